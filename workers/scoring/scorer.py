"""The scorer: a batch of records in, a batch of results and a batch of rejected rows out.

Shared by every mode. Two stages, so a mode can enter at the second one:

1. ``Scorer.features(batch)``: Arrow columns -> a float64 matrix in the model's feature order plus a reason
   for each row that cannot be scored (``workers.scoring.features``: converted as LightGBM's pandas path does).
2. ``Scorer.finish(...)``: predict the good rows and assemble the result and error tables.

A bad row never fails the batch; a batch missing a feature column does (``InputError``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import ConfigError, InputError
from workers.scoring.features import Features, feature_matrix, is_text, missing_features, plain
from workers.scoring.model import Model

ERROR_FIELDS = [("reason", pa.string()), ("raw", pa.string())]
PASSTHROUGH_SETTING = "SCORING_SCORING__PASSTHROUGH"

# Columns we write, by the mode that writes them. A passthrough column of the same name would replace ours
# (the input's old score, or model_version, which is half the upsert key), so such names are refused at
# start-up, compared case-insensitively (SQLite's column names are, and a reader should not have to care).
# One set for every mode: modes share settings (one ConfigMap), and a name fine in batch would break stream.
RESULT_COLUMNS = frozenset({"id", "score", "label", "scores", "model_version", "scored_at", "served",
                            "explanation", "explanation_base"})
ERROR_COLUMNS = frozenset({"id", "reason", "raw", "model_version", "scored_at", "source"})
RESERVED_BY_MODE: dict[str, frozenset[str]] = {
    "batch": RESULT_COLUMNS | ERROR_COLUMNS | {"input_file"},  # input_file: the table sinks' unit column
    "stream": RESULT_COLUMNS | ERROR_COLUMNS | {"topic", "partition", "offset", "timestamp"},
    "serve": RESULT_COLUMNS | ERROR_COLUMNS | {"topic", "partition", "offset", "__row"},
}
RESERVED_COLUMNS: frozenset[str] = frozenset().union(*RESERVED_BY_MODE.values())
RESERVED_PREFIXES = ("explanation", "__")  # explanation_*: ours to add; __*: internal (serve's __row)


def reserved_column(name: str) -> bool:
    """Is ``name`` (any case) one of the columns the workers write, in any mode?"""
    low = name.casefold()
    return low in RESERVED_COLUMNS or low.startswith(RESERVED_PREFIXES)


def check_passthrough(passthrough: list[str], id_column: str = "id") -> None:
    """Raise ConfigError (naming SCORING_SCORING__PASSTHROUGH) when a passthrough column would replace one of
    ours or another passthrough column: a reserved name, or the same name twice in any case."""
    clash = [c for c in passthrough if reserved_column(c)]
    if clash:
        shown = ", ".join(repr(c) for c in clash)
        hint = (f" (the results' 'id' holds the id column {id_column!r})"
                if any(c.casefold() == "id" for c in clash) and id_column.casefold() != "id" else "")
        raise ConfigError(PASSTHROUGH_SETTING, f"{shown}: named like a column the workers write "
                          f"({', '.join(sorted(RESERVED_COLUMNS))}, explanation*, __*){hint}; it would replace "
                          "ours. Rename the input column, or leave it out")
    seen: dict[str, str] = {}
    for c in passthrough:
        if c.casefold() in seen:
            raise ConfigError(PASSTHROUGH_SETTING, f"{seen[c.casefold()]!r} and {c!r} are one column to a table "
                                                   "sink (names compare case-insensitively); list it once")
        seen[c.casefold()] = c


@dataclass
class Scored:
    results: pa.Table
    errors: pa.Table  # id, reason, raw (JSON of the input values), model_version, scored_at, carried columns
    error_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # their row indices in the input
    # (source, model_version) of records whose earlier rejection is settled by these results: table sinks delete
    # those error rows in the same transaction (serve: an event rejected once, redelivered and now scored).
    resolved: list[tuple[str, str]] = field(default_factory=list)

    def with_error_sources(self, sources: list[str]) -> Scored:
        """Add the ``source`` column (a stable locator such as ``file#row`` or ``topic/p@offset``) to errors.

        It keys rejected rows in table sinks, so a rewrite replaces them instead of adding copies.
        """
        errors = self.errors.append_column("source", pa.array(sources, pa.string()))
        return Scored(self.results, errors, self.error_rows)

    @property
    def num_results(self) -> int:
        """Result rows (shadow versions' rows included)."""
        return self.results.num_rows

    @property
    def num_errors(self) -> int:
        """Rejected records (rows of ``errors``)."""
        return self.errors.num_rows


def _now() -> pa.Scalar:
    return pa.scalar(dt.datetime.now(dt.UTC), type=pa.timestamp("us", tz="UTC"))


def _bytes_text(b: bytes) -> str:
    """Bytes as text: themselves when UTF-8, else ``\\x`` + hex (PostgreSQL's bytea text form)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "\\x" + b.hex()


def _json_default(v):
    if isinstance(v, bytes | bytearray | memoryview):
        return _bytes_text(bytes(v))
    return str(v)  # Decimal, timedelta, an int beyond 64 bits...


def to_json(value) -> str:
    """JSON text of input values (the errors' ``raw`` column) whatever their Arrow type: never raises."""
    try:
        return orjson.dumps(value, default=_json_default).decode()
    except (orjson.JSONEncodeError, TypeError):  # e.g. an integer beyond 64 bits nested where default is not called
        import json

        return json.dumps(value, default=_json_default)


def error_ids(ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Ids of rejected rows as text, for the errors output, whatever the id column's type (a file's ids may
    be binary, integers, lists...): text as is, binary as UTF-8 or ``\\x`` hex, what Arrow can cast to text
    as cast, anything else as JSON. Null stays null."""
    ids = plain(ids)
    t = ids.type
    if is_text(t):
        return pc.cast(ids, pa.string())
    if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)):
        try:
            return pc.cast(ids, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
        return pa.array([None if v is None else to_json(v) for v in ids.to_pylist()], pa.string())
    return pa.array([None if v is None else _bytes_text(v) for v in ids.to_pylist()], pa.string())


class Scorer:
    """Scores batches with one model. Thread-safe for concurrent ``score`` calls (no shared state)."""

    def __init__(self, model: Model, id_column: str = "id", passthrough: list[str] | None = None,
                 explain: str = "none", explain_top_k: int = 5):
        self.model = model
        self.id_column = id_column
        self.passthrough = list(passthrough or [])
        check_passthrough(self.passthrough, id_column)
        self.explain = explain
        self.explain_top_k = explain_top_k
        # Called with the matrix of the rows about to be predicted (drift tracking in batch and serve modes).

    @classmethod
    def from_settings(cls, model: Model, scoring) -> Scorer:
        """The scorer every mode uses, from the ``scoring`` settings group."""
        return cls(model, scoring.id_column, scoring.passthrough, scoring.explain, scoring.explain_top_k)

    # -- stage 1 ---------------------------------------------------------------------------------
    def check_columns(self, names: list[str] | pa.Schema) -> None:
        """Raise InputError when the id, a feature or a passthrough column is missing."""
        present = set(names.names if isinstance(names, pa.Schema) else names)
        missing = [c for c in self.model.feature_names if c not in present]
        if missing:
            raise InputError(missing_features(missing, present))
        for col in [self.id_column, *self.passthrough]:
            if col not in present:
                raise InputError(f"missing column '{col}'")

    def good_matrix(self, feats: Features) -> np.ndarray:
        """The rows that can be scored, C-contiguous (what predict takes)."""
        if not feats.reasons:
            return feats.matrix
        keep = np.ones(feats.matrix.shape[0], dtype=bool)
        keep[list(feats.reasons)] = False
        return np.ascontiguousarray(feats.matrix[keep])

    def features_only(self, batch: pa.RecordBatch | pa.Table) -> np.ndarray:
        """The feature matrix of a batch without an id column (reference data for profiles); bad values -> NaN."""
        names = self.model.feature_names
        missing = [c for c in names if c not in batch.schema.names]
        if missing:
            raise InputError(f"missing feature column(s) {missing[:10]}")
        with_id = batch.append_column(self.id_column, pa.array(range(batch.num_rows))) \
            if self.id_column not in batch.schema.names else batch
        feats = self.features(with_id)
        return feats.matrix

    def features(self, batch: pa.RecordBatch | pa.Table) -> Features:
        self.check_columns(batch.schema)
        feats = feature_matrix(self.model, batch)
        ids = batch.column(self.id_column)
        if ids.null_count:
            for i in np.flatnonzero(np.asarray(pc.is_null(ids))):
                feats.reasons.setdefault(int(i), f"missing id ('{self.id_column}' is null)")
        return feats

    # -- stage 2 ---------------------------------------------------------------------------------
    def finish(
        self,
        ids: pa.Array | pa.ChunkedArray,
        feats: Features,
        carry: dict[str, pa.Array | pa.ChunkedArray] | None = None,
        raw_rows: list[dict] | None = None,
        predictions: np.ndarray | None = None,
        served: bool = True,
    ) -> Scored:
        """Predict the rows without a reason and build the result and error tables.

        ``carry`` columns (passthrough values, source topic/partition/offset, file and row) go with
        each row into results and errors. ``raw_rows`` gives the input values for the errors' ``raw``
        column; when absent it is built from ``carry`` and the matrix. ``predictions`` of the good rows,
        when given (serve mode batches several requests into one predict call), replace predicting here.
        ``served`` is False for a shadow version's rows (stored, never the answer).
        """
        carry = carry or {}
        n = feats.matrix.shape[0]
        version = pa.scalar(self.model.version, pa.string())
        now = _now()
        if feats.reasons:
            bad_idx = np.fromiter(sorted(feats.reasons), dtype=np.int64)
            good = np.ones(n, dtype=bool)
            good[bad_idx] = False
            good_idx = pa.array(np.flatnonzero(good))
            matrix = np.ascontiguousarray(feats.matrix[good])
            take = lambda col: col.take(good_idx)  # noqa: E731
        else:
            bad_idx = np.empty(0, dtype=np.int64)
            matrix = feats.matrix
            take = lambda col: col  # noqa: E731
        m = matrix.shape[0]
        cols: dict[str, pa.Array | pa.ChunkedArray] = {"id": take(ids)}
        if predictions is not None:
            pred = predictions
        elif m:
            pred = self.model.predict(matrix)
        else:
            pred = np.empty((0, self.model.num_class) if self.model.multiclass else 0)
        if self.model.multiclass:
            cols["score"] = pa.array(pred.max(axis=1))
            cols["label"] = pa.array(pred.argmax(axis=1).astype(np.int32))
            cols["scores"] = pa.FixedSizeListArray.from_arrays(pa.array(pred.ravel()), self.model.num_class).cast(
                pa.list_(pa.float64())
            )
        else:
            cols["score"] = pa.array(pred, type=pa.float64())
        cols["model_version"] = pa.repeat(version, m)
        cols["scored_at"] = pa.repeat(now, m)
        cols["served"] = pa.repeat(pa.scalar(served), m)
        if self.explain != "none":
            from workers.scoring.explain import explanation_columns

            classes = pred.argmax(axis=1) if self.model.multiclass else None
            cols.update(explanation_columns(self.model, matrix, classes,
                                            self.explain_top_k if self.explain == "top" else None))
        for name, col in carry.items():
            cols[name] = take(col)
        results = pa.table(cols)
        errors = self._errors(ids, feats, bad_idx, carry, raw_rows, version, now)
        return Scored(results, errors, bad_idx)

    def _errors(self, ids, feats, bad_idx, carry, raw_rows, version, now) -> pa.Table:
        idx = pa.array(bad_idx, type=pa.int64())
        reasons = [feats.reasons[int(i)] for i in bad_idx]
        if raw_rows is not None:
            raws = [to_json(raw_rows[int(i)]) for i in bad_idx]
        else:
            raws = [self._raw_from_matrix(feats.matrix[int(i)]) for i in bad_idx]
        cols: dict[str, pa.Array] = {
            "id": error_ids(ids.take(idx)),
            "reason": pa.array(reasons, pa.string()),
            "raw": pa.array(raws, pa.string()),
            "model_version": pa.repeat(version, len(bad_idx)),
            "scored_at": pa.repeat(now, len(bad_idx)),
        }
        for name, col in carry.items():
            cols[name] = col.take(idx)
        return pa.table(cols)

    def _raw_from_matrix(self, row: np.ndarray) -> str:
        values = {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.model.feature_names, row, strict=True)}
        return orjson.dumps(values).decode()

"""The scorer: a batch of records in, a batch of results and a batch of rejected rows out.

Shared by every mode. Two stages, so a mode can enter at the second one:

1. ``Scorer.features(batch)``: Arrow columns -> a float64 matrix in the model's feature order
   (null -> NaN, which LightGBM treats as missing; categorical values -> the model's category codes)
   plus a reason for each row that cannot be scored (e.g. a string that is not a number). The conversion of
   one column is ``model_values``, which every mode uses (serve's OIP tensors too), so a value scores the same
   whatever its physical type: the contract is LightGBM's own predict on the equivalent pandas frame
   (``tests/test_differential.py``).
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
class Features:
    matrix: np.ndarray  # float64 [n, n_features], C order
    reasons: dict[int, str] = field(default_factory=dict)  # row index -> why it cannot be scored


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
    def ok(self) -> int:
        return self.results.num_rows

    @property
    def rejected(self) -> int:
        return self.errors.num_rows


def _now() -> pa.Scalar:
    return pa.scalar(dt.datetime.now(dt.UTC), type=pa.timestamp("us", tz="UTC"))


def _plain(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


_NUMBER_TEXT = r"(?i)^[ \t\n\r\f\v]*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|inf|infinity|nan)[ \t\n\r\f\v]*$"


def _floats(name: str, col: pa.Array | pa.ChunkedArray, reasons: dict[int, str] | None) -> np.ndarray:
    """Values as float64 (null -> NaN), as LightGBM's pandas path converts a frame: every integer, float,
    decimal and boolean type is cast, integers beyond 2**53 rounded to the nearest float64 like numpy does.

    Text is parsed as a number as strictly as ``pandas.to_numeric``: ASCII digits, an optional sign, point and
    exponent, surrounding spaces; ``"inf"`` is infinity, ``"nan"`` is missing, like the float values they
    spell; ``"1_000"``, non-ASCII digits, ``"nan(1)"``, ``"0x10"`` are not numbers. A text that is not a
    number gets a reason in ``reasons`` (its row is rejected), or is missing when ``reasons`` is None (a
    category value the model has not seen). Other types (lists, timestamps, binary...) are not numbers:
    InputError, the whole batch (file) fails.
    """
    t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), np.nan)
    if _is_number(t):
        # safe=False: an int64/uint64 beyond 2**53 has no exact float64; a safe cast refuses it, numpy and
        # LightGBM round it.
        return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    if not _is_text(t):
        raise InputError(f"feature column '{name}' has type {t}, which is not numeric")
    # What a number may look like, as pandas.to_numeric takes it: ASCII digits only (no "1_000", no "٣"),
    # surrounding spaces allowed, "inf"/"infinity"/"nan" in any case, nothing else ("nan(1)", "0x10").
    text = pc.cast(col, pa.string())
    try:  # fast path: Arrow parses the whole column, or raises if any value is not a number for it
        fast = np.array(pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fast = None
    if fast is not None:
        # Arrow is stricter than pandas but for one thing: it reads "nan(1)" (any "nan(...)") as NaN.
        odd = np.flatnonzero(np.isnan(fast))
        if not odd.size or pc.all(pc.match_substring_regex(text.take(pa.array(odd)), _NUMBER_TEXT)).as_py():
            return fast
    valid = pc.match_substring_regex(text, _NUMBER_TEXT)
    bad = pc.invert(pc.fill_null(valid, True))
    if pc.any(bad).as_py():
        bad_idx = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        if reasons is not None:
            for i in bad_idx:
                raw = text[int(i)].as_py()
                reasons.setdefault(int(i), f"feature '{name}': {raw[:80]!r} is not a number")
        text = pc.if_else(valid, text, pa.scalar(None, pa.string()))
    values = pc.cast(pc.utf8_trim_whitespace(text), pa.float64()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64)  # writable (a zero-copy Arrow view is not)


def _category_codes(name: str, col: pa.Array | pa.ChunkedArray, categories: list) -> np.ndarray:
    """Each value's position in the model's category list (NaN for null or a category the model has not seen,
    as LightGBM's pandas path does), whatever the column's type: numeric categories are matched as numbers
    (so 5, 5.0, "5", Decimal("5.00") are all the category 5), text categories as text."""
    value_set = pa.array(categories)
    vt = value_set.type
    if pa.types.is_integer(vt) and pa.types.is_integer(col.type):
        # Integers compare exactly (through a decimal wide enough for any int64/uint64): via float64,
        # neighbours beyond 2**53 would be one category.
        wide = pa.decimal128(38, 0)
        col, value_set = pc.cast(col, wide), pc.cast(value_set, wide)
    elif pa.types.is_integer(vt) or pa.types.is_floating(vt):
        values = pa.array(_floats(name, col, None), from_pandas=True)  # NaN -> null: no category
        value_set = pc.cast(value_set, pa.float64(), safe=False)
        col = values
    elif _is_text(col.type) or _is_number(col.type) or pa.types.is_null(col.type):
        try:
            col, value_set = pc.cast(col, pa.string()), pc.cast(value_set, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"categorical feature column '{name}' has type {col.type}, which cannot hold its "
                             f"categories ({vt})") from None
    else:
        raise InputError(f"categorical feature column '{name}' has type {col.type}, which cannot hold its "
                         f"categories ({vt})")
    codes = pc.index_in(col, value_set=value_set)
    return pc.cast(codes, pa.float64()).to_numpy(zero_copy_only=False)


def model_values(model: Model, j: int, values, reasons: dict[int, str]) -> np.ndarray:
    """Feature ``j``'s values (an Arrow array or chunked array, a numpy array, or a list) -> what the model's
    predict takes for it: float64, NaN for missing, a pandas-categorical feature's values replaced by their
    positions in its category list. The one conversion every mode uses, so the same value scores the same
    whatever the physical type it arrives in. Rows that cannot be scored get a reason in ``reasons`` (by
    index); a column of a type that cannot hold the feature raises InputError."""
    name = model.feature_names[j]
    if isinstance(values, pa.Array | pa.ChunkedArray):
        col = values
    else:
        try:
            col = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"feature '{name}': values of mixed or unsupported types ({str(exc)[:80]})") from None
    col = _plain(col)
    cats = model.categorical.get(j)
    if cats is not None:
        return _category_codes(name, col, cats)
    return _floats(name, col, reasons)  # numeric, or a categorical_feature given by integer code (used as is)


def _lightgbm_name(column: str) -> str:
    """The feature name LightGBM gives an input column: it replaces each space with '_' (``days since`` ->
    ``days_since``); it refuses JSON special characters, so no other name changes."""
    return column.replace(" ", "_")


def missing_features(missing: list[str], present) -> str:
    """The one-line reason for missing feature columns. A column LightGBM renamed when the model was trained
    (``days since`` saved as ``days_since``) is named, with what to do: the input is not renamed silently, as
    both spellings may be columns of one input."""
    shown = ", ".join(repr(c) for c in missing[:10])
    message = f"missing feature column(s) {shown}{' ...' if len(missing) > 10 else ''}"
    renamed: dict[str, str] = {}
    for c in present:
        if isinstance(c, str) and _lightgbm_name(c) != c:
            renamed.setdefault(_lightgbm_name(c), c)
    hints = [f"the input has {renamed[c]!r} for {c!r}" for c in missing if c in renamed]
    if hints:
        message += (f" ({'; '.join(hints[:10])}: LightGBM replaced spaces in feature names with '_' when the "
                    "model was trained; rename the column)")
    return message


def feature_matrix(model: Model, columns) -> Features:
    """Columns by feature name (a mapping, or an Arrow table/batch) -> the model's float64 matrix in feature
    order, with a reason for each row that cannot be scored. Raises InputError when a feature is missing."""
    names = model.feature_names
    present = set(columns.schema.names if hasattr(columns, "schema") else columns)
    missing = [c for c in names if c not in present]
    if missing:
        raise InputError(missing_features(missing, present))
    get = columns.column if hasattr(columns, "schema") else columns.__getitem__
    n = columns.num_rows if hasattr(columns, "schema") else len(get(names[0])) if names else 0
    matrix = np.empty((n, len(names)), dtype=np.float64)
    reasons: dict[int, str] = {}
    for j, name in enumerate(names):
        matrix[:, j] = model_values(model, j, get(name), reasons)
    return Features(matrix, reasons)


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
    ids = _plain(ids)
    t = ids.type
    if _is_text(t):
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

"""What the table sinks (PostgreSQL, MariaDB, SQLite) share: on the Arrow side, before any SQL, and the batch
unit of the server-backed ones (``TransactionUnit``).

- ``dedupe_last``: one row per key within one write, the *later* row kept, as the README promises; the caller
  counts the dropped rows. Later means: input order (batch); for rows carrying ``topic``, ``partition`` and
  ``offset`` (stream, serve) the higher offset within one topic-partition, and across partitions (whose offsets
  are unrelated) the later record ``timestamp``, or input order when a timestamp is missing.
- ``POSITION``: the columns locating a stream row in its topic-partition; table sinks upsert such rows only over
  a stored row that is not newer in the same partition (a zombie worker's stale write never wins).
- ``plain``: the value type a column really holds (dictionary decoded, views and extensions to their
  ordinary types), so type mapping looks at a small set of families.
- ``json_texts``: values as JSON text, per row, with a reason for a value JSON cannot hold (never a
  traceback). Documented mapping for values JSON has no type for: decimal -> number (exact digits), bytes ->
  base64 text, duration -> seconds (number), month-day-nano interval -> {"months", "days", "nanoseconds"},
  NaN/infinity -> null (orjson's choice; JSON has no such numbers), map -> object when every key is text,
  else a list of [key, value] pairs.
- ``is_json``: a column of JSON text (``arrow.json``, e.g. passthrough values of mixed JSON types): each
  sink stores the values it holds, parsed (PostgreSQL jsonb, SQLite the value itself, Kafka the JSON in the
  message), never the text as a JSON string.
- ``UNIT_COLUMN``: the column naming the unit (input file) a batch row came from, so a rewritten unit can
  replace all of its old results and errors.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.sinks.base import UnitWriter

#: set on every row written through ``Sink.begin(unit)`` (batch); NULL for stream/serve rows
UNIT_COLUMN = "input_file"
RESULT_KEY = ("id", "model_version")  # results' primary key in every table sink
ERROR_KEY = ("source", "model_version")  # rejected rows' primary key
#: where a stream (or serve) row's record sits: rows with these columns are ordered by them, not by input order
POSITION = ("topic", "partition", "offset")


def is_listlike(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            or pa.types.is_list_view(t) or pa.types.is_large_list_view(t))


def is_uuid(t: pa.DataType) -> bool:
    return isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.uuid"


def is_json(t: pa.DataType) -> bool:
    """JSON text (Arrow's canonical ``arrow.json`` extension): values to store parsed, not as strings."""
    return isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.json"


def json_column(texts: list[str | None]) -> pa.ExtensionArray:
    """JSON texts as an ``arrow.json`` column (what ``records.passthrough_array`` gives mixed values)."""
    return pa.ExtensionArray.from_storage(pa.json_(), pa.array(texts, pa.string()))


def plain(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """The column as an ordinary Arrow type: dictionary decoded, string/binary views as string/binary,
    float16 as float32, extension types (other than uuid, which the sinks map) as their storage."""
    t = col.type
    if pa.types.is_dictionary(t):
        return plain(col.cast(t.value_type))
    if pa.types.is_string_view(t):
        return col.cast(pa.large_string())
    if pa.types.is_binary_view(t):
        return col.cast(pa.large_binary())
    if pa.types.is_float16(t):
        return col.cast(pa.float32())
    if isinstance(t, pa.BaseExtensionType) and not is_uuid(t):
        storage = col.storage if isinstance(col, pa.Array) else pa.chunked_array(
            [c.storage for c in col.chunks], t.storage_type)
        return plain(storage)
    return col


def dedupe_last(table: pa.Table, key: Iterable[str]) -> tuple[pa.Table, list[int] | None]:
    """(table with one row per key, the kept rows' indices in ``table`` or None when nothing was dropped).

    The later row of each key wins: the last in input order, except for rows carrying ``POSITION`` (see
    ``_newest``). Arrow's group_by cannot hash every type (lists, structs as ids): those keys fall back to
    Python values."""
    key = [k for k in key if k in table.column_names]
    n = table.num_rows
    if n < 2 or not key:
        return table, None
    positioned = all(c in table.column_names for c in POSITION)
    try:
        probe = pa.table({k: plain(table.column(k)) for k in key}).append_column("__row", pa.array(np.arange(n)))
        last = probe.group_by(key, use_threads=False).aggregate([("__row", "max")])["__row_max"]
        if len(last) == n:
            return table, None
        if positioned:
            rows = probe.group_by(key, use_threads=False).aggregate([("__row", "list")])["__row_list"].to_pylist()
            keep = sorted(_newest(table, group) if len(group) > 1 else group[0] for group in rows)
        else:
            keep = sorted(last.to_pylist())
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowInvalid):
        seen: dict[bytes, list[int]] = {}
        columns = [table.column(k).to_pylist() for k in key]
        for i, values in enumerate(zip(*columns, strict=True)):
            seen.setdefault(orjson.dumps(list(values), default=json_default), []).append(i)
        if len(seen) == n:
            return table, None
        keep = sorted(group[-1] if not positioned or len(group) == 1 else _newest(table, group)
                      for group in seen.values())
    return table.take(pa.array(keep, pa.int64())), keep


def _newest(table: pa.Table, rows: list[int]) -> int:
    """Of these rows (one key, several records), the newest record's: within one topic-partition the highest
    offset (equal offsets: the later row); across partitions, whose offsets are unrelated, the later record
    ``timestamp``, or the later row in input order when a timestamp is missing (or equal)."""
    rows = sorted(rows)
    take = pa.array(rows, pa.int64())
    topics, partitions, offsets = (table.column(c).take(take).to_pylist() for c in POSITION)
    best: dict[tuple, int] = {}  # (topic, partition) -> position in ``rows`` of its highest offset
    for j, (topic, partition, offset) in enumerate(zip(topics, partitions, offsets, strict=True)):
        if topic is None or partition is None or offset is None:
            best[("row", j)] = j  # no position: a partition of its own
            continue
        b = best.get((topic, partition))
        if b is None or offsets[b] <= offset:
            best[(topic, partition)] = j
    survivors = sorted(best.values())
    if len(survivors) == 1:
        return rows[survivors[0]]
    stamps: list | None = None
    if "timestamp" in table.column_names:
        col = plain(table.column("timestamp"))
        if pa.types.is_timestamp(col.type):
            stamps = col.take(take).cast(pa.int64()).to_pylist()
            if any(stamps[j] is None for j in survivors):
                stamps = None
    if stamps is None:
        return rows[survivors[-1]]
    return rows[max(survivors, key=lambda j: (stamps[j], j))]


def json_default(value: object) -> object:
    """orjson's fallback for values JSON has no type for (the documented mapping in the module docstring)."""
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return orjson.Fragment(format(value, "f"))
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.timedelta):
        # pandas' Timedelta (what Arrow returns for ns durations) keeps nanoseconds in .value
        ns = getattr(value, "value", None)
        return ns / 1e9 if isinstance(ns, int) else value.total_seconds()
    if isinstance(value, pa.MonthDayNano):
        return {"months": value.months, "days": value.days, "nanoseconds": value.nanoseconds}
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int):  # beyond 64 bits: exact digits
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _mapish(t: pa.DataType, v: object) -> object:
    """Arrow gives maps as lists of (key, value) tuples: an object when every key is text."""
    if isinstance(v, list) and all(isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in v):
        return dict(v)
    return v


def json_texts(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[list[str | None], dict[int, str]]:
    """Each value as JSON text (None stays None) and, per row that cannot be written, the reason."""
    col = plain(col)
    values = col.to_pylist()
    is_map = pa.types.is_map(col.type)
    out: list[str | None] = []
    bad: dict[int, str] = {}
    dumps = orjson.dumps
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(dumps(_mapish(col.type, v) if is_map else v, default=json_default).decode())
        except (TypeError, orjson.JSONEncodeError) as exc:
            out.append(None)
            bad[i] = f"column {name!r}: the value has no JSON form ({exc})"
    return out, bad


def nul_rows(name: str, col: pa.ChunkedArray | pa.Array, what: str) -> dict[int, str]:
    """Rows whose text holds a NUL character, which PostgreSQL text and jsonb cannot store."""
    col = plain(col)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return {}
    hit = pc.match_substring(col, "\x00")
    if not pc.any(hit).as_py():
        return {}
    return {i: f"column {name!r}: {what} cannot hold the NUL character (\\x00) in this text"
            for i, h in enumerate(hit.to_pylist()) if h}


def missing_keys(table: pa.Table, key: Iterable[str]) -> dict[int, str]:
    """Rows with a null in a key column (keys cannot be null)."""
    bad: dict[int, str] = {}
    for k in key:
        if k in table.column_names and table.column(k).null_count:
            for i, valid in enumerate(pc.is_valid(table.column(k)).to_pylist()):
                if not valid:
                    bad.setdefault(i, f"{k} is missing (null); rows are stored by ({', '.join(key)})")
    return bad


def with_unit(table: pa.Table, unit: str | None, setting: str) -> pa.Table:
    """The table with ``UNIT_COLUMN`` set to ``unit`` (batch writes); unchanged for stream/serve writes."""
    if unit is None:
        return table
    if UNIT_COLUMN in table.column_names:
        raise ConfigError(setting, f"a column named {UNIT_COLUMN!r} (a passthrough?) clashes with the column "
                                   "table outputs use for the input file of each row; rename it")
    return table.append_column(UNIT_COLUMN, pa.array([unit] * table.num_rows, pa.string()))


class TransactionalSink(Protocol):
    """What ``TransactionUnit`` needs of a server-backed table sink (PostgreSQL, MariaDB)."""

    name: str
    duplicates_collapsed: int

    def _store(self, scored: Scored, unit: str | None, first: bool = False) -> int: ...
    def _rollback(self) -> None: ...
    def _commit(self, what: str) -> None: ...


class TransactionUnit(UnitWriter):
    """One batch unit of a server-backed table sink: one transaction that first deletes the unit's old rows (the
    sink's ``_store`` with ``first``), then every write, then commit. Columns the table cannot hold fail this
    input alone (``InputError``); after any failure the unit refuses further writes."""

    def __init__(self, sink: TransactionalSink, unit: str):
        self.sink, self.unit = sink, unit
        self.started = self.failed = False
        self.collapsed = 0

    def write(self, scored: Scored) -> None:
        if self.failed:
            raise SinkError(f"writing {self.unit} to {self.sink.name}: an earlier write of this unit failed")
        try:
            self.collapsed += self.sink._store(scored, self.unit, first=not self.started)
        except ConfigError as exc:  # columns this table cannot hold: this input fails alone, the run goes on
            self.failed = True
            self.sink._rollback()
            raise InputError(str(exc)) from None
        except BaseException:
            self.failed = True
            raise
        self.started = True

    def commit(self) -> None:
        if not self.started:  # an emptied input: its old rows still go
            self.write(Scored(pa.table({}), pa.table({})))
        self.sink._commit("writing results")
        self.sink.duplicates_collapsed += self.collapsed

    def abort(self) -> None:
        self.sink._rollback()


def keyed_rows(scored: Scored, unit: str | None, setting: str) -> tuple[pa.Table, list[int] | None, pa.Table]:
    """A write's results and errors as a keyed table sink stores them: rows without a key refused
    (``RowsRejected``, one by one, before duplicates collapse), the unit column added, errors without a locator
    keyed by their id, and rows with the same key collapsed to the later one (``keep``: the kept rows' indices
    in the input, None when none was dropped)."""
    missing = missing_keys(scored.results, RESULT_KEY)
    if missing:
        raise RowsRejected(missing)
    results = with_unit(scored.results, unit, setting)
    errors = scored.errors
    if errors.num_rows and "source" not in errors.column_names:
        # Rows without a locator (a mode that does not set one): keyed by their id instead.
        ids = errors.column("id").to_pylist() if "id" in errors.column_names else [None] * errors.num_rows
        errors = errors.append_column("source", pa.array([f"id:{i}" for i in ids], pa.string()))
    errors = with_unit(errors, unit, setting)
    results, keep = dedupe_last(results, RESULT_KEY)
    errors, _ = dedupe_last(errors, ERROR_KEY)
    return results, keep, errors

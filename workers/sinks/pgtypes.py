"""Arrow types -> PostgreSQL column types, and Arrow columns -> the CSV text COPY reads.

Mapping (what a new column gets; ``format_type`` spelling, so it compares with the catalog):
    int8..int64, uint8..uint32 -> bigint        uint64, decimal128/256 -> numeric (exact)
    float16/32/64 -> double precision           bool -> boolean
    string, large_string, string_view -> text   binary, large/fixed-size binary, binary_view -> bytea
    uuid (extension) -> uuid                    date32/64 -> date; time32/64 -> time (microseconds)
    timestamp, with or without tz -> timestamptz (no tz: read as UTC; microseconds)
    duration, month_day_nano interval -> interval (microseconds)
    list / large / fixed-size list of floats -> double precision[] (nulls kept)
    other lists, struct, map -> jsonb (see ``tables.json_texts`` for values JSON has no type for)
    null -> text; ``raw``/``explanation`` text -> jsonb (they hold JSON)
A column that already exists with another type (a passthrough whose type changes between files or
records, an id that is int in one file and text in another) is widened once to the join of both
(``join``): numbers of different kinds -> numeric; other mixes -> jsonb (an id column: text). Values
are then written in the column's type.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from workers.sinks.tables import is_listlike, is_uuid, json_texts, nul_rows, plain

JSON_COLUMNS = {"raw", "explanation"}
NUMBERS = {"bigint", "numeric", "double precision"}
# How an existing column is converted when widened to each type.
USING = {"numeric": "{c}::numeric", "text": "{c}::text", "jsonb": "to_jsonb({c})"}


def pg_type(t: pa.DataType, name: str = "") -> str:
    if pa.types.is_dictionary(t):
        return pg_type(t.value_type, name)
    if name in JSON_COLUMNS and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return "jsonb"
    if is_uuid(t):
        return "uuid"
    if isinstance(t, pa.BaseExtensionType):
        return pg_type(t.storage_type, name)
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_uint64(t) or pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_floating(t):
        return "double precision"
    if pa.types.is_timestamp(t):
        return "timestamp with time zone"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time without time zone"
    if pa.types.is_duration(t) or pa.types.is_interval(t):
        return "interval"
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)):
        return "bytea"
    if is_listlike(t) and pa.types.is_floating(t.value_type):
        return "double precision[]"
    if is_listlike(t) or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_union(t):
        return "jsonb"
    return "text"


def join(a: str, b: str, key: bool = False) -> str:
    """The narrowest type holding values of both ``a`` and ``b``: numbers of different kinds -> numeric;
    other mixes -> jsonb (numbers stay numbers, text stays text), or text for key columns (ids compare as
    text)."""
    if a == b:
        return a
    if a in NUMBERS and b in NUMBERS:
        return "numeric"
    return "text" if key else "jsonb"


def _float_text(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(v)


def _array_literal(values: list) -> str:
    return "{" + ",".join("NULL" if x is None else _float_text(float(x)) for x in values) + "}"


def _interval_text(col: pa.ChunkedArray | pa.Array) -> list[str | None]:
    t = col.type
    if pa.types.is_duration(t):
        per_us = {"s": 1_000_000, "ms": 1000, "us": 1, "ns": None}[t.unit]
        counts = pc.cast(col, pa.int64()).to_pylist()
        return [None if c is None else f"{c * per_us if per_us else c // 1000} microseconds" for c in counts]
    if t == pa.month_day_nano_interval():
        return [None if v is None else f"{v.months} months {v.days} days {v.nanoseconds // 1000} microseconds"
                for v in col.to_pylist()]
    return [None if v is None else str(v) for v in col.to_pylist()]  # month / day_time intervals


def _text(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array | pa.ChunkedArray, dict[int, str]]:
    """Any column as text: strings as they are, primitives as Arrow prints them, others as JSON."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col, nul_rows(name, col, "PostgreSQL text")
    if pg_type(t) == "bytea":
        return pa.array([None if v is None else "\\x" + v.hex() for v in col.to_pylist()], pa.string()), {}
    if pg_type(t) == "interval":
        return pa.array(_interval_text(col), pa.string()), {}
    if pg_type(t) == "uuid":
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string()), {}
    try:
        return pc.cast(col, pa.string()), {}
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        texts, bad = json_texts(name, col)
        return pa.array(texts, pa.string()), bad


def csv_column(name: str, col: pa.ChunkedArray | pa.Array, target: str) -> tuple[pa.Array | pa.ChunkedArray,
                                                                                 dict[int, str]]:
    """The column as values Arrow's CSV writer prints the way COPY reads them into a ``target`` column,
    and the rows that cannot be (row index -> reason)."""
    col = plain(col)
    own = pg_type(col.type, name)
    if target == "jsonb":
        if own == "jsonb" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            return col, nul_rows(name, col, "PostgreSQL jsonb")  # already JSON text (raw, explanation)
        texts, bad = json_texts(name, col)
        for i, reason in nul_rows(name, col, "PostgreSQL jsonb").items():  # jsonb refuses \u0000 too
            bad.setdefault(i, reason)
        return pa.array(texts, pa.string()), bad
    if target == "text":
        return _text(name, col)
    if target == "double precision[]" and is_listlike(col.type):
        return pa.array([None if v is None else _array_literal(v) for v in col.to_pylist()], pa.string()), {}
    if target == "bytea" and own == "bytea":
        return _text(name, col)
    if target == "uuid" and own == "uuid":
        return _text(name, col)
    if target == "interval" and own == "interval":
        return pa.array(_interval_text(col), pa.string()), {}
    if target == "timestamp with time zone" and pa.types.is_timestamp(col.type) and col.type.tz is None:
        return pc.assume_timezone(col, "UTC"), {}
    if target in ("numeric", "double precision") and pa.types.is_floating(col.type):
        # Arrow prints nan/inf, which numeric reads only in some spellings: write PostgreSQL's own
        if pc.any(pc.invert(pc.is_finite(col))).as_py():
            return pa.array([None if v is None else _float_text(v) for v in col.to_pylist()], pa.string()), {}
        return col, {}
    if own == target or (target == "numeric" and own in NUMBERS):
        return col, {}
    # A type the join rules never pair (a column widened by another writer meanwhile): let the server
    # read the text; rows it refuses are found and rejected one by one.
    return _text(name, col)

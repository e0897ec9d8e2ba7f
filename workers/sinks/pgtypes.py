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
    JSON text (the ``arrow.json`` extension: passthrough values of mixed JSON types) -> jsonb, parsed (so a
    number stays a number, text a JSON string, integers beyond 64 bits exact numerics), never a JSON string
Nanoseconds (``exact_columns``): timestamptz, time and interval hold microseconds. A ns timestamp, time or
duration column (or month-day-nano interval) whose values in a write are all whole microseconds is stored in
those types, exactly. When any value is not, the column of that write is text instead, so distinct values stay
distinct and read back exactly: PostgreSQL's own text spelling (session TimeZone UTC) with up to 9 fraction
digits: ``2026-01-02 03:04:05.123456789+00``, ``03:04:05.000000001``, ``-00:00:01.000000001`` (durations as
[-]hours:minutes:seconds), month-day-nano ``N mons N days HH:MM:SS.fffffffff``. An existing column of the
temporal type is then widened: an id to text (its old values cast ``::text``, the same spelling, so a rewrite
matches them), a passthrough to jsonb (values as JSON strings). Any temporal value written into a text or
jsonb column uses this spelling (ISO ``T`` and ``+00:00`` in jsonb, as ``to_jsonb`` writes timestamps).
NUL characters: PostgreSQL text and jsonb cannot hold U+0000. In JSON columns (``raw``, ``explanation``,
JSON text) and in every text column of the errors table (diagnostics) it is replaced by the six visible
characters ``\u0000`` (``escape_nul``); a result row with a NUL in a text or jsonb value is rejected alone
(``RowsRejected``), never the write.
A column that already exists with another type (a passthrough whose type changes between files or
records, an id that is int in one file and text in another) is widened once to the join of both
(``join``): numbers of different kinds -> numeric; other mixes -> jsonb (an id column: text). Values
are then written in the column's type.
"""

from __future__ import annotations

import datetime as dt
import re

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from workers.sinks.tables import is_json, is_listlike, is_uuid, json_texts, nul_rows, plain
from workers.sinks.utctext import fast_utc_text, is_utc_timestamp

JSON_COLUMNS = {"raw", "explanation"}
NUMBERS = {"bigint", "numeric", "double precision"}
# How an existing column is converted when widened to each type.
USING = {"numeric": "{c}::numeric", "text": "{c}::text", "jsonb": "to_jsonb({c})"}


def pg_type(t: pa.DataType, name: str = "") -> str:
    if pa.types.is_dictionary(t):
        return pg_type(t.value_type, name)
    if name in JSON_COLUMNS and (pa.types.is_string(t) or pa.types.is_large_string(t)) or is_json(t):
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


_PER_NS = {"s": 10**9, "ms": 10**6, "us": 1000, "ns": 1}
_EPOCH = dt.datetime(1970, 1, 1)
# A JSON escape of U+0000 (not preceded by an escaped backslash): what PostgreSQL jsonb refuses.
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _fraction(ns: int) -> str:
    return "" if ns == 0 else "." + f"{ns:09d}".rstrip("0")


def _clock(ns: int) -> str:
    """Non-negative nanoseconds as PostgreSQL prints a time / an interval's time part: H:MM:SS[.fraction]."""
    s, f = divmod(ns, 10**9)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{s:02d}{_fraction(f)}"


def is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or pa.types.is_time(t) or pa.types.is_duration(t) \
        or t == pa.month_day_nano_interval()


def temporal_text(col: pa.ChunkedArray | pa.Array, iso: bool = False) -> list[str | None]:
    """Timestamps (as UTC), times, durations and month-day-nano intervals in PostgreSQL's text spelling with
    up to 9 fraction digits (see the module docstring); ``iso``: timestamps as ``to_jsonb`` spells them."""
    t = col.type
    if t == pa.month_day_nano_interval():
        return [None if v is None else f"{v.months} mons {v.days} days "
                f"{'-' if v.nanoseconds < 0 else ''}{_clock(abs(v.nanoseconds))}" for v in col.to_pylist()]
    per = _PER_NS[t.unit]
    counts = pc.cast(col, pa.int64() if t.bit_width == 64 else pa.int32()).to_pylist()
    if pa.types.is_time(t):
        return [None if c is None else _clock(c * per) for c in counts]
    if pa.types.is_duration(t):
        return [None if c is None else ("-" if c < 0 else "") + _clock(abs(c) * per) for c in counts]
    sep, zone = ("T", "+00:00") if iso else (" ", "+00")
    out: list[str | None] = []
    for c in counts:
        if c is None:
            out.append(None)
            continue
        s, f = divmod(c * per, 10**9)
        try:
            d = _EPOCH + dt.timedelta(seconds=s)
        except OverflowError:  # beyond datetime's years 1..9999 (and PostgreSQL's range): Arrow's spelling
            d = None
        out.append(f"{c}" if d is None else f"{d.year:04d}-{d.month:02d}-{d.day:02d}{sep}{d.hour:02d}:"
                   f"{d.minute:02d}:{d.second:02d}{_fraction(f)}{zone}")
    return out


def _sub_micro(col: pa.ChunkedArray | pa.Array) -> bool:
    """Whether a ns temporal column holds a value that is not a whole number of microseconds."""
    t = col.type
    if t == pa.month_day_nano_interval():
        return any(v is not None and v.nanoseconds % 1000 for v in col.to_pylist())
    if not is_temporal(t) or t.unit != "ns":
        return False
    n = pc.cast(col, pa.int64())
    rest = pc.subtract(n, pc.multiply(pc.divide(n, 1000), 1000))
    return bool(pc.any(pc.not_equal(rest, 0)).as_py())


def exact_columns(table: pa.Table) -> pa.Table:
    """The table with each ns temporal column that holds sub-microsecond values as text (module docstring),
    so PostgreSQL's microsecond types never round distinct values together."""
    for i, name in enumerate(table.column_names):
        col = plain(table.column(i))
        if is_temporal(col.type) and _sub_micro(col):
            table = table.set_column(i, name, pa.array(temporal_text(col), pa.string()))
    return table


def escape_nul(col: pa.ChunkedArray | pa.Array, json: bool) -> pa.ChunkedArray | pa.Array:
    """Text (or JSON text) with each NUL character as the visible ``\\u0000`` (diagnostic columns)."""
    col = plain(col)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    if json and pc.any(pc.match_substring(col, "\\u0000")).as_py():
        col = pc.replace_substring_regex(col, r"(^|[^\\])((?:\\\\)*)\\u0000", r"\1\2\\\\u0000")
        # overlapping matches (\u0000\u0000) need a second pass
        col = pc.replace_substring_regex(col, r"(^|[^\\])((?:\\\\)*)\\u0000", r"\1\2\\\\u0000")
    if pc.any(pc.match_substring(col, "\x00")).as_py():  # a raw NUL (in JSON: inside a string)
        col = pc.replace_substring(col, "\x00", "\\\\u0000" if json else "\\u0000")
    return col


def json_nul_rows(name: str, texts: list[str | None]) -> dict[int, str]:
    """Rows of JSON text holding an escaped NUL character, which jsonb refuses."""
    return {i: f"column {name!r}: PostgreSQL jsonb cannot hold the NUL character (\\u0000) in this value"
            for i, v in enumerate(texts) if v is not None and "\\u0000" in v and _JSON_NUL.search(v)}


def _text(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array | pa.ChunkedArray, dict[int, str]]:
    """Any column as text: strings as they are, primitives as Arrow prints them, others as JSON."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col, nul_rows(name, col, "PostgreSQL text")
    if is_temporal(t):
        return pa.array(temporal_text(col), pa.string()), {}
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
    own = pg_type(col.type, name)  # before plain: JSON text is an extension type
    col = plain(col)
    if target == "jsonb":
        if own == "jsonb" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            # already JSON text (raw, explanation, a JSON-text passthrough): as it is, NULs escaped in diagnostics
            if name in JSON_COLUMNS:
                return escape_nul(col, json=True), {}
            bad = json_nul_rows(name, col.to_pylist())
            for i, reason in nul_rows(name, col, "PostgreSQL jsonb").items():
                bad.setdefault(i, reason)
            return col, bad
        if is_temporal(col.type):
            return pa.array([None if v is None else orjson.dumps(v).decode()
                             for v in temporal_text(col, iso=True)], pa.string()), {}
        texts, bad = json_texts(name, col)
        for i, reason in json_nul_rows(name, texts).items():
            bad.setdefault(i, reason)
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
    if target == "timestamp with time zone" and is_utc_timestamp(col.type):
        # The text Arrow's CSV writer prints for a UTC column (``2026-01-02 03:04:05.123456Z``; ``+0000`` for the
        # zone "+00:00"), made without its per-value zone lookup (``utctext``); outside the years 1..9999 the
        # writer's own text, as before.
        text = fast_utc_text(col, " ", "+0000" if col.type.tz == "+00:00" else "Z")
        if text is not None:
            return text, {}
        return (pc.assume_timezone(col, "UTC") if col.type.tz is None else col), {}
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

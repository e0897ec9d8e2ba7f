"""Arrow types -> MariaDB / MySQL column types, and Arrow columns -> the Python values PyMySQL sends.

Mapping (what a new column gets; spelled as ``information_schema.COLUMNS.COLUMN_TYPE`` shows it, so it compares
with the catalog). Tables are ``utf8mb4`` with collation ``utf8mb4_nopad_bin``: every Unicode character
(emoji too, which MySQL's 3-byte ``utf8`` refuses), and text keys compare byte for byte, so ``a``, ``A`` and
``a `` (trailing space; the PAD SPACE collations ignore it) are three ids:
    int8..int64, uint8..uint32 -> bigint(20)       uint64 -> bigint(20) unsigned
    float16/32/64 -> double (NaN is stored as NULL, as pandas means it; +-infinity, which DOUBLE cannot
    hold, rejects the row)                          bool -> tinyint(1)
    decimal128/256 with precision <= 65 and scale <= 30 -> decimal(p,s); wider decimals -> longtext (digits)
    string -> longtext; binary -> longblob           uuid (extension) -> uuid (MariaDB's own type)
    date -> date; time -> time(6)                    timestamp -> datetime(6), in UTC (a timestamp without
    a zone is read as UTC; nanoseconds are truncated to microseconds)
    duration, intervals, lists (the multiclass ``scores`` too), structs, maps, unions -> longtext holding
    JSON (``tables.json_texts``: durations as seconds); ``raw``, ``explanation`` and JSON text
    (``arrow.json``, passthrough values of mixed JSON types) -> longtext holding that JSON; null -> longtext
Key columns must fit an InnoDB primary key (3072 bytes): a text or binary ``id`` and ``model_version`` are
``varchar(255)`` / ``varbinary(255)``, the errors' ``source`` ``varchar(512)`` (255 + 512 characters of 4
bytes fit); a key value longer than its column rejects the row, never truncated, and so does a nanosecond
timestamp key that is not a whole microsecond (``datetime(6)`` would make ids 1 ns apart one row).
``input_file`` is ``text`` with a 255-character prefix index (what a rewritten input deletes by).
A column that exists with another type is widened once (``join``): integers of both signs -> decimal(20,0),
decimals (and integers) of other precision or scale -> a decimal holding both (up to 65 digits), other numbers
-> double, a key column -> varchar(255), other mixes -> longtext (values as text / JSON).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
from pymysql.converters import escape_item

from workers.sinks.tables import is_json, is_listlike, is_uuid, json_texts, plain

Values: TypeAlias = list | pa.Array | pa.ChunkedArray

JSON_COLUMNS = {"raw", "explanation"}
KEY_CHARS = {"source": 512}  # characters of a text key column; others KEY_DEFAULT
KEY_DEFAULT = 255
INTEGERS = {"bigint(20)", "bigint(20) unsigned", "decimal(20,0)"}
NUMBERS = INTEGERS | {"double"}
BIGINT = (-(2**63), 2**63 - 1)


def key_type(name: str) -> str:
    return f"varchar({KEY_CHARS.get(name, KEY_DEFAULT)})"


def my_type(t: pa.DataType, name: str = "", key: bool = False) -> str:
    """The column type a new column of Arrow type ``t`` gets (``key``: part of the primary key)."""
    if pa.types.is_dictionary(t):
        return my_type(t.value_type, name, key)
    if is_json(t) or (name in JSON_COLUMNS and (pa.types.is_string(t) or pa.types.is_large_string(t))):
        return key_type(name) if key else "longtext"
    if is_uuid(t):
        return "uuid"
    if isinstance(t, pa.BaseExtensionType):
        return my_type(t.storage_type, name, key)
    if pa.types.is_boolean(t):
        return "tinyint(1)"
    if pa.types.is_uint64(t):
        return "bigint(20) unsigned"
    if pa.types.is_integer(t):
        return "bigint(20)"
    if pa.types.is_floating(t):
        return "double"
    if pa.types.is_decimal(t):
        if t.precision <= 65 and t.scale <= 30 and t.scale >= 0:
            return f"decimal({t.precision},{t.scale})"
        return key_type(name) if key else "longtext"
    if pa.types.is_timestamp(t):
        return "datetime(6)"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time(6)"
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)):
        return f"varbinary({KEY_DEFAULT})" if key else "longblob"
    return key_type(name) if key else "longtext"


def join(a: str, b: str, key: bool = False, name: str = "") -> str:
    """The narrowest type holding values of both ``a`` and ``b`` (see the module docstring)."""
    if a == b:
        return a
    if a in INTEGERS and b in INTEGERS:
        return "decimal(20,0)"
    da, db = _decimal(a), _decimal(b)
    if da and db:  # room for the integer digits and the fraction digits of both
        scale = max(da[1], db[1])
        digits = max(da[0] - da[1], db[0] - db[1]) + scale
        if digits <= 65:
            return f"decimal({digits},{scale})"
    if a in NUMBERS and b in NUMBERS and not key:
        return "double"
    return key_type(name) if key else "longtext"


def _decimal(t: str) -> tuple[int, int] | None:
    if t == "bigint(20)" or t == "bigint(20) unsigned":
        return (20, 0)
    if t.startswith("decimal(") and t.endswith(")"):
        p, _, s = t[len("decimal("):-1].partition(",")
        return int(p), int(s or 0)
    return None


def _chars(target: str) -> int | None:
    if target.startswith(("varchar(", "varbinary(")):
        return int(target.split("(", 1)[1].rstrip(")"))
    return None


def _valid_utf8(name: str, col: pa.ChunkedArray | pa.Array) -> dict[int, str]:
    """Rows of a string column that are not valid UTF-8 (a Parquet file can hold such bytes)."""
    try:
        col.validate(full=True)
        return {}
    except pa.ArrowInvalid:
        pass
    bad = {}
    for i, v in enumerate(pc.cast(col, pa.large_binary()).to_pylist()):
        if v is not None:
            try:
                v.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = f"column {name!r}: the text is not valid UTF-8"
    return bad


def _text(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[Values, dict[int, str]]:
    """Any column as text values: strings as they are, temporal values in MariaDB's spelling, nested as JSON."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        bad = _valid_utf8(name, col)
        if bad:
            col = pc.if_else(pc.is_in(pa.array(range(len(col)), pa.int64()), pa.array(list(bad), pa.int64())),
                             pa.scalar(None, t), col)
        return col, bad
    if pa.types.is_timestamp(t) or pa.types.is_time(t) or pa.types.is_date(t):
        return _temporal(name, col)
    if is_uuid(t):
        return [None if v is None else str(v) for v in col.to_pylist()], {}
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if v is None else "0x" + v.hex() for v in col.to_pylist()], {}
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.cast(col, pa.string()), {}
    return json_texts(name, col)


def _temporal(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[Values, dict[int, str]]:
    """Dates, times and timestamps (as UTC, microseconds) as the text MariaDB reads into its types."""
    t = col.type
    if pa.types.is_date(t):
        return pc.strftime(pc.cast(col, pa.timestamp("s")), format="%Y-%m-%d"), {}
    if pa.types.is_time(t):
        micros = pc.cast(pc.cast(col, pa.time64("us"), safe=False), pa.int64()).to_pylist()
        out: list[str | None] = []
        for m in micros:
            if m is None:
                out.append(None)
                continue
            s, f = divmod(m, 1_000_000)
            out.append(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{f:06d}")
        return out, {}
    utc = pc.cast(col, pa.timestamp("us", "UTC" if t.tz else None), safe=False)
    bad: dict[int, str] = {}
    try:
        return pc.strftime(utc, format="%Y-%m-%d %H:%M:%S", locale="C"), bad
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out = []
    for i, v in enumerate(pc.cast(utc, pa.int64()).to_pylist()):
        if v is None:
            out.append(None)
            continue
        try:
            d = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=v)
            out.append(d.isoformat(sep=" ", timespec="microseconds"))
        except OverflowError:
            out.append(None)
            bad[i] = f"column {name!r}: the timestamp is outside the years MariaDB DATETIME holds (1000-9999)"
    return out, bad


def sub_micro_keys(name: str, col: pa.ChunkedArray | pa.Array) -> dict[int, str]:
    """Rows of a key column of nanosecond timestamps (or times) whose value is not a whole microsecond: MariaDB's
    ``datetime(6)`` / ``time(6)`` would truncate them, so two distinct ids 1 ns apart would become one row."""
    col = plain(col)
    t = col.type
    if not ((pa.types.is_timestamp(t) or pa.types.is_time(t)) and t.unit == "ns"):
        return {}
    nanos = pc.cast(col, pa.int64()).to_pylist()
    return {i: f"column {name!r}: {v % 1000} nanoseconds past the microsecond; MariaDB keeps microseconds, so "
               "ids this close would become one row (store the id as text, or whole microseconds)"
            for i, v in enumerate(nanos) if v is not None and v % 1000}


def values(name: str, col: pa.ChunkedArray | pa.Array, target: str) -> tuple[Values, dict[int, str]]:
    """The column's values (Arrow where cheap, else Python values) for a ``target`` column, and the rows that cannot be
    written (row index -> one-line reason naming the column). Cheap checks in Arrow first; what only the server
    can tell (a decimal out of range, a date before year 1) is found by the sink's bisection."""
    own = my_type(col.type, name)  # before plain: JSON text and uuid are extension types
    col = plain(col)
    t = col.type
    longest = _chars(target)
    if longest is not None:  # a key column: text (or binary) of bounded length, never truncated
        if target.startswith("varbinary") and (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                               or pa.types.is_fixed_size_binary(t)):
            vals = col.to_pylist()
            bad = {i: f"column {name!r}: {len(v)} bytes is longer than the key column's {longest}"
                   for i, v in enumerate(vals) if v is not None and len(v) > longest}
            return vals, bad
        vals, bad = _text(name, col)
        lengths = pc.utf8_length(vals) if not isinstance(vals, list) else pa.array(
            [None if v is None else len(v) for v in vals], pa.int64())
        if pc.any(pc.greater(lengths, longest)).as_py():
            for i, n in enumerate(lengths.to_pylist()):
                if n is not None and n > longest and i not in bad:
                    bad[i] = (f"column {name!r}: {n} characters is longer than the key column's {longest} "
                              "(MariaDB keys are bounded)")
        return vals, bad
    if target == "longtext" or target == "text":
        if own == "longtext" and (pa.types.is_string(t) or pa.types.is_large_string(t)):
            return _text(name, col)
        if is_listlike(t) or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_union(t) \
                or pa.types.is_duration(t) or pa.types.is_interval(t):
            return json_texts(name, col)
        return _text(name, col)
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.string()), {}
    if pa.types.is_floating(t):  # NaN is missing; infinity fits no MariaDB number
        col = pc.cast(col, pa.float64())
        bad = {}
        if pc.any(pc.is_inf(col)).as_py():
            bad = {i: f"column {name!r}: MariaDB {target.upper()} cannot hold {v} (infinity)"
                   for i, v in enumerate(col.to_pylist()) if v is not None and math.isinf(v)}
        return pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col), bad
    if target == "bigint(20)" and pa.types.is_uint64(t):
        bad = {}
        if pc.any(pc.greater(col, BIGINT[1])).as_py():
            bad = {i: f"column {name!r}: {v} is out of the range of BIGINT"
                   for i, v in enumerate(col.to_pylist()) if v is not None and v > BIGINT[1]}
        return col, bad
    if target in ("datetime(6)", "date", "time(6)") and (pa.types.is_timestamp(t) or pa.types.is_date(t)
                                                          or pa.types.is_time(t)):
        return _temporal(name, col)
    if target == "uuid" or (target.startswith("decimal") and not pa.types.is_decimal(t)):
        return _text(name, col)
    if target == "longblob" and not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                     or pa.types.is_fixed_size_binary(t)):
        vals, bad = _text(name, col)
        vals = vals if isinstance(vals, list) else vals.to_pylist()
        return [None if v is None else v.encode() for v in vals], bad
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return col.to_pylist(), {}  # bytes: PyMySQL's escaping (_binary'...')
    return col, {}


_ESCAPES = (("\\", "\\\\"), ("'", "\\'"), ("\x00", "\\0"), ("\n", "\\n"), ("\r", "\\r"), ("\x1a", "\\Z"))


def literals(vals: Values) -> pa.Array | pa.ChunkedArray:
    """Each value as a MariaDB SQL literal (text; NULL for a missing value), built in Arrow for text, numbers and
    booleans (Python-side escaping costs about 20 us per row, three times the server's insert), with PyMySQL's
    escaping for the rest (bytes, values computed in Python). The session's sql_mode has no
    NO_BACKSLASH_ESCAPES, so backslash escapes are the quoting rules."""
    if isinstance(vals, list):
        try:  # text computed in Python (JSON): escaped in Arrow all the same
            return literals(pa.array(vals, pa.string()))
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            pass
        return pa.array(["NULL" if v is None else escape_item(v, "utf8mb4") for v in vals], pa.string())
    t = vals.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = vals
        for raw, escaped in _ESCAPES:
            if pc.any(pc.match_substring(text, raw)).as_py():
                text = pc.replace_substring(text, raw, escaped)
        out = pc.binary_join_element_wise(pa.scalar("'", t), text, pa.scalar("'", t), pa.scalar("", t))
    elif pa.types.is_boolean(t):
        out = pc.cast(pc.cast(vals, pa.int8()), pa.string())
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        out = pc.cast(vals, pa.string())
    elif pa.types.is_null(t):
        out = pa.nulls(len(vals), pa.string())
    else:
        return literals(vals.to_pylist())
    return pc.fill_null(out, "NULL")

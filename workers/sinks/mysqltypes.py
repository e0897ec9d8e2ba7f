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
bytes fit); a key value longer than its column rejects the row, never truncated. ``input_file`` is ``text``
with a 255-character prefix index (what a rewritten input deletes by).
A column that exists with another type is widened once (``join``): integers of both signs -> decimal(20,0),
decimals (and integers) of other precision or scale -> a decimal holding both (up to 65 digits), other numbers
-> double, a key column -> varchar(255), other mixes -> longtext (values as text / JSON).
"""

from __future__ import annotations

import datetime as dt
import math

import pyarrow as pa
import pyarrow.compute as pc

from workers.sinks.tables import is_json, is_listlike, is_uuid, json_texts, plain

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


def _text(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[list, dict[int, str]]:
    """Any column as text values: strings as they are, temporal values in MariaDB's spelling, nested as JSON."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        bad = _valid_utf8(name, col)
        if bad:
            col = pc.if_else(pc.is_in(pa.array(range(len(col)), pa.int64()), pa.array(list(bad), pa.int64())),
                             pa.scalar(None, t), col)
        return col.to_pylist(), bad
    if pa.types.is_timestamp(t) or pa.types.is_time(t) or pa.types.is_date(t):
        return _temporal(name, col)
    if is_uuid(t):
        return [None if v is None else str(v) for v in col.to_pylist()], {}
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if v is None else "0x" + v.hex() for v in col.to_pylist()], {}
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.cast(col, pa.string()).to_pylist(), {}
    return json_texts(name, col)


def _temporal(name: str, col: pa.ChunkedArray | pa.Array) -> tuple[list, dict[int, str]]:
    """Dates, times and timestamps (as UTC, microseconds) as the text MariaDB reads into its types."""
    t = col.type
    if pa.types.is_date(t):
        return pc.strftime(pc.cast(col, pa.timestamp("s")), format="%Y-%m-%d").to_pylist(), {}
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
        return pc.strftime(utc, format="%Y-%m-%d %H:%M:%S", locale="C").to_pylist(), bad
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


def values(name: str, col: pa.ChunkedArray | pa.Array, target: str) -> tuple[list, dict[int, str]]:
    """The column's values as Python values PyMySQL escapes for a ``target`` column, and the rows that cannot be
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
        for i, v in enumerate(vals):
            if v is not None and len(v) > longest and i not in bad:
                bad[i] = (f"column {name!r}: {len(v)} characters is longer than the key column's {longest} "
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
        return [None] * len(col), {}
    if target == "double" and pa.types.is_floating(t):
        vals = col.to_pylist()
        bad = {}
        for i, v in enumerate(vals):
            if v is not None and not math.isfinite(v):
                if v != v:
                    vals[i] = None  # NaN: missing
                else:
                    bad[i] = f"column {name!r}: MariaDB DOUBLE cannot hold {v} (infinity)"
        return vals, bad
    if target == "bigint(20)" and pa.types.is_uint64(t):
        vals = col.to_pylist()
        return vals, {i: f"column {name!r}: {v} is out of the range of BIGINT"
                      for i, v in enumerate(vals) if v is not None and v > BIGINT[1]}
    if target in ("datetime(6)", "date", "time(6)") and (pa.types.is_timestamp(t) or pa.types.is_date(t)
                                                          or pa.types.is_time(t)):
        return _temporal(name, col)
    if target == "uuid" or (target.startswith("decimal") and not pa.types.is_decimal(t)):
        return _text(name, col)
    if target == "longblob" and not (pa.types.is_binary(t) or pa.types.is_large_binary(t)
                                     or pa.types.is_fixed_size_binary(t)):
        vals, bad = _text(name, col)
        return [None if v is None else v.encode() for v in vals], bad
    if pa.types.is_floating(t):  # into an integer/decimal column: the server checks the range
        vals = col.to_pylist()
        return [None if v is not None and v != v else v for v in vals], {
            i: f"column {name!r}: {v} is not a finite number" for i, v in enumerate(vals)
            if v is not None and v == v and not math.isfinite(v)}
    return col.to_pylist(), {}

"""Arrow columns as a Delta or an Iceberg table holds them: the value mapping of the Delta Lake and Iceberg sinks
(``workers/sinks/delta.py`` and ``iceberg.py`` state it), and the cast of a write to the types a table already has.

Delta has signed integers, float, double, decimal(<=38), string, binary, boolean, date, timestamp in
microseconds, arrays, maps and structs; everything else is mapped here, or refused with a reason. Iceberg (v2)
has the same, less the 8- and 16-bit integers, plus time in microseconds: the two differ only in what ``Lake``
says.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import InputError
from workers.sinks.tables import is_json, is_listlike, is_uuid, json_texts, plain

log = logging.getLogger("workers.sinks.delta")


@dataclass(frozen=True)
class Lake:
    """What a table format holds that the other does not."""

    name: str  # in reasons: "Delta holds decimals of at most 38 digits"
    widen: tuple[tuple[pa.DataType, pa.DataType], ...]  # integer types it lacks -> the next one it has
    time_as_text: bool  # no time-of-day type: ISO text


DELTA = Lake("Delta", ((pa.uint8(), pa.int16()), (pa.uint16(), pa.int32()), (pa.uint32(), pa.int64())), True)
ICEBERG = Lake("Iceberg", ((pa.int8(), pa.int32()), (pa.int16(), pa.int32()), (pa.uint8(), pa.int32()),
                           (pa.uint16(), pa.int32()), (pa.uint32(), pa.int64())), False)


def _needs_json(t: pa.DataType, lake: Lake = DELTA) -> bool:
    """Types inside a nested value that the table cannot hold and a cast cannot fix: the whole value goes as
    JSON."""
    if pa.types.is_interval(t) or pa.types.is_union(t) or (pa.types.is_time(t) and lake.time_as_text) \
            or pa.types.is_duration(t) or is_uuid(t) or is_json(t) or pa.types.is_null(t) \
            or pa.types.is_decimal256(t):
        return True
    if is_listlike(t):
        return _needs_json(t.value_type, lake)
    if pa.types.is_map(t):
        return _needs_json(t.key_type, lake) or _needs_json(t.item_type, lake)
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_needs_json(t.field(i).type, lake) for i in range(t.num_fields))
    return False


def _target(t: pa.DataType, lake: Lake = DELTA) -> pa.DataType:
    """The type a (plain, not JSON-bound) column is cast to."""
    if pa.types.is_dictionary(t):
        return _target(t.value_type, lake)
    for small, wide in lake.widen:
        if t == small:
            return wide
    if pa.types.is_uint64(t):
        return pa.decimal128(20, 0)
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", tz="UTC" if t.tz else None)
    if pa.types.is_time(t):
        return pa.time64("us")
    if pa.types.is_date64(t):
        return pa.date32()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t) or pa.types.is_fixed_size_binary(t):
        return pa.binary()
    if is_listlike(t):
        return pa.list_(pa.field("element", _target(t.value_type, lake)))
    if pa.types.is_map(t):
        return pa.map_(_target(t.key_type, lake), _target(t.item_type, lake))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _target(f.type, lake)) for f in t])
    return t


def delta_column(name: str, col: pa.ChunkedArray, lake: Lake = DELTA) -> tuple[pa.ChunkedArray | pa.Array,
                                                                                 dict[int, str]]:
    """The column as the table holds it (the mapping in the sink's module docstring), and rows that cannot be
    written. InputError when the column's type cannot be held at all (a decimal of more than 38 digits)."""
    t = col.type
    if is_uuid(t):
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string()), {}
    if is_json(t):
        return plain(col).cast(pa.string()), {}
    col = plain(col)
    t = col.type
    if pa.types.is_decimal(t) and t.precision > 38:
        raise InputError(f"column {name!r}: {lake.name} holds decimals of at most 38 digits, not {t}")
    if pa.types.is_decimal256(t):
        return col.cast(pa.decimal128(t.precision, t.scale)), {}
    if pa.types.is_time(t) and lake.time_as_text:
        return pc.cast(col, pa.string()), {}
    if pa.types.is_duration(t):
        return pc.cast(col, pa.int64()), {}
    if pa.types.is_null(t):
        return pa.nulls(len(col), pa.string()), {}
    if pa.types.is_interval(t) or pa.types.is_union(t) or _needs_json(t, lake):
        texts, bad = json_texts(name, col)
        return pa.array(texts, pa.string()), bad
    target = _target(t, lake)
    if target == t:
        return col, {}
    try:  # ns -> us drops the nanoseconds
        return col.cast(target, safe=not (pa.types.is_timestamp(t) or pa.types.is_time(t))), {}
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        texts, bad = json_texts(name, col)
        log.debug("column %r as JSON text (%s)", name, exc)
        return pa.array(texts, pa.string()), bad


def _sub_microsecond(name: str, col: pa.ChunkedArray | pa.Array) -> dict[int, str]:
    """Rows of a timestamp key column whose value has nanoseconds: Delta keeps microseconds, so two ids that
    differ below one would become one key (stored twice, and matched by each other's updates)."""
    t = col.type
    if not pa.types.is_timestamp(t) or t.unit != "ns":
        return {}
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    ns = pc.cast(arr, pa.int64())
    off = pc.fill_null(pc.not_equal(pc.subtract(ns, pc.multiply(pc.divide(ns, 1000), 1000)), 0), False)
    rows = pc.indices_nonzero(off).to_pylist()
    return {i: f"{name} {col[i]} has nanoseconds; Delta and Iceberg timestamps hold microseconds, so distinct "
               "ids would become one" for i in rows}


def delta_table(data: pa.Table, keys: tuple[str, ...] = (), lake: Lake = DELTA) -> tuple[pa.Table, dict[int, str]]:
    """The table with every column as the table format holds it, and the rows that cannot be written (with a
    reason); ``keys``: the columns that key the rows, which must stay distinct (``_sub_microsecond``)."""
    cols: list = []
    bad: dict[int, str] = {}
    for name in data.column_names:
        if name in keys:
            for i, reason in _sub_microsecond(name, plain(data.column(name))).items():
                bad.setdefault(i, reason)
        col, refused = delta_column(name, data.column(name), lake)
        cols.append(col)
        for i, reason in refused.items():
            bad.setdefault(i, reason)
    return pa.table(cols, names=data.column_names), bad


_NAN = object()


def _nan_free(value: object) -> object:
    """``value`` with every float NaN replaced by one marker, so that equal nested values compare equal."""
    if isinstance(value, float) and value != value:
        return _NAN
    if isinstance(value, list):
        return [_nan_free(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_free(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_nan_free(v) for v in value)
    return value


def _lossless(before: pa.ChunkedArray, after: pa.ChunkedArray) -> bool:
    """Whether every value of ``after`` (``before`` cast) casts back to itself. Arrow's safe cast checks integer
    overflow and float-to-integer truncation but not float64 -> float32 (0.1234567891 rounded, 1e300 -> inf),
    float -> decimal (0.125 -> 0.12) or timestamp -> date (the time dropped): those are losses too."""
    try:
        back = after.cast(before.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    if pc.all(pc.equal(pc.is_null(before), pc.is_null(back))).as_py() is False:  # None: no rows, nothing lost
        return False
    try:
        same = pc.equal(before, back)
        if pa.types.is_floating(before.type):  # NaN stays NaN
            same = pc.or_kleene(same, pc.and_(pc.is_nan(before), pc.is_nan(back)))
    except pa.ArrowNotImplementedError:  # nested values: compared as Python values, NaN equal to NaN
        return bool(_nan_free(before.to_pylist()) == _nan_free(back.to_pylist()))
    return pc.all(pc.fill_null(same, True)).as_py() is not False


def conform(data: pa.Table, target: pa.Schema, where: str) -> pa.Table:
    """``data`` with each column the table already has cast to the table's type, when every value survives the
    cast (int32 into int64, 1.0 into an integer); InputError naming the column otherwise (2.5 or 'x' into an
    integer column): delta-rs would truncate or fail mid-commit, and a write must never lose a value. The
    target's nullability is kept (Iceberg's identifier fields are required)."""
    have = {f.name: f.type for f in target}
    for i, name in enumerate(data.column_names):
        want = have.get(name)
        if want is None or data.schema.field(i).type == want:
            continue
        try:
            cast = data.column(i).cast(want, safe=True)
            if not _lossless(data.column(i), cast):
                raise pa.ArrowInvalid("a value changes in the cast")
            data = data.set_column(i, pa.field(name, want, target.field(name).nullable), cast)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise InputError(f"column {name!r} is {want} in {where}; these {data.schema.field(i).type} values "
                             "cannot all be held by it (rename the column or write to a new table)") from None
    return data

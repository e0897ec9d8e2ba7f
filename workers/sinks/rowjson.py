"""Result rows as JSON, one mapping for the sinks that store JSON (Kafka messages, Redis hash fields): timestamps
RFC 3339, JSON text embedded as JSON, decimals exact, bytes base64 and the table sinks' other mappings
(``tables.json_default``), anything else as its text. Never raises for a value the scorer can produce."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from workers.scoring.scorer import Scored
from workers.sinks.tables import is_json, is_uuid, json_default, plain
from workers.sinks.utctext import is_utc_timestamp, utc_text


def json_value_default(value: object) -> object:
    """Values JSON has no type for: the table sinks' mapping (decimal exact, bytes base64...), else text."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    try:
        return json_default(value)
    except TypeError:
        return str(value)


def plain_columns(scored: Scored) -> Scored:
    """Column types to_pylist gives no JSON-able value for, made plain (views, float16, extensions)."""
    table = scored.results
    if all(not pa.types.is_string_view(t) and not isinstance(t, pa.BaseExtensionType) for t in table.schema.types):
        return scored
    cols = [c if is_uuid(c.type) or is_json(c.type) else plain(c) for c in table.columns]
    return Scored(pa.table(cols, names=table.column_names), scored.errors, scored.error_rows)


def json_rows(table: pa.Table, fragments: tuple[str, ...] = ()) -> list[bytes]:
    """Each row as a JSON object with the Kafka sink's value mapping (timestamps RFC 3339, JSON text embedded as
    JSON, other values by ``tables.json_default``, else as text); never raises. Columns in ``fragments`` hold JSON
    text. Built column by column (orjson over a whole column, split where a separator cannot occur), then one
    ``bytes %`` per row: the per-row cost stays well under a microsecond per column."""
    n = table.num_rows
    if not n:
        return []
    names = table.column_names
    parts, columns = [], []
    for name in names:
        quoted, values = _column_json(table.column(name), name in fragments)
        key = orjson.dumps(name).replace(b"%", b"%%")
        if values[0] == values[-1] and values.count(values[0]) == n:
            # one value in the whole batch (model_version, scored_at, served, topic...): inlined in the template
            value = values[0].replace(b"%", b"%%")
            parts.append(key + (b':"' + value + b'"' if quoted else b":" + value))
            continue
        parts.append(key + (b':"%s"' if quoted else b":%s"))
        columns.append(values)
    template = b"{" + b",".join(parts) + b"}"
    if not columns:
        return [template % ()] * n
    return [template % row for row in zip(*columns, strict=True)]


def _column_json(col: pa.ChunkedArray | pa.Array, fragment: bool) -> tuple[bool, list[bytes]]:
    """(quoted, values): each value's JSON, or with ``quoted`` the inside of its JSON string (a text column without
    nulls, whose quotes the template adds)."""
    t = plain(col).type if not is_json(col.type) else col.type
    if is_json(col.type) or fragment and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        # JSON text; a fragment column of nested values (a struct, a list, a decimal) is made JSON below
        return False, [b"null" if v is None else _fragment(v) for v in plain(col).to_pylist()]
    if is_utc_timestamp(t):
        return False, _utc_json(col, "Z" if t.tz else "")
    if _plain_struct(t):
        return False, _struct_json(plain(col))
    values = plain(col).to_pylist()
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return False, orjson.dumps(values)[1:-1].split(b",")  # numbers, true/false, null: never a comma inside
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        # One dumps per value: one array's text cannot be split back into values (a value ending in '",' is
        # spelled '\\",' and that plus the next separator reads '","' too: text moved between records).
        dumps = orjson.dumps
        if not col.null_count:
            return True, [dumps(v)[1:-1] for v in values]
        return False, [b"null" if v is None else dumps(v) for v in values]
    return False, [_value_json(v) for v in values]


def _utc_json(col: pa.ChunkedArray | pa.Array, zone: str) -> list[bytes]:
    """RFC 3339 JSON strings of a UTC timestamp column, made column-wise (``utctext``; the text holds no comma, so
    one orjson call splits into values). Instants repeated across the batch (``scored_at`` is one per batch) are
    formatted once each."""
    arr = plain(col)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    encoded = pc.dictionary_encode(arr)
    if len(encoded.dictionary) * 4 > len(arr):  # mostly distinct (the record timestamps): format them all
        return orjson.dumps(utc_text(arr, "T", zone).to_pylist())[1:-1].split(b",")
    texts = orjson.dumps(utc_text(encoded.dictionary, "T", zone).to_pylist())[1:-1].split(b",")
    at = encoded.indices.to_pylist()
    if encoded.null_count:
        return [b"null" if i is None else texts[i] for i in at]
    return list(map(texts.__getitem__, at))


def _plain_struct(t: pa.DataType) -> bool:
    """A struct of numbers, booleans, text and such structs (distinct field names): its JSON object is the same
    built from its fields' columns as dumped per value (other fields, e.g. timestamps, are spelled otherwise
    inside a value)."""
    if not pa.types.is_struct(t) or not t.num_fields or len({f.name for f in t}) < t.num_fields:
        return False
    return all(pa.types.is_integer(f.type) or pa.types.is_boolean(f.type) or pa.types.is_string(f.type)
               or pa.types.is_large_string(f.type) or pa.types.is_float32(f.type) or pa.types.is_float64(f.type)
               or _plain_struct(f.type) for f in t)


def _struct_json(col: pa.ChunkedArray | pa.Array) -> list[bytes]:
    """A ``_plain_struct`` column's values as JSON objects, field column by field column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    parts, columns = [], []
    for field, child in zip(arr.type, arr.flatten(), strict=True):
        quoted, values = _column_json(child, False)
        parts.append(orjson.dumps(field.name).replace(b"%", b"%%") + (b':"%s"' if quoted else b":%s"))
        columns.append(values)
    template = b"{" + b",".join(parts) + b"}"
    rows = [template % row for row in zip(*columns, strict=True)]
    if arr.null_count:
        rows = [row if ok else b"null" for row, ok in zip(rows, arr.is_valid().to_pylist(), strict=True)]
    return rows


def _value_json(value: object) -> bytes:
    try:
        return orjson.dumps(value, default=json_value_default)
    except (orjson.JSONEncodeError, TypeError):  # e.g. an integer beyond 64 bits inside a list: Python's json
        return json.dumps(_plain_json(value), default=str).encode()


def _plain_json(value: object) -> object:
    """For Python's json (the fallback): NaN and infinities as null (orjson's rule), integers of any size exact,
    other values as ``tables.json_default`` maps them, else as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(v) for v in value]
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    try:
        converted = json_default(value)
    except TypeError:
        return str(value)
    return str(converted) if isinstance(converted, orjson.Fragment) else _plain_json(converted)


def _fragment(text: str) -> bytes:
    """JSON text as it is; text that is not JSON (not from the scorer) as a JSON string."""
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return orjson.dumps(text)
    return text.encode()

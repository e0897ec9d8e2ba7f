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
        parts.append(key + (b':"%s"' if quoted else b":%s"))
        columns.append(values)
    template = b"{" + b",".join(parts) + b"}"
    return [template % row for row in zip(*columns, strict=True)]


def _column_json(col: pa.ChunkedArray, fragment: bool) -> tuple[bool, list[bytes]]:
    """(quoted, values): each value's JSON, or with ``quoted`` the inside of its JSON string (a text column without
    nulls, whose quotes the template adds)."""
    t = plain(col).type if not is_json(col.type) else col.type
    if is_json(col.type) or fragment and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        # JSON text; a fragment column of nested values (a struct, a list, a decimal) is made JSON below
        return False, [b"null" if v is None else _fragment(v) for v in plain(col).to_pylist()]
    if is_utc_timestamp(t):
        # RFC 3339 text made column-wise (``utctext``); it holds no comma, so one orjson call splits into values
        texts = utc_text(col, "T", "Z" if t.tz else "").to_pylist()
        return False, orjson.dumps(texts)[1:-1].split(b",")
    values = plain(col).to_pylist()
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return False, orjson.dumps(values)[1:-1].split(b",")  # numbers, true/false, null: never a comma inside
    if (pa.types.is_string(t) or pa.types.is_large_string(t)) and not col.null_count:
        # Inside a JSON string every quote is escaped, so '","' only ever separates two elements.
        return True, orjson.dumps(values)[2:-2].split(b'","')
    return False, [_value_json(v) for v in values]


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

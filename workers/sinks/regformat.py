"""Result rows in the Schema Registry formats (``kafka://topic?format=avro|protobuf|jsonschema``).

The result schema is derived from the result table's columns, which the model and the settings decide (score;
label and scores for a multiclass model; model_version, scored_at, served; stream topic/partition/offset/
timestamp; passthrough columns), so one worker registers one schema and a new model version with the same
columns registers nothing new. Column types map as the JSON sink writes them: integers, floats, booleans and
text as themselves, timestamps as RFC 3339 text (the JSON sink's form, and Protobuf then needs no imported
well-known type), lists of floats as arrays, anything else (decimals, JSON text, nested values) as its JSON text.

Every field but ``id`` is optional (a passthrough value may be null): Avro ``["null", T]`` with default null,
Protobuf proto3 ``optional`` (presence kept, so a null stays a null), JSON Schema ``[T, "null"]``.

Wire format: magic byte 0, the schema id (4 bytes, big-endian), for Protobuf the message index ``[0]`` (the
single byte 0: Result is the file's first message), then the payload.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable
from typing import Any

import fastavro
import orjson
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from workers.sinks.rowjson import json_rows, json_value_default
from workers.sinks.tables import is_json, plain
from workers.sinks.utctext import UTC_ZONES, utc_text

FORMATS = ("json", "avro", "protobuf", "jsonschema")
STRATEGIES = ("topic_name", "record_name", "topic_record_name")
#: the record's full name (Avro namespace.name, Protobuf package.message): record_name subjects use it
NAMESPACE, RECORD = "scoring_workers", "Result"
REGISTRY_TYPE = {"avro": "AVRO", "protobuf": "PROTOBUF", "jsonschema": "JSON"}
F = descriptor_pb2.FieldDescriptorProto


def kind(t: pa.DataType) -> str:
    """One of long, double, boolean, string, bytes, doubles (list of floats), text (RFC 3339), json (JSON text)."""
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_uint64(t):  # Avro long / Protobuf int64 stop at 2**63 - 1: decimal text keeps every value
        return "string"
    if pa.types.is_integer(t):
        return "long"
    if pa.types.is_floating(t):
        return "double"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return "bytes"
    if pa.types.is_timestamp(t):
        return "time"
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
            and pa.types.is_floating(t.value_type):
        return "doubles"
    return "json"


def columns(schema: pa.Schema) -> list[tuple[str, str]]:
    """(name, kind) of each result column; extension types (uuid, arrow.json) by their storage, JSON as text."""
    out = []
    for f in schema:
        t = f.type
        if isinstance(t, pa.BaseExtensionType):
            uuid = t.extension_name == "arrow.uuid"  # canonical text, as the JSON results write it
            out.append((f.name, "json" if is_json(t) else "string" if uuid else kind(t.storage_type)))
        else:
            out.append((f.name, kind(t)))
    return out


def field_names(cols: list[tuple[str, str]]) -> list[str]:
    """The schema's field name of each column: Avro and Protobuf names are ``[A-Za-z_][A-Za-z0-9_]*``, so every
    other character becomes ``_`` and a leading digit gets a ``_`` before it (``user-id`` -> ``user_id``); a
    name taken already gets ``_2``, ``_3``... (JSON Schema keeps the column names: any text is a JSON key)."""
    out: list[str] = []
    taken = {n for n, _ in cols if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)}
    for name, _ in cols:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            out.append(name)
            continue
        base = re.sub(r"[^A-Za-z0-9_]", "_", name)
        base = "_" + base if not base or base[0].isdigit() else base
        cand, n = base, 1
        while cand in taken:
            n += 1
            cand = f"{base}_{n}"
        taken.add(cand)
        out.append(cand)
    return out


def subject(topic: str, strategy: str) -> str:
    full = f"{NAMESPACE}.{RECORD}"
    return {"topic_name": f"{topic}-value", "record_name": full, "topic_record_name": f"{topic}-{full}"}[strategy]


# -- schemas -------------------------------------------------------------------------------------------------
_AVRO = {"long": "long", "double": "double", "boolean": "boolean", "string": "string", "bytes": "bytes",
         "time": "string", "json": "string", "doubles": {"type": "array", "items": "double"}}


def avro_schema(cols: list[tuple[str, str]]) -> dict[str, Any]:
    fields: list[dict[str, Any]] = []
    for name, (_, k) in zip(field_names(cols), cols, strict=True):
        t = _AVRO[k]
        fields.append({"name": name, "type": t} if name == "id" else
                      {"name": name, "type": ["null", t], "default": None})
    return {"type": "record", "name": RECORD, "namespace": NAMESPACE, "fields": fields}


_PROTO = {"long": F.TYPE_INT64, "double": F.TYPE_DOUBLE, "boolean": F.TYPE_BOOL, "string": F.TYPE_STRING,
          "bytes": F.TYPE_BYTES, "time": F.TYPE_STRING, "json": F.TYPE_STRING, "doubles": F.TYPE_DOUBLE}


#: result.v1's fields keep the numbers of schemas/result.v1.proto, so a reader compiled from that file reads any
#: worker's messages; other columns (passthrough, explanations) are numbered from 100 in column order.
PROTO_NUMBERS = {"id": 1, "score": 2, "label": 3, "scores": 4, "model_version": 5, "served": 6, "scored_at": 7,
                 "topic": 8, "partition": 9, "offset": 10, "timestamp": 11}


def proto_file(cols: list[tuple[str, str]]) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of ``result.proto``: message Result, result.v1 fields by their fixed numbers."""
    fdp = descriptor_pb2.FileDescriptorProto(name="scoring_workers/result.proto", package=NAMESPACE, syntax="proto3")
    msg = fdp.message_type.add(name=RECORD)
    extra = 100
    for name, (_, k) in zip(field_names(cols), cols, strict=True):
        number = PROTO_NUMBERS.get(name, extra)
        if name not in PROTO_NUMBERS:
            extra += 1
        field = msg.field.add(name=name, number=number, type=_PROTO[k])
        if k == "doubles":
            field.label = F.LABEL_REPEATED
        else:
            field.label = F.LABEL_OPTIONAL
            if name != "id":  # proto3 optional: a synthetic oneof per field keeps presence (null stays null)
                field.proto3_optional = True
                field.oneof_index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=f"_{name}")
    return fdp


_JSON = {"long": "integer", "double": "number", "boolean": "boolean", "string": "string", "bytes": "string",
         "time": "string", "doubles": "array"}


def json_schema(cols: list[tuple[str, str]]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, k in cols:
        if k == "json":
            props[name] = {}
            continue
        prop: dict[str, Any] = {"type": _JSON[k] if name == "id" else [_JSON[k], "null"]}
        if k == "doubles":
            prop["items"] = {"type": "number"}
        if k == "time":
            prop["format"] = "date-time"
        props[name] = prop
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": f"{NAMESPACE}.{RECORD}",
            "type": "object", "properties": props, "required": ["id"], "additionalProperties": True}


def schema_text(fmt: str, cols: list[tuple[str, str]]) -> str:
    """The schema as the registry stores it (Protobuf: a base64 FileDescriptorProto, as confluent-kafka's
    serializer registers it)."""
    if fmt == "avro":
        return json.dumps(avro_schema(cols))
    if fmt == "protobuf":
        return base64.b64encode(proto_file(cols).SerializeToString()).decode()
    return json.dumps(json_schema(cols))


# -- payloads ------------------------------------------------------------------------------------------------
def _utc_micros(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A timestamp column as microseconds in UTC (zone-less stays zone-less): the text is always six fraction
    digits (what ``datetime.strftime("%f")`` gave), nanoseconds floored as ``datetime`` floors them, and an instant
    of another zone spelled as the UTC time it is (its wall-clock time with a ``Z`` named another instant)."""
    col = plain(col)
    t = col.type
    if t.tz not in UTC_ZONES:
        col = col.cast(pa.timestamp(t.unit, tz="UTC"))  # Arrow stores UTC: only the type changes
    if t.unit == "ns":
        us = pa.timestamp("us", tz=col.type.tz)
        col = pa.chunked_array([_floor_us(c, us) for c in col.chunks], type=us)
    # exact (a checked cast: an instant beyond int64 microseconds raises, a data error, as to_pylist raised)
    return col.cast(pa.timestamp("us", tz=col.type.tz))


def _floor_us(chunk: pa.Array, us: pa.DataType) -> pa.Array:
    """Nanosecond instants floored to microseconds by integer division (``floor_temporal`` overflows, and wraps,
    within the first microsecond of the nanosecond range, 1677-09-21T00:12:43.145224)."""
    floored = chunk.cast(pa.int64()).fill_null(0).to_numpy() // 1000
    mask = chunk.is_null().to_numpy(zero_copy_only=False) if chunk.null_count else None
    return pa.array(floored, pa.int64(), mask=mask).cast(us)


def _values(col: pa.ChunkedArray, k: str) -> list:
    """The column's values as the payload needs them: timestamps RFC 3339 text, JSON-ish values as JSON text."""
    if is_json(col.type):
        return plain(col).to_pylist()
    if k == "time":
        return utc_text(_utc_micros(col), "T", "Z" if col.type.tz else "").to_pylist()
    values = plain(col).to_pylist()
    if k == "json":
        return [None if v is None else orjson.dumps(v, default=json_value_default).decode() for v in values]
    if k == "bytes":
        return [None if v is None else bytes(v) for v in values]
    if k == "double":
        return [None if v is None else float(v) for v in values]
    if k == "string" and (pa.types.is_fixed_size_binary(getattr(col.type, "storage_type", col.type))
                          or pa.types.is_uint64(col.type)):
        return [None if v is None else str(v) for v in values]
    return values


def encoder(fmt: str, cols: list[tuple[str, str]]) -> Callable[[pa.Table], list[bytes]]:
    """A function from a result table (with exactly ``cols``) to the payloads (no wire-format header)."""
    names = field_names(cols)
    if fmt == "jsonschema":
        fragments = tuple(n for n, k in cols if k == "json")
        return lambda table: json_rows(table, fragments)
    if fmt == "avro":
        parsed = fastavro.parse_schema(avro_schema(cols))

        def avro(table: pa.Table) -> list[bytes]:
            out = []
            data = [_values(table.column(n), k) for n, k in cols]
            for row in zip(*data, strict=True):
                buf = io.BytesIO()
                fastavro.schemaless_writer(buf, parsed, dict(zip(names, row, strict=True)))
                out.append(buf.getvalue())
            return out

        return avro
    pool = descriptor_pool.DescriptorPool()
    message = message_factory.GetMessageClass(pool.Add(proto_file(cols)).message_types_by_name[RECORD])

    def proto(table: pa.Table) -> list[bytes]:
        out = []
        data = [_values(table.column(n), k) for n, k in cols]
        for row in zip(*data, strict=True):
            out.append(message(**{n: v for n, v in zip(names, row, strict=True) if v is not None})
                       .SerializeToString())
        return out

    return proto


def header(fmt: str, schema_id: int) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + (b"\x00" if fmt == "protobuf" else b"")

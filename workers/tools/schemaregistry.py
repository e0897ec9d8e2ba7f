"""``schema --check registry:SUBJECT[/VERSION]``: a producer's schema fetched from the Schema Registry
(``SCORING_SCHEMA_REGISTRY__*``: URL, basic auth, CA file), in the JSON Schema shape ``check_producer`` reads.

The registry holds Avro, Protobuf and JSON Schema subjects; Avro and Protobuf are mapped to the properties a JSON
Schema would have for the values the wire decoder (workers/decode/wire.py) hands the model: numbers, integers,
booleans, text, enum symbols / enum value names (categories), null where the field may be absent. Bytes map to
the pseudo type ``bytes`` and nested records/messages to ``object``, so a feature typed so is an error, as
such records are dead-lettered. A field that may be null (Avro union with null, proto3 ``optional``) is not
required; Protobuf is read from its first message (message index [0], what a serializer writes by default).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from workers.decode.registry import RegistryClient, Schema, SchemaNotFound
from workers.errors import ConfigError
from workers.settings import SchemaRegistrySettings

PREFIX = "registry:"
_AVRO = {"null": "null", "boolean": "boolean", "int": "integer", "long": "integer", "float": "number",
         "double": "number", "string": "string", "bytes": "bytes"}


def parse_spec(spec: str) -> tuple[str, str]:
    """``registry:SUBJECT`` or ``registry:SUBJECT/VERSION`` -> (subject, version: a number or ``latest``)."""
    body = spec[len(PREFIX):]
    subject, _, version = body.rpartition("/") if "/" in body else (body, "", "latest")
    if not subject or not (version == "latest" or (version.isdigit() and int(version) > 0)):
        raise ConfigError("--check", f"{spec!r}: use registry:SUBJECT or registry:SUBJECT/VERSION "
                                     "(a version number or latest)")
    return subject, version


def fetch(settings: SchemaRegistrySettings, spec: str) -> tuple[dict[str, Any], str]:
    """(the producer's schema as JSON Schema, where it came from: ``subject version N (TYPE, id I)``).
    ConfigError for a missing URL or an unknown subject/version; RegistryUnavailable when it does not answer."""
    if not settings.url:
        raise ConfigError("SCORING_SCHEMA_REGISTRY__URL", f"--check {spec} reads the schema registry: set its URL")
    subject, version = parse_spec(spec)
    client = RegistryClient(settings)
    client.check()  # credentials refused / certificate not verified: ConfigError naming the setting
    try:
        got = client.subject_version(subject, version)
        kind = str(got.get("schemaType") or "AVRO").upper()
        if kind == "PROTOBUF":  # the FileDescriptorProto (the .proto text would need a parser)
            got = client.subject_version(subject, str(int(got["version"])), serialized=True)
    except SchemaNotFound:
        what = "no subject" if version == "latest" else "no version " + version + " of subject"
        raise ConfigError("--check", f"schema registry {client.shown} has {what} {subject!r}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError("--check", f"schema registry {client.shown}: unexpected answer for subject "
                                     f"{subject!r}") from None
    schema = Schema(int(got.get("id") or 0), kind, str(got.get("schema", "")), list(got.get("references") or []))
    origin = f"{subject} version {got.get('version', version)} ({kind}, id {schema.id})"
    try:
        if kind == "JSON":
            return orjson.loads(schema.text), origin
        if kind == "AVRO":
            return avro_as_json_schema(orjson.loads(schema.text)), origin
        if kind == "PROTOBUF":
            return proto_as_json_schema(client, schema), origin
    except SchemaNotFound as exc:  # a Protobuf reference the registry does not have
        raise ConfigError("--check", f"{origin}: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError("--check", f"{origin} cannot be read as a {kind} schema: {exc}"[:300]) from None
    raise ConfigError("--check", f"{origin}: schema type {kind} is not one the worker reads")


def avro_as_json_schema(avro: Any) -> dict[str, Any]:
    """An Avro record schema's fields as JSON Schema properties (named types resolved within the schema)."""
    if not isinstance(avro, dict) or avro.get("type") != "record":
        raise ValueError("the top-level type is not a record")
    named: dict[str, Any] = {}
    props, required = {}, []
    for f in avro.get("fields") or []:
        prop = _avro_prop(f["type"], named, avro.get("namespace", ""))
        props[f["name"]] = prop
        if "null" not in _types(prop):
            required.append(f["name"])
    return {"type": "object", "properties": props, "required": required}


def _types(prop: dict[str, Any]) -> set[str]:
    t = prop.get("type")
    out = set(t) if isinstance(t, list) else {t} if t else set()
    return out | {"null"} if None in prop.get("enum", ()) else out


def _union(members: list[dict[str, Any]]) -> dict[str, Any]:
    """One property for the values of any member (types listed, enum symbols listed, null as both)."""
    types = sorted({t for m in members for t in _types(m) if "enum" not in m})
    symbols = [v for m in members for v in m.get("enum", ())]
    out: dict[str, Any] = {}
    if symbols:
        out["enum"] = symbols + ([None] if "null" in types else [])
        types = [t for t in types if t != "null"]
    if types or not symbols:
        out["type"] = types
    return out


def _avro_prop(t: Any, named: dict[str, Any], ns: str) -> dict[str, Any]:
    if isinstance(t, list):  # a union, flattened: the category check reads a top-level "enum"
        return _union([_avro_prop(x, named, ns) for x in t])
    if isinstance(t, str):
        if t in _AVRO:
            return {"type": _AVRO[t]}
        full = t if "." in t else f"{ns}.{t}" if ns else t
        if full in named or t in named:
            return named.get(full) or named[t]
        raise ValueError(f"unknown type {t!r} (named types in other subjects are not followed)")
    if not isinstance(t, dict):
        raise ValueError(f"not a type: {t!r}")
    kind = t.get("type")
    if kind == "enum":
        prop: dict[str, Any] = {"enum": list(t.get("symbols") or [])}
    elif kind == "fixed":
        prop = {"type": "bytes"}
    elif kind == "record":
        prop = {"type": "object"}
    elif kind in ("array", "map"):
        prop = {"type": "array" if kind == "array" else "object"}
    else:
        return _avro_prop(kind, named, ns)  # {"type": "long", "logicalType": ...}: its underlying type
    if "name" in t:
        space = t.get("namespace", ns)
        named[t["name"] if "." in t["name"] or not space else f"{space}.{t['name']}"] = prop
        named[t["name"]] = prop
    if kind == "record":  # its own named types (used by later fields) count too
        for f in t.get("fields") or []:
            _avro_prop(f["type"], named, t.get("namespace", ns))
    return prop


def proto_as_json_schema(client: RegistryClient, schema: Schema) -> dict[str, Any]:
    """The first message of a Protobuf schema (its imports from the references) as JSON Schema properties."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    from workers.decode.wire import ProtobufFormat

    base64.b64decode(schema.text, validate=True)  # not base64: a ValueError, reported as unreadable
    _pool, file, names = ProtobufFormat(client, ()).compile(schema)  # the pool kept alive with its descriptors
    if not names:
        raise ValueError("the file has no message")
    desc = file.message_types_by_name[names[0]]
    numbers = (FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_SINT32, FD.TYPE_SINT64,
               FD.TYPE_FIXED32, FD.TYPE_FIXED64, FD.TYPE_SFIXED32, FD.TYPE_SFIXED64)
    props, required = {}, []
    for fd in desc.fields:
        if fd.type == FD.TYPE_ENUM:
            prop: dict[str, Any] = {"enum": [v.name for v in fd.enum_type.values]}
        else:
            t = ("integer" if fd.type in numbers else "number" if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT)
                 else "boolean" if fd.type == FD.TYPE_BOOL else "string" if fd.type == FD.TYPE_STRING
                 else "bytes" if fd.type == FD.TYPE_BYTES else "object")
            prop = {"type": t}
        if fd.label == FD.LABEL_REPEATED:
            prop = {"type": "array"}
        elif fd.has_presence:  # proto3 optional, a message field: may be absent (null)
            prop = _union([prop, {"type": "null"}])
        else:
            required.append(fd.name)  # proto3 without presence: always a value (the default when unset)
        props[fd.name] = prop
    return {"type": "object", "properties": props, "required": required}

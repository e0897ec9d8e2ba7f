"""Confluent wire-format record values (Avro, Protobuf, JSON Schema) -> the objects ``RecordDecoder`` maps to
features by name, with a reason for each value that is the record's fault.

Wire format: magic byte 0, the writer schema's id (4 bytes, big-endian), then the payload; Protobuf puts the
message indexes (zigzag varints: a count, then the path of the message in the schema's file; ``[0]`` written
as the single byte 0) before it. Each id's schema is fetched once (``workers.decode.registry``) and compiled
once: a fastavro parsed schema, a Protobuf message class built from the registry's FileDescriptorProto
(``format=serialized``) in a descriptor pool of its own, or a JSON Schema validator.

Fields map to features by name, so writer schemas evolve freely: a feature the writer's schema lacks is
missing (null), extra fields are ignored unless passed through, records of several schema ids mix in a batch.
Avro enums decode to their symbol and Protobuf enums to their value's name, so categorical features map
through the model's categories as JSON strings do.

Two steps, on two threads: ``prepare`` (the pipeline's main thread) fetches the schemas a batch names and may
raise ``RegistryUnavailable`` (retried, partitions paused); ``parse`` (any thread) uses only what was fetched,
so scoring never waits on the registry.
"""

from __future__ import annotations

import base64
import io
import re
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import orjson

from workers.decode.avrofast import compile_reader
from workers.decode.records import MAX_ID_LENGTH, Decoded, RecordDecoder, exact_loads, long_number
from workers.decode.registry import RegistryClient, RegistryUnavailable, Schema, SchemaNotFound
from workers.settings import Settings

MAGIC = 0
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
Parsed = tuple[list[Any], dict[int, str]]  # objects (None where a reason is), reasons by record index

_avrorows: ModuleType | None
try:  # the native reader of flat Avro records (workers/decode/_avrorows.cpp), built by the install
    from workers.decode import _avrorows
except ImportError:  # pragma: no cover - a build without a compiler: every record takes the Python path
    _avrorows = None


class PayloadError(ValueError):
    """A payload that is readable but wrong for its schema (its message is the whole reason)."""


def schema_id_of(value: bytes | None) -> int | None:
    """The schema id of a wire-format value, or None when the value is not one (its reason comes in parse)."""
    if value is None or len(value) < 5 or value[0] != MAGIC:
        return None
    return int.from_bytes(value[1:5], "big")


class WireFormat:
    """One of the registry formats; subclasses compile a schema and read a payload with it."""

    kind = ""  # the registry's schemaType
    serialized = False  # ask the registry for ?format=serialized

    def __init__(self, registry: RegistryClient):
        self.registry = registry
        self.compiled: dict[int, Any] = {}  # schema id -> compiled schema, or a str: why it cannot be used
        self.lock = threading.Lock()

    def want(self, names: Sequence[str]) -> None:
        """The field names decoders read (the routing may change them on reload); Protobuf reads only those."""

    def prepare(self, values: Sequence[bytes | None]) -> None:
        """Fetch and compile every schema the batch names (RegistryUnavailable: the caller retries)."""
        for sid in {schema_id_of(v) for v in values} - {None} - set(self.compiled):
            assert sid is not None
            schema = self.registry.fetch(sid, self.serialized)
            if schema is None:
                continue  # a 404: parse gives the reason (asked again after a while)
            compiled = self._compile_checked(schema)
            with self.lock:
                self.compiled[sid] = compiled

    def _compile_checked(self, schema: Schema) -> Any:
        if schema.schema_type != self.kind:
            return f"schema id {schema.id} is a {schema.schema_type} schema, not {self.kind}"
        try:
            return self.compile(schema)
        except RegistryUnavailable:
            raise  # fetching a reference failed: the registry's outage (retried), not a fault of the schema
        except SchemaNotFound as exc:
            return f"schema id {schema.id} references a schema the registry does not have ({exc})"
        except Exception as exc:  # noqa: BLE001 - any schema the library refuses is unusable for its records
            return f"schema id {schema.id} cannot be used: {type(exc).__name__}: {exc}"[:300]

    def parse(self, values: Sequence[bytes | None]) -> Parsed:
        objs: list[Any] = []
        reasons: dict[int, str] = {}
        for i, value in enumerate(values):
            obj, reason = self.parse_one(value)
            if reason is not None:
                reasons[i] = reason
            objs.append(obj)
        return objs, reasons

    def parse_one(self, value: bytes | None) -> tuple[Any, str | None]:
        """One value: (object, None), or (None, the reason it cannot be read)."""
        if value is None:
            return None, "empty value (tombstone)"
        if not value:
            return None, "not the Confluent wire format: empty value"
        if value[0] != MAGIC:
            return None, f"not the Confluent wire format: magic byte {value[0]}, expected 0"
        if len(value) < 5:
            return None, f"not the Confluent wire format: {len(value)} bytes, shorter than its 5-byte header"
        sid = int.from_bytes(value[1:5], "big")
        schema = self.compiled.get(sid)
        if schema is None:
            return None, f"schema id {sid} is not in the schema registry"
        if type(schema) is str:
            return None, schema
        try:
            return self.read(schema, value, sid), None
        except PayloadError as exc:
            return None, f"{self.kind} schema id {sid}: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001 - the payload does not decode: the record's fault
            # fastavro names its reader object with a memory address ("<_io.BytesIO object at 0x7f...>"): left
            # out, so one payload gets one reason in every run
            shown = _ADDRESS.sub("", str(exc))
            return None, f"does not decode as {self.kind} schema id {sid}: {type(exc).__name__}: {shown}"[:300]

    def compile(self, schema: Schema) -> Any:
        raise NotImplementedError

    def read(self, compiled: Any, value: bytes, sid: int) -> Any:
        raise NotImplementedError

    def rows(self, decoder: RecordDecoder, values: Sequence[bytes | None],
             keys: Sequence[bytes | None] | None) -> Decoded | None:
        """The batch decoded by a native reader of this format for ``decoder``, or None (none: the caller
        parses and decodes it the Python way)."""
        return None


class AvroFormat(WireFormat):
    kind = "AVRO"

    def __init__(self, registry: RegistryClient):
        super().__init__(registry)
        # (schema id, (feature names, id field)) -> the native reader's program, or None (see avro_program)
        self._programs: dict[tuple[int, tuple[tuple[str, ...], str]], tuple[int, ...] | None] = {}

    def compile(self, schema: Schema) -> Any:
        import fastavro

        named: dict[str, Any] = {}
        self._add_references(schema.references, named, set())
        parsed = fastavro.parse_schema(orjson.loads(schema.text), named)
        return parsed, compile_reader(parsed)  # the compiled reader: None for a schema it leaves to fastavro

    def parse(self, values: Sequence[bytes | None]) -> Parsed:
        """The compiled readers first, keyed by the 5-byte header (magic byte and schema id); a value none of them
        reads (no header, another id, a payload the strict reader refuses) goes the general way, ``parse_one``."""
        with self.lock:
            readers = {bytes([MAGIC]) + sid.to_bytes(4, "big"): c[1] for sid, c in self.compiled.items()
                       if type(c) is tuple and c[1] is not None}
        if not readers:
            return super().parse(values)
        objs: list[Any] = []
        reasons: dict[int, str] = {}
        append, one = objs.append, self.parse_one
        for i, value in enumerate(values):
            try:
                append(readers[value[:5]](value, 5))  # type: ignore[index]
                continue
            except Exception:  # noqa: BLE001, S110 - a tombstone, another schema, a malformed payload: below
                pass
            obj, reason = one(value)
            if reason is not None:
                reasons[i] = reason
            append(obj)
        return objs, reasons

    def rows(self, decoder: RecordDecoder, values: Sequence[bytes | None],
             keys: Sequence[bytes | None] | None) -> Decoded | None:
        """Records of flat schemas (``avro_program``) read natively (workers/decode/_avrorows.cpp), the others
        and every record it does not accept by ``parse`` and the decoder's Python path."""
        if _avrorows is None or not decoder.native_for(values, keys):
            return None
        signature = (decoder.names_tuple, decoder.id_field)
        with self.lock:
            compiled = [(sid, c) for sid, c in self.compiled.items() if type(c) is tuple and c[1] is not None]
        programs: dict[bytes, tuple[int, ...]] = {}
        for sid, (parsed, _) in compiled:
            key = (sid, signature)
            if key not in self._programs:
                self._programs[key] = avro_program(parsed, decoder.names, decoder.id_field)
            program = self._programs[key]
            if program is not None:
                programs[bytes([MAGIC]) + sid.to_bytes(4, "big")] = program
        if not programs:
            return None
        native, width = _avrorows, len(decoder.names)
        return decoder.decode_rows(values, keys, lambda v, k, out: native.rows(v, programs, k, width,
                                                                            MAX_ID_LENGTH, out),
                                   self.parse, from_json=False)

    def _add_references(self, references: list[dict], named: dict[str, Any], seen: set[tuple[str, int]]) -> None:
        """Named types of other subjects, parsed into one namespace before the schema using them; a referenced
        schema's own references first (they may go any number of levels deep)."""
        import fastavro

        for ref in references:
            key = (str(ref["subject"]), int(ref["version"]))
            if key in seen:
                continue
            seen.add(key)
            text, nested = self.registry.reference(*key)
            self._add_references(nested, named, seen)
            fastavro.parse_schema(orjson.loads(text), named)

    def read(self, compiled: Any, value: bytes, sid: int) -> Any:
        """The compiled reader's record; fastavro's (value or exception) for a payload that reader refuses and
        for schemas it does not read (``workers.decode.avrofast``)."""
        parsed, fast = compiled
        if fast is not None:
            try:
                return fast(value, 5)
            except Exception:  # noqa: BLE001, S110 - malformed for the strict reader: fastavro says what it is
                pass
        from fastavro import schemaless_reader

        buf = io.BytesIO(value)
        buf.seek(5)
        obj = schemaless_reader(buf, parsed, None)
        if buf.tell() != len(value):
            raise ValueError(f"{len(value) - buf.tell()} bytes left after the record")
        return obj


_AVRO_KINDS = {"null": 0, "boolean": 1, "int": 2, "long": 2, "float": 3, "double": 4, "string": 5, "bytes": 6}


def _avro_branch(schema: Any) -> tuple[int, int] | None:
    """(kind, extra) of a value type the native reader reads (_avrorows.cpp's Kind), or None."""
    if isinstance(schema, str):
        kind = _AVRO_KINDS.get(schema)
        return None if kind is None else (kind, 0)
    if isinstance(schema, dict) and "logicalType" not in schema:  # a logical type: fastavro converts it
        t = schema.get("type")
        if isinstance(t, str) and t in _AVRO_KINDS:
            return _AVRO_KINDS[t], 0
        if t == "enum":
            return 7, len(schema["symbols"])
        if t == "fixed":
            size = schema["size"]
            return (8, size) if type(size) is int and 0 <= size < 2**31 else None  # fastavro takes any number
    return None


def avro_program(schema: Any, names: Sequence[str], id_field: str) -> tuple[int, ...] | None:
    """The native reader's program for records of ``schema`` (fastavro-parsed) decoded for features ``names``
    and ``id_field``: per field (dest: the feature column, -2 the id, -1 skipped; 1 for a union, else 0; the
    number of branches; then kind and extra of each). None for a schema it does not read: anything but a
    record of primitives, inline enums and fixed (of a size from 0 to 2^31 - 1), and unions of those, without
    logical types; a field name given twice; or the id field also a feature."""
    if not isinstance(schema, dict) or schema.get("type") != "record" or id_field in names:
        return None
    if len({fd.get("name") for fd in schema.get("fields", [])}) != len(schema.get("fields", [])):
        return None  # a name written twice: the Python path keeps the last field's value
    column = {name: j for j, name in enumerate(names)}
    program: list[int] = []
    try:
        for fd in schema["fields"]:
            name = fd["name"]
            dest = column.get(name, -2 if name == id_field else -1)
            t = fd["type"]
            branches = [_avro_branch(b) for b in t] if isinstance(t, list) else [_avro_branch(t)]
            if not branches or any(b is None for b in branches):
                return None
            program += [dest, int(isinstance(t, list)), len(branches)]
            for b in branches:
                program += b  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None
    return tuple(program)


def _varint(value: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint at ``pos``: (value, position after it)."""
    shift = result = 0
    while True:
        if pos >= len(value) or shift > 63:
            raise ValueError("truncated message index")
        b = value[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


# google.protobuf wrappers: proto3's nullable scalars (unset = missing). MessageToDict would give JSON's mapping,
# where Int64Value/UInt64Value are text ("7"), so their value is read directly.
_WRAPPERS = frozenset(f"google.protobuf.{k}Value" for k in
                      ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes"))


class ProtobufFormat(WireFormat):
    """The registry's FileDescriptorProto (``format=serialized``) into a pool of its own, rather than parsing the
    .proto text: it is the form protoc produces and the upb runtime loads directly, with no parser to trust
    beside protobuf itself; imports are the references, loaded first (Google's well-known types are built in)."""

    kind = "PROTOBUF"
    serialized = True

    def __init__(self, registry: RegistryClient, wanted: Sequence[str]):
        super().__init__(registry)
        self.wanted = frozenset(wanted)
        self.classes: dict[tuple[int, tuple[int, ...]], tuple[Any, Callable[[Any], dict]]] = {}

    def want(self, names: Sequence[str]) -> None:
        if frozenset(names) != self.wanted:
            self.wanted = frozenset(names)
            self.classes = {}

    def compile(self, schema: Schema) -> Any:
        from google.protobuf import descriptor_pb2, descriptor_pool

        pool = descriptor_pool.DescriptorPool()
        self._add(pool, schema.text, schema.references, set())
        proto = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(schema.text))
        return pool, pool.FindFileByName(proto.name), [m.name for m in proto.message_type]

    def _add(self, pool: Any, text: str, references: list[dict], seen: set[str]) -> None:
        """Add the file ``text`` (base64 FileDescriptorProto) after its imports: Google's well-known types from
        the runtime, the others from the registry subjects its references name (their own imports first)."""
        from google.protobuf import (  # noqa: F401 - imported so the default pool has them to copy from
            any_pb2,
            descriptor_pb2,
            descriptor_pool,
            duration_pb2,
            empty_pb2,
            struct_pb2,
            timestamp_pb2,
            wrappers_pb2,
        )

        proto = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text))
        by_name = {ref["name"]: ref for ref in references}
        for dep in proto.dependency:
            if dep in seen:
                continue
            seen.add(dep)
            if dep.startswith("google/protobuf/"):
                try:
                    pool.AddSerializedFile(descriptor_pool.Default().FindFileByName(dep).serialized_pb)
                    continue
                except KeyError:
                    pass
            ref = by_name.get(dep)
            if ref is None:
                raise SchemaNotFound(f"it imports {dep}, which no reference names")
            self._add(pool, *self.registry.reference(ref["subject"], ref["version"], serialized=True), seen)
        pool.Add(proto)

    def read(self, compiled: Any, value: bytes, sid: int) -> Any:
        count, pos = _varint(value, 5)
        path: tuple[int, ...]
        if count == 0:
            path = (0,)
        else:
            if count < 0 or count > 64:
                raise ValueError(f"message index count {count}")
            items = []
            for _ in range(count):
                index, pos = _varint(value, pos)
                if index < 0:  # zigzag allows it; Python's negative indexing would pick a message from the end
                    raise ValueError(f"negative message index {index}")
                items.append(index)
            path = tuple(items)
        made = self.classes.get((sid, path))
        if made is None:
            made = self._class(compiled[1], compiled[2], path)
            self.classes[(sid, path)] = made
        cls, to_obj = made
        msg = cls.FromString(value[pos:])
        return to_obj(msg)

    def _class(self, file: Any, names: list[str], path: tuple[int, ...]) -> tuple[Any, Callable[[Any], dict]]:
        from google.protobuf import message_factory

        try:
            desc = file.message_types_by_name[names[path[0]]]
            for index in path[1:]:
                desc = desc.nested_types[index]
        except IndexError:
            raise ValueError(f"no message at index {list(path)} in {file.name}") from None
        return message_factory.GetMessageClass(desc), self._reader(desc)

    def _reader(self, desc: Any) -> Callable[[Any], dict]:
        """msg -> {field name: value} for the wanted fields the message has: enums as their names, unset fields
        that track presence as None, nested messages and repeated fields as JSON-like values."""
        from google.protobuf.descriptor import FieldDescriptor
        from google.protobuf.json_format import MessageToDict

        plain, special = [], []
        wrappers = _WRAPPERS
        for fd in desc.fields:
            if fd.name not in self.wanted:
                continue
            # protobuf 6 deprecates .label (a warning per field); older runtimes lack .is_repeated
            repeated = fd.is_repeated if hasattr(type(fd), "is_repeated") else \
                fd.label == FieldDescriptor.LABEL_REPEATED
            if not repeated and fd.type not in (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE) \
                    and not fd.has_presence:
                plain.append(fd.name)
            else:
                special.append((fd.name, fd, repeated))

        def value_of(msg: Any, name: str, fd: Any, repeated: bool) -> Any:
            if repeated:
                return MessageToDict(msg, preserving_proto_field_name=True).get(name)
            if fd.has_presence and not msg.HasField(name):
                return None
            v = getattr(msg, name)
            if fd.type == FieldDescriptor.TYPE_ENUM:
                known = fd.enum_type.values_by_number.get(v)
                return known.name if known is not None else v
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                if fd.message_type.full_name in wrappers:  # a nullable scalar: its value, not JSON's text for int64
                    return v.value
                return MessageToDict(v, preserving_proto_field_name=True)
            return v

        def to_obj(msg: Any) -> dict:
            obj = {name: getattr(msg, name) for name in plain}
            for name, fd, repeated in special:
                obj[name] = value_of(msg, name, fd, repeated)
            return obj

        return to_obj


class JsonSchemaFormat(WireFormat):
    kind = "JSON"

    def compile(self, schema: Schema) -> Any:
        from jsonschema.validators import validator_for
        from referencing import Registry
        from referencing.jsonschema import DRAFT202012, specification_with

        doc = orjson.loads(schema.text)
        cls = validator_for(doc)
        cls.check_schema(doc)
        spec = specification_with(cls.META_SCHEMA.get("$schema", ""), default=DRAFT202012)
        resources: list[tuple[str, Any]] = []
        self._references(schema.references, spec, resources, set(), str(doc.get("$id") or "")
                         if isinstance(doc, dict) else "")
        return cls(doc, registry=Registry().with_resources(resources))

    def _references(self, references: list[dict], spec: Any, out: list[tuple[str, Any]],
                    seen: set[tuple[str, int, str, str]], base: str) -> None:
        """The schemas of other subjects a ``$ref`` may name: under the reference's name (what the ``$ref``
        says), that name resolved against the referring schema's ``$id`` (``base``: where a relative ``$ref``
        lands), and their own ``$id``; their own references too. Nothing is fetched from ``$ref`` URLs."""
        from urllib.parse import urljoin

        from referencing import Resource

        for ref in references:
            key = (str(ref["subject"]), int(ref["version"]))
            name = str(ref["name"])
            if (*key, name, base) in seen:  # one schema may be named differently by different referrers
                continue
            seen.add((*key, name, base))
            text, nested = self.registry.reference(*key)
            resource = Resource.from_contents(orjson.loads(text), default_specification=spec)
            out.append((name, resource))
            if base:
                out.append((urljoin(base, name), resource))
            if resource.id():
                out.append((str(resource.id()), resource))
            self._references(nested, spec, out, seen, str(resource.id() or (urljoin(base, name) if base else "")))

    def read(self, compiled: Any, value: bytes, sid: int) -> Any:
        payload = value[5:]
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise PayloadError(f"not valid JSON: {str(exc)[:120]}") from None
        if long_number(payload):
            obj = exact_loads(payload)
        error = next(iter(compiled.iter_errors(obj)), None)
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "(root)"
            raise PayloadError(f"does not match the schema at {where}: {error.message[:200]}")
        return obj


def wire_format(value_format: str, registry: RegistryClient, wanted: Sequence[str] = ()) -> WireFormat:
    """The reader of ``value_format`` (``wanted``: the field names any decoder reads: features, id, passthrough)."""
    if value_format == "avro":
        return AvroFormat(registry)
    if value_format == "protobuf":
        return ProtobufFormat(registry, wanted)
    if value_format == "jsonschema":
        return JsonSchemaFormat(registry)
    raise ValueError(value_format)


def from_settings(settings: Settings) -> WireFormat | None:
    """The stream's wire format, None for plain JSON. No network I/O (a bad CA file is ConfigError already)."""
    fmt = settings.stream.value_format
    if fmt == "json":
        return None
    return wire_format(fmt, RegistryClient(settings.schema_registry))

"""Break-it review of Schema Registry input (issue 16): records written by confluent-kafka's own serializers (or,
where a serializer cannot write the case, by fastavro/protobuf as a serializer would) against tests/schema_registry.py,
read by the worker's wire formats and record decoder, scores checked against Booster.predict. Most tests drive
``workers.decode`` directly (a real registry over HTTP, no broker: fast); the stream test runs a real worker."""

from __future__ import annotations

import decimal
import io
import json

import fastavro
import lightgbm as lgb
import numpy as np
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

from tests.schema_registry import TestRegistry
from workers.decode.records import RecordDecoder
from workers.decode.registry import RegistryClient, RegistryUnavailable
from workers.decode.wire import wire_format
from workers.scoring.model import load_model
from workers.settings import ModelSettings, SchemaRegistrySettings

FEATURES = [f"x{j}" for j in range(8)]
F = descriptor_pb2.FieldDescriptorProto
CTX = SerializationContext("t", MessageField.VALUE)


def wire(value_format: str, reg: TestRegistry, url: str | None = None):
    names = ["id", *FEATURES]
    return wire_format(value_format, RegistryClient(SchemaRegistrySettings(url=url or reg.url)), names)


def decode(models, fmt, values: list[bytes | None]):
    """What the stream's score lane does with a batch: prepare (fetch), parse, decode to features."""
    fmt.prepare(values)
    decoder = RecordDecoder(load_model(ModelSettings(path=models["binary"])))
    return decoder.decode(values, None, fmt.parse(values))


def booster_scores(models, recs: list[dict]) -> np.ndarray:
    matrix = np.array([[np.nan if r.get(f) is None else float(r[f]) for f in FEATURES] for r in recs])
    return lgb.Booster(model_file=models["binary"]).predict(matrix)


def assert_scores(models, decoded, recs: list[dict]) -> None:
    assert decoded.features.reasons == {}, decoded.features.reasons
    model = load_model(ModelSettings(path=models["binary"]))
    got = model.predict(np.ascontiguousarray(decoded.features.matrix))
    assert decoded.ids == [r["id"] for r in recs]
    np.testing.assert_allclose(got, booster_scores(models, recs), rtol=0, atol=1e-12)


def avro_value(sid: int, parsed_schema, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema, record)
    return b"\0" + sid.to_bytes(4, "big") + buf.getvalue()


# -- Avro ----------------------------------------------------------------------------------------------------
def test_avro_reference_that_has_references_of_its_own(models):
    """A subject whose referenced schema references a third (Top -> Mid -> Inner): every level is loaded, as
    Confluent's deserializer does; the schema was usable only when the references were one level deep."""
    reg = TestRegistry()
    inner = {"type": "record", "name": "Inner", "namespace": "t", "fields": [{"name": "z", "type": "double"}]}
    mid = {"type": "record", "name": "Mid", "namespace": "t", "fields": [{"name": "inner", "type": "t.Inner"}]}
    top = {"type": "record", "name": "Top", "namespace": "t",
           "fields": [{"name": "id", "type": "string"}, *({"name": f, "type": "double"} for f in FEATURES),
                      {"name": "m", "type": "t.Mid"}]}
    reg.register("inner", json.dumps(inner))
    reg.register("mid", json.dumps(mid), references=[{"name": "t.Inner", "subject": "inner", "version": 1}])
    sid = reg.register("top-value", json.dumps(top), references=[{"name": "t.Mid", "subject": "mid", "version": 1}])
    named: dict = {}
    fastavro.parse_schema(inner, named)
    fastavro.parse_schema(mid, named)
    parsed = fastavro.parse_schema(top, named)
    recs = [{"id": f"r{i}", **{f: i * 0.1 - j for j, f in enumerate(FEATURES)}} for i in range(5)]
    values = [avro_value(sid, parsed, {**r, "m": {"inner": {"z": 1.0}}}) for r in recs]
    assert_scores(models, decode(models, wire("avro", reg), values), recs)


def test_avro_decimal_feature_is_a_number(models):
    """An amount written as Avro ``decimal`` (bytes, a logical type) is a number; it was dead-lettered as
    'expected a number, got Decimal' although the README lists only text, bytes and records as non-features."""
    reg = TestRegistry()
    schema = {"type": "record", "name": "D", "namespace": "t", "fields": [
        {"name": "id", "type": "string"},
        {"name": "x0", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 4}},
        {"name": "x1", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 4}],
         "default": None},
        *({"name": f, "type": "double"} for f in FEATURES[2:])]}
    ser = AvroSerializer(SchemaRegistryClient({"url": reg.url}), json.dumps(schema))
    recs = [{"id": f"d{i}", "x0": decimal.Decimal("1.2345") * i, "x1": None if i % 2 else decimal.Decimal("-0.5"),
             **{f: 0.25 * j for j, f in enumerate(FEATURES[2:])}} for i in range(6)]
    decoded = decode(models, wire("avro", reg), [ser(r, CTX) for r in recs])
    assert_scores(models, decoded, recs)


# -- Protobuf ------------------------------------------------------------------------------------------------
def wrappers_file() -> descriptor_pb2.FileDescriptorProto:
    """Nullable numbers the proto3 way: google.protobuf wrappers (DoubleValue, Int64Value, Int32Value, FloatValue)."""
    fdp = descriptor_pb2.FileDescriptorProto(name="wrapped.proto", package="bk", syntax="proto3",
                                             dependency=["google/protobuf/wrappers.proto"])
    fdp.message_type.add(name="Other").field.add(name="q", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    msg = fdp.message_type.add(name="In")
    msg.field.add(name="id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    kinds = ["DoubleValue", "Int64Value", "Int32Value", "FloatValue", "UInt64Value", "DoubleValue", "DoubleValue",
             "DoubleValue"]
    for j, (f, kind) in enumerate(zip(FEATURES, kinds, strict=True)):
        msg.field.add(name=f, number=2 + j, type=F.TYPE_MESSAGE, type_name=f".google.protobuf.{kind}",
                      label=F.LABEL_OPTIONAL)
    return fdp


def proto_class(fdp: descriptor_pb2.FileDescriptorProto, name: str):
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def test_protobuf_wrapper_types_are_numbers(models):
    """Int64Value/UInt64Value features (and Int32Value, FloatValue, DoubleValue; unset is missing): the int64 ones
    came out as JSON's text form ('7') and every such record was dead-lettered as 'expected a number, got str'."""
    reg = TestRegistry()
    cls = proto_class(wrappers_file(), "bk.In")
    ser = ProtobufSerializer(cls, SchemaRegistryClient({"url": reg.url}), {"use.deprecated.format": False})
    recs = [{"id": f"w{i}", "x0": 0.5 * i, "x1": i - 3, "x2": 2 * i, "x3": 0.25, "x4": 10**12 + i,
             "x5": None if i % 3 == 0 else -1.5, "x6": 0.0, "x7": 1.0} for i in range(6)]
    values = [ser(cls(id=r["id"], **{f: {"value": v} for f, v in r.items() if f != "id" and v is not None}), CTX)
              for r in recs]
    decoded = decode(models, wire("protobuf", reg), values)
    assert_scores(models, decoded, recs)


def test_protobuf_negative_message_index_is_dead_lettered(models):
    """A message index is a zigzag varint; -1 is not a message (it read the file's last message as if it were
    named, a wrong record silently scored when its bytes happen to parse)."""
    reg = TestRegistry()
    cls = proto_class(wrappers_file(), "bk.In")
    ser = ProtobufSerializer(cls, SchemaRegistryClient({"url": reg.url}), {"use.deprecated.format": False})
    good = ser(cls(id="a", x0={"value": 1.0}), CTX)
    assert good[5:7] == b"\x02\x02"  # one index: 1 (In is the file's second message)
    bad = good[:5] + b"\x02\x01" + good[7:]  # one index: -1
    fmt = wire("protobuf", reg)
    fmt.prepare([good, bad])
    objs, reasons = fmt.parse([good, bad])
    assert objs[0] == {"id": "a", "x0": 1.0, **{f: None for f in FEATURES[1:]}}
    assert objs[1] is None and "message index" in reasons[1] and "-1" in reasons[1], reasons


# -- JSON Schema ---------------------------------------------------------------------------------------------
def test_jsonschema_ref_to_a_referenced_subject(models):
    """A JSON Schema whose ``$ref`` names another subject's schema (a registry reference, as Confluent's
    JSONSerializer registers it): the reference is loaded; every record was dead-lettered 'Unresolvable'."""
    reg = TestRegistry()
    num = {"$id": "https://example.com/num.json", "type": ["number", "null"]}
    reg.register("num", json.dumps(num), "JSON")
    main = {"type": "object", "required": ["id"],
            "properties": {"id": {"type": "string"},
                           **{f: {"$ref": "https://example.com/num.json"} for f in FEATURES}}}
    sid = reg.register("j-value", json.dumps(main), "JSON",
                       references=[{"name": "https://example.com/num.json", "subject": "num", "version": 1}])
    recs = [{"id": f"j{i}", **{f: (None if (i + j) % 5 == 0 else i - j * 0.5) for j, f in enumerate(FEATURES)}}
            for i in range(5)]
    bad = {"id": "bad", "x0": "high"}
    values = [b"\0" + sid.to_bytes(4, "big") + json.dumps(r).encode() for r in [*recs, bad]]
    fmt = wire("jsonschema", reg)
    fmt.prepare(values)
    objs, reasons = fmt.parse(values)
    assert list(reasons) == [5] and "does not match the schema at x0" in reasons[5], reasons
    assert_scores(models, decode(models, fmt, values[:5]), recs)


# -- the registry --------------------------------------------------------------------------------------------
class FlakyReferences(TestRegistry):
    """Answers 500 to the first ``n`` requests for a subject version (a reference), then normally."""

    def __init__(self, n: int):
        self.fail_refs = n
        super().__init__()

    def handle(self, h, body):
        if h.path.startswith("/subjects/") and body is None and self.fail_refs > 0:
            self.fail_refs -= 1
            self.requests.append(h.path)
            self._reply(h, 500, {"error_code": 50001, "message": "backend timeout"})
            return
        super().handle(h, body)


def test_registry_error_on_a_reference_is_retried_not_dead_letters(models):
    """A 5xx while fetching a referenced schema is the registry's outage, not the records' fault: prepare raises
    RegistryUnavailable (the pipeline pauses and retries) and the schema is usable once the registry answers. It
    was cached for good as 'cannot be used: RegistryUnavailable', dead-lettering every record of that id."""
    reg = FlakyReferences(1)
    common = {"type": "record", "name": "Common", "namespace": "t", "fields": [{"name": "z", "type": "double"}]}
    top = {"type": "record", "name": "Top", "namespace": "t",
           "fields": [{"name": "id", "type": "string"}, *({"name": f, "type": "double"} for f in FEATURES),
                      {"name": "c", "type": "t.Common"}]}
    reg.register("common", json.dumps(common))
    sid = reg.register("top-value", json.dumps(top), references=[{"name": "t.Common", "subject": "common",
                                                                  "version": 1}])
    named: dict = {}
    fastavro.parse_schema(common, named)
    parsed = fastavro.parse_schema(top, named)
    recs = [{"id": f"r{i}", **{f: i + j * 0.3 for j, f in enumerate(FEATURES)}} for i in range(3)]
    values = [avro_value(sid, parsed, {**r, "c": {"z": 0.0}}) for r in recs]
    fmt = wire("avro", reg)
    with pytest.raises(RegistryUnavailable, match="500"):
        fmt.prepare(values)
    assert_scores(models, decode(models, fmt, values), recs)


def test_wrong_registry_path_is_an_outage_not_dead_letters(models):
    """A URL missing its path prefix (``https://host/registry`` written as ``https://host``: here, an extra
    segment) makes every request 404 without the registry's 'schema not found' code (40403): that is the
    setting's fault, not every record's. It dead-lettered the whole stream as 'not in the schema registry'."""
    reg = TestRegistry()
    ser = AvroSerializer(SchemaRegistryClient({"url": reg.url}), json.dumps(
        {"type": "record", "name": "P", "fields": [{"name": "id", "type": "string"}]}))
    value = ser({"id": "a"}, CTX)
    fmt = wire("avro", reg, url=reg.url + "/wrong-prefix")
    with pytest.raises(RegistryUnavailable, match="404"):
        fmt.prepare([value])
    # A real "schema not found" (40403) is still the record's fault.
    missing = b"\0\0\0\x03\xe7" + value[5:]
    fmt = wire("avro", reg)
    fmt.prepare([missing])
    assert fmt.parse([missing])[1] == {0: "schema id 999 is not in the schema registry"}


# -- Protobuf as a team writes it: imports, nested messages, oneof, optional, repeated, maps --------------------
def test_protobuf_imports_nested_index_oneof_maps(models):
    """ProtobufSerializer with an imported file (registered as a reference by the serializer), the input a nested
    message (index [1, 0]), a oneof, proto3 optional, repeated and map fields beside the features."""
    reg = TestRegistry()
    common = descriptor_pb2.FileDescriptorProto(name="bk/common.proto", package="bk.common", syntax="proto3")
    meta = common.message_type.add(name="Meta")
    meta.field.add(name="source", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    main = descriptor_pb2.FileDescriptorProto(name="bk/main.proto", package="bk", syntax="proto3",
                                              dependency=["bk/common.proto", "google/protobuf/wrappers.proto"])
    main.message_type.add(name="Unrelated").field.add(name="q", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    outer = main.message_type.add(name="Envelope")
    outer.field.add(name="n", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    inp = outer.nested_type.add(name="Input")
    inp.field.add(name="id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    inp.oneof_decl.add(name="first")
    inp.field.add(name="x0", number=2, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL, oneof_index=0)
    inp.field.add(name="x0_text", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL, oneof_index=0)
    inp.oneof_decl.add(name="_x1")
    inp.field.add(name="x1", number=4, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL, oneof_index=1,
                  proto3_optional=True)
    inp.field.add(name="x2", number=5, type=F.TYPE_MESSAGE, type_name=".google.protobuf.DoubleValue",
                  label=F.LABEL_OPTIONAL)
    for j, f in enumerate(FEATURES[3:]):
        inp.field.add(name=f, number=6 + j, type=F.TYPE_FLOAT if j == 0 else F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    inp.field.add(name="tags", number=20, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    entry = inp.nested_type.add(name="AttrsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    inp.field.add(name="attrs", number=21, type=F.TYPE_MESSAGE, type_name=".bk.Envelope.Input.AttrsEntry",
                  label=F.LABEL_REPEATED)
    inp.field.add(name="meta", number=22, type=F.TYPE_MESSAGE, type_name=".bk.common.Meta", label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(common)
    pool.Add(main)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("bk.Envelope.Input"))
    ser = ProtobufSerializer(cls, SchemaRegistryClient({"url": reg.url}), {"use.deprecated.format": False})
    recs = []
    values = []
    for i in range(8):
        r = {"id": f"p{i}", "x0": None if i % 4 == 3 else i * 0.5, "x1": None if i % 2 else -i * 0.25,
             "x2": None if i % 3 == 0 else 0.75, "x3": 0.5, **{f: i - j for j, f in enumerate(FEATURES[4:])}}
        kw = {k: v for k, v in r.items() if v is not None and k not in ("x0", "x2")}
        if r["x0"] is not None:
            kw["x0"] = r["x0"]
        else:
            kw["x0_text"] = "other branch of the oneof"
        if r["x2"] is not None:
            kw["x2"] = {"value": r["x2"]}
        values.append(ser(cls(**kw, tags=["a", "b"], attrs={"k": 1.0}, meta={"source": "s"}), CTX))
        recs.append(r)
    assert values[0][5:8] == b"\x04\x02\x00"  # message indexes [1, 0]
    assert any(s.startswith("/subjects/bk%2Fcommon.proto") or "bk/common.proto" in s for s in reg.subjects)
    assert_scores(models, decode(models, wire("protobuf", reg), values), recs)


# -- a real worker -------------------------------------------------------------------------------------------
@pytest.mark.kafka
def test_stream_avro_mixed_ids_tombstones_headers_huge_record(models, kafka, tmp_path):
    """One partition, one batch: records of three writer schemas (v2 renames x7 and adds a nested record, an enum
    and logical types; v3 drops x6 and makes x0 a decimal), a tombstone and a key without value, headers, and a
    record of ~700 KB. Each good record is stored once with Booster.predict's score, the null values are
    dead-lettered with their reason, and everything is committed."""
    import signal
    import sqlite3

    from tests.kafka_util import wait_for

    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    topic = kafka.topic(partitions=1)
    ctx = SerializationContext(topic, MessageField.VALUE)
    nullable = [{"name": f, "type": ["null", "double"], "default": None} for f in FEATURES]
    v1 = {"type": "record", "name": "In", "namespace": "bk", "fields": [{"name": "id", "type": "string"}, *nullable,
                                                                        {"name": "blob", "type": "string",
                                                                         "default": ""}]}
    v2 = {"type": "record", "name": "In", "namespace": "bk", "fields": [
        {"name": "id", "type": "string"}, *nullable[:7], {"name": "x7_renamed", "type": ["null", "double"],
                                                          "default": None},
        {"name": "where", "type": ["null", {"type": "record", "name": "Where", "fields": [
            {"name": "lat", "type": "double"}]}], "default": None},
        {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["GOLD", "SILVER", "NEW_ONE"]}},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}}]}
    v3 = {"type": "record", "name": "In", "namespace": "bk", "fields": [
        {"name": "id", "type": "string"},
        {"name": "x0", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 3}},
        *[n for n in nullable[1:] if n["name"] != "x6"]]}
    s1, s2, s3 = (AvroSerializer(client, json.dumps(s)) for s in (v1, v2, v3))
    rng = np.random.default_rng(11)
    recs: list[dict] = []
    msgs: list[tuple[bytes, bytes | None, list]] = []
    import datetime
    import uuid

    for i in range(90):
        r = {"id": f"m{i}", **{f: float(v) for f, v in zip(FEATURES, rng.normal(size=8), strict=True)}}
        if i % 7 == 0:
            r["x3"] = None
        kind = i % 3
        if kind == 0:
            value = s1(r, ctx)
        elif kind == 1:
            x7 = r.pop("x7")
            value = s2({**r, "x7_renamed": x7, "where": {"lat": 1.0} if i % 2 else None, "tier": "NEW_ONE",
                        "ts": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), "uid": uuid.uuid4(),
                        "day": datetime.date(2026, 1, 2)}, ctx)
            r["x7"] = None  # renamed: the feature is missing
        else:
            r.pop("x6")
            r["x0"] = decimal.Decimal(f"{r['x0']:.3f}")
            value = s3(r, ctx)
            r["x6"] = None
            r["x0"] = float(r["x0"])
        recs.append(r)
        msgs.append((r["id"].encode(), value, [("trace", b"t" * 10), ("dup", b"1"), ("dup", b"2")]))
    huge = {"id": "huge", **{f: 0.5 for f in FEATURES}, "blob": "z" * 700_000}
    msgs.insert(40, (b"huge", s1(huge, ctx), []))
    recs.insert(40, {k: v for k, v in huge.items() if k != "blob"})
    msgs.insert(20, (b"tomb", None, []))
    msgs.insert(60, (None, None, [("only", b"headers")]))
    producer = kafka.producer
    for key, value, headers in msgs:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0
    db = str(tmp_path / "s.db")
    proc = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{topic}", "--sink",
                        f"sqlite:///{db}?table=scores", "--value-format", "avro", "--schema-registry-url", reg.url,
                        "--metrics-port", "0", log=str(tmp_path / "w.log"))

    def stored() -> list:
        try:
            with sqlite3.connect(db) as conn:
                return conn.execute("select id, score from scores").fetchall()
        except sqlite3.Error:
            return []

    wait_for(lambda: len(stored()) >= len(recs), 60, what="all stored")
    dead = kafka.consume_all(f"{topic}.dlq", 2)
    wait_for(lambda: kafka.committed(f"g-{topic}", topic, 1) == {0: len(msgs)}, 30, what="commit")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log = (tmp_path / "w.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    rows = stored()
    assert len(rows) == len({i for i, _ in rows}) == len(recs)  # each once
    got = dict(rows)
    want = booster_scores(models, recs)
    np.testing.assert_allclose([got[r["id"]] for r in recs], want, rtol=0, atol=1e-12)
    assert sorted(dict(m.headers())["error.reason"].decode() for m in dead) == ["empty value (tombstone)"] * 2


# -- the Kafka sink in a registry format (workers/sinks/regformat.py) ---------------------------------------------
@pytest.mark.kafka
@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_kafka_sink_registry_format_with_a_uint64_passthrough(models, kafka, tmp_path, fmt):
    """A passthrough counter from 2**63 up (JSON's unsigned 64-bit values; the decoder keeps it exact as uint64)
    mapped to Avro/Protobuf ``long``/``int64``, which cannot hold it: the rows were dead-lettered. A uint64 is
    written as its decimal text now; the value read back is exact."""
    import signal

    from confluent_kafka.schema_registry.avro import AvroDeserializer

    from tests.test_kafka_sink_registry import deserializer

    reg = TestRegistry()
    src, out = kafka.topic(partitions=1), kafka.topic(partitions=1, prefix="o")
    recs = [{"id": f"u{i}", **{f: 0.1 * i for f in FEATURES}, "ctr": 2**64 - 1 - i} for i in range(3)]
    kafka.produce_json(src, recs)
    log = tmp_path / "w.log"
    proc = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                        f"kafka://{out}?format={fmt}", "--schema-registry-url", reg.url, "--passthrough", "ctr",
                        "--metrics-port", "0", log=str(log))
    try:
        msgs = kafka.consume_all(out, len(recs), timeout=10)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert code == 0, text[-2000:]
    client = SchemaRegistryClient({"url": reg.url})
    des = AvroDeserializer(client) if fmt == "avro" else deserializer(fmt, client, reg)
    ctx = SerializationContext(out, MessageField.VALUE)
    got = {}
    for m in msgs:
        obj = des(m.value(), ctx)
        got[obj["id"] if fmt == "avro" else obj.id] = obj["ctr"] if fmt == "avro" else obj.ctr
    assert {k: int(v) for k, v in got.items()} == {r["id"]: r["ctr"] for r in recs}


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://127.0.0.1:1/ bad", "http://:8081",
                                 "https://registry.example:99999"])
def test_malformed_registry_url_stops_start_up_in_one_line(models, tmp_path, url):
    """A registry URL that starts with http:// but is no URL (a port that is not a number or out of range, a
    space, no host) crashed the worker with a traceback (exit 1) from inside urllib."""
    from tests.test_stream_registry import one_line, run

    line = one_line(run(["--model", models["binary"], "--topic", "t-never", "--bootstrap-servers", "127.0.0.1:1",
                         "--sink", f"sqlite:///{tmp_path}/s.db?table=scores", "--value-format", "avro",
                         "--schema-registry-url", url]), "SCORING_SCHEMA_REGISTRY__URL")
    assert "not a valid URL" in line, line


class Scripted(TestRegistry):
    """Answers /schemas/ids/{id} as ``script`` says for that id: (status, body) or ("slow", seconds)."""

    def __init__(self, script: dict):
        self.script = script
        super().__init__()

    def handle(self, h, body):
        import re
        import time

        m = re.fullmatch(r"/schemas/ids/(\d+)", h.path.split("?")[0])
        if m and int(m.group(1)) in self.script:
            self.requests.append(h.path)
            how = self.script[int(m.group(1))]
            if how[0] == "slow":
                time.sleep(how[1])
                how = (200, {"schema": '"string"'})
            data = json.dumps(how[1]).encode()
            h.send_response(how[0])
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        super().handle(h, body)


def test_registry_answers_each_way_for_one_batch():
    """Per schema id: a wrong schema type and an unparsable schema are the records' fault (dead-lettered, asked
    once); 500, a JSON list, a slow answer past the timeout are outages (RegistryUnavailable, nothing cached).
    A value too short for the header said 'magic byte 0, expected 0'."""
    import time

    reg = Scripted({1: (200, {"schemaType": "PROTOBUF", "schema": "c3ludGF4"}), 2: (200, {"schema": "{not json"}),
                    3: (500, {"error_code": 50001, "message": "boom"}), 4: (200, ["a", "list"]),
                    5: ("slow", 3.0), 6: (404, {"error_code": 40403, "message": "Schema 6 not found"})})
    client = RegistryClient(SchemaRegistrySettings(url=reg.url, timeout_s=1.0))
    fmt = wire_format("avro", client)
    v = {sid: b"\0" + sid.to_bytes(4, "big") + b"\x02a" for sid in range(1, 7)}
    fmt.prepare([v[1], v[2], v[6], None, b""])
    _, reasons = fmt.parse([v[1], v[2], v[6], None, b"", b"\x00\x00"])
    assert reasons == {0: "schema id 1 is a PROTOBUF schema, not AVRO",
                       1: reasons[1], 2: "schema id 6 is not in the schema registry",
                       3: "empty value (tombstone)", 4: "not the Confluent wire format: empty value",
                       5: "not the Confluent wire format: 2 bytes, shorter than its 5-byte header"}
    assert reasons[1].startswith("schema id 2 cannot be used: "), reasons[1]
    for sid, what in ((3, "answered 500"), (4, "not a JSON object"), (5, "unreachable")):
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match=what):
            fmt.prepare([v[sid]])
        assert time.monotonic() - started < 2.5, sid
        assert sid not in fmt.compiled
    before = len(reg.requests)
    fmt.prepare([v[1], v[2], v[6]])  # compiled reasons kept; the 404 remembered for a while
    assert len(reg.requests) == before


def test_kafka_sink_avro_schema_names_are_avro_names():
    import re

    import pyarrow as pa

    from workers.sinks.regformat import columns, schema_text

    table = pa.table({"id": ["a"], "score": [0.5], "user-id": ["u"], "event.type": ["e"], "1st": [1],
                      "user_id": ["v"]})
    names = [f["name"] for f in json.loads(schema_text("avro", columns(table.schema)))["fields"]]
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names), names
    assert names == ["id", "score", "user_id_2", "event_type", "_1st", "user_id"]  # a valid name keeps its own


@pytest.mark.kafka
def test_kafka_sink_protobuf_with_a_hyphenated_passthrough(models, kafka, tmp_path):
    import signal

    reg = TestRegistry()
    src, out = kafka.topic(partitions=1), kafka.topic(partitions=1, prefix="o")
    recs = [{"id": f"h{i}", **{f: 0.1 * i for f in FEATURES}, "user-id": f"u{i}"} for i in range(3)]
    kafka.produce_json(src, recs)
    log = tmp_path / "w.log"
    proc = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                        f"kafka://{out}?format=protobuf", "--schema-registry-url", reg.url, "--passthrough",
                        "user-id", "--metrics-port", "0", log=str(log))
    try:
        msgs = kafka.consume_all(out, len(recs), timeout=10)
        dead = kafka.consume_all(f"{src}.dlq", 0, timeout=1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    assert code == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert dead == []
    assert len(msgs) == len(recs)


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_kafka_sink_registry_format_with_a_uuid_passthrough(fmt):
    import uuid

    import pyarrow as pa

    from workers.sinks.regformat import columns, encoder

    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    table = pa.table({"id": ["a", "b"], "score": [0.5, 0.25],
                      "uid": RecordDecoder.passthrough_array([u, None])})  # what an Avro uuid field passes through
    cols = columns(table.schema)
    payloads = encoder(fmt, cols)(table)
    assert len(payloads) == 2
    assert dict(cols)["uid"] == "string"  # text, as the JSON sink and the module docstring have it


@pytest.mark.kafka
def test_transactional_topic_caught_up_has_no_lag(models, kafka, tmp_path):
    """Records written by a transactional producer (Kafka Streams, Flink, ksqlDB, Debezium with EOS) end with a
    commit marker: the high watermark is one past the last record. Once every record is stored and committed the
    worker is caught up: lag 0, lag seconds 0, ready."""
    import signal
    import time
    import uuid

    from confluent_kafka import Producer

    from tests.conftest import free_port
    from tests.kafka_util import wait_for
    from tests.test_rebalance import gauges
    from tests.test_stream_registry import readyz

    topic = kafka.topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(15)
    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, key=f"t{i}".encode(), value=json.dumps({"id": f"t{i}", "x0": 0.5 * i}).encode())
    producer.commit_transaction(15)
    db, port = str(tmp_path / "s.db"), free_port()
    proc = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{topic}", "--sink",
                        f"sqlite:///{db}?table=scores", "--metrics-port", str(port), "--stall-seconds", "2",
                        log=str(tmp_path / "w.log"))
    try:
        wait_for(lambda: kafka.committed(f"g-{topic}", topic, 1)[0] >= 5, 60, what="5 committed")
        time.sleep(4)  # past --stall-seconds
        lag, lag_s, ready = gauges(port, "scoring_consumer_lag"), gauges(port, "scoring_consumer_lag_seconds"), \
            readyz(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert (lag, lag_s, ready[0]) == ({"0": 0.0}, {"0": 0.0}, 200), (lag, lag_s, ready)


def test_registry_credentials_in_the_url(models):
    """``http://key:secret@host`` (Confluent clients' basic.auth.credentials.source=URL): urllib took the userinfo
    for part of the host name, so the registry was 'unreachable: Name or service not known' for good. Now it is
    basic auth (percent-encoding undone), never shown."""
    reg = TestRegistry(users={"reader": "p@ss:w/rd"})
    ser = AvroSerializer(SchemaRegistryClient({"url": reg.url, "basic.auth.user.info": "reader:p@ss:w/rd"}),
                         json.dumps({"type": "record", "name": "P", "fields": [{"name": "id", "type": "string"}]}))
    value = ser({"id": "a"}, CTX)
    url = reg.url.replace("http://", "http://reader:p%40ss%3Aw%2Frd@")
    client = RegistryClient(SchemaRegistrySettings(url=url))
    assert client.check() is None
    fmt = wire_format("avro", client)
    fmt.prepare([value])
    assert fmt.parse([value]) == ([{"id": "a"}], {})
    assert "p%40ss" not in client.shown and "p@ss" not in client.shown, client.shown
    with pytest.raises(Exception, match="401") as refused:  # the settings' credentials win over the URL's
        RegistryClient(SchemaRegistrySettings(url=url, username="reader", password="wrong")).check()
    assert "wrong" not in str(refused.value) and "p@ss" not in str(refused.value)


def test_jsonschema_reference_of_a_reference_by_relative_name(models):
    """main -> person.json (relative name, no $id) -> num.json: both levels resolve."""
    reg = TestRegistry()
    reg.register("num", json.dumps({"type": ["number", "null"]}), "JSON")
    person = {"type": "object", "properties": {"x1": {"$ref": "num.json"}}}
    reg.register("person", json.dumps(person), "JSON", references=[{"name": "num.json", "subject": "num",
                                                                    "version": 1}])
    main = {"$id": "https://example.com/schemas/main.json", "type": "object",
            "properties": {"id": {"type": "string"}, "p": {"$ref": "person.json"}, "x0": {"$ref": "num.json"}}}
    sid = reg.register("m-value", json.dumps(main), "JSON",
                       references=[{"name": "person.json", "subject": "person", "version": 1},
                                   {"name": "num.json", "subject": "num", "version": 1}])
    good = b"\0" + sid.to_bytes(4, "big") + b'{"id": "a", "x0": 1.5, "p": {"x1": null}}'
    bad = b"\0" + sid.to_bytes(4, "big") + b'{"id": "b", "x0": 1.5, "p": {"x1": "text"}}'
    fmt = wire("jsonschema", reg)
    fmt.prepare([good, bad])
    objs, reasons = fmt.parse([good, bad])
    assert objs[0] == {"id": "a", "x0": 1.5, "p": {"x1": None}}
    assert list(reasons) == [1] and "does not match the schema at p/x1" in reasons[1], reasons

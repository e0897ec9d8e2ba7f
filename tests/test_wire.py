"""Wire-format readers (workers/decode/wire.py) and the registry client, in process: records from confluent-kafka's
serializers, schemas from tests/schema_registry.py (a real HTTP server), a real model's decoder."""

from __future__ import annotations

import json

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

from tests.schema_registry import TestRegistry
from tests.test_stream_registry import FEATURES, avro_schema
from workers.decode.records import RecordDecoder
from workers.decode.registry import RegistryClient, RegistryUnavailable
from workers.decode.wire import wire_format
from workers.errors import ConfigError
from workers.scoring.model import load_model
from workers.settings import SchemaRegistrySettings, load_settings

F = descriptor_pb2.FieldDescriptorProto
CTX = SerializationContext("topic-w", MessageField.VALUE)


def setup(**kw):
    reg = TestRegistry(**kw)
    return reg, SchemaRegistryClient({"url": reg.url}), RegistryClient(SchemaRegistrySettings(url=reg.url))


def importing_class():
    """Input in in.proto, importing common.proto (its Color enum) and google/protobuf/timestamp.proto."""
    common = descriptor_pb2.FileDescriptorProto(name="w/common.proto", package="w", syntax="proto3")
    enum = common.enum_type.add(name="Color")
    for number, symbol in enumerate(["unknown", "red", "green"]):
        enum.value.add(name=symbol, number=number)
    main = descriptor_pb2.FileDescriptorProto(name="w/in.proto", package="w", syntax="proto3",
                                              dependency=["w/common.proto", "google/protobuf/timestamp.proto"])
    msg = main.message_type.add(name="Input")
    msg.field.add(name="id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    msg.field.add(name="x0", number=2, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    msg.field.add(name="color", number=3, type=F.TYPE_ENUM, type_name=".w.Color", label=F.LABEL_OPTIONAL)
    msg.field.add(name="at", number=4, type=F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp",
                  label=F.LABEL_OPTIONAL)
    msg.field.add(name="tags", number=5, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(common)
    pool.Add(main)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("w.Input"))


def test_protobuf_imports_enums_nested_and_bad_payloads():
    reg, client, rc = setup()
    cls = importing_class()
    good = ProtobufSerializer(cls, client, {})(cls(id="a", x0=1.5, color=2, tags=["p", "q"]), CTX)
    avro_value = AvroSerializer(client, avro_schema())({"id": "b", **dict.fromkeys(FEATURES, 1.0)}, CTX)
    wire = wire_format("protobuf", rc, ["id", "x0", "color", "at", "tags", "absent"])
    truncated = good[:-1]  # the last string field one byte short
    bad_index = good[:5] + b"\x02\x0e" + good[6:]  # one index, 7: no such message
    values = [good, truncated, bad_index, avro_value, b"\x00" + good[1:5]]
    wire.prepare(values)
    objs, reasons = wire.parse(values)
    assert objs[0] == {"id": "a", "x0": 1.5, "color": "green", "at": None, "tags": ["p", "q"]}
    assert reasons[1].startswith("does not decode as PROTOBUF schema id ")
    assert "no message at index [7]" in reasons[2]
    assert reasons[3].endswith("is a AVRO schema, not PROTOBUF")
    assert reasons[4].startswith("does not decode as PROTOBUF")  # no message index at all
    # the imported file came from the subject the serializer registered it under, by its reference
    assert "w/common.proto" in reg.subjects
    assert any(p.startswith("/subjects/w%2Fcommon.proto/versions/") for p in reg.requests), reg.requests


def test_avro_values_that_cannot_be_features_and_ids(models):
    reg, client, rc = setup()
    schema = avro_schema(x0="bytes", extra=[{"name": "n", "type": {"type": "record", "name": "N", "fields": [
        {"name": "a", "type": "int"}]}}])
    value = AvroSerializer(client, schema)({"id": "c", **dict.fromkeys(FEATURES, 1.0), "x0": b"\x01", "n": {"a": 1}},
                                           CTX)
    nested = json.loads(avro_schema())
    nested["fields"][1] = {"name": "x0", "type": {"type": "record", "name": "X", "fields": [
        {"name": "a", "type": "int"}]}}
    value2 = AvroSerializer(client, json.dumps(nested))({"id": "d", **dict.fromkeys(FEATURES, 1.0), "x0": {"a": 2}},
                                                       CTX)
    wire = wire_format("avro", rc)
    wire.prepare([value, value2])
    decoder = RecordDecoder(load_model_for(models))
    got = decoder.decode([value, value2], None, wire.parse([value, value2]))
    assert got.features.reasons == {0: "feature 'x0': expected a number, got bytes b'\\x01'",
                                    1: "feature 'x0': expected a number, got dict {\"a\":2}"}


def load_model_for(models):
    from workers.settings import ModelSettings

    return load_model(ModelSettings(path=models["binary"]))


def test_registry_outage_and_unknown_ids_are_told_apart():
    reg, client, rc = setup()
    value = AvroSerializer(client, avro_schema())({"id": "e", **dict.fromkeys(FEATURES, 1.0)}, CTX)
    unknown = b"\x00\x00\x00\x00\x63" + value[5:]
    wire = wire_format("avro", rc)
    reg.fail_status = 503
    with pytest.raises(RegistryUnavailable, match="answered 503"):
        wire.prepare([value])
    reg.fail_status = None
    reg.stop()
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        wire.prepare([value])
    reg.start()
    before = reg.id_requests()
    wire.prepare([value, unknown, value])
    wire.prepare([value, unknown])  # cached: the schema for good, the 404 for a while
    assert reg.id_requests() - before == 2
    objs, reasons = wire.parse([value, unknown])
    assert objs[0]["id"] == "e" and reasons == {1: "schema id 99 is not in the schema registry"}


def test_registry_settings_and_start_up_check(tmp_path):
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__URL"):
        load_settings({"stream": {"value_format": "protobuf"}})
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__URL: must start with http"):
        load_settings({"schema_registry": {"url": "ftp://x"}})
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__CA_FILE: no such file"):
        RegistryClient(SchemaRegistrySettings(url="https://x", ca_file=str(tmp_path / "none.pem")))
    reg = TestRegistry(users={"u": "right"})
    wrong = RegistryClient(SchemaRegistrySettings(url=reg.url, username="u", password="wrong"))
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__PASSWORD"):
        wrong.check()
    assert RegistryClient(SchemaRegistrySettings(url=reg.url, username="u", password="right")).check() is None
    reg.stop()
    assert "unreachable" in (RegistryClient(SchemaRegistrySettings(url=reg.url)).check() or "")


def test_https_registry_certificate_checked_against_the_ca_file(tmp_path):
    from tests.tls_util import make_pki

    pki = make_pki(str(tmp_path))
    reg = TestRegistry(tls=pki.server)
    assert RegistryClient(SchemaRegistrySettings(url=reg.url, ca_file=pki.ca)).check() is None
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__CA_FILE: .*certificate"):
        RegistryClient(SchemaRegistrySettings(url=reg.url, ca_file=pki.other_ca)).check()
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__CA_FILE: not a PEM CA bundle"):
        RegistryClient(SchemaRegistrySettings(url=reg.url, ca_file=str(not_pem)))

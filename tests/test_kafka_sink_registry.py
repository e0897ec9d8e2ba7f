"""The Kafka sink in the Schema Registry formats: a real stream worker on the Tansu broker writes results as
Avro, Protobuf and JSON Schema; the output topic is read with confluent-kafka's own deserializers against
tests/schema_registry.py (a stdlib registry: no registry server installs here); scores equal Booster.predict."""

from __future__ import annotations

import signal

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pool, message_factory

from tests.schema_registry import TestRegistry
from tests.test_stream_registry import predict, values
from workers.errors import ConfigError, SinkError
from workers.settings import KafkaSettings, SchemaRegistrySettings
from workers.sinks.kafka import KafkaSink

pytestmark = pytest.mark.kafka


def deserializer(fmt: str, client: SchemaRegistryClient, reg: TestRegistry):
    if fmt == "avro":
        return AvroDeserializer(client)
    if fmt == "jsonschema":
        return JSONDeserializer(None, schema_registry_client=client)
    # The Protobuf deserializer needs the message class; built from the schema the sink registered.
    import base64

    from google.protobuf import descriptor_pb2

    text = reg.schemas[max(reg.schemas)]["schema"]
    fdp = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text))
    pool = descriptor_pool.DescriptorPool()
    cls = message_factory.GetMessageClass(pool.Add(fdp).message_types_by_name["Result"])
    return ProtobufDeserializer(cls, {"use.deprecated.format": False}, client)


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "jsonschema"])
def test_stream_worker_writes_registry_format(models, kafka, tmp_path, fmt):
    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    src, out = kafka.topic(partitions=1), kafka.topic(partitions=1, prefix="o")
    recs = values(200, 3, "r")
    kafka.produce_json(src, [{**r, "region": "eu"} for r in recs])
    proc = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                        f"kafka://{out}?format={fmt}", "--schema-registry-url", reg.url, "--passthrough", "region",
                        log=str(tmp_path / "w.log"))
    try:
        msgs = kafka.consume_all(out, len(recs), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "w.log").read_text()[-2000:]
    assert f"{out}-value" in reg.subjects
    des = deserializer(fmt, client, reg)
    ctx = SerializationContext(out, MessageField.VALUE)
    got = {}
    for m in msgs:
        assert m.value()[0] == 0
        obj = des(m.value(), ctx)
        if fmt == "protobuf":
            obj = {"id": obj.id, "score": obj.score, "region": obj.region, "model_version": obj.model_version}
        got[obj["id"]] = obj
        assert m.key().decode() == obj["id"]
    want = predict(models["binary"], recs)
    assert sorted(got) == sorted(want)
    assert all(abs(got[i]["score"] - s) <= 1e-12 for i, s in want.items())
    assert {o["region"] for o in got.values()} == {"eu"} and all(o["model_version"] for o in got.values())
    conforms_to_result_v1(fmt, reg.schemas[reg.subjects[f"{out}-value"][-1]]["schema"], tmp_path)


def conforms_to_result_v1(fmt: str, text: str, tmp_path) -> None:
    """The schema registered for a plain binary model (stream mode, plus the passthrough column ``region``) has
    schemas/result.v1.avsc's / result.v1.proto's fields, with the same types (and Protobuf numbers)."""
    import base64
    import json
    import subprocess
    import sys
    from pathlib import Path

    from google.protobuf import descriptor_pb2

    root = Path(__file__).resolve().parent.parent / "schemas"
    if fmt == "avro":
        registered = {f["name"]: f["type"] for f in json.loads(text)["fields"]}
        spec = {f["name"]: f["type"] for f in json.loads((root / "result.v1.avsc").read_text())["fields"]}
        assert registered.pop("region") == ["null", "string"]
        assert set(registered) == set(spec) - {"label", "scores"}
        assert all(registered[n] == spec[n] for n in registered), (registered, spec)
    elif fmt == "protobuf":
        out = tmp_path / "v1.pb"
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--descriptor_set_out={out}",
                        "result.v1.proto"], check=True)
        spec_file = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
        spec = {f.name: (f.number, f.type, f.label) for f in spec_file.message_type[0].field}
        reg_file = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text))
        registered = {f.name: (f.number, f.type, f.label) for f in reg_file.message_type[0].field}
        assert registered.pop("region")[0] == 100
        assert spec_file.package == reg_file.package and spec_file.message_type[0].name == "Result"
        assert set(registered) == set(spec) - {"label", "scores"}
        assert all(registered[n] == spec[n] for n in registered), (registered, spec)


def test_refused_schema_and_bad_settings_are_one_line(models, tmp_path):
    """A registry answering 409 to the registration is a ConfigError naming the sink setting; unknown format or
    strategy and a missing registry URL are refused when the sink is made."""
    import pyarrow as pa

    reg = TestRegistry()
    reg.fail_status = 409
    sink = KafkaSink("kafka://o-refused?format=avro", KafkaSettings(), "SCORING_STREAM__SINK",
                     SchemaRegistrySettings(url=reg.url))
    table = pa.table({"id": ["a"], "score": [0.5], "model_version": ["v"]})
    with pytest.raises(ConfigError, match="refused the result schema for subject 'o-refused-value'"):
        sink._wire_messages(table)
    reg.fail_status = 503
    with pytest.raises(SinkError, match="answered 503"):
        sink._wire_messages(table)
    assert not sink.registered
    for uri, what in (("kafka://o?format=xml", "format='xml'"), ("kafka://o?format=avro&subject=x", "subject='x'"),
                      ("kafka://o?colour=1", "unknown parameter")):
        with pytest.raises(ConfigError, match=what):
            KafkaSink(uri, KafkaSettings(), "SCORING_STREAM__SINK", SchemaRegistrySettings(url=reg.url))
    with pytest.raises(ConfigError, match="SCORING_SCHEMA_REGISTRY__URL"):
        KafkaSink("kafka://o?format=protobuf", KafkaSettings(), "SCORING_STREAM__SINK", SchemaRegistrySettings())


def test_worker_stops_with_one_line_when_the_registry_refuses(models, kafka, tmp_path):
    """The registry answering 409 to the result schema stops the worker: exit 2, one line naming the sink
    setting, no traceback, nothing committed."""
    reg = TestRegistry()
    reg.fail_status = 409
    src, out = kafka.topic(partitions=1), kafka.topic(partitions=1, prefix="o")
    kafka.produce_json(src, values(20, 4, "q"))
    log = tmp_path / "w.log"
    proc = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                        f"kafka://{out}?format=avro", "--schema-registry-url", reg.url, log=str(log))
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 2, text[-2000:]
    assert "refused the result schema" in text and "Traceback" not in text, text[-2000:]
    assert kafka.committed(f"g-{src}", src, 1) in ({}, {0: 0}, None)


def test_registry_outage_while_the_sink_writes_waits_like_a_sink_outage(models, kafka, tmp_path):
    """The sink must register the result schema before it writes: with the registry answering 503, then gone,
    the batch waits (readiness 503 naming the registry, nothing written, nothing committed, the worker alive);
    once the registry is back every result is written once and committed."""
    from tests.conftest import free_port
    from tests.kafka_util import wait_for
    from tests.test_stream_registry import readyz

    reg = TestRegistry()
    reg.fail_status = 503
    src, out = kafka.topic(partitions=1), kafka.topic(partitions=1, prefix="o")
    recs = values(60, 5, "w")
    kafka.produce_json(src, recs)
    port, group, log = free_port(), f"g-{src}", tmp_path / "w.log"
    proc = kafka.worker("--model", models["binary"], "--topic", src, "--group", group, "--sink",
                        f"kafka://{out}?format=avro", "--schema-registry-url", reg.url, "--metrics-port", str(port),
                        env={"SCORING_STREAM__RETRY_BACKOFF_MAX_S": "0.5"}, log=str(log))
    try:
        wait_for(lambda: "answered 503" in readyz(port)[1], 60, what="readiness names the registry's 503")
        assert readyz(port)[0] == 503
        wait_for(lambda: any(p.startswith("/subjects/") for p in reg.requests), 30, what="registration tried")
        reg.fail_status = None
        reg.stop()
        wait_for(lambda: "unreachable" in readyz(port)[1] and "schema registry" in readyz(port)[1], 30,
                 what="readiness names the unreachable registry")
        assert proc.poll() is None
        assert kafka.committed(group, src, 1) in ({}, {0: 0})
        assert kafka.consume_all(out, 0, timeout=1) == []
        reg.start()
        wait_for(lambda: kafka.committed(group, src, 1) == {0: len(recs)}, 60, what="all committed")
        wait_for(lambda: readyz(port)[0] == 200, 30, what="ready again")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    msgs = kafka.consume_all(out, len(recs), timeout=30)
    des = AvroDeserializer(SchemaRegistryClient({"url": reg.url}))
    ctx = SerializationContext(out, MessageField.VALUE)
    got = [des(m.value(), ctx) for m in msgs]
    want = predict(models["binary"], recs)
    assert sorted(o["id"] for o in got) == sorted(want)  # each once: none lost, none doubled
    assert all(abs(o["score"] - want[o["id"]]) <= 1e-12 for o in got)
    assert "Traceback" not in log.read_text()

"""The Kafka sink's registry formats beyond a binary model: the three subject naming strategies
(``&subject=topic_name|record_name|topic_record_name``) agree with confluent-kafka's own strategy functions, and a
multiclass model's label and class scores come back intact through confluent-kafka's deserializers. Written by
the real sink to the Tansu broker, read back with confluent-kafka, registry: tests/schema_registry.py."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pytest
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    record_subject_name_strategy,
    topic_record_subject_name_strategy,
    topic_subject_name_strategy,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict

from tests.helpers import frame
from tests.schema_registry import TestRegistry
from tests.scoring_util import TableScorer
from workers.scoring.model import load_model
from workers.settings import KafkaSettings, ModelSettings, SchemaRegistrySettings
from workers.sinks.kafka import KafkaSink

pytestmark = pytest.mark.kafka

CONFLUENT = {"topic_name": topic_subject_name_strategy, "record_name": record_subject_name_strategy,
             "topic_record_name": topic_record_subject_name_strategy}


def proto_class(text: str):
    fdp = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text))
    return message_factory.GetMessageClass(descriptor_pool.DescriptorPool().Add(fdp).message_types_by_name["Result"])


def reader(fmt: str, client: SchemaRegistryClient, text: str):
    """confluent-kafka's deserializer of ``fmt``, as a function of the message value to a dict."""
    if fmt == "avro":
        return AvroDeserializer(client)
    if fmt == "jsonschema":
        return JSONDeserializer(None, schema_registry_client=client)
    des = ProtobufDeserializer(proto_class(text), {"use.deprecated.format": False}, client)
    return lambda value, ctx: MessageToDict(des(value, ctx), preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)


def writer(fmt: str, client: SchemaRegistryClient, text: str, strategy: str, cls=None):
    """confluent-kafka's serializer of the same schema, naming its subject by ``strategy`` and looking it up only
    (no registration): it finds the schema only under the subject our sink registered it under."""
    conf = {"auto.register.schemas": False, "subject.name.strategy": CONFLUENT[strategy]}
    if fmt == "avro":
        return AvroSerializer(client, text, conf=conf)
    if fmt == "jsonschema":
        return JSONSerializer(text, client, conf=conf)
    return ProtobufSerializer(cls, client, conf={**conf, "use.deprecated.format": False})


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "jsonschema"])
def test_subject_strategies_and_multiclass_results_read_back_with_confluent(models, kafka, fmt):
    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    model = load_model(ModelSettings(path=models["multiclass"]))
    scored = TableScorer(model).score(pa.Table.from_pandas(frame(40, seed=3), preserve_index=False))
    want = {r["id"]: r for r in scored.results.to_pylist()}
    assert all(len(r["scores"]) == 3 and r["label"] in (0, 1, 2) for r in want.values())
    out = kafka.topic(partitions=1, prefix="o")
    subjects = {"topic_name": f"{out}-value", "record_name": "scoring_workers.Result",
                "topic_record_name": f"{out}-scoring_workers.Result"}
    for strategy in subjects:  # the three strategies write the same results to one topic
        sink = KafkaSink(f"kafka://{out}?format={fmt}&subject={strategy}",
                         KafkaSettings(bootstrap_servers=kafka.bootstrap), "SCORING_STREAM__SINK",
                         SchemaRegistrySettings(url=reg.url))
        try:
            sink.write_batch(scored)
        finally:
            sink.close()
    assert sorted(reg.subjects) == sorted(subjects.values())
    (sid,) = {ids[0] for ids in reg.subjects.values()}  # one schema, under three subjects
    text = reg.schemas[sid]["schema"]
    ctx = SerializationContext(out, MessageField.VALUE)
    cls = proto_class(text) if fmt == "protobuf" else None
    for strategy in subjects:
        one = cls(id="x", score=0.5) if cls is not None else {"id": "x", "score": 0.5}
        value = writer(fmt, client, text, strategy, cls)(one, ctx)
        assert int.from_bytes(value[1:5], "big") == sid, strategy
    msgs = kafka.consume_all(out, 3 * len(want), timeout=30)
    assert len(msgs) == 3 * len(want)
    des = reader(fmt, client, text)
    for m in msgs:
        got = des(m.value(), ctx)
        w = want[got["id"]]
        assert m.key().decode() == got["id"]
        assert int(got["label"]) == w["label"] and got["scores"] == w["scores"] and got["score"] == w["score"]
        assert got["model_version"] == w["model_version"] and got["served"] is True
    if fmt == "avro":  # the class scores are an array of doubles, label a long, both optional
        fields = {f["name"]: f["type"] for f in json.loads(text)["fields"]}
        assert fields["label"] == ["null", "long"]
        assert fields["scores"] == ["null", {"type": "array", "items": "double"}]


@pytest.mark.parametrize("fmt", ["avro", "protobuf", "jsonschema"])
def test_multiclass_shadow_rows_and_binary_served_rows_through_registry_formats(models, kafka, tmp_path, fmt):
    """A binary model served with a multiclass shadow, the shadow rows in a sink of their own
    (SCORING_ROUTING__SHADOW_SINK), both kafka:// in a registry format: served rows carry score and no label or
    class scores (null; an empty list in Protobuf, whose repeated fields have no null), shadow rows carry
    served=false, the shadow's label and its class scores; read back with confluent-kafka's deserializers."""
    import signal

    import lightgbm as lgb
    import numpy as np

    from tests.helpers import FEATURES
    from tests.test_rollout import write_routing
    from tests.test_stream_registry import values

    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    src, out, shadow = kafka.topic(partitions=1), kafka.topic(partitions=1, prefix="o"), kafka.topic(1, "s")
    recs = values(50, 9, "m")
    kafka.produce_json(src, recs)
    routing = write_routing(tmp_path / "routing.yaml", [{"name": "v", "model": models["binary"]},
                                                        {"name": "mc", "model": models["multiclass"], "shadow": True}])
    log = tmp_path / "w.log"
    proc = kafka.worker("--routing", routing, "--topic", src, "--group", f"g-{src}", "--sink",
                        f"kafka://{out}?format={fmt}", "--schema-registry-url", reg.url,
                        env={"SCORING_ROUTING__SHADOW_SINK": f"kafka://{shadow}?format={fmt}&subject=topic_name"},
                        log=str(log))
    try:
        served_msgs = kafka.consume_all(out, len(recs), timeout=60)
        shadow_msgs = kafka.consume_all(shadow, len(recs), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    matrix = np.array([[r[f] for f in FEATURES] for r in recs])
    want_served = dict(zip([r["id"] for r in recs], lgb.Booster(model_file=models["binary"]).predict(matrix),
                           strict=True))
    want_shadow = dict(zip([r["id"] for r in recs], lgb.Booster(model_file=models["multiclass"]).predict(matrix),
                           strict=True))
    for topic, msgs in ((out, served_msgs), (shadow, shadow_msgs)):
        sid = int.from_bytes(msgs[0].value()[1:5], "big")
        des = reader(fmt, client, reg.schemas[sid]["schema"])
        ctx = SerializationContext(topic, MessageField.VALUE)
        got = {o["id"]: o for o in (des(m.value(), ctx) for m in msgs)}
        assert len(got) == len(msgs) == len(recs), topic
        for i, o in got.items():
            if topic == out:
                assert o["served"] is True and o["model_version"] == "v"
                assert abs(o["score"] - want_served[i]) <= 1e-12
                assert o.get("label") is None and o.get("scores") in ((None, []) if fmt == "protobuf" else (None,))
            else:
                assert o["served"] is False and o["model_version"] == "mc"
                assert o["scores"] == pytest.approx(list(want_shadow[i]), abs=1e-12)
                assert int(o["label"]) == int(np.argmax(want_shadow[i]))
                assert abs(o["score"] - max(want_shadow[i])) <= 1e-12

"""Stream mode with Schema Registry values (Avro, Protobuf, JSON Schema): real worker processes on the Tansu broker,
records written by confluent-kafka's own serializers against tests/schema_registry.py (a stdlib registry: no
registry server installs here), results in SQLite, scores checked against Booster.predict."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from tests.conftest import free_port
from tests.kafka_util import wait_for
from tests.schema_registry import TestRegistry

pytestmark = pytest.mark.kafka

FEATURES = [f"x{j}" for j in range(8)]
F = descriptor_pb2.FieldDescriptorProto


def rows(db: str) -> dict[str, dict]:
    try:
        conn = sqlite3.connect(db)
        conn.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in conn.execute("select * from scores")}
    except sqlite3.Error:
        return {}


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:  # the probe server is not listening yet
        return 0, ""


def avro_schema(drop: tuple[str, ...] = (), extra: list[dict] | None = None, x0: str = "double") -> str:
    fields = [{"name": "id", "type": "string"}]
    fields += [{"name": f, "type": x0 if f == "x0" else ["null", "double"], **({} if f == "x0" else {"default": None})}
               for f in FEATURES if f not in drop]
    return json.dumps({"type": "record", "name": "Input", "namespace": "t", "fields": fields + (extra or [])})


def values(n: int, seed: int, prefix: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, len(FEATURES)))
    return [{"id": f"{prefix}{i}", **{f: float(m[i, j]) for j, f in enumerate(FEATURES)}} for i in range(n)]


def predict(model: str, recs: list[dict]) -> dict[str, float]:
    booster = lgb.Booster(model_file=model)
    matrix = np.array([[np.nan if r.get(f) is None else r[f] for f in FEATURES] for r in recs], dtype=np.float64)
    return dict(zip([r["id"] for r in recs], booster.predict(matrix), strict=True))


def worker(kafka, model: str, topic: str, db: str, fmt: str, url: str, *extra: str, env: dict | None = None,
           log: str | None = None):
    return kafka.worker("--model", model, "--topic", topic, "--group", f"g-{topic}", "--sink",
                        f"sqlite:///{db}?table=scores", "--value-format", fmt, "--schema-registry-url", url,
                        *extra, env=env, log=log)


def reasons(msgs) -> list[str]:
    return sorted(dict(m.headers())["error.reason"].decode() for m in msgs)


def test_avro_evolving_schemas_and_every_dead_letter_reason(models, kafka, tmp_path):
    """Two writer schemas in one batch (the second lacks x7 and adds fields), a passthrough column, and each
    reason a record is dead-lettered for."""
    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    topic = kafka.topic(partitions=1)
    ctx = SerializationContext(topic, MessageField.VALUE)
    v1 = AvroSerializer(client, avro_schema(extra=[{"name": "region", "type": "string"}]))
    v2 = AvroSerializer(client, avro_schema(drop=("x7",), extra=[
        {"name": "region", "type": "string"}, {"name": "note", "type": "string"},
        {"name": "x9", "type": "double"}]))
    texty = AvroSerializer(client, avro_schema(x0="string"))  # a feature of a type that cannot be one
    first, second = values(300, 1, "a"), values(300, 2, "b")
    for r in second:
        del r["x7"]
    msgs = [(r["id"].encode(), v1({**r, "region": "eu"}, ctx)) for r in first]
    msgs += [(r["id"].encode(), v2({**r, "region": "us", "note": "n", "x9": 1.0}, ctx)) for r in second]
    good = msgs[0][1]
    bad = [(b"magic", b"\x01" + good[1:]), (b"unknown", b"\x00\x00\x00\x03\xe7" + good[5:]),
           (b"short", good[:8]), (b"texty", texty({"id": "t1", **{f: 1.0 for f in FEATURES}, "x0": "abc"}, ctx))]
    msgs[150:150] = bad
    kafka.produce(topic, msgs)
    db, port = str(tmp_path / "s.db"), free_port()
    proc = worker(kafka, models["binary"], topic, db, "avro", reg.url, "--passthrough", "region",
                  "--metrics-port", str(port), log=str(tmp_path / "w.log"))
    wait_for(lambda: len(rows(db)) >= 600, 60, what="600 stored")
    dead = kafka.consume_all(f"{topic}.dlq", len(bad))
    got = reasons(dead)
    assert len(got) == len(bad), got
    assert got[0].startswith("does not decode as AVRO schema id 1: "), got
    assert got[1:] == sorted(["not the Confluent wire format: magic byte 1, expected 0",
                              "schema id 999 is not in the schema registry",
                              "feature 'x0': expected a number, got str \"abc\""]), got
    wait_for(lambda: kafka.committed(f"g-{topic}", topic, 1) == {0: len(msgs)}, 30, what="commit")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    stored = rows(db)
    want = {**predict(models["binary"], first), **predict(models["binary"], second)}
    assert sorted(stored) == sorted(want)
    assert all(abs(stored[i]["score"] - s) <= 1e-12 for i, s in want.items())
    assert {stored[r["id"]]["region"] for r in first} == {"eu"} and {stored[r["id"]]["region"] for r in second} == {"us"}
    assert reg.id_requests() == 3 + 1  # ids 1, 2, 3 fetched once each; 999 asked once (404)


def proto_file(name: str, with_size: bool) -> descriptor_pb2.FileDescriptorProto:
    """A .proto as protoc would describe it: an unrelated message first (so the input is message index 1), the
    input with a Color enum and, in the first version only, the integer category ``size``."""
    fdp = descriptor_pb2.FileDescriptorProto(name=name, package="t", syntax="proto3")
    enum = fdp.enum_type.add(name="Color")
    for number, symbol in enumerate(["unknown", "red", "green", "blue"]):
        enum.value.add(name=symbol, number=number)
    fdp.message_type.add(name="Other").field.add(name="q", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    msg = fdp.message_type.add(name="Input")
    msg.field.add(name="id", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    for j, f in enumerate(FEATURES):
        msg.field.add(name=f, number=2 + j, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    msg.field.add(name="color", number=20, type=F.TYPE_ENUM, type_name=".t.Color", label=F.LABEL_OPTIONAL)
    if with_size:
        msg.field.add(name="size", number=21, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL, proto3_optional=True)
        msg.oneof_decl.add(name="_size")
        msg.field[-1].oneof_index = 0
    msg.field.add(name="comment", number=22, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    return fdp


def proto_class(fdp):
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Input"))


def test_protobuf_enums_as_categories_two_versions(models, kafka, tmp_path):
    """Protobuf enums and integers map through the model's categories; the second version lacks ``size`` (missing)
    and an enum value the model never saw (``unknown``) is a missing category, as an unseen JSON string is."""
    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    topic = kafka.topic(partitions=2)
    ctx = SerializationContext(topic, MessageField.VALUE)
    c1, c2 = proto_class(proto_file("in_v1.proto", True)), proto_class(proto_file("in_v2.proto", False))
    s1, s2 = ProtobufSerializer(c1, client, {}), ProtobufSerializer(c2, client, {})
    rng = np.random.default_rng(5)
    recs, msgs = [], []
    for i in range(400):
        r = {"id": f"p{i}", **{f: float(v) for f, v in zip(FEATURES, rng.normal(size=8), strict=True)},
             "color": ["red", "green", "blue", "unknown"][i % 4]}
        if i % 2 == 0:
            r["size"] = [1, 5, 10][i % 3]
            value = s1(c1(**r, comment="x"), ctx)
        else:
            value = s2(c2(**r), ctx)
        recs.append(r)
        msgs.append((r["id"].encode(), value))
    kafka.produce(topic, msgs)
    db = str(tmp_path / "s.db")
    proc = worker(kafka, models["categorical"], topic, db, "protobuf", reg.url, "--metrics-port", "0",
                  log=str(tmp_path / "w.log"))
    wait_for(lambda: len(rows(db)) >= 400, 60, what="400 stored")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    frame = pd.DataFrame([{f: r[f] for f in FEATURES} for r in recs])
    frame["color"] = pd.Categorical([r["color"] if r["color"] != "unknown" else None for r in recs],
                                    categories=["red", "green", "blue"])
    frame["size"] = pd.Categorical([r.get("size") for r in recs], categories=[1, 5, 10])
    want = lgb.Booster(model_file=models["categorical"]).predict(frame)
    stored = rows(db)
    assert all(abs(stored[r["id"]]["score"] - s) <= 1e-12 for r, s in zip(recs, want, strict=True))
    assert any("/schemas/ids/" in p for p in reg.requests)


def test_jsonschema_over_https_with_basic_auth(models, kafka, tmp_path):
    """JSON Schema records from an HTTPS registry with a private CA and a password; a record that does not match
    its schema is dead-lettered with the validator's reason."""
    from tests.tls_util import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(str(tmp_path / "pki"))
    reg = TestRegistry(users={"reader": "s3cret-pw"}, tls=pki.server)
    client = SchemaRegistryClient({"url": reg.url, "basic.auth.user.info": "reader:s3cret-pw",
                                   "ssl.ca.location": pki.ca})
    topic = kafka.topic(partitions=1)
    schema = {"type": "object", "properties": {"id": {"type": "string"}, **{f: {"type": "number"} for f in FEATURES}},
              "required": ["id", "x0"]}
    ser = JSONSerializer(json.dumps(schema), client)
    recs = values(200, 3, "j")
    ctx = SerializationContext(topic, MessageField.VALUE)
    msgs = [(r["id"].encode(), ser(r, ctx)) for r in recs]
    msgs.append((b"bad", msgs[0][1][:5] + b'{"id": "bad", "x0": "high"}'))
    kafka.produce(topic, msgs)
    db = str(tmp_path / "s.db")
    proc = worker(kafka, models["binary"], topic, db, "jsonschema", reg.url, "--schema-registry-username", "reader",
                  "--schema-registry-ca-file", pki.ca, "--metrics-port", "0",
                  env={"SCORING_SCHEMA_REGISTRY__PASSWORD": "s3cret-pw"}, log=str(tmp_path / "w.log"))
    wait_for(lambda: len(rows(db)) >= 200, 60, what="200 stored")
    dead = kafka.consume_all(f"{topic}.dlq", 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert reasons(dead) == ["JSON schema id 1: does not match the schema at x0: 'high' is not of type 'number'"]
    want, stored = predict(models["binary"], recs), rows(db)
    assert all(abs(stored[i]["score"] - s) <= 1e-12 for i, s in want.items())
    assert "s3cret-pw" not in (tmp_path / "w.log").read_text()


def test_registry_outage_pauses_names_readiness_and_resumes(models, kafka, tmp_path):
    """A new schema id while the registry answers 503, then while it is gone: the batch waits (nothing committed
    past the first records), readiness names the registry, and every record is stored once when it is back."""
    reg = TestRegistry()
    client = SchemaRegistryClient({"url": reg.url})
    topic = kafka.topic(partitions=1)
    ctx = SerializationContext(topic, MessageField.VALUE)
    first, later = values(100, 7, "f"), values(100, 8, "l")
    before = [(r["id"].encode(), AvroSerializer(client, avro_schema())(r, ctx)) for r in first]
    new = AvroSerializer(client, avro_schema(extra=[{"name": "v", "type": "int", "default": 2}]))
    after = [(r["id"].encode(), new({**r, "v": 2}, ctx)) for r in later]  # schema id 2, not fetched yet
    kafka.produce(topic, before)
    db, port = str(tmp_path / "s.db"), free_port()
    proc = worker(kafka, models["binary"], topic, db, "avro", reg.url, "--metrics-port", str(port),
                  env={"SCORING_STREAM__RETRY_BACKOFF_MAX_S": "0.5"}, log=str(tmp_path / "w.log"))
    group = f"g-{topic}"
    wait_for(lambda: kafka.committed(group, topic, 1) == {0: 100}, 60, what="first records committed")
    assert readyz(port)[0] == 200
    reg.fail_status = 503
    kafka.produce(topic, after)
    wait_for(lambda: readyz(port)[0] == 503, 30, what="not ready")
    status, text = readyz(port)
    assert "schema registry unavailable" in text and "503" in text, text
    reg.fail_status = None
    reg.stop()
    wait_for(lambda: "unreachable" in readyz(port)[1], 30, what="readiness names the unreachable registry")
    assert kafka.committed(group, topic, 1) == {0: 100} and len(rows(db)) == 100
    assert proc.poll() is None
    reg.start()
    wait_for(lambda: len(rows(db)) >= 200, 60, what="all stored after the registry is back")
    wait_for(lambda: kafka.committed(group, topic, 1) == {0: 200}, 30, what="all committed")
    wait_for(lambda: readyz(port)[0] == 200, 30, what="ready again")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    stored = rows(db)
    want = {**predict(models["binary"], first), **predict(models["binary"], later)}
    assert sorted(stored) == sorted(want)
    assert all(abs(stored[i]["score"] - s) <= 1e-12 for i, s in want.items())
    assert kafka.consume_all(f"{topic}.dlq", 0, timeout=1) == []


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")}
    return subprocess.run([sys.executable, "-m", "workers", "stream", "--metrics-port", "", *args],
                          env={**full, **(env or {})}, capture_output=True, text=True, timeout=60)


def one_line(proc: subprocess.CompletedProcess, setting: str) -> str:
    shown = f"exit {proc.returncode}\nstderr: {proc.stderr[-2000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr, shown
    lines = [line for line in proc.stderr.splitlines() if setting in line]
    assert len(lines) == 1, shown
    return lines[0]


def test_bad_registry_settings_stop_start_up_naming_the_setting(models, kafka, tmp_path):
    base = ["--model", models["binary"], "--topic", "t-never", "--bootstrap-servers", kafka.bootstrap,
            "--sink", f"sqlite:///{tmp_path}/s.db?table=scores"]
    one_line(run([*base, "--value-format", "avro"]), "SCORING_SCHEMA_REGISTRY__URL")
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    line = one_line(run([*base, "--value-format", "avro", "--schema-registry-url", "https://localhost:1",
                         "--schema-registry-ca-file", str(bad_ca)]), "SCORING_SCHEMA_REGISTRY__CA_FILE")
    assert "PEM" in line
    reg = TestRegistry(users={"reader": "right"})
    line = one_line(run([*base, "--value-format", "avro", "--schema-registry-url", reg.url,
                         "--schema-registry-username", "reader"],
                        env={"SCORING_SCHEMA_REGISTRY__PASSWORD": "wrong-pw"}), "SCORING_SCHEMA_REGISTRY__PASSWORD")
    assert "401" in line and "wrong-pw" not in line


def test_registry_down_at_start_up_is_readiness_then_recovers_while_idle(models, kafka, tmp_path):
    """Unreachable at start-up is not a setting's fault: the worker runs, not ready (naming the registry), and turns
    ready once the registry answers, with no record needed to find out."""
    reg = TestRegistry()
    reg.stop()
    topic = kafka.topic(partitions=1)
    port = free_port()
    proc = worker(kafka, models["binary"], topic, str(tmp_path / "s.db"), "avro", reg.url, "--metrics-port",
                  str(port), log=str(tmp_path / "w.log"))
    wait_for(lambda: "schema registry unavailable" in readyz(port)[1], 60, what="readiness names the registry")
    assert proc.poll() is None
    reg.start()
    wait_for(lambda: readyz(port)[0] == 200, 30, what="ready once the registry answers")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

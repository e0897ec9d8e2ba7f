"""The JSON Schemas: generated input schema, and the versioned output and dead-letter schemas in schemas/."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

from tests.helpers import FEATURES, frame
from tests.scoring_util import TableScorer
from workers.decode.records import RecordDecoder
from workers.scoring.model import load_model
from workers.settings import ModelSettings
from workers.sinks.deadletter import headers_for
from workers.sinks.kafka import result_messages
from workers.sources.base import Record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str) -> Draft202012Validator:
    schema = json.load(open(os.path.join(ROOT, "schemas", name)))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_generated_input_schema_accepts_good_records_and_rejects_bad(models):
    proc = subprocess.run([sys.executable, "-m", "workers", "schema", "--model", models["categorical"]],
                          capture_output=True, text=True, check=True)
    schema = json.loads(proc.stdout)
    Draft202012Validator.check_schema(schema)
    v = Draft202012Validator(schema)
    assert schema["properties"]["color"]["enum"] == ["red", "green", "blue", None]
    good = {"id": "a", **{f: 0.5 for f in FEATURES}, "color": "green", "size": 5, "other": "ignored"}
    assert not list(v.iter_errors(good))
    assert not list(v.iter_errors({"id": 7, "x0": None}))  # features may be missing or null
    for bad in ({**good, "id": None}, {k: val for k, val in good.items() if k != "id"}, {**good, "x3": "1.5"},
                {**good, "color": "purple"}, {**good, "x1": [1]}):
        assert list(v.iter_errors(bad)), bad
    # What the schema accepts, the decoder scores (the contract and the worker agree).
    model = load_model(ModelSettings(path=models["categorical"]))
    decoded = RecordDecoder(model).decode([orjson.dumps(good), orjson.dumps({"id": 7, "x0": None})])
    assert not decoded.features.reasons


def test_results_match_the_result_schema(models):
    v = load("result.v1.json")
    for kind in ("binary", "multiclass"):
        scorer = TableScorer(load_model(ModelSettings(path=models[kind])))
        df = frame(20, seed=2)
        scored = scorer.score(pa.Table.from_pandas(df, preserve_index=False), carry={
            "topic": pa.array(["t"] * 20), "partition": pa.array([1] * 20, pa.int32()),
            "offset": pa.array(range(20), pa.int64())})
        for _key, value in result_messages(scored):
            assert not list(v.iter_errors(orjson.loads(value))), value
    assert list(v.iter_errors({"id": "a", "score": "high", "model_version": "m", "scored_at": "x"}))


def test_dead_letter_headers_match_the_dead_letter_schema():
    v = load("dead-letter.v1.json")
    record = Record("events", 3, 42, 1_700_000_000_000, b"k", b"garbage", [("trace", b"abc")])
    headers = {k: val.decode() for k, val in headers_for(record, "not valid JSON: ...", "m-1")}
    assert not list(v.iter_errors(headers)), headers
    assert headers["trace"] == "abc"
    del headers["error.reason"]
    assert list(v.iter_errors(headers))


def test_a_producers_schema_is_checked_against_the_model(models, tmp_path):
    ours = json.loads(subprocess.run([sys.executable, "-m", "workers", "schema", "--model", models["categorical"]],
                                     capture_output=True, text=True, check=True).stdout)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(ours))

    def check(path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers", "schema", "--model", models["categorical"],
                               "--check", str(path)], capture_output=True, text=True)

    proc = check(good)
    assert proc.returncode == 0 and "0 error(s), 0 warning(s)" in proc.stdout, proc.stdout
    theirs = json.loads(json.dumps(ours))
    theirs["properties"]["x3"] = {"type": "string"}  # a numeric feature sent as text: rejected records
    theirs["properties"]["color"] = {"enum": ["red", "green", "purple"]}  # an unseen category
    del theirs["properties"]["x7"]  # never sent
    theirs["required"] = []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(theirs))
    proc = check(bad)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "error: feature 'x3' may be ['string']; the model needs a number or null (such records are " \
           "dead-lettered)" in lines
    assert "warning: feature 'color': categories ['purple'] are unknown to the model (missing)" in lines
    assert "warning: feature 'x7' is not in the producer's schema: missing (null) on every record" in lines
    assert any(line.startswith("warning: id field 'id' is not required") for line in lines)
    assert lines[-1].endswith("1 error(s), 3 warning(s) against " + ours["$id"].rsplit(":", 1)[1])


@pytest.mark.parametrize("kind", ["binary", "categorical"])
def test_schema_command_prints_avro_and_protobuf_contracts(models, tmp_path, kind):
    """`schema --format avro|protobuf`: the Avro record parses (fastavro) and the .proto compiles (protoc from
    grpcio-tools), both naming the id and every feature, categories as strings."""
    import fastavro
    import lightgbm as lgb
    from google.protobuf import descriptor_pb2

    names = lgb.Booster(model_file=models[kind]).feature_name()
    run = lambda fmt: subprocess.run([sys.executable, "-m", "workers", "schema", "--model", models[kind],  # noqa: E731
                                      "--format", fmt], capture_output=True, text=True, check=True).stdout
    avro = json.loads(run("avro"))
    fastavro.parse_schema(avro)
    assert [f["name"] for f in avro["fields"]] == ["id", *names]
    types = {f["name"]: f["type"] for f in avro["fields"]}
    assert types["id"] == "string" and all(types[n][0] == "null" for n in names)
    (tmp_path / "input.proto").write_text(run("protobuf"))
    out = tmp_path / "input.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}",
                    "input.proto"], check=True)
    msg = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0].message_type[0]
    assert [f.name for f in msg.field] == ["id", *names]
    assert [f.proto3_optional for f in msg.field] == [False] + [True] * len(names)
    if kind == "categorical":
        assert "string" in {t[1] for n, t in types.items() if n != "id"}

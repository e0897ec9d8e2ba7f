"""Serve mode under real inputs: malformed OIP requests, CloudEvents batches with bad events, every JSON type as
passthrough into real sinks, a hanging store. The app runs in-process (Starlette's TestClient) except where a
real uvicorn process is the point (tritonclient, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import httpx
import lightgbm as lgb
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.conftest import free_port, wait_port
from tests.helpers import FEATURES
from workers.errors import ConfigError, InputError
from workers.runtime.serve.app import App
from workers.settings import load_settings

BATCH = {"content-type": "application/cloudevents-batch+json"}


def app_for(model_path: str, **groups) -> App:
    return App(load_settings({"model": {"path": model_path}, **groups}))


@pytest.fixture(scope="module")
def client(models):
    with TestClient(app_for(models["binary"]).asgi()) as c:
        yield c


def tensor(name="x", shape=(1, 8), datatype="FP64", data=None, **extra) -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype,
            "data": [0.5] * int(np.prod(shape)) if data is None else data, **extra}


# -- case 18: malformed OIP requests -> 400 with a message, never 500 ----------------------------------------
MALFORMED = [
    ({"inputs": [tensor(shape=[2**40, 2**40], data=[])]}, "shape"),
    ({"inputs": [tensor(shape=[2**70, 8], data=[])]}, "shape"),
    ({"inputs": [tensor(shape=[-3, 8], data=[])]}, "shape"),
    ({"inputs": [tensor(shape=[], data=[0.5])]}, "shape"),
    ({"inputs": [tensor(shape=[1, 8], data=[0.5] * 8, datatype=["FP64"])]}, "datatype"),
    ({"inputs": [tensor(datatype=None)]}, "datatype"),
    ({"inputs": [tensor(name=7)]}, "name"),
    ({"inputs": [tensor(parameters=[1, 2])]}, "parameters"),
    ({"inputs": [tensor(parameters="binary_data_size")]}, "parameters"),
    ({"inputs": [tensor()], "parameters": [1]}, "parameters"),
    ({"inputs": [tensor()], "parameters": "x"}, "parameters"),
    ({"inputs": [tensor()], "outputs": [{"name": "score", "parameters": [True]}]}, "parameters"),
    ({"inputs": [tensor()], "outputs": [{"name": "score", "parameters": "binary_data"}]}, "parameters"),
    ({"inputs": [tensor()], "outputs": {"name": "score"}}, "outputs"),
    ({"inputs": [tensor()], "outputs": "score"}, "outputs"),
    ({"inputs": [tensor()], "outputs": [{"name": 3}]}, "name"),
    ({"inputs": {"name": "x"}}, "inputs"),
    ({"inputs": [tensor()], "id": {"a": 1}}, "id"),
    ({"inputs": [tensor(), tensor()]}, "twice"),
    ({"inputs": [tensor(data=[[0.5] * 4, [0.5] * 5])]}, "data"),
    ({"inputs": [tensor(data={"a": 1})]}, "data"),
]


@pytest.mark.parametrize("body,says", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_infer_requests_get_400_naming_the_problem(client, body, says):
    resp = client.post("/v2/models/binary/infer", content=json.dumps(body).encode())
    assert resp.status_code == 400, resp.text
    assert says in resp.json()["error"], resp.text


def categorical_request(segment_tensor: dict) -> dict:
    inputs = [tensor(name=f, shape=[2], data=[0.1, 0.2]) for f in FEATURES]
    inputs.append(tensor(name="size", shape=[2], data=[1, 5]))
    inputs.append(segment_tensor)
    return {"inputs": inputs}


@pytest.mark.parametrize("color,says", [
    (tensor(name="color", shape=[1, 2], datatype="BYTES", data=["red", "blue"]), "shape"),  # 2 values, 1 row
    (tensor(name="color", shape=[2, 1, 1], datatype="BYTES", data=["red", "blue"]), "shape"),
    (tensor(name="color", shape=[2], datatype="BYTES", data=[["red"], ["blue", "x"]]), "BYTES"),
    (tensor(name="color", shape=[2], datatype="BYTES", data=[1.5, {"a": 1}]), "BYTES"),
    (tensor(name="color", shape=[2], datatype="BYTES", data=[["red", "blue"]]), "BYTES"),
])
def test_bytes_data_shaped_wrongly_is_refused_not_scored_as_text(models, color, says):
    with TestClient(app_for(models["categorical"]).asgi()) as c:
        good = c.post("/v2/models/categorical/infer", content=orjson.dumps(categorical_request(
            tensor(name="color", shape=[2], datatype="BYTES", data=["red", "blue"]))))
        assert good.status_code == 200, good.text
        resp = c.post("/v2/models/categorical/infer", content=orjson.dumps(categorical_request(color)))
        assert resp.status_code == 400, resp.text
        assert says in resp.json()["error"], resp.text


def binary_body(head: dict, blobs: list[bytes]) -> tuple[bytes, dict]:
    header = json.dumps(head).encode()  # json, not orjson: generated heads hold integers beyond 64 bits
    return header + b"".join(blobs), {"inference-header-content-length": str(len(header))}


def test_malformed_binary_extension_bodies_get_400(models):
    good = np.zeros((2, 8), "<f8").tobytes()
    strings = struct.pack("<I", 3) + b"red" + struct.pack("<I", 50) + b"blu"  # second length runs past the end
    cases = [
        ({"inputs": [tensor(shape=[2**40, 2**40], data=None, parameters={"binary_data_size": len(good)})]},
         [good], "shape"),
        ({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP64", "parameters": {"binary_data_size": True}}]},
         [good], "binary_data_size"),
        ({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP64", "parameters": {"binary_data_size": 8}}]},
         [good], "bytes do not hold"),
    ]
    with TestClient(app_for(models["binary"]).asgi()) as c:
        for head, blobs, says in cases:
            for t in head["inputs"]:
                t.pop("data", None)
            body, headers = binary_body(head, blobs)
            resp = c.post("/v2/models/binary/infer", content=body, headers=headers)
            assert resp.status_code == 400 and says in resp.json()["error"], (head, resp.text)
        for bad in ("²", "١٢", "-5", "9" * 40):
            resp = c.post("/v2/models/binary/infer", content=b"{}", headers={"inference-header-content-length": bad.encode()})
            assert resp.status_code == 400, (bad, resp.text)
    with TestClient(app_for(models["categorical"]).asgi()) as c:
        req = categorical_request({"name": "color", "shape": [2], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(strings)}})
        body, headers = binary_body(req, [strings])
        resp = c.post("/v2/models/categorical/infer", content=body, headers=headers)
        assert resp.status_code == 400 and "truncated" in resp.json()["error"], resp.text
        latin = struct.pack("<I", 3) + "réd".encode("latin-1") + struct.pack("<I", 4) + b"blue"
        req["inputs"][-1]["parameters"]["binary_data_size"] = len(latin)
        body, headers = binary_body(req, [latin])
        resp = c.post("/v2/models/categorical/infer", content=body, headers=headers)
        assert resp.status_code == 400 and "UTF-8" in resp.json()["error"], resp.text


# Structure-aware generation: bodies that look like OIP requests, with every field sometimes of the wrong kind.
json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
             | st.text(max_size=6))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                        max_size=3), max_leaves=8)
dims = st.integers(-2, 10) | st.sampled_from([0, 8, 2**31, 2**40, 2**63, 2**64, -(2**63)])
shapes = st.lists(dims, max_size=4) | json_any
names = st.sampled_from(["x", "input", *FEATURES, "color", "size"]) | json_any
dtypes = st.sampled_from(["FP64", "FP32", "FP16", "INT64", "INT8", "UINT64", "BOOL", "BYTES", "COMPLEX", ""]) | json_any
params = st.none() | st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 200) | json_any,
                                                         "binary_data": json_any}) | json_any
data = (st.lists(st.floats() | st.integers(-(2**64), 2**64) | st.text(max_size=4) | st.booleans() | st.none(),
                 max_size=20) | st.lists(st.lists(st.floats(allow_nan=False), max_size=9), max_size=4) | json_any)
tensors = st.fixed_dictionaries({}, optional={"name": names, "shape": shapes, "datatype": dtypes, "data": data,
                                              "parameters": params})
outputs = st.lists(st.fixed_dictionaries({}, optional={"name": st.sampled_from(["score", "label", "nope"]) | json_any,
                                                       "parameters": params}), max_size=2) | json_any
requests = st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=3) | json_any},
                                 optional={"id": json_any, "outputs": outputs, "parameters": params})


def test_infer_never_answers_5xx_to_generated_requests(models):
    app = app_for(models["categorical"])
    with TestClient(app.asgi()) as c:
        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(requests, st.lists(st.binary(max_size=80), max_size=3), st.booleans())
        def run(req, blobs, binary):
            if binary:
                body, headers = binary_body(req, blobs)
            else:
                body, headers = json.dumps(req).encode(), {}
            resp = c.post("/v2/models/categorical/infer", content=body, headers=headers)
            assert resp.status_code < 500, (req, resp.text)
            if resp.status_code >= 400:
                assert resp.json()["error"]

        run()
    assert 'status="500"' not in c.get("/metrics").text


# -- case 23: the model metadata lists every version of the routing ------------------------------------------
def write_routing(folder, models, extra: str = "") -> str:
    path = os.path.join(folder, "routing.yaml")
    with open(path, "w") as f:
        f.write(f"versions:\n  - name: v1\n    model: {models['binary']}\n    weight: 80\n"
                f"  - name: v2\n    model: {models['binary_v2']}\n    weight: 20\n"
                f"  - name: v3\n    model: {models['binary_v2']}\n    shadow: true\n{extra}")
    return path


def test_model_metadata_lists_every_routing_version_for_triton_clients(models, tmp_path):
    import tritonclient.http as triton

    routing = write_routing(tmp_path, models)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--routing", routing, "--model-name", "m",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_port(port, 30), "server did not start"
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        meta = client.get_model_metadata("m")
        assert sorted(meta["versions"]) == ["v1", "v2", "v3"]
        x = np.random.default_rng(4).normal(size=(5, 8))
        for version, model in (("v1", "binary"), ("v2", "binary_v2"), ("v3", "binary_v2")):
            assert client.is_model_ready("m", model_version=version)
            assert sorted(client.get_model_metadata("m", model_version=version)["versions"]) == ["v1", "v2", "v3"]
            t = triton.InferInput("x", list(x.shape), "FP64")
            t.set_data_from_numpy(x)
            result = client.infer("m", [t], model_version=version)
            assert result.get_response()["model_version"] == version
            expected = lgb.Booster(model_file=models[model]).predict(x)
            assert np.max(np.abs(result.as_numpy("score") - expected)) <= 1e-9
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


# -- case 7 (serve): categorical values are mapped through the model's category lists ------------------------
def test_oip_categorical_values_score_like_lightgbm_pandas_predict(models):
    """size has integer categories [1, 5, 10] (codes 0..2): the value 5 is code 1, never code 5 (which a raw-code
    reading would use). Unknown values are missing, as pandas makes them."""
    from tests.helpers import frame

    df = frame(40, seed=31, categorical=True)
    df.loc[3, "size"] = np.nan  # missing
    booster = lgb.Booster(model_file=models["categorical"])
    expected = booster.predict(df[[*FEATURES, "color", "size"]])
    size = [None if v != v else float(v) for v in df["size"].astype(float)]
    inputs = [tensor(name=f, shape=[40], data=df[f].tolist()) for f in FEATURES]
    inputs.append(tensor(name="color", shape=[40], datatype="BYTES", data=df["color"].astype(str).tolist()))
    with TestClient(app_for(models["categorical"]).asgi()) as c:
        for dtype in ("FP64", "INT64"):
            sizes = [7 if v is None else v for v in size]  # 7 is no category: missing, like the null
            body = {"inputs": [*inputs, tensor(name="size", shape=[40], datatype=dtype, data=sizes)]}
            resp = c.post("/v2/models/categorical/infer", content=orjson.dumps(body))
            assert resp.status_code == 200, resp.text
            got = np.array(resp.json()["outputs"][0]["data"])
            assert np.max(np.abs(got - expected)) <= 1e-9
        # The same through the binary tensor extension (tritonclient's default).
        color = b"".join(struct.pack("<I", len(v)) + v.encode() for v in df["color"].astype(str))
        sizes = np.array([7 if v is None else v for v in size], "<i8").tobytes()
        head = {"inputs": [*inputs[:-1],
                           {"name": "color", "shape": [40], "datatype": "BYTES",
                            "parameters": {"binary_data_size": len(color)}},
                           {"name": "size", "shape": [40, 1], "datatype": "INT64",
                            "parameters": {"binary_data_size": len(sizes)}}]}
        body, headers = binary_body(head, [color, sizes])
        resp = c.post("/v2/models/categorical/infer", content=body, headers=headers)
        assert resp.status_code == 200, resp.text
        assert np.max(np.abs(np.array(resp.json()["outputs"][0]["data"]) - expected)) <= 1e-9
        # Text categories cannot come as numbers (a code would be guessed): a 400 naming the input.
        body = {"inputs": [*inputs[:-1], tensor(name="color", shape=[40], data=[0.0] * 40),
                           tensor(name="size", shape=[40], data=[1] * 40)]}
        resp = c.post("/v2/models/categorical/infer", content=orjson.dumps(body))
        assert resp.status_code == 400 and "'color'" in resp.json()["error"], resp.text


# -- case 4: a CloudEvents batch holding a bad event, with --sink --------------------------------------------
def kafka_event(record: dict | str, offset: int, source: str = "/apis/v1/namespaces/ns/kafkasources/src#events",
                **extra) -> dict:
    """A structured CloudEvent as Knative's KafkaSource sends it."""
    event = {"specversion": "1.0", "type": "dev.knative.kafka.event", "source": source,
             "id": f"partition:2/offset:{offset}", "datacontenttype": "application/json", **extra}
    event["data"] = record
    return event


def good_record(i: int) -> dict:
    x = np.random.default_rng(500 + i).normal(size=len(FEATURES))
    return {"id": f"e{i}", **{f: float(v) for f, v in zip(FEATURES, x, strict=True)}}


def read_table(sink: str, table: str) -> list[dict]:
    if sink.startswith("sqlite"):
        conn = sqlite3.connect(sink.split("sqlite:///", 1)[1].split("?", 1)[0])
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f'SELECT * FROM "{table}"')]
        except sqlite3.OperationalError:
            return []
    if sink.startswith("mysql"):
        from tests.conftest import query_mysql

        if not query_mysql("SHOW TABLES LIKE %s", (table,)):
            return []
        return query_mysql(f"SELECT * FROM `{table}`", dicts=True)
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(sink.split("?", 1)[0], row_factory=dict_row) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (f'"{table}"',)).fetchone()["to_regclass"]
        return list(conn.execute(f'SELECT * FROM "{table}"')) if exists else []


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def sink_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/serve.db?table=scores", "scores"
    if request.param == "mysql":
        uri, table = request.getfixturevalue("my_uri"), request.getfixturevalue("my_table")
        return f"{uri}?table={table}", table
    pg_dsn, table = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_table")
    return f"{pg_dsn}?table={table}", table


def test_batch_with_a_bad_event_stores_and_answers_the_good_ones(models, sink_uri):
    uri, table = sink_uri
    booster = lgb.Booster(model_file=models["binary"])
    records = [good_record(i) for i in range(5)]
    batch = [kafka_event(r, 100 + i) for i, r in enumerate(records)]
    batch.insert(2, kafka_event({"id": "bad", "x0": "abc"}, 99))
    batch.insert(4, kafka_event("{not json", 98))
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        for attempt in range(2):  # Knative retries a delivery: the same answer, nothing stored twice
            resp = c.post("/", headers=BATCH, content=orjson.dumps(batch))
            assert resp.status_code == 200, resp.text
            events = resp.json()
            kinds = [e["type"] for e in events]
            assert kinds == ["scoring.result"] * 2 + ["scoring.result.error"] + ["scoring.result"] + \
                ["scoring.result.error"] + ["scoring.result"] * 2, (attempt, kinds)
            assert "expected a number" in events[2]["data"]["error"] and "JSON" in events[4]["data"]["error"]
            scores = [e["data"]["score"] for e in events if e["type"] == "scoring.result"]
            x = np.array([[r[f] for f in FEATURES] for r in records])
            assert np.max(np.abs(np.array(scores) - booster.predict(x))) <= 1e-9
    stored = sorted(read_table(uri, table), key=lambda r: r["id"])
    assert [r["id"] for r in stored] == [f"e{i}" for i in range(5)]
    assert [r["offset"] for r in stored] == [100, 101, 102, 103, 104]
    errors = sorted(read_table(uri, f"{table}_errors"), key=lambda r: r["source"])
    assert len(errors) == 2, errors  # the retry replaced the error rows, it did not add copies
    assert [e["source"] for e in errors] == [
        "/apis/v1/namespaces/ns/kafkasources/src#events#partition:2/offset:98",
        "/apis/v1/namespaces/ns/kafkasources/src#events#partition:2/offset:99"]
    assert {e["id"] for e in errors} == {None, "bad"}


def test_an_event_rejected_then_redelivered_scoring_leaves_no_stale_error_row(models, sink_uri):
    """Review finding: the error row of an event's first delivery stayed beside the result of a later delivery
    of the same event (same source#id) that now scores. The result's write deletes it in the same transaction."""
    uri, table = sink_uri
    fixed = good_record(7)
    first, again = kafka_event({**fixed, "x0": "abc"}, 70), kafka_event(fixed, 70)  # one event id, two contents
    other = kafka_event({"id": "still-bad", "x0": "abc"}, 71)
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        assert c.post("/", headers=BATCH, content=orjson.dumps([first, other])).status_code == 200
        assert len(read_table(uri, f"{table}_errors")) == 2
        resp = c.post("/", headers=BATCH, content=orjson.dumps([again]))
        assert resp.status_code == 200 and resp.json()[0]["type"] == "scoring.result", resp.text
    assert [r["id"] for r in read_table(uri, table)] == ["e7"]
    assert [e["id"] for e in read_table(uri, f"{table}_errors")] == ["still-bad"]  # only the settled one is gone


def test_rows_the_sink_cannot_hold_are_answered_with_the_reason_and_the_rest_stored(models, pg_dsn, pg_table):
    """PostgreSQL text cannot hold NUL: that event's row is refused by the sink (RowsRejected); it is answered
    with the reason, the others are stored and answered, and a redelivery gives the same answers."""
    uri = f"{pg_dsn}?table={pg_table}"
    records = [good_record(i) for i in range(4)]
    for i, r in enumerate(records):
        r["note"] = "a\u0000b" if i == 1 else f"n{i}"
    batch = [kafka_event(r, 10 + i) for i, r in enumerate(records)]
    with TestClient(app_for(models["binary"], serve={"sink": uri}, scoring={"passthrough": ["note"]}).asgi()) as c:
        for _ in range(2):
            resp = c.post("/", headers=BATCH, content=orjson.dumps(batch))
            assert resp.status_code == 200, resp.text
            events = resp.json()
            assert [e["type"] for e in events] == ["scoring.result", "scoring.result.error", "scoring.result",
                                                   "scoring.result"]
            assert "'note'" in events[1]["data"]["error"] and events[1]["subject"] == "e1"
            assert [e["data"]["note"] for e in events if "note" in e["data"]] == ["n0", "n2", "n3"]
        # A single event the sink refuses: 400 with the reason (Knative dead-letters it, no retry loop).
        msg = {"ce-specversion": "1.0", "ce-id": "x1", "ce-source": "s", "ce-type": "t",
               "content-type": "application/json"}
        resp = c.post("/", headers=msg, content=orjson.dumps(records[1]))
        assert resp.status_code == 400 and "'note'" in resp.json()["error"], resp.text
    assert sorted(r["id"] for r in read_table(uri, pg_table)) == ["e0", "e2", "e3"]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "none"])
def test_passthrough_values_of_every_json_type_are_answered_as_sent(models, tmp_path, kind, request):
    """Case 13 (serve): an integer of 2**63 or more, types changing between events, lists with nulls, objects:
    never a 500; the reply carries each event's own value, and every event is stored."""
    values = [2**63 + 5, -1, 15.5, "text", None, [1, None], {"a": [1, 2]}, True, 2**64 - 1, [], ""]
    records = [{**good_record(i), "extra": v} for i, v in enumerate(values)]
    serve, table = {}, "scores"
    if kind == "sqlite":
        serve = {"sink": f"sqlite:///{tmp_path}/s.db?table=scores"}
    elif kind == "postgresql":
        table = request.getfixturevalue("pg_table")
        serve = {"sink": f"{request.getfixturevalue('pg_dsn')}?table={table}"}
    with TestClient(app_for(models["binary"], serve=serve, scoring={"passthrough": ["extra"]}).asgi()) as c:
        for chunk in (records[:1], records, records[1:2], records[5:6]):  # 2**63 alone first: it was a 500
            resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(r, i) for i, r in enumerate(chunk)]))
            assert resp.status_code == 200, resp.text
            got = resp.json()
            assert all(e["type"] == "scoring.result" for e in got), got
            assert [e["data"]["extra"] for e in got] == [r["extra"] for r in chunk]
    if serve:
        assert len(read_table(serve["sink"], table)) == len(values)


@pytest.mark.parametrize("names", [["score"], ["model_version"], ["served"], ["explanation_x0"], ["__row"],
                                   ["id"], ["offset"], ["source"]])
def test_passthrough_named_like_a_result_field_is_refused_at_start_up(models, tmp_path, names):
    sink = {"sink": f"sqlite:///{tmp_path}/s.db?table=scores"}
    with pytest.raises(ConfigError, match="SCORING_SCORING__PASSTHROUGH"):
        app_for(models["binary"], serve=sink, scoring={"passthrough": names})
    proc = subprocess.run([sys.executable, "-m", "workers", "serve", "--model", models["binary"], "--port", "0",
                           "--sink", sink["sink"], "--passthrough", names[0]], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "SCORING_SCORING__PASSTHROUGH" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_event_shapes_a_sender_can_get_wrong_are_answered_per_event_never_500(models):
    """Siblings of case 4: one malformed batch item is answered with its reason; the others are scored."""
    good = kafka_event(good_record(0), 1)
    items = [
        good,
        "not an object",
        [1, 2],
        {"specversion": "1.0", "type": "t", "source": "s"},  # no id
        {**kafka_event(good_record(1), 2), "specversion": "9.9"},
        {k: v for k, v in kafka_event(good_record(2), 3).items() if k != "data"},  # no data
        {**kafka_event(good_record(3), 4), "datacontenttype": "application/xml"},
        {**kafka_event(good_record(4), 5), "data": "{not json"},
        {**kafka_event(good_record(5), 6), "data": [1, 2]},
        {k: v for k, v in kafka_event(good_record(6), 7).items() if k != "data"} | {"data_base64": "***"},
        kafka_event(good_record(7), 8),
    ]
    with TestClient(app_for(models["binary"]).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps(items))
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert len(got) == len(items)
        assert [e["type"] for e in got] == ["scoring.result"] + ["scoring.result.error"] * 9 + ["scoring.result"]
        says = ["JSON str", "JSON list", "'id'", "specversion", "without data", "not JSON", "not valid JSON",
                "where an object was expected", "base64"]
        for reply, word in zip(got[1:-1], says, strict=True):
            assert word in reply["data"]["error"], (word, reply)
        assert got[3]["id"] == "batch-item-3/result" and got[4]["id"] == "partition:2/offset:2/result"
        assert c.post("/", headers=BATCH, content=b"[]").json() == []
        for body in (b"{}", b"null", b'"x"'):
            resp = c.post("/", headers=BATCH, content=body)
            assert resp.status_code == 400 and "array" in resp.json()["error"], resp.text
        binary = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t"}
        for headers, body, word in [({**binary, "content-type": "application/json"}, b"{not json", "not valid JSON"),
                                    ({**binary, "content-type": "image/png"}, b"{}", "not JSON"),
                                    ({**binary, "content-type": "application/json"}, b"", "not valid JSON"),
                                    ({"content-type": "application/cloudevents+json"}, b"[]", "object"),
                                    ({"content-type": "application/cloudevents+json"},
                                     orjson.dumps({k: v for k, v in good.items() if k != "data"}), "without data")]:
            resp = c.post("/", headers=headers, content=body)
            assert resp.status_code == 400 and word in resp.json()["error"], (headers, resp.text)
        assert 'status="500"' not in c.get("/metrics").text


def test_cloudevents_categorical_values_score_like_lightgbm_pandas_predict(models):
    """Case 7 (serve, CloudEvents): the JSON record's category values (text, integers, the integer category as a
    float) are mapped through the model's lists, as LightGBM's pandas predict maps the same values."""
    from tests.helpers import frame

    df = frame(30, seed=41, categorical=True)
    df.loc[2, "color"] = np.nan
    df.loc[4, "size"] = np.nan
    booster = lgb.Booster(model_file=models["categorical"])
    expected = booster.predict(df[[*FEATURES, "color", "size"]])
    records = []
    for i, row in enumerate(df.to_dict("records")):
        size = None if row["size"] != row["size"] else int(row["size"])
        rec = {"id": row["id"], **{f: row[f] for f in FEATURES},
               "color": None if not isinstance(row["color"], str) else row["color"],
               "size": float(size) if (size is not None and i % 2) else size}
        records.append(rec)
    with TestClient(app_for(models["categorical"]).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(r, i) for i, r in enumerate(records)]))
        assert resp.status_code == 200, resp.text
        got = np.array([e["data"]["score"] for e in resp.json()])
    assert np.max(np.abs(got - expected)) <= 1e-9


def test_rows_refused_with_routing_take_the_event_out_with_its_shadow_rows(models, tmp_path, pg_dsn, pg_table):
    uri = f"{pg_dsn}?table={pg_table}"
    routing = write_routing(tmp_path, models)
    records = [{**good_record(i), "note": "a\u0000b" if i == 3 else f"n{i}"} for i in range(8)]
    settings = load_settings({"routing": {"path": routing}, "serve": {"sink": uri, "model_name": "m"},
                              "scoring": {"passthrough": ["note"]}})
    with TestClient(App(settings).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(r, i) for i, r in enumerate(records)]))
        assert resp.status_code == 200, resp.text
        got = resp.json()
    assert [e["type"] for e in got] == ["scoring.result"] * 3 + ["scoring.result.error"] + ["scoring.result"] * 4
    assert {e["data"]["model_version"] for e in got if "score" in e["data"]} <= {"v1", "v2"}
    stored = read_table(uri, pg_table)
    assert sorted({r["id"] for r in stored}) == [f"e{i}" for i in range(8) if i != 3]
    assert sorted(r["model_version"] for r in stored if r["id"] == "e0")[-1] == "v3"  # shadow rows stored
    assert all(not r["served"] for r in stored if r["model_version"] == "v3")


# -- a hanging store (case 17's class, serve side): every sink call bounded, SIGTERM too --------------------
@pytest.fixture
def locked(pg_dsn):
    """lock(table): hold an ACCESS EXCLUSIVE lock on it from another connection until the test ends."""
    import psycopg

    conns = []

    def lock(table: str) -> None:
        conn = psycopg.connect(pg_dsn)
        conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        conns.append(conn)

    yield lock
    for conn in conns:
        conn.rollback()
        conn.close()


def test_a_hung_sink_write_is_answered_503_within_the_bound(models, pg_dsn, pg_table, locked):
    uri = f"{pg_dsn}?table={pg_table}"
    app = app_for(models["binary"], serve={"sink": uri})
    app.plane.store.timeout_s = 2.0
    batch = orjson.dumps([kafka_event(good_record(i), i) for i in range(3)])
    with TestClient(app.asgi()) as c:
        assert c.post("/", headers=BATCH, content=batch).status_code == 200  # creates the tables
        locked(pg_table)
        started = time.monotonic()
        resp = c.post("/", headers=BATCH, content=batch)
        assert resp.status_code == 503 and "no answer within 2 s" in resp.json()["error"], resp.text
        assert time.monotonic() - started < 10
        # The next request queues behind the hung write: bounded the same way, never stuck.
        assert c.post("/", headers=BATCH, content=batch).status_code == 503
        assert c.get("/healthz").status_code == 200


def test_sigterm_with_a_sink_write_hung_on_a_lock_exits_promptly(models, pg_dsn, pg_table, locked):
    uri = f"{pg_dsn}?table={pg_table}"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--model", models["binary"], "--port",
                             str(port), "--sink", uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port(port, 30), "server did not start"
        batch = orjson.dumps([kafka_event(good_record(i), i) for i in range(3)])
        url = f"http://127.0.0.1:{port}/"
        assert httpx.post(url, headers=BATCH, content=batch, timeout=30).status_code == 200
        locked(pg_table)
        answers: list = []
        sender = threading.Thread(target=lambda: answers.append(httpx.post(url, headers=BATCH, content=batch,
                                                                            timeout=60)))
        sender.start()
        time.sleep(1.5)  # the write is now waiting on the lock
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        elapsed = time.monotonic() - started
        sender.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0 and elapsed < 6, (code, elapsed, proc.stderr.read().decode()[-2000:])
    assert answers and answers[0].status_code == 503 and "stopping" in answers[0].json()["error"]


# Structure-aware generation for CloudEvents: items that look like KafkaSource events, each field mostly right
# (so most events get scored) and sometimes of any JSON kind.
def mostly(value: st.SearchStrategy | object) -> st.SearchStrategy:
    right = value if isinstance(value, st.SearchStrategy) else st.just(value)
    return st.integers(0, 9).flatmap(lambda k: json_any if k == 0 else right)  # one_of would pick json_any half


records = st.fixed_dictionaries({"id": mostly(st.text(min_size=1, max_size=4)),
                                 **{f: mostly(st.floats(allow_nan=False) | st.none()) for f in FEATURES}},
                                optional={"extra": json_any})
events = st.fixed_dictionaries(
    {"specversion": mostly("1.0"), "id": mostly(st.text(min_size=1, max_size=5)), "source": mostly("s"),
     "type": mostly("t"), "data": mostly(records)},
    optional={"datacontenttype": mostly("application/json"), "data_base64": st.text(max_size=8) | json_any,
              "key": st.text(max_size=3) | json_any})


def test_cloudevents_never_answer_5xx_to_generated_events(models, tmp_path):
    app = app_for(models["binary"], serve={"sink": f"sqlite:///{tmp_path}/s.db?table=scores"},
                  scoring={"passthrough": ["extra"]})
    with TestClient(app.asgi()) as c:
        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(events, max_size=4) | json_any, events, st.booleans())
        def run(batch, single, structured):
            resp = c.post("/", headers=BATCH, content=json.dumps(batch).encode())
            assert resp.status_code < 500, (batch, resp.text)
            if resp.status_code == 200:
                assert isinstance(batch, list) and len(resp.json()) == len(batch)
            headers = {"content-type": "application/cloudevents+json"} if structured else {
                "ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t",
                "content-type": "application/json"}
            body = json.dumps(single if structured else single.get("data")).encode()
            resp = c.post("/", headers=headers, content=body)
            assert resp.status_code < 500, (single, resp.text)

        run()
    assert 'status="500"' not in c.get("/metrics").text


def test_binary_mode_attributes_outside_ascii_are_percent_encoded_both_ways(models):
    """A record id like 'café 1' or '\u0100' goes into the reply's ce-subject header: the CloudEvents HTTP binding
    percent-encodes it (a raw value cannot be sent: it was a 500). Read back with the cloudevents SDK."""
    from cloudevents.core.bindings import http as ce_http
    from cloudevents.core.v1.event import CloudEvent

    with TestClient(app_for(models["binary"]).asgi()) as c:
        for rid in ("café 1", "\u0100", "100%", 'a"b', "日本"):
            event = CloudEvent({"type": "t", "source": "/s", "id": f"ev-{rid}", "datacontenttype": "application/json"},
                               orjson.dumps(good_record(0) | {"id": rid}))
            for to_http in (ce_http.to_binary_event, ce_http.to_structured_event):
                msg = to_http(event)
                resp = c.post("/", headers=msg.headers, content=msg.body)
                assert resp.status_code == 200, (rid, resp.text)
                reply = ce_http.from_http_event(ce_http.HTTPMessage(dict(resp.headers), resp.content))
                assert reply.get_subject() == rid and reply.get_id() == f"ev-{rid}/result", (rid, resp.headers)


# -- round 2 (review defect 10): a KafkaSource-looking id with numbers Kafka cannot have ---------------------
def test_event_ids_with_impossible_kafka_positions_are_stored_without_a_position(models, sink_uri):
    """A partition of 2**31 or more, an offset of 2**63 or more, non-ASCII digits or a trailing newline: not a
    Kafka position (was a 500 from an int32/int64 overflow for every event of the batch); stored without one."""
    uri, table = sink_uri
    ids = ["partition:2147483648/offset:1", "partition:0/offset:9223372036854775808",
           "partition:0/offset:99999999999999999999999", "partition:\u0663/offset:1", "partition:1/offset:2\n",
           "partition:2147483647/offset:9223372036854775807"]
    batch = [{**kafka_event(good_record(i), 0), "id": eid} for i, eid in enumerate(ids)]
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps(batch))
        assert resp.status_code == 200, resp.text
        assert [e["type"] for e in resp.json()] == ["scoring.result"] * len(ids), resp.text
        single = {"ce-specversion": "1.0", "ce-type": "t", "ce-source": "s", "ce-id": "partition:4294967296/offset:1",
                  "content-type": "application/json"}
        resp = c.post("/", headers=single, content=orjson.dumps({**good_record(9), "id": "single"}))
        assert resp.status_code == 200, resp.text
    stored = {r["id"]: (r["partition"], r["offset"]) for r in read_table(uri, table)}
    assert stored == {**{f"e{i}": (None, None) for i in range(5)}, "e5": (2147483647, 9223372036854775807),
                      "single": (None, None)}, stored


# -- round 2 (review defect 8): a sink refusing a write without naming rows ---------------------------------
def test_an_error_row_the_sink_cannot_hold_fails_its_event_alone(models, pg_dsn, pg_table):
    """A record rejected for a NUL in a feature: its error row's raw JSON holds the NUL, which PostgreSQL text
    cannot take (the sink raised InputError naming no row: a 500, and the good events of the batch were lost).
    The good events are stored and answered; the bad one is answered with its reason; alone it is a 400."""
    uri = f"{pg_dsn}?table={pg_table}"
    records = [good_record(0), {**good_record(1), "x0": "x\u0000"}, good_record(2)]
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        for _ in range(2):
            resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(r, i) for i, r in enumerate(records)]))
            assert resp.status_code == 200, resp.text
            got = resp.json()
            assert [e["type"] for e in got] == ["scoring.result", "scoring.result.error", "scoring.result"], got
            assert "expected a number" in got[1]["data"]["error"], got
        msg = {"ce-specversion": "1.0", "ce-id": "partition:0/offset:1", "ce-source": "s", "ce-type": "t",
               "content-type": "application/json"}
        resp = c.post("/", headers=msg, content=orjson.dumps({**records[1], "id": "n"}))
        assert resp.status_code == 400 and "expected a number" in resp.json()["error"], resp.text
        assert 'status="500"' not in c.get("/metrics").text
    assert sorted(r["id"] for r in read_table(uri, pg_table)) == ["e0", "e2"]


class _RefusingSink:
    """A real SQLite sink behind a wrapper that refuses, as a sink may, a write holding one given record with an
    ``InputError`` naming no row, before storing anything (the wrapper is the only way to get that refusal from a
    real sink on purpose once the PostgreSQL NUL case above stops raising it)."""

    def __init__(self, sink, bad_ids: set[str], error: type[Exception]):
        self.sink, self.bad_ids, self.error, self.calls = sink, bad_ids, error, 0

    def __getattr__(self, name):
        return getattr(self.sink, name)

    def write_batch(self, scored):
        self.calls += 1
        ids = set(scored.results["id"].to_pylist()) | set(scored.errors["id"].to_pylist())
        if ids & self.bad_ids:
            if self.error is InputError:
                raise InputError("the store cannot hold this row")
            raise self.error("SCORING_SERVE__SINK", "the store cannot hold this row")
        self.sink.write_batch(scored)


@pytest.mark.parametrize("error", ["InputError", "ConfigError"])
def test_a_write_refused_without_rows_named_is_halved_until_the_events_are_found(models, tmp_path, error):
    uri = f"sqlite:///{tmp_path}/s.db?table=scores"
    app = app_for(models["binary"], serve={"sink": uri})
    exc = {"InputError": InputError, "ConfigError": ConfigError}[error]
    app.plane.store.sink = _RefusingSink(app.plane.store.sink, {"e3", "e6", "bad"}, exc)
    records = [good_record(i) for i in range(8)] + [{"id": "bad", "x0": "abc"}]
    with TestClient(app.asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(r, i) for i, r in enumerate(records)]))
        assert resp.status_code == 200, resp.text
        got = resp.json()
    kinds = ["scoring.result.error" if i in (3, 6, 8) else "scoring.result" for i in range(9)]
    assert [e["type"] for e in got] == kinds, got
    assert all("cannot hold this row" in got[i]["data"]["error"] for i in (3, 6, 8)), got
    assert "expected a number" in got[8]["data"]["error"]
    assert sorted(r["id"] for r in read_table(uri, "scores")) == [f"e{i}" for i in range(8) if i not in (3, 6)]
    assert read_table(uri, "scores_errors") == []


# -- round 2 (review defect 7, serve side): integers beyond 64 bits as passthrough ---------------------------
@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "none"])
def test_passthrough_integers_beyond_64_bits_are_answered_exactly(models, tmp_path, kind, request):
    """orjson reads 18446744073709551621 as 1.8446744073709552e+19: the reply (and the value handed to the sink)
    must keep the integer the event sent, in batch, structured and binary mode."""
    big = [2**64 + 5, -(2**63) - 1, {"k": [2**70, 1]}, [-(2**90)], 2**64 - 1, 7]
    serve, table = {}, "scores"
    if kind == "sqlite":
        serve = {"sink": f"sqlite:///{tmp_path}/s.db?table=scores"}
    elif kind == "postgresql":
        table = request.getfixturevalue("pg_table")
        serve = {"sink": f"{request.getfixturevalue('pg_dsn')}?table={table}"}
    records = [{**good_record(i), "big": v} for i, v in enumerate(big)]
    with TestClient(app_for(models["binary"], serve=serve, scoring={"passthrough": ["big"]}).asgi()) as c:
        body = json.dumps([kafka_event(r, i) for i, r in enumerate(records)]).encode()
        resp = c.post("/", headers=BATCH, content=body)
        assert resp.status_code == 200, resp.text
        assert [e["data"]["big"] for e in resp.json()] == big, resp.text
        structured = json.dumps(kafka_event({**records[0], "id": "s"}, 50)).encode()
        resp = c.post("/", headers={"content-type": "application/cloudevents+json"}, content=structured)
        assert resp.status_code == 200 and resp.json()["big"] == big[0], resp.text
        msg = {"ce-specversion": "1.0", "ce-id": "partition:0/offset:60", "ce-source": "s", "ce-type": "t",
               "content-type": "application/json"}
        resp = c.post("/", headers=msg, content=json.dumps({**records[1], "id": "b"}).encode())
        assert resp.status_code == 200 and resp.json()["big"] == big[1], resp.text
    if serve:
        stored = {r["id"]: r["big"] for r in read_table(serve["sink"], table)}
        assert len(stored) == len(big) + 2
        assert str(2**64 + 5) in str(stored["e0"]) and str(2**70) in str(stored["e2"]), stored


# -- round 2 (review defect 16): OIP values that do not fit their datatype, stray inputs and bytes ------------
def per_feature() -> list[dict]:
    return [tensor(name=f, shape=[1], data=[0.5]) for f in FEATURES]


LAX = [
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="INT8", data=[300])]},
     [repr(FEATURES[-1]), "300", "INT8"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="UINT8", data=[-1])]},
     [repr(FEATURES[-1]), "UINT8"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="INT64", data=[11.5])]},
     [repr(FEATURES[-1]), "11.5", "integers"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="INT64", data=[True])]},
     [repr(FEATURES[-1]), "true"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="INT64", data=[None])]},
     [repr(FEATURES[-1]), "null"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="INT64", data=[2**63])]},
     [repr(FEATURES[-1]), "INT64 range"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="BOOL", data=[2])]},
     [repr(FEATURES[-1]), "true or false"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="FP64", data=[False])]},
     [repr(FEATURES[-1]), "false"]),
    ({"inputs": [*per_feature()[:-1], tensor(name=FEATURES[-1], shape=[1], datatype="FP32", data=[1e300])]},
     [repr(FEATURES[-1]), "FP32 range"]),
    ({"inputs": [tensor(data=[1.5] * 8, datatype="INT32", shape=[1, 8])]}, ["'x'", "1.5"]),
    ({"inputs": per_feature() + [tensor(name="extra", shape=[1])]}, ["unknown input", "'extra'"]),
    ({"inputs": [*per_feature()[:-1], tensor(name="x7_typo", shape=[1])]}, ["missing", "'x7_typo'"]),
]


@pytest.mark.parametrize("body,says", LAX, ids=[str(i) for i in range(len(LAX))])
def test_values_that_do_not_fit_their_datatype_and_stray_inputs_get_400(client, body, says):
    resp = client.post("/v2/models/binary/infer", content=json.dumps(body).encode())
    assert resp.status_code == 400, resp.text
    assert all(s in resp.json()["error"] for s in says), (says, resp.text)


def test_binary_bodies_with_bytes_left_over_or_data_twice_get_400(client):
    good = np.full((2, 8), 0.5, "<f8").tobytes()
    head = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP64", "parameters": {"binary_data_size": len(good)}}]}
    body, headers = binary_body(head, [good])
    assert client.post("/v2/models/binary/infer", content=body, headers=headers).status_code == 200
    resp = client.post("/v2/models/binary/infer", content=body + b"\0\0\0\0", headers=headers)
    assert resp.status_code == 400 and "4 bytes after the last binary tensor" in resp.json()["error"], resp.text
    both = {"inputs": [{**head["inputs"][0], "data": [0.5] * 16}]}
    body, headers = binary_body(both, [good])
    resp = client.post("/v2/models/binary/infer", content=body, headers=headers)
    assert resp.status_code == 400 and "both data and parameters.binary_data_size" in resp.json()["error"], resp.text


def test_missing_values_in_json_fp_tensors_score_like_lightgbm(client, models):
    """null, and NaN as tritonclient (Python's json) writes it with binary_data=False, are missing values, as in
    binary mode; LightGBM's own predict is the reference."""
    booster = lgb.Booster(model_file=models["binary"])
    x = np.random.default_rng(7).normal(size=(4, len(FEATURES)))
    x[0, 1] = x[2, 5] = x[3, 0] = np.nan
    expected = booster.predict(x)
    for data in (json.dumps(x.ravel().tolist()), json.dumps([None if v != v else v for v in x.ravel().tolist()])):
        body = f'{{"inputs": [{{"name": "x", "shape": [4, 8], "datatype": "FP64", "data": {data}}}]}}'.encode()
        resp = client.post("/v2/models/binary/infer", content=body)
        assert resp.status_code == 200, resp.text
        assert np.max(np.abs(np.array(resp.json()["outputs"][0]["data"]) - expected)) <= 1e-12
    resp = client.post("/v2/models/binary/infer", content=b'{"inputs": [NaN]')
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"], resp.text


def test_cloudevents_specversion_other_than_1_0_or_attributes_not_strings_are_refused_per_event(models):
    items = [kafka_event(good_record(0), 1),
             {**kafka_event(good_record(1), 2), "specversion": "0.3"},
             {**kafka_event(good_record(2), 3), "specversion": 1.0},
             {**kafka_event(good_record(3), 4), "id": 7},
             {**kafka_event(good_record(4), 5), "source": ["s"]},
             {**kafka_event(good_record(5), 6), "id": 2**70},
             kafka_event(good_record(6), 7)]
    with TestClient(app_for(models["binary"]).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=json.dumps(items).encode())
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert [e["type"] for e in got] == ["scoring.result"] + ["scoring.result.error"] * 5 + ["scoring.result"]
        for reply, word in zip(got[1:6], ["specversion", "strings", "['id'] must be strings", "['source']",
                                          str(2**70)], strict=True):
            assert word in reply["data"]["error"], (word, reply)
        resp = c.post("/", content=json.dumps(good_record(0)).encode(),
                      headers={"ce-specversion": "0.3", "ce-id": "1", "ce-source": "s", "ce-type": "t",
                               "content-type": "application/json"})
        assert resp.status_code == 400 and "specversion" in resp.json()["error"], resp.text

"""Serve mode under real inputs: malformed OIP requests, CloudEvents batches with bad events, every JSON type as
passthrough into real sinks, a hanging store. The app runs in-process (Starlette's TestClient) except where a
real uvicorn process is the point (tritonclient, SIGTERM)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import lightgbm as lgb
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.conftest import free_port, wait_port
from tests.helpers import FEATURES
from workers.runtime.serve import App
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

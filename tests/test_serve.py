"""Serve mode as a real process (uvicorn), driven by clients no one here wrote: tritonclient, cloudevents."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import urllib.request

import httpx
import lightgbm as lgb
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.v1.event import CloudEvent

from tests.conftest import free_port, wait_port
from tests.helpers import FEATURES


def start(model_path: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--model", model_path, "--port", str(port),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    assert wait_port(port, 30), "server did not start"
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def binary_server(models):
    proc, addr = start(models["binary"], "--max-batch-rows", "64", "--max-latency-ms", "20")
    yield addr
    proc.terminate()
    assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def multiclass_server(models):
    proc, addr = start(models["multiclass"], "--model-name", "mc")
    yield addr
    proc.terminate()
    proc.wait(30)


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(FEATURES)))


def test_tritonclient_health_metadata_and_infer(models, binary_server):
    client = triton.InferenceServerClient(binary_server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("binary")
    meta = client.get_model_metadata("binary")
    assert [i["name"] for i in meta["inputs"]] == FEATURES and meta["outputs"][0]["name"] == "score"
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    booster = lgb.Booster(model_file=models["binary"])
    x = rows(37)
    for binary in (True, False):  # the binary tensor extension, and plain JSON
        tensor = triton.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("score", binary_data=binary)
        result = client.infer("binary", [tensor], outputs=[out], request_id="req-1")
        assert np.max(np.abs(result.as_numpy("score") - booster.predict(x))) <= 1e-9
        assert result.get_response()["id"] == "req-1"
    # One [N] tensor per feature, FP32 (compared with predict on the same float32 values).
    x32 = x.astype(np.float32)
    inputs = []
    for j, name in enumerate(FEATURES):
        t = triton.InferInput(name, [x.shape[0]], "FP32")
        t.set_data_from_numpy(x32[:, j])
        inputs.append(t)
    result = client.infer("binary", inputs)
    assert np.max(np.abs(result.as_numpy("score") - booster.predict(x32.astype(np.float64)))) <= 1e-9
    version = meta["versions"][0]
    assert client.is_model_ready("binary", model_version=version)


def test_multiclass_outputs_and_json_without_content_type(models, multiclass_server):
    booster = lgb.Booster(model_file=models["multiclass"])
    x = rows(11, seed=3)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP64",
                                      "data": x.tolist()}]})
    # tritonclient sends JSON with no Content-Type: send it the same way.
    req = urllib.request.Request(f"http://{multiclass_server}/v2/models/mc/infer", data=body, method="POST")
    req.remove_header("Content-type")
    out = orjson.loads(urllib.request.urlopen(req, timeout=10).read())
    got = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in out["outputs"]}
    expected = booster.predict(x)
    assert np.max(np.abs(got["scores"] - expected)) <= 1e-9
    assert got["label"].tolist() == expected.argmax(axis=1).tolist()
    assert np.max(np.abs(got["score"] - expected.max(axis=1))) <= 1e-9


def kafka_event(record: dict | bytes, offset: int, key: str = "k") -> CloudEvent:
    return CloudEvent({"type": "dev.knative.kafka.event", "source": "/apis/v1/namespaces/ns/kafkasources/src#events",
                       "id": f"partition:2/offset:{offset}", "subject": f"partition:2#{offset}", "key": key,
                       "kafkaheadertrace": "abc", "datacontenttype": "application/json"},
                      record if isinstance(record, bytes) else orjson.dumps(record))


def record(i: int, x: np.ndarray) -> dict:
    return {"id": f"e{i}", **dict(zip(FEATURES, map(float, x), strict=True)), "extra": "ignored"}


def test_cloudevents_binary_structured_and_batch(models, binary_server):
    booster = lgb.Booster(model_file=models["binary"])
    x = rows(5, seed=9)
    expected = booster.predict(x)
    url = f"http://{binary_server}/"
    for to_http in (ce_http.to_binary_event, ce_http.to_structured_event):
        msg = to_http(kafka_event(record(0, x[0]), 17))
        resp = httpx.post(url, headers=msg.headers, content=msg.body)
        assert resp.status_code == 200, resp.text
        reply = ce_http.from_http_event(ce_http.HTTPMessage(dict(resp.headers), resp.content))
        assert reply.get_type() == "scoring.result" and reply.get_subject() == "e0"
        assert reply.get_source().startswith("scoring-workers/binary/binary-")
        data = reply.get_data()
        data = orjson.loads(data) if isinstance(data, bytes | str) else data
        assert abs(data["score"] - expected[0]) <= 1e-9 and data["id"] == "e0"
    batch = [orjson.loads(ce_http.to_structured_event(kafka_event(record(i, x[i]), 100 + i)).body) for i in range(5)]
    batch.insert(2, orjson.loads(ce_http.to_structured_event(kafka_event({"id": "bad", "x0": "abc"}, 99)).body))
    resp = httpx.post(url, headers={"content-type": "application/cloudevents-batch+json"}, content=orjson.dumps(batch))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/cloudevents-batch+json")
    events = resp.json()
    assert [e["type"] for e in events] == ["scoring.result"] * 2 + ["scoring.result.error"] + ["scoring.result"] * 3
    assert events[2]["data"]["error"] == "feature 'x0': expected a number, got str \"abc\""
    scores = [e["data"]["score"] for e in events if e["type"] == "scoring.result"]
    assert np.max(np.abs(np.array(scores) - expected)) <= 1e-9
    assert [e["id"] for e in events][:2] == ["partition:2/offset:100/result", "partition:2/offset:101/result"]


def test_bad_requests_get_4xx_with_a_message(binary_server):
    base = f"http://{binary_server}"
    infer = f"{base}/v2/models/binary/infer"
    cases = [
        ("POST", infer, b"{not json", {}, 400, "not valid JSON"),
        ("POST", infer, b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
        ("POST", infer, orjson.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64",
                                                   "data": [1, 2, 3, 4, 5, 6]}]}), {}, 400, "has 3 columns"),
        ("POST", infer, orjson.dumps({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP64",
                                                   "data": [1, 2, 3]}]}), {}, 400, "do not match shape"),
        ("POST", infer, orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "COMPLEX",
                                                   "data": [1] * 8}]}), {}, 400, "not supported"),
        ("POST", infer, orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64",
                                                   "data": ["a"] * 8}]}), {}, 400, "must be numbers"),
        ("POST", infer, orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64",
                                                   "parameters": {"binary_data_size": 64}}]}),
         {"Inference-Header-Content-Length": "5000"}, 400, "larger than the body"),
        ("POST", f"{base}/v2/models/other/infer", b"{}", {}, 404, "unknown model 'other'"),
        ("GET", f"{base}/v2/models/binary/versions/v999", None, {}, 404, "unknown version"),
        ("POST", infer, b"x" * (17 * 1024 * 1024), {}, 413, "over the limit"),
        ("POST", f"{base}/", b"{}", {"content-type": "application/json"}, 400, "not a CloudEvent"),
        ("POST", f"{base}/", b'{"id": "a", "x0": 1}', {"ce-specversion": "1.0", "ce-id": "1"}, 400,
         "required attribute"),
        ("POST", f"{base}/", b"[1, 2]", {"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "s",
                                         "content-type": "application/json"}, 400, "where an object was expected"),
        ("POST", f"{base}/", b"{", {"content-type": "application/cloudevents-batch+json"}, 400, "not valid JSON"),
        ("GET", f"{base}/nope", None, {}, 404, "no such route"),
        ("DELETE", infer, None, {}, 405, "method not allowed"),
    ]
    for method, url, body, headers, status, says in cases:
        resp = httpx.request(method, url, content=body, headers=headers, timeout=30)
        assert resp.status_code == status, (url, body and body[:60], resp.status_code, resp.text[:200])
        assert says in resp.json()["error"], (says, resp.text)
    text = httpx.get(f"{base}/metrics").text
    assert 'scoring_http_requests_total{route="infer",status="400"}' in text
    assert 'status="500"' not in text


def test_concurrent_clients_are_batched_and_get_their_own_rows(models, binary_server):
    booster = lgb.Booster(model_file=models["binary"])
    base = f"http://{binary_server}"

    def batch_counts() -> tuple[float, float]:
        text = httpx.get(f"{base}/metrics").text
        get = lambda name: float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))  # noqa: E731
        return get("scoring_serve_batch_requests_count"), get("scoring_serve_batch_requests_sum")

    calls_before, requests_before = batch_counts()

    def one(i: int) -> float:
        x = rows(3, seed=1000 + i)
        body = orjson.dumps({"id": str(i), "inputs": [{"name": "x", "shape": [3, 8], "datatype": "FP64",
                                                        "data": x.ravel().tolist()}]})
        out = httpx.post(f"{base}/v2/models/binary/infer", content=body, timeout=30).json()
        assert out["id"] == str(i)
        return float(np.max(np.abs(np.array(out["outputs"][0]["data"]) - booster.predict(x))))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        errors = list(pool.map(one, range(400)))
    assert max(errors) <= 1e-9  # every response carries its own rows' scores
    calls_after, requests_after = batch_counts()
    requests, calls = requests_after - requests_before, calls_after - calls_before
    assert requests == 400
    # An idle batcher predicts at once, so how many requests share a call depends on how many are in flight:
    # a loaded machine (the client is 32 Python threads) overlaps fewer. Unbatched would be 400 calls.
    assert calls < 400 * 0.75, f"400 concurrent requests took {calls} predict calls: not batched"
    # A request bigger than the batch limit is scored whole, not split.
    big = rows(500, seed=5)
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [500, 8], "datatype": "FP64", "data": big.ravel().tolist()}]})
    out = httpx.post(f"{base}/v2/models/binary/infer", content=body, timeout=30).json()
    assert np.max(np.abs(np.array(out["outputs"][0]["data"]) - booster.predict(big))) <= 1e-9
    text = httpx.get(f"{base}/metrics").text
    assert 'scoring_serve_batch_rows_bucket{le="1000.0"}' in text


def test_cloudevents_results_are_also_written_to_a_sink(models, tmp_path):
    import sqlite3

    db = tmp_path / "serve.db"
    proc, addr = start(models["binary"], "--sink", f"sqlite:///{db}?table=scores")
    try:
        x = rows(3, seed=4)
        batch = [orjson.loads(ce_http.to_structured_event(kafka_event(record(i, x[i]), 500 + i)).body)
                 for i in range(3)]
        resp = httpx.post(f"http://{addr}/", headers={"content-type": "application/cloudevents-batch+json"},
                          content=orjson.dumps(batch), timeout=30)
        assert resp.status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    rows_ = sqlite3.connect(db).execute('select id, topic, "partition", "offset", score from scores order by id').fetchall()
    booster = lgb.Booster(model_file=models["binary"])
    expected = booster.predict(x)
    assert [r[:4] for r in rows_] == [(f"e{i}", "events", 2, 500 + i) for i in range(3)]
    assert max(abs(r[4] - e) for r, e in zip(rows_, expected, strict=True)) <= 1e-9


def test_tritonclient_json_tensors_with_nan_score_as_missing(models, binary_server):
    """Round 2 (review defect 16): tritonclient with binary_data=False writes NaN literally (Python's json);
    it is a missing value, scored as LightGBM's predict scores NaN, like the same tensor in binary mode."""
    client = triton.InferenceServerClient(binary_server)
    booster = lgb.Booster(model_file=models["binary"])
    x = rows(6, seed=3)
    x[0, 0] = x[3, 4] = x[5, :] = np.nan
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("binary", [tensor], outputs=[triton.InferRequestedOutput("score", binary_data=binary)])
        assert np.max(np.abs(result.as_numpy("score") - booster.predict(x))) <= 1e-12
    bad = triton.InferInput("input", [1, len(FEATURES)], "INT8")
    bad.set_data_from_numpy(np.full((1, len(FEATURES)), 5, np.int8), binary_data=False)
    bad._data = [300] * len(FEATURES)  # what numpy would wrap around to 44 without a word
    with pytest.raises(triton.InferenceServerException, match="300 is out of the INT8 range"):
        client.infer("binary", [bad])

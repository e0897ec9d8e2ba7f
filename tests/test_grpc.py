"""Serve's Open Inference Protocol over gRPC, with a client nobody here wrote: tritonclient.grpc.

The server is ``scoring-worker serve --grpc-port P`` in its own process (tritonclient's ``inference.*`` messages
and ours cannot share one process's protobuf descriptor pool, see ``workers/decode/oip_proto``). Scores are
compared with ``Booster.predict`` on the same model file. Typed ``contents`` (which tritonclient never sends: it
sends raw bytes) go through tritonclient's own generated stub. Also here: the committed stubs are what the
pinned grpcio-tools generates from the vendored .proto.
"""

from __future__ import annotations

import concurrent.futures
import filecmp
import os
import pathlib
import subprocess
import sys
import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port, wait_port
from tests.helpers import FEATURES

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUBS = "workers/decode/oip_proto"


def test_committed_grpc_stubs_are_what_the_pinned_generator_writes(tmp_path):
    proto = f"{STUBS}/open_inference_grpc.proto"
    (tmp_path / STUBS).mkdir(parents=True)
    (tmp_path / proto).write_bytes((ROOT / proto).read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", proto], cwd=tmp_path, check=True)
    for name in ("open_inference_grpc_pb2.py", "open_inference_grpc_pb2.pyi", "open_inference_grpc_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / STUBS / name, ROOT / STUBS / name, shallow=False), (
            f"{STUBS}/{name} differs from what grpcio-tools generates: run `make grpc-stubs` and commit")


def start(model_path: str, *extra: str) -> tuple[subprocess.Popen, str, str]:
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "SCORING_SERVE__GRPC_PORT": str(grpc_port)}
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--model", model_path, "--port", str(http),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert wait_port(http, 30) and wait_port(grpc_port, 30), "server did not start"
    return proc, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""


@pytest.fixture(scope="module")
def binary_server(models):
    proc, addr, _ = start(models["binary"], "--max-body-bytes", str(256 * 1024))
    yield addr
    stop(proc)


def triton():
    import tritonclient.grpc as triton

    return triton


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(FEATURES)))


def test_tritonclient_health_metadata_and_raw_infer_fp64_fp32(models, binary_server):
    t = triton()
    client = t.InferenceServerClient(binary_server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("binary")
    meta = client.get_model_metadata("binary", as_json=True)
    assert [i["name"] for i in meta["inputs"]] == FEATURES and meta["outputs"][0]["name"] == "score"
    assert meta["platform"] == "lightgbm" and meta["versions"]
    assert client.get_server_metadata(as_json=True)["name"] == "scoring-workers"
    booster = lgb.Booster(model_file=models["binary"])
    x = rows(37)
    tensor = t.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x)
    result = client.infer("binary", [tensor], request_id="req-1")
    np.testing.assert_allclose(result.as_numpy("score"), booster.predict(x), rtol=0, atol=1e-12)
    assert result.get_response().id == "req-1"
    # One [N] FP32 tensor per feature (compared with predict on the same float32 values).
    x32 = x.astype(np.float32)
    inputs = []
    for j, name in enumerate(FEATURES):
        inputs.append(t.InferInput(name, [x.shape[0]], "FP32"))
        inputs[-1].set_data_from_numpy(x32[:, j])
    result = client.infer("binary", inputs, outputs=[t.InferRequestedOutput("score")])
    np.testing.assert_allclose(result.as_numpy("score"), booster.predict(x32.astype(np.float64)), atol=1e-12)
    version = meta["versions"][0]
    assert client.is_model_ready("binary", model_version=version)
    result = client.infer("binary", [tensor], model_version=version)
    assert result.get_response().model_version == version


def test_typed_contents_through_tritonclients_own_stub(models, binary_server):
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    booster = lgb.Booster(model_file=models["binary"])
    x = rows(5, seed=2)
    with grpc.insecure_channel(binary_server) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="binary", id="typed")
        tensor = req.inputs.add(name="x", datatype="FP64", shape=list(x.shape))
        tensor.contents.fp64_contents.extend(x.ravel().tolist())
        reply = stub.ModelInfer(req)
        assert not reply.raw_output_contents  # answered in kind: typed
        assert reply.id == "typed" and reply.outputs[0].name == "score"
        np.testing.assert_allclose(reply.outputs[0].contents.fp64_contents, booster.predict(x), atol=1e-12)
        # INT32 per-feature tensors through int_contents.
        req = pb.ModelInferRequest(model_name="binary")
        xi = np.round(x * 3).astype(np.int32)
        for j, name in enumerate(FEATURES):
            req.inputs.add(name=name, datatype="INT32", shape=[5]).contents.int_contents.extend(xi[:, j].tolist())
        reply = stub.ModelInfer(req)
        np.testing.assert_allclose(reply.outputs[0].contents.fp64_contents, booster.predict(xi.astype(float)),
                                   atol=1e-12)
        # Malformed: values in the wrong field, both raw and typed, a wrong count.
        bad = []
        wrong_field = pb.ModelInferRequest(model_name="binary")
        wrong_field.inputs.add(name="x", datatype="FP64", shape=[1, 8]).contents.fp32_contents.extend([0.5] * 8)
        bad.append((wrong_field, "fp64_contents"))
        both = pb.ModelInferRequest(model_name="binary")
        both.inputs.add(name="x", datatype="FP64", shape=[1, 8]).contents.fp64_contents.extend([0.5] * 8)
        both.raw_input_contents.append(np.zeros(8).tobytes())
        bad.append((both, "both contents and raw_input_contents"))
        short = pb.ModelInferRequest(model_name="binary")
        short.inputs.add(name="x", datatype="FP64", shape=[2, 8]).contents.fp64_contents.extend([0.5] * 8)
        bad.append((short, "do not match shape"))
        for request, words in bad:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_status_codes_for_unknown_models_bad_shapes_and_oversize(binary_server):
    import grpc

    t = triton()
    client = t.InferenceServerClient(binary_server)

    def code_of(call) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(t.InferenceServerException) as err:
            call()
        return err.value.status(), err.value.message()

    x = rows(2)
    tensor = t.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x)
    status, message = code_of(lambda: client.infer("nope", [tensor]))
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in message
    status, message = code_of(lambda: client.infer("binary", [tensor], model_version="v999"))
    assert status == "StatusCode.NOT_FOUND" and "unknown version" in message
    status, _ = code_of(lambda: client.get_model_metadata("nope"))
    assert status == "StatusCode.NOT_FOUND"
    wide = t.InferInput("input", [2, 5], "FP64")
    wide.set_data_from_numpy(np.zeros((2, 5)))
    status, message = code_of(lambda: client.infer("binary", [wide]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "5 columns" in message
    big = rows(5000)  # 320 kB of FP64, over the 256 kB limit of this server
    large = t.InferInput("input", list(big.shape), "FP64")
    large.set_data_from_numpy(big)
    status, _ = code_of(lambda: client.infer("binary", [large]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live()  # still serving


def test_concurrent_clients_each_get_their_own_scores(models, binary_server):
    t = triton()
    booster = lgb.Booster(model_file=models["binary"])

    def one(seed: int) -> float:
        client = t.InferenceServerClient(binary_server)
        x = rows(1 + seed % 7, seed)
        tensor = t.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        got = client.infer("binary", [tensor]).as_numpy("score")
        return float(np.max(np.abs(got - booster.predict(x))))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        errors = list(pool.map(one, range(200)))
    assert max(errors) <= 1e-12


def test_multiclass_and_categorical_bytes_over_grpc(models):
    t = triton()
    proc, addr, _ = start(models["multiclass"], "--model-name", "mc")
    try:
        client = t.InferenceServerClient(addr)
        x = rows(9, seed=4)
        tensor = t.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        result = client.infer("mc", [tensor])
        expected = lgb.Booster(model_file=models["multiclass"]).predict(x)
        np.testing.assert_allclose(result.as_numpy("scores"), expected, atol=1e-12)
        np.testing.assert_array_equal(result.as_numpy("label"), expected.argmax(axis=1))
        np.testing.assert_allclose(result.as_numpy("score"), expected.max(axis=1), atol=1e-12)
    finally:
        stop(proc)
    proc, addr, _ = start(models["categorical"], "--model-name", "cat")
    try:
        client = t.InferenceServerClient(addr)
        colors = np.array(["red", "green", "blue", "purple"], dtype=object)  # purple: unknown, missing
        sizes = np.array([1, 5, 10, 5], dtype=np.float64)
        x = rows(4, seed=6)
        inputs = []
        for j, name in enumerate(FEATURES):
            inputs.append(t.InferInput(name, [4], "FP64"))
            inputs[-1].set_data_from_numpy(x[:, j].copy())
        inputs.append(t.InferInput("color", [4], "BYTES"))
        inputs[-1].set_data_from_numpy(colors)
        inputs.append(t.InferInput("size", [4], "FP64"))
        inputs[-1].set_data_from_numpy(sizes)
        got = client.infer("cat", inputs).as_numpy("score")
        frame = pd.DataFrame({f: x[:, j] for j, f in enumerate(FEATURES)})
        frame["color"] = pd.Categorical(colors, categories=["red", "green", "blue"])
        frame["size"] = pd.Categorical(sizes.astype(int), categories=[1, 5, 10])
        np.testing.assert_allclose(got, lgb.Booster(model_file=models["categorical"]).predict(frame), atol=1e-12)
    finally:
        stop(proc)


def test_grpc_health_service_answers_serving_for_probes(binary_server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(binary_server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_calls_in_flight_at_sigterm_are_answered_or_refused_and_the_server_exits_cleanly(models):
    """gRPC's handler threads hand each call to the event loop (serve/grpc.py): at SIGTERM the calls in flight
    still get their scores (the loop keeps running while gRPC stops with its grace period), later ones are
    refused (UNAVAILABLE) or find no server; none hangs or fails otherwise, and the process exits 0."""
    import threading

    t = triton()
    booster = lgb.Booster(model_file=models["binary"])
    proc, addr, _ = start(models["binary"])
    stopping = threading.Event()
    outcomes: list[str] = []

    def caller(seed: int) -> None:
        client = t.InferenceServerClient(addr)
        x = rows(50, seed)
        tensor = t.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        for _ in range(10_000):
            try:
                got = client.infer("binary", [tensor], client_timeout=20).as_numpy("score")
            except t.InferenceServerException as exc:
                outcomes.append(f"refused {exc.status()}" if stopping.is_set() else f"error {exc}")
                return
            outcomes.append("after" if stopping.is_set() else "before")
            assert float(np.max(np.abs(got - booster.predict(x)))) <= 1e-12

    threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(12)]
    for th in threads:
        th.start()
    while outcomes.count("before") < 100:
        assert proc.poll() is None
        time.sleep(0.05)
    stopping.set()
    proc.terminate()
    for th in threads:
        th.join(60)
        assert not th.is_alive(), "a call hung through the shutdown"
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
    odd = [o for o in outcomes if o not in ("before", "after") and o not in (
        "refused StatusCode.UNAVAILABLE", "refused StatusCode.CANCELLED")]
    assert not odd, odd[:5]


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose 10,000-row calls each take ~0.5 s of predict (1,000 trees)."""
    from tests import helpers

    path = helpers.save(helpers.train("binary", rounds=1000), str(tmp_path_factory.mktemp("slow")), "slow")
    proc, addr, http = start(path, "--max-body-bytes", str(64 << 20))
    yield addr, http
    stop(proc)


def slow_call(t, client, deadline_s: float):
    x = rows(10_000, 3)
    tensor = t.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x)
    try:
        client.infer("slow", [tensor], client_timeout=deadline_s)
        return "OK"
    except t.InferenceServerException as exc:
        return exc.status()


def test_health_and_liveness_answer_while_many_slow_calls_are_in_flight(slow_server):
    """Each call holds a handler thread while it waits for its predict: 20 slow calls in flight once took all
    16 threads, and a Kubernetes gRPC probe (1 s timeout) then timed out on a busy, healthy pod."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t = triton()
    addr, _ = slow_server
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        busy = [pool.submit(slow_call, t, t.InferenceServerClient(addr), 120) for _ in range(20)]
        time.sleep(1.0)  # every call queued or predicting
        assert not all(f.done() for f in busy), [f.result() for f in busy if f.done()]
        import grpc

        with grpc.insecure_channel(addr) as channel:
            for _ in range(3):
                started = time.monotonic()
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                client = t.InferenceServerClient(addr)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert client.is_server_live(client_timeout=1) and client.is_server_ready(client_timeout=1)
                assert time.monotonic() - started < 1.5
        assert [f.result() for f in busy] == ["OK"] * 20


def test_calls_that_end_before_their_answer_are_not_predicted_nor_counted_ok(slow_server):
    """A call whose deadline passes while it waits is dropped (its coroutine cancelled, its batcher entry
    skipped): 30 such calls of ~0.5 s of predict each once kept the server busy for ~15 s after their clients
    had given up, each counted OK."""
    import urllib.request

    t = triton()
    addr, http = slow_server

    def infer_counts() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://{http}/metrics", timeout=5).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith('scoring_grpc_requests_total{') and 'route="grpc.infer"' in line:
                code = line.split('code="')[1].split('"')[0]
                out[code] = float(line.rsplit(" ", 1)[1])
        return out

    before = infer_counts()
    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        ended = list(pool.map(lambda _: slow_call(t, t.InferenceServerClient(addr), 0.2), range(30)))
    assert set(ended) == {"StatusCode.DEADLINE_EXCEEDED"}
    started = time.monotonic()
    x = rows(1, 4)
    tensor = t.InferInput("input", [1, x.shape[1]], "FP64")
    tensor.set_data_from_numpy(x)
    t.InferenceServerClient(addr).infer("slow", [tensor], client_timeout=60)
    waited = time.monotonic() - started
    assert waited < 4, f"a 1-row call waited {waited:.1f} s behind calls nobody waits for"
    deadline = time.monotonic() + 10
    while True:  # each ended call is counted once its handler has seen it end
        after = infer_counts()
        gone = {code: after.get(code, 0) - before.get(code, 0) for code in ("DEADLINE_EXCEEDED", "CANCELLED", "OK")}
        if gone["DEADLINE_EXCEEDED"] + gone["CANCELLED"] >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # timed out, every one (a client's timer fires a little before the server's: 15 of 40 were once CANCELLED)
    assert gone == {"DEADLINE_EXCEEDED": 30, "CANCELLED": 0, "OK": 1}, (before, after)

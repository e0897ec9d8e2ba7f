"""Break-it review of serve's OIP over gRPC, as a client nobody here wrote sees it (tritonclient's generated stub
against ``scoring-worker serve`` in its own process, see ``tests/test_grpc.py`` for why two processes).

Differential: every score is compared with ``lightgbm.Booster.predict`` on the same model file (and, for
categorical features, with LightGBM's pandas path on a ``pd.Categorical`` frame). Hypothesis draws the classes of
inputs a client can send: every datatype in typed contents or raw bytes, both layouts, 0..N rows, NaN and
infinities; and the malformed ones, which must each be one INVALID_ARGUMENT naming the input, never INTERNAL.
"""

from __future__ import annotations

import concurrent.futures
import math

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import FEATURES
from tests.test_grpc import start, stop

grpc = pytest.importorskip("grpc")

# datatype -> (numpy dtype of raw bytes, typed contents field or None)
KINDS = {
    "FP64": ("<f8", "fp64_contents"), "FP32": ("<f4", "fp32_contents"), "FP16": ("<f2", None),
    "INT8": ("<i1", "int_contents"), "INT16": ("<i2", "int_contents"), "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"), "UINT8": ("<u1", "uint_contents"), "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"), "UINT64": ("<u8", "uint64_contents"), "BOOL": ("?", "bool_contents"),
}


def pb():
    from tritonclient.grpc import service_pb2

    return service_pb2


@pytest.fixture(scope="module")
def servers(models):
    """One server of the binary model and one of the categorical model, both alive for the module."""
    import tritonclient.grpc.service_pb2_grpc as pb_grpc

    procs = []
    out = {}
    for kind in ("binary", "categorical"):
        proc, addr, _ = start(models[kind], "--model-name", kind)
        procs.append(proc)
        channel = grpc.insecure_channel(addr)
        out[kind] = (pb_grpc.GRPCInferenceServiceStub(channel), lgb.Booster(model_file=models[kind]))
    yield out
    for proc in procs:
        stop(proc)


def _values(dtype: str, n: int, draw_floats: np.ndarray) -> np.ndarray:
    """``draw_floats`` made into values of ``dtype`` (integers within its range)."""
    raw, _ = KINDS[dtype]
    if dtype == "BOOL":
        return draw_floats > 0
    if dtype.startswith(("INT", "UINT")):
        info = np.iinfo(np.dtype(raw))
        clean = np.nan_to_num(draw_floats, nan=0.0, posinf=0.0, neginf=0.0)
        return np.clip(np.round(clean * 3), info.min, min(info.max, 2**53)).astype(np.dtype(raw))
    with np.errstate(over="ignore"):  # 1e30 as FP16/FP32 is infinity, as a client's cast makes it
        return draw_floats.astype(np.dtype(raw))


def _add(req, name: str, dtype: str, values: np.ndarray, shape: list[int], raw: bool) -> None:
    tensor = req.inputs.add(name=name, datatype=dtype, shape=shape)
    if raw:
        req.raw_input_contents.append(np.ascontiguousarray(values, dtype=np.dtype(KINDS[dtype][0])).tobytes())
    else:
        getattr(tensor.contents, KINDS[dtype][1]).extend(values.ravel().tolist())


def _scores(reply) -> np.ndarray:
    if reply.raw_output_contents:
        return np.frombuffer(reply.raw_output_contents[0], "<f8")
    return np.array(reply.outputs[0].contents.fp64_contents, dtype=np.float64)


finite = st.floats(-50, 50, allow_nan=False, width=32)
special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30])
cells = st.one_of(finite, finite, finite, special)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(sorted(KINDS)), rows=st.integers(0, 7), per_feature=st.booleans(), raw=st.booleans(),
       data=st.data())
def test_every_datatype_layout_and_row_count_scores_as_predict(servers, dtype, rows, per_feature, raw, data):
    """Any well-formed tensor (every datatype, typed or raw, matrix or per-feature, 0 rows, NaN/inf in floats)
    scores exactly as ``Booster.predict`` on the same values as float64."""
    if KINDS[dtype][1] is None:
        raw = True  # FP16 has no typed contents
    stub, booster = servers["binary"]
    floats = np.array(data.draw(st.lists(cells, min_size=rows * 8, max_size=rows * 8)), dtype=np.float64)
    values = _values(dtype, rows, floats).reshape(rows, 8)
    req = pb().ModelInferRequest(model_name="binary")
    if per_feature:
        for j, name in enumerate(FEATURES):
            _add(req, name, dtype, values[:, j], [rows], raw)
    else:
        _add(req, "input", dtype, values, [rows, 8], raw)
    reply = stub.ModelInfer(req, timeout=30)
    expected = booster.predict(values.astype(np.float64)) if rows else np.empty(0)
    got = _scores(reply)
    assert list(reply.outputs[0].shape) == [rows]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert bool(reply.raw_output_contents) == raw  # answered in kind


def _malformed():
    """(label, request builder, words the message must hold) for requests a client gets wrong."""
    p = pb()

    def req():
        return p.ModelInferRequest(model_name="binary")

    def typed(shape, n, dtype="FP64", name="input"):
        r = req()
        t = r.inputs.add(name=name, datatype=dtype, shape=shape)
        getattr(t.contents, KINDS.get(dtype, ("", "fp64_contents"))[1] or "fp64_contents").extend([0] * n)
        return r

    def bytes_matrix():
        r = req()
        r.inputs.add(name="input", datatype="BYTES", shape=[1, 8]).contents.bytes_contents.extend([b"1"] * 8)
        return r

    def bytes_numeric_feature():
        r = req()
        for name in FEATURES:
            r.inputs.add(name=name, datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"0.5")
        return r

    def duplicate():
        r = typed([1, 8], 8)
        r.inputs.add(name="input", datatype="FP64", shape=[1, 8]).contents.fp64_contents.extend([0] * 8)
        return r

    def raw_count():
        r = typed([1, 8], 0)
        r.inputs.add(name="other", datatype="FP64", shape=[1, 8])
        r.raw_input_contents.append(np.zeros(8).tobytes())
        return r

    def raw_short():
        r = req()
        r.inputs.add(name="input", datatype="FP64", shape=[1, 8])
        r.raw_input_contents.append(b"\0" * 63)
        return r

    def ragged_features():
        r = req()
        for j, name in enumerate(FEATURES):
            r.inputs.add(name=name, datatype="FP64", shape=[2 if j else 3]).contents.fp64_contents.extend(
                [0.0] * (2 if j else 3))
        return r

    def empty_name():
        return typed([1, 8], 8, name="")

    return [
        ("huge shape vs small data", lambda: typed([2**31 - 1, 2**31 - 1], 8), "do not match shape"),
        ("shape beyond any body", lambda: typed([2**40, 8], 8), "shape must be"),
        ("negative dimension", lambda: typed([-1, 8], 8), "shape must be"),
        ("3 dimensions", lambda: typed([1, 8, 1], 8), "shape must be"),
        ("no dimension", lambda: typed([], 1), "shape must be"),
        ("wrong width", lambda: typed([1, 5], 5), "5 columns"),
        ("lower-case datatype", lambda: typed([1, 8], 8, dtype="fp64"), "not supported"),
        ("unknown datatype", lambda: typed([1, 8], 8, dtype="FP128"), "not supported"),
        ("INT8 out of range", lambda: _int8_300(req), "out of the INT8 range"),
        ("BYTES matrix", bytes_matrix, "must be numbers"),
        ("BYTES for a numeric feature", bytes_numeric_feature, "BYTES only for features with a category list"),
        ("duplicate input", duplicate, "given twice"),
        ("raw for one input of two", raw_count, "raw_input_contents has 1 entries for 2 inputs"),
        ("raw bytes short", raw_short, "63 bytes do not hold"),
        ("per-feature lengths differ", ragged_features, "different lengths"),
        ("no inputs", req, "no inputs"),
        ("empty input name", empty_name, "empty"),
    ]


def _int8_300(req):
    r = req()
    r.inputs.add(name="input", datatype="INT8", shape=[1, 8]).contents.int_contents.extend([300] * 8)
    return r


@pytest.mark.parametrize("label", [m[0] for m in _malformed()])
def test_a_malformed_tensor_is_one_invalid_argument_naming_it(servers, label):
    stub, _ = servers["binary"]
    _, build, words = next(m for m in _malformed() if m[0] == label)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    assert words in err.value.details() and "\n" not in err.value.details()


def test_unknown_parameters_are_ignored_and_an_unknown_output_is_refused(servers):
    stub, booster = servers["binary"]
    x = np.linspace(-1, 1, 16).reshape(2, 8)
    req = pb().ModelInferRequest(model_name="binary")
    req.parameters["no_such_parameter"].string_param = "x"
    _add(req, "input", "FP64", x, [2, 8], raw=False)
    req.inputs[0].parameters["also_unknown"].int64_param = 3
    np.testing.assert_allclose(_scores(stub.ModelInfer(req, timeout=30)), booster.predict(x), atol=1e-12)
    req.outputs.add(name="probability")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output" in err.value.details()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), data=st.data())
def test_categorical_values_score_as_lightgbms_pandas_path(servers, rows, data):
    """Text categories as BYTES, numeric ones as numbers or as BYTES text; unknown values are missing, as
    pandas' Categorical makes them."""
    stub, booster = servers["categorical"]
    x = np.array(data.draw(st.lists(finite, min_size=rows * 8, max_size=rows * 8))).reshape(rows, 8)
    colors = data.draw(st.lists(st.sampled_from(["red", "green", "blue", "purple", "", "Red"]),
                                min_size=rows, max_size=rows))
    sizes = data.draw(st.lists(st.sampled_from([1, 5, 10, 7, 0]), min_size=rows, max_size=rows))
    size_as_text = data.draw(st.booleans())
    req = pb().ModelInferRequest(model_name="categorical")
    for j, name in enumerate(FEATURES):
        _add(req, name, "FP64", x[:, j], [rows], raw=False)
    req.inputs.add(name="color", datatype="BYTES", shape=[rows]).contents.bytes_contents.extend(
        [c.encode() for c in colors])
    if size_as_text:
        req.inputs.add(name="size", datatype="BYTES", shape=[rows]).contents.bytes_contents.extend(
            [str(s).encode() for s in sizes])
    else:
        _add(req, "size", "FP64", np.array(sizes, dtype=np.float64), [rows], raw=False)
    got = _scores(stub.ModelInfer(req, timeout=30))
    frame = pd.DataFrame({f: x[:, j] for j, f in enumerate(FEATURES)})
    frame["color"] = pd.Categorical([c if c in ("red", "green", "blue") else None for c in colors],
                                    categories=["red", "green", "blue"])
    frame["size"] = pd.Categorical([s if s in (1, 5, 10) else None for s in sizes], categories=[1, 5, 10])
    np.testing.assert_allclose(got, booster.predict(frame), rtol=0, atol=1e-12)


def test_concurrent_requests_for_different_versions_each_get_their_versions_scores(models, tmp_path):
    """Adaptive batching merges concurrent requests: requests naming v1, v2 or no version (sticky by id), raw and
    typed, interleaved from 16 threads, each get the scores of the version their reply names."""
    import tritonclient.grpc.service_pb2_grpc as pb_grpc

    routing = tmp_path / "routing.yaml"
    routing.write_text(f"versions:\n  - {{name: v1, model: {models['binary']}, weight: 50}}\n"
                       f"  - {{name: v2, model: {models['binary_v2']}, weight: 50}}\n")
    proc, addr, _ = start("", "--routing", str(routing), "--model-name", "m")
    boosters = {"v1": lgb.Booster(model_file=models["binary"]), "v2": lgb.Booster(model_file=models["binary_v2"])}
    try:
        def one(seed: int) -> str | None:
            with grpc.insecure_channel(addr) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                rng = np.random.default_rng(seed)
                x = rng.normal(size=(1 + seed % 9, 8))
                asked = ["v1", "v2", ""][seed % 3]
                req = pb().ModelInferRequest(model_name="m", model_version=asked, id=f"r{seed}")
                _add(req, "input", "FP64", x, list(x.shape), raw=bool(seed % 2))
                reply = stub.ModelInfer(req, timeout=60)
                if asked and reply.model_version != asked:
                    return f"{seed}: asked {asked}, answered {reply.model_version}"
                err = float(np.max(np.abs(_scores(reply) - boosters[reply.model_version].predict(x))))
                return None if err <= 1e-12 else f"{seed}: {reply.model_version} off by {err}"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            wrong = [w for w in pool.map(one, range(240)) if w]
        assert not wrong, wrong[:5]
    finally:
        stop(proc)

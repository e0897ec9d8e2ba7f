"""OIP JSON tensor data: the fast path for numbers (``oip._numbers``) against the checked path it skips.

For any JSON data a client can send (flat or nested, numbers, nulls, booleans, text, lists, ragged rows, the
wrong count) the two give the same float64 values or the same 400 reason, byte for byte."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.decode import oip
from workers.errors import BadRequest

scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False), st.none(),
                    st.booleans(), st.text(max_size=3), st.just([]), st.lists(st.integers(0, 3), max_size=2),
                    st.floats(min_value=1e39, max_value=1e300))  # beyond FP32's range


def _outcome(fast: bool, monkeypatch, dtype: str, data, shape: list[int]):
    if not fast:
        monkeypatch.setattr(oip, "_numbers", lambda *a: None)
    try:
        size = int(np.prod(shape))
        return ("ok", oip._json_values("x", dtype, data, shape, size).tobytes())
    except BadRequest as exc:
        return ("400", str(exc))
    finally:
        monkeypatch.undo()


@st.composite
def tensors(draw):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    shape = draw(st.sampled_from([[rows, cols], [rows * cols], [rows, cols + 1]]))
    mostly = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-10**6, 10**6),
                       st.none())
    value = draw(st.sampled_from([mostly, scalars]))
    if draw(st.booleans()):
        data = [[draw(value) for _ in range(cols)] for _ in range(rows)]
        if draw(st.integers(0, 4)) == 0:  # a ragged row
            data[draw(st.integers(0, rows - 1))].append(draw(mostly))
    else:
        data = [draw(value) for _ in range(rows * cols + draw(st.sampled_from([0, 0, 0, 1, -1])))]
    return draw(st.sampled_from(["FP64", "FP32", "FP16"])), data, shape


@settings(max_examples=600, deadline=None)
@given(tensors())
def test_the_fast_path_gives_what_the_checked_path_gives(monkeypatch_module, case):
    dtype, data, shape = case
    if not data:
        return
    data = orjson.loads(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)) if _jsonable(data) else data
    assert _outcome(True, monkeypatch_module, dtype, data, shape) == _outcome(False, monkeypatch_module, dtype,
                                                                              data, shape)


def _jsonable(data) -> bool:
    try:
        orjson.dumps(data)
    except TypeError:  # integers beyond 64 bits: what Python's json (the NaN fallback) would hand over as they are
        return False
    return True


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_the_fast_path_takes_the_usual_bodies():
    """Flat and nested rows of numbers and nulls go the fast way (null is NaN); anything else does not."""
    assert oip._numbers([1, 2.5, None, 4], [2, 2], 4).tolist()[:2] == [1.0, 2.5]
    assert np.isnan(oip._numbers([[1, None], [3, 4]], [2, 2], 4)[1])
    assert oip._numbers([1, True], [2], 2) is None
    assert oip._numbers([[1, 2], [3]], [2, 2], 4) is None
    assert oip._numbers([1, 2, 3], [2, 2], 4) is None
    assert oip._numbers([[1, 2], [3, 4]], [4], 4) is None


_PACKED_CHECK = """
import sys
import numpy as np
from hypothesis import given, settings, strategies as st
from workers.decode import oip_grpc
from workers.decode.oip_proto import open_inference_grpc_pb2 as pb

@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=300).map(lambda v: ("fp64", v)),
                 st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=300).map(
                     lambda v: ("fp32", v))))
def check(case):
    kind, values = case
    field = f"{kind}_contents"
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(values)
    want = np.array(getattr(contents, field), dtype=np.float64)
    got = oip_grpc._typed("x", kind.upper(), [len(values)], contents)
    assert got.dtype == np.float64 and got.flags.writeable
    assert np.array_equal(got, want, equal_nan=True) and np.array_equal(np.signbit(got), np.signbit(want))
    if values:
        assert oip_grpc._packed(contents, field, len(values)) is not None  # the fast path was taken

check()
print("checked")
"""


def test_grpc_typed_fp64_fp32_contents_read_from_their_bytes_equal_reading_each_value():
    """oip_grpc reads FP64/FP32 typed contents from the packed bytes (one copy) instead of one Python float per
    value: the same float64 values, NaN, infinities, -0.0 and subnormals included (hypothesis). In a process of
    its own: our OIP stubs and tritonclient's (other tests of this worker process) cannot share protobuf's
    descriptor pool."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PACKED_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "checked", out.stderr[-3000:]

"""OIP REST requests: the native reader of tensor numbers (``_jsonrows.oip_data``, used by ``oip.parse``) against
the Python path alone. For any body a client can send (the usual requests, every number spelling, nulls, nested
rows, other datatypes, keys repeated or escaped, text in the data, the binary extension's JSON header, and random
mutations of those bytes) both give the same request (id, matrix bit for bit, outputs asked) or the same 400
reason; nothing else is raised."""

from __future__ import annotations

import json
import random

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import FEATURES
from workers.decode import oip
from workers.errors import BadRequest
from workers.scoring.model import load_model
from workers.settings import ModelSettings


@pytest.fixture(scope="module")
def model(models):
    if oip._jsonrows is None:
        pytest.skip("workers.decode._jsonrows is not built (pip install -e . builds it)")
    return load_model(ModelSettings(path=models["binary"]))


def outcome(body: bytes, model, native: bool, header_length: int | None = None):
    saved = oip._jsonrows
    if not native:
        oip._jsonrows = None
    try:
        req = oip.parse(body, header_length, model)
    except BadRequest as exc:
        return ("400", str(exc))
    finally:
        oip._jsonrows = saved
    m = req.matrix.copy()
    m[np.isnan(m)] = np.nan  # missing is missing, whichever NaN; -0.0 kept
    return ("ok", req.id, m.shape, m.tobytes(), sorted(req.binary_outputs), req.requested)


def same(body: bytes, model, header_length: int | None = None):
    got, want = outcome(body, model, True, header_length), outcome(body, model, False, header_length)
    assert got == want, (body[:300], got, want)
    return got


numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-10**6, 10**6), st.integers(-2**63, 2**63 - 1), st.none(),
    st.floats(min_value=1e38, max_value=1e300))  # FP32's range ends near 3.4e38
odd = st.one_of(st.booleans(), st.text(max_size=3), st.just([]), st.just({}), st.integers(-2**70, 2**70))
spellings = st.sampled_from(["0", "-0", "-0.0", "1e5", "1E+05", "1e-5", "12345678901234567", "123456789012345678",
                             "1234567890123456789", "1.0e308", "1e309", "-1e-320", "4.9e-324", "2.2250738585072014e-308",
                             "0.1", "01", "1.", ".5", "+1", "1e", "-", "1e00001", "9007199254740993", "NaN",
                             "Infinity", "-Infinity", "nul", "null", "true"])


@st.composite
def requests(draw):
    rows, cols = draw(st.integers(1, 5)), draw(st.sampled_from([len(FEATURES), len(FEATURES), 3]))
    value = draw(st.sampled_from([numbers, numbers, st.one_of(numbers, odd)]))
    shape = draw(st.sampled_from([[rows, cols], [rows * cols], [rows, cols + 1], [rows + 1, cols], [rows, cols, 1]]))
    if draw(st.booleans()):
        data: list = [[draw(value) for _ in range(cols)] for _ in range(rows)]
        if draw(st.integers(0, 5)) == 0:
            data[draw(st.integers(0, rows - 1))].append(draw(numbers))
    else:
        data = [draw(value) for _ in range(rows * cols + draw(st.sampled_from([0, 0, 0, 1, -1])))]
    spec: dict = {"name": draw(st.sampled_from(["x", "input-0", FEATURES[0]])), "shape": shape,
                  "datatype": draw(st.sampled_from(["FP64", "FP64", "FP32", "FP16", "INT64", "BOOL", "BYTES"])),
                  "data": data}
    if draw(st.integers(0, 6)) == 0:
        del spec[draw(st.sampled_from(["data", "shape", "datatype", "name"]))]
    if draw(st.integers(0, 6)) == 0:
        spec["parameters"] = draw(st.sampled_from([{"binary_data_size": 8}, {"x": 1}, []]))
    inputs = [spec]
    if draw(st.integers(0, 4)) == 0:  # one [N] tensor per feature
        inputs = [{"name": f, "shape": [rows], "datatype": "FP64", "data": [draw(value) for _ in range(rows)]}
                  for f in FEATURES]
    if draw(st.integers(0, 8)) == 0:
        inputs.append(inputs[0])
    req: dict = {"inputs": inputs}
    if draw(st.booleans()):
        req["id"] = draw(st.one_of(st.text(max_size=5), st.integers(0, 3)))
    if draw(st.integers(0, 3)) == 0:
        req["outputs"] = draw(st.sampled_from([[{"name": "score"}], [{"name": "score", "parameters":
                                                                      {"binary_data": True}}], "x", [1]]))
    if draw(st.integers(0, 5)) == 0:
        req["parameters"] = draw(st.sampled_from([{"binary_data_output": True}, {"binary_data_output": 1}, []]))
    return req


def text(req: dict, style: int) -> bytes:
    try:
        raw = orjson.dumps(req)
    except TypeError:  # integers beyond 64 bits
        raw = json.dumps(req).encode()
    if style == 1:
        return json.dumps(json.loads(raw), indent=2).encode()
    if style == 2:
        return b" \n\t" + json.dumps(json.loads(raw), separators=(" , ", " : ")).encode() + b"\r\n "
    return raw


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.integers(0, 2))
@example({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [[1, 2, 3, 4, 5, 6, 7, None]]}]}, 0)
def test_a_request_reads_the_same_with_and_without_the_native_reader(model, req, style):
    same(text(req, style), model)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spellings, min_size=8, max_size=8), st.booleans())
def test_every_number_spelling_reads_the_same(model, words, nested):
    data = f"[[{','.join(words)}]]" if nested else f"[{','.join(words)}]"
    shape = "[1, 8]"
    for dtype in ("FP64", "FP32"):
        body = f'{{"inputs": [{{"name": "x", "shape": {shape}, "datatype": "{dtype}", "data": {data}}}]}}'
        same(body.encode(), model)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.integers(0, 2), st.randoms(use_true_random=False))
def test_mutated_bytes_read_the_same(model, req, style, rnd: random.Random):
    body = bytearray(text(req, style))
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randrange(len(body))
        what = rnd.randrange(4)
        if what == 0:
            body[at] = rnd.randrange(256)
        elif what == 1:
            del body[at]
        elif what == 2:
            body.insert(at, rnd.choice(b'[]{},:"\\-.0e n\xff\xc3'))
        else:
            body[at:at] = body[rnd.randrange(len(body)):][:rnd.randint(1, 20)]
    same(bytes(body), model)


def test_keys_repeated_escaped_or_elsewhere_read_the_same(model):
    row = "[1, 2, 3, 4, 5, 6, 7, 8]"
    two = "[8, 7, 6, 5, 4, 3, 2, 1]"
    head = '"name": "x", "shape": [1, 8], "datatype": "FP64"'
    bodies = [
        f'{{"inputs": [{{{head}, "data": {row}, "data": {two}}}]}}',  # orjson keeps the last
        f'{{"inputs": [{{{head}, "data": {row}}}], "inputs": [{{{head}, "data": {two}}}]}}',
        f'{{"inputs": [{{{head}, "d\\u0061ta": {row}}}]}}',
        f'{{"inp\\u0075ts": [{{{head}, "data": {row}}}]}}',
        f'{{"inputs": [{{{head}, "data": {row}, "parameters": {{"data": {two}}}}}]}}',
        f'{{"id": "data: [1]", "inputs": [{{{head}, "data": {row}}}]}}',
        f'{{"inputs": [{{{head}, "data": {row}}}]}} trailing',
        f'{{"inputs": [{{{head}, "data": {row}}}]}}{{}}',
        f'\ufeff{{"inputs": [{{{head}, "data": {row}}}]}}',
        f'{{"inputs": [{{{head}, "data": [{row[1:-1]}, ]}}]}}',
        f'{{"inputs": [{{{head}, "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}}]}}',
        '{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}',
        '{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": [[1, 2, 3, 4], []]}]}',
        f'{{"inputs": [{{{head}, "data": [[[1, 2, 3, 4, 5, 6, 7, 8]]]}}]}}',
        f'{{"inputs": [{{{head}, "data": {row}}}, 5]}}',
        f'{{"inputs": [{{{head}, "data": {row}}}], "outputs": [{{"name": "score"}}], "id": "\\ud800"}}',
        f'{{"inputs": [{{{head}, "data": {row}}}], "id": "caf\u00e9"}}',
        '{"inputs": []}', '{}', '[]', '', '{"inputs": [{}]}', '{"inputs": [[1, 2]]}',
    ]
    outcomes = [same(b.encode(), model) for b in bodies]
    assert outcomes[0][0] == "ok" and outcomes[1][0] == "ok"  # the last "data" / "inputs" answered, as orjson reads


def test_the_binary_extension_header_reads_the_same(model):
    x = np.arange(8, dtype=np.float64)
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64",
                                     "parameters": {"binary_data_size": 64}}],
                         "outputs": [{"name": "score", "parameters": {"binary_data": True}}]})
    assert same(head + x.tobytes(), model, len(head))[0] == "ok"
    mixed = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": x.tolist()}]})
    assert same(mixed + x.tobytes(), model, len(mixed))[0] == "400"  # bytes after the last tensor


def test_the_usual_request_takes_the_native_reader(model):
    """The request the benchmark sends (and clients mostly do) is read natively: its data arrays are gone from
    what orjson reads, and the matrix is exact."""
    x = np.random.default_rng(3).normal(size=(100, 8))
    x[3, 2] = np.nan
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [100, 8], "datatype": "FP64",
                                     "data": [None if np.isnan(v) else v for v in x.ravel().tolist()]}]})
    native = oip._jsonrows.oip_data(body)
    assert native is not None and b"[]" in native[0] and len(native[0]) < 100
    got = oip.parse(body, None, model).matrix
    np.testing.assert_array_equal(got, x)

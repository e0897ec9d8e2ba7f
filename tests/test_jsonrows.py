"""The native JSON record reader (workers/decode/_jsonrows.cpp) against the per-record Python decoder it stands
in front of: every batch decodes to the same ids, reasons, matrix (bit for bit, NaN for missing) and raw values
of the rejected rows, whatever the bytes (hypothesis, records and mutations of them)."""

from __future__ import annotations

import json
import os
import random
import struct

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import FEATURES
from tests.test_jsonparse import OldDecoder
from workers.decode import records, wire
from workers.decode.records import MAX_ID_LENGTH, Decoded, RecordDecoder
from workers.scoring.model import load_model
from workers.settings import ModelSettings


@pytest.mark.parametrize("name", ["_jsonrows", "_avrorows"])
def test_the_native_readers_are_built(name):
    """Both are built by the install (pyproject's ext-modules); without one its records take the Python path,
    correct but several times slower: a build that lost it must not pass CI unnoticed."""
    module = records._jsonrows if name == "_jsonrows" else wire._avrorows
    if module is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"workers.decode.{name} is not built")
        pytest.skip(f"workers.decode.{name} is not built (pip install -e . builds it)")


@pytest.fixture(scope="module")
def pair(models):
    if records._jsonrows is None:
        pytest.skip("workers.decode._jsonrows is not built")
    model = load_model(ModelSettings(path=models["binary"]))
    return model


def bits(matrix: np.ndarray) -> bytes:
    """The matrix as bytes, every NaN made one NaN (missing is missing), -0.0 kept (a bit difference)."""
    m = matrix.copy()
    m[np.isnan(m)] = np.nan
    return m.tobytes()


def check(model, values, keys=None, key_as_id=False, id_field="id") -> Decoded:
    new = RecordDecoder(model, id_field=id_field, key_as_id=key_as_id)
    old = OldDecoder(model, id_field=id_field, key_as_id=key_as_id)
    assert new.native
    got, want = new.decode(values, keys), old.decode(values, keys)
    assert got.ids == want.ids
    assert got.features.reasons == want.features.reasons
    assert got.features.matrix.shape == want.features.matrix.shape
    assert bits(got.features.matrix) == bits(want.features.matrix), (values, got.features.matrix,
                                                                    want.features.matrix)
    for i in want.features.reasons:  # the errors' raw column
        assert got.raw[i] == want.raw[i]
    assert got.passthrough == {}
    return got


NAMES = [*FEATURES, "id", "note", "x0 ", "X0"]
floats_ = st.floats(allow_nan=False, allow_infinity=False) | st.floats(min_value=-1e3, max_value=1e3) | (
    st.floats(allow_nan=False, allow_infinity=False, width=32))
numbers = st.one_of(floats_, st.integers(min_value=-2**70, max_value=2**70),
                    st.sampled_from([0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 2**53 + 1,
                                     9007199254740993, 10**18 - 1, 10**18, -(10**18) + 1, 0.1, 0.3, 1e22, 1e23]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=6),
                    st.sampled_from(["r1", "é", "\u2028", "\x00", "\\", '"', "\ud7ff", "\U0001f600"]))
values_ = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                       st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=5)
records_ = st.dictionaries(st.sampled_from(NAMES), values_, max_size=10)
usual = st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8)},
                              optional={f: st.one_of(st.none(), numbers) for f in FEATURES})


def text_of(obj, how: int) -> bytes:
    """``obj`` as a producer would write it: orjson, json with spaces or with ASCII escapes, indented."""
    try:
        if how == 0:
            return orjson.dumps(obj)
        if how == 1:
            return json.dumps(obj).encode()
        if how == 2:
            return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()
        return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return json.dumps(obj).encode("utf-8", "surrogatepass")


def mutate(value: bytes, rnd: random.Random) -> bytes:
    """A byte-level change: truncated, a byte replaced, inserted or dropped, or a piece doubled."""
    if not value:
        return value
    i = rnd.randrange(len(value))
    choice = rnd.randrange(5)
    if choice == 0:
        return value[:i]
    if choice == 1:
        return value[:i] + bytes([rnd.randrange(256)]) + value[i + 1:]
    if choice == 2:
        return value[:i] + rnd.choice([b",", b"}", b"{", b'"', b"\\", b" ", b"-", b".", b"e", b"0", b"\xff",
                                       b"\xc3", b"\x00", b"\n"]) + value[i:]
    if choice == 3:
        return value[:i] + value[i + 1:]
    j = rnd.randrange(i, len(value))
    return value[:j] + value[i:j] + value[j:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(usual | records_, st.integers(0, 3), st.integers(0, 2**32)), max_size=10),
       st.booleans())
@example([({"id": "a", "x0": 1.5}, 0, 0)], False)
def test_records_decode_as_the_python_path_does(pair, items, key_as_id):
    values: list[bytes | None] = []
    for obj, how, seed in items:
        value = text_of(obj, how)
        rnd = random.Random(seed)
        if seed % 4 == 0:
            value = mutate(value, rnd)
        values.append(None if seed % 17 == 0 else value)
    keys = [None if i % 3 == 0 else (b"\xff" if i % 3 == 1 else f"k{i}".encode()) for i in range(len(values))]
    check(pair, values, keys, key_as_id=key_as_id)
    check(pair, values)
    check(pair, values, keys, key_as_id=key_as_id, id_field="x0")  # the id field is also a feature


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 25), st.sampled_from("efg"))
def test_numbers_in_every_spelling_read_as_python_reads_them(pair, x, digits, kind):
    """A number written with any precision, in any notation: the double Python (and orjson) reads."""
    spelled = {repr(x), f"{x:.{digits}{kind}}", f"{x:.{digits}E}", f"{x:.{digits}f}"[:40]}
    check(pair, [f'{{"id":"a","x0":{s}}}'.encode() for s in spelled])


def test_edges(pair):
    ones = [
        b'{"id":"a","x0":-0}', b'{"id":"a","x0":-0.0}', b'{"id":"a","x0":1E5}', b'{"id":"a","x0":1e+5}',
        b'{"id":"a","x0":1e-400}', b'{"id":"a","x0":1e400}', b'{"id":"a","x0":4.9e-324}', b'{"id":"a","x0":01}',
        b'{"id":"a","x0":1.}', b'{"id":"a","x0":.5}', b'{"id":"a","x0":+1}', b'{"id":"a","x0":NaN}',
        b'{"id":"a","x0":123456789012345678}', b'{"id":"a","x0":1234567890123456789}',
        b'{"id":"a","x0":-9223372036854775808}', b'{"id":"a","x0":12345678901234567890.5}',
        b'{"id":"a","x0":0.000000000000000000000000001}', b'{"id":"a","x0":1e00001}', b'{"id":"a","x0":1e0001}',
        b'{"id":"a","x0":9007199254740993.0}', b'{"id":"a","x0":true}', b'{"id":"a","x0":"1.5"}',
        b'{"id":"a","x0":[1]}', b'{"id":"a","x0":{}}', b'{"id":"a","x0":1,"x0":2}', b'{"id":"a","x0":"s","x0":2}',
        b'{"id":"a","x\\u0030":7}', b'{"id":"a","\\u0078\\u0030":7}', b'{"i\\u0064":"a"}', b'{"id":"\\u0061"}',
        b'{"id":"a\\"b"}', b'{"id":""}', b'{"id":5}', b'{"id":null}', b'{"id":["a"]}', b'{}', b'[]', b'1', b'',
        b' ', b'{"id":"a"} x', b'{"id":"a"}{}', b'{"id":"a",}', b'{"id":"a" "x0":1}', b'{"id":"a","id":"b"}',
        b'{"id":"a","deep":' + b"[" * 200 + b"]" * 200 + b"}", b'{"id":"a","deep":' + b"[" * 100 + b"]" * 100 + b"}",
        b'{"id":"a","n":"\\ud83d\\ude00"}', b'{"id":"a","n":"\\ud800"}', b'{"id":"a","n":"\\x"}',
        b'{"id":"a","n":"\t"}', b'{"id":"\xc3\xa9"}', b'{"id":"\xc3"}', b'{"id":"a","n":"\xed\xa0\x80"}',
        b'{"id":"a","n":"\xf4\x90\x80\x80"}', b'{"id":"a","n":"\xe0\x80\xaf"}', b'\xef\xbb\xbf{"id":"a"}',
        b'\t{"id" : "a" ,\r\n "x0" : 2 }\n', b'{"id":"a","x0":null,"x1":1e-7,"x2":-1.5E+3}',
        b'{"id":"a","n":{"x0":"no"},"x1":[true,false,null,{"a":[]}]}', b'{"id":"' + b"a" * MAX_ID_LENGTH + b'"}',
        b'{"id":"' + b"a" * (MAX_ID_LENGTH + 1) + b'"}', b'{"id":"' + "é".encode() * MAX_ID_LENGTH + b'"}',
        b'{"id":"' + "é".encode() * (MAX_ID_LENGTH + 1) + b'"}', b'{"id":"a","x0":1\x00}', None,
    ]
    got = check(pair, ones)
    assert got.features.matrix[0, 0] == 0.0 and struct.pack("d", got.features.matrix[1, 0]) == struct.pack("d", -0.0)
    keys = [b"key", None, b"\xff", b"", b"k" * (MAX_ID_LENGTH + 1)]
    for id_part in (b"", b'"id":null,'):
        values = [b"{" + id_part + b'"x0":1}' for _ in keys]
        check(pair, values, keys, key_as_id=True)
    check(pair, [b'{"key":"a","x0":1}', b'{"id":"b","x0":1}'], id_field="key")


def test_a_usual_batch_takes_the_native_path_and_only_odd_records_the_python_one(pair, monkeypatch):
    values = [orjson.dumps({"id": f"r{i}", **{f: i * 0.5 for f in FEATURES}}) for i in range(100)]
    values[3] = b'{"id":"r3","x0":"text"}'
    values[5] = b'{"id":5,"x0":1}'
    calls: list[int] = []
    python_decode = RecordDecoder.decode

    def counted(self, vals, keys=None, parsed=None, from_json=False):
        if parsed is not None:
            calls.append(len(vals))
        return python_decode(self, vals, keys, parsed, from_json)

    monkeypatch.setattr(RecordDecoder, "decode", counted)
    got = check(pair, values)
    assert calls == [2]  # records 3 and 5 only
    assert got.ids[5] == "5" and 3 in got.features.reasons and got.features.matrix[99, 0] == 49.5

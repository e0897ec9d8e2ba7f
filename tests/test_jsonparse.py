"""workers/decode/jsonparse.py: the batch JSON parse and the big-integer check equal the per-value path they
replace (the trusted one: orjson per value, a regex for 19 digits), over adversarial values."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import FEATURES
from workers.decode.jsonparse import exact_loads, long_number, parse_values
from workers.decode.records import _NUMERIC, MAX_ID_LENGTH, Decoded, Features, RecordDecoder
from workers.scoring.model import load_model
from workers.settings import ModelSettings

_OLD_LONG = re.compile(rb"[0-9]{19}")  # the check as it was (records.py before the translate)
_NOT_FRACTION = re.compile(rb"(?<![.0-9])[0-9]{19}")  # 19+ digits in a row not after a decimal point


def old_long_number(value: bytes | str) -> bool:
    return _OLD_LONG.search(value.encode() if isinstance(value, str) else value) is not None


digit_runs = st.lists(st.one_of(st.text("0123456789", min_size=15, max_size=22), st.binary(max_size=4),
                                st.sampled_from(["", ",", ".", "-", "e", "\"", "1", "٣", "0.00", ".0"])), max_size=12)


@settings(max_examples=400, deadline=None)
@given(digit_runs, st.booleans())
def test_long_number_is_the_regex(parts, as_text):
    """19+ digits not after a '.', as a regex finds them; never fewer values than the old check (a subset)."""
    value = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    want = _NOT_FRACTION.search(value) is not None
    assert long_number(value) == want
    assert not want or old_long_number(value)
    assert long_number(bytearray(value)) == want
    assert long_number(memoryview(value)) == want
    if as_text:
        text = value.decode("utf-8", "replace")
        assert long_number(text) == (_NOT_FRACTION.search(text.encode()) is not None)


def test_long_number_edges():
    assert long_number(b"1234567890123456789")  # exactly 19
    assert not long_number(b"123456789012345678")  # 18
    assert not long_number(b"123456789.123456789")
    assert not long_number(b'{"x": 0.0012345678901234567, "y": 1.12345678901234567890}')  # fractions: floats
    assert long_number(b'{"x": 0.0012345678901234567, "n": 12345678901234567890}')
    assert long_number(b'{"x": 1.5e1234567890123456789}')  # an exponent: json's inf, as before
    assert long_number('{"n": 18446744073709551621}')


# -- the batch parse and the decoder loop against the decoder as it was -------------------------------------
class OldDecoder(RecordDecoder):
    """The per-record decoder as it was before the batch parse (copied from records.py at 9b01351): the
    trusted path the fast one must equal."""

    def decode(self, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None,
               parsed: tuple[list[Any], dict[int, str]] | None = None) -> Decoded:
        """``values`` as JSON records, or, with ``parsed``, the objects a wire format already read from them
        (``workers.decode.wire``: Avro, Protobuf, JSON Schema) with the reasons of those it could not read."""
        n = len(values)
        width = len(self.names)
        flat: list[Any] = []  # n * width feature values, row after row
        reasons: dict[int, str] = {}
        ids: list[str | None] = []
        raw: list[dict | None] = []
        passthrough: dict[str, list[Any]] = {name: [] for name in self.passthrough}
        nan_row = [None] * width
        id_field, names = self.id_field, self.names
        extend, loads, big = flat.extend, orjson.loads, old_long_number
        objs, given = parsed if parsed is not None else (None, {})
        for i in range(n):
            obj: Any = None
            reason = None
            if objs is not None:
                obj = objs[i]
                reason = given.get(i)
            else:
                value = values[i]
                if value is None:
                    reason = "empty value (tombstone)"
                else:
                    try:
                        obj = loads(value)
                        if big(value):
                            obj = exact_loads(value)
                    except orjson.JSONDecodeError as exc:
                        reason = f"not valid JSON: {str(exc)[:120]}"
            if reason is None and type(obj) is not dict:
                reason = f"{'JSON ' if objs is None else ''}{type(obj).__name__} where an object was expected"
                obj = None
            rid: Any = None
            if reason is None:
                rid = obj.get(id_field)
                key = keys[i] if keys is not None else None
                if rid is None and self.key_as_id and key is not None:
                    try:
                        rid = key.decode("utf-8")
                    except UnicodeDecodeError:
                        reason = "message key is not UTF-8 text"
                if reason is None:
                    if rid is None:
                        reason = f"missing id field '{id_field}'"
                    elif type(rid) is int:
                        rid = str(rid)
                    elif type(rid) is not str:
                        reason = f"id field '{id_field}' must be a string or integer, got {type(rid).__name__}"
                    elif not rid or len(rid) > MAX_ID_LENGTH:
                        reason = f"id field '{id_field}' must have 1 to {MAX_ID_LENGTH} characters"
            if reason is None:
                extend(map(obj.get, names))  # checked below, for the whole batch at once
            else:
                reasons[i] = reason
                extend(nan_row)
                rid = rid if isinstance(rid, str) else None
            ids.append(rid)
            raw.append(obj)
            for name, col in passthrough.items():
                col.append(obj.get(name) if obj is not None else None)
        # Fast path: one pass over every value's type. Only a batch holding something other than numbers and
        # nulls (a category, a bool, a string) goes row by row.
        if not self.numeric_only or not _NUMERIC.issuperset(set(map(type, flat))):
            self._check_rows(flat, width, reasons)
        matrix = np.array(flat, dtype=np.float64).reshape(n, width) if n else np.empty((0, width))
        return Decoded(ids, Features(matrix, reasons), passthrough, raw)




def decoders(models, kind: str, **kw) -> tuple[RecordDecoder, OldDecoder]:
    model = load_model(ModelSettings(path=models[kind]))
    return RecordDecoder(model, **kw), OldDecoder(model, **kw)


def same(new: Decoded, old: Decoded) -> None:
    assert new.ids == old.ids
    assert new.features.reasons == old.features.reasons
    assert new.features.matrix.shape == old.features.matrix.shape
    assert np.array_equal(new.features.matrix, old.features.matrix, equal_nan=True)
    assert new.passthrough == old.passthrough
    assert new.raw == old.raw


NAMES = [*FEATURES, "color", "size", "id", "big", "note"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                         st.sampled_from(["red", "green", "blue", "5", 10, 1, 5.0, 18446744073709551621]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=3), inner, max_size=3),
                           max_leaves=6)
records_ = st.dictionaries(st.sampled_from(NAMES), json_values, max_size=12)


def encoded(obj) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: Python's json writes it
        return json.dumps(obj).encode()


# Fragments that, joined with others, could close or open brackets and strings across values
FRAGMENTS = [b"", b" ", b"\n", b"\t", b",", b"[", b"]", b"{", b"}", b'"', b"\\", b":", b"1", b"1],[2",
             b'{"a":[{}', b"{}]}", b'{"a":"}', b'{"}', b"{},{}", b'{"id":"x"},{"id":"y"}', b"\xef\xbb\xbf",
             b"\xff", b"null", b"true", b'"id"', b'{"id":"z","x0":1}', b"]}", b"[{", b'\\"', b"\x00",
             b"12345678901234567890", b"NaN", b"1e400", b"-"]
adversarial = st.lists(st.sampled_from(FRAGMENTS), min_size=0, max_size=4).map(b"".join)
values_ = st.one_of(records_.map(encoded), records_.map(lambda r: b" " + encoded(r) + b"\n"), adversarial,
                    st.none(), st.binary(max_size=8), json_values.map(encoded))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(values_, max_size=12), st.booleans(), st.booleans())
def test_fast_decode_equals_the_per_record_path(models, values, key_as_id, categorical):
    kw = {"key_as_id": key_as_id, "passthrough": ["note", "big"]}
    new, old = decoders(models, "categorical" if categorical else "binary", **kw)
    keys = [None if i % 3 == 0 else (b"\xff" if i % 3 == 1 else f"k{i}".encode()) for i in range(len(values))]
    same(new.decode(values, keys), old.decode(values, keys))
    same(new.decode(values), old.decode(values))
    # A router with several decoders parses the batch once and hands it to each (from_json): the same result.
    same(new.decode(values, keys, parse_values(values), from_json=True), old.decode(values, keys))


def test_values_that_shift_records_when_joined_fall_back(models):
    """Each pair or triple is valid JSON joined into one array of the right length, never alone."""
    new, old = decoders(models, "binary")
    for values in ([b'[{"id":"a"}', b'{"id":"b"}]', b'{"id":"c"},{"id":"d"}'],
                   [b'{"id":"a","n":"}', b'{"}', b'{"id":"c"},{"id":"d"}'],
                   [b'{"id":"a","n":[{}', b'{}]}', b'{"id":"c"},{"id":"d"}'],
                   [b'{"id":"a"}, {"id":"b"}', b""], [b"1],[2"], [b" "], [b"\xef\xbb\xbf{}"]):
        got = new.decode(values)
        same(got, old.decode(values))
        assert len(got.features.reasons) >= 1


def test_batches_of_good_records_with_tombstones_and_big_integers(models):
    new, old = decoders(models, "categorical", passthrough=["big"])
    values = [orjson.dumps({"id": f"r{i}", **{f: i * 0.25 for f in FEATURES}, "color": "red", "size": 5})
              for i in range(50)]
    values[7] = None
    values[9] = b'{"id":"b","x0":1,"big":18446744073709551621}'
    values[11] = b'{"id":"s","x0":0.0012345678901234567,"x1":1.2345678901234567e-05,"big":0.00000000000000000001}'
    got = new.decode(values)
    same(got, old.decode(values))
    assert got.features.matrix[11, 0] == 0.0012345678901234567 and got.passthrough["big"][11] == 1e-20
    assert got.passthrough["big"][9] == 18446744073709551621 and got.features.reasons == {
        7: "empty value (tombstone)"}


# Values that are not JSON alone but open/close brackets or strings that a neighbour closes/opens when joined
TRICKY = [b'[{"id":"a"}', b'{"id":"b"}]', b'{"id":"c"},{"id":"d"}', b'{"id":"e","n":"}', b'{"}', b'{"id":"f","n":[{}',
          b"{}]}", b'{"id":"g"}]', b'[{"id":"h"}', b"]", b"[", b'"', b'{"id":"i"},', b',{"id":"j"}', b"{},{}",
          b'{"id":"k","x0":1.5}', b'{"id":"l","x1":2}', b' {"id":"m"} ', b'{"id":"n","big":123456789012345678901}']


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(TRICKY), min_size=1, max_size=8))
def test_joined_tricks_never_shift_records(models, values):
    new, old = decoders(models, "binary", passthrough=["n", "big"])
    same(new.decode(values), old.decode(values))


def _ident(i: int) -> bytes:
    return f'"id":"r{i}","x0":{i}.5'.encode()


# groups of values: one whole record; two values joined into one element; one value of two elements. A batch
# mixing the last two kinds has as many elements as values when naively joined with commas: records shift.
groups = st.one_of(
    st.integers(0, 99).map(lambda i: [b"{" + _ident(i) + b"}"]),
    st.integers(0, 99).map(lambda i: [b"[{" + _ident(i) + b"}", b"{" + _ident(i + 1) + b"}]"]),
    st.integers(0, 99).map(lambda i: [b"{" + _ident(i) + b',"n":"}', b'{"}']),
    st.integers(0, 99).map(lambda i: [b"{" + _ident(i) + b',"n":[{}', b"{}]}"]),
    st.integers(0, 99).map(lambda i: [b"{" + _ident(i) + b"},{" + _ident(i + 1) + b"}"]),
    st.integers(0, 99).map(lambda i: [b"{" + _ident(i) + b"}, {" + _ident(i + 2) + b"}\n"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(groups, min_size=1, max_size=6).map(lambda gs: [v for g in gs for v in g]))
def test_merged_and_split_values_never_shift_records(models, values):
    new, old = decoders(models, "binary", passthrough=["n"])
    same(new.decode(values), old.decode(values))

"""The native Avro record reader (workers/decode/_avrorows.cpp) against the Python path it stands in front of
(``AvroFormat.parse`` + ``RecordDecoder.decode``): random flat schemas whose fields are features, the id or
other fields, of every type the compiled reader knows (logical types included: those schemas stay on the
Python path), records written by fastavro, mutated payloads, several schema ids in one batch. Every batch
decodes to the same ids, reasons, matrix (bit for bit, NaN for missing) and raw values of rejected rows."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import FEATURES
from tests.test_avrofast import field_types
from workers.decode import wire
from workers.decode.records import MAX_ID_LENGTH, RecordDecoder
from workers.decode.registry import Schema
from workers.scoring.model import load_model
from workers.scoring.scorer import to_json
from workers.settings import ModelSettings


@pytest.fixture(scope="module")
def model(models):
    if wire._avrorows is None:
        pytest.skip("workers.decode._avrorows is not built")
    return load_model(ModelSettings(path=models["binary"]))


def header(sid: int) -> bytes:
    return bytes([0]) + sid.to_bytes(4, "big")


def fmt_with(schemas: dict[int, dict]) -> wire.AvroFormat:
    fmt = wire.AvroFormat(None)  # type: ignore[arg-type] - no references: the registry is never asked
    for sid, schema in schemas.items():
        fmt.compiled[sid] = fmt.compile(Schema(sid, "AVRO", json.dumps(schema)))
    return fmt


def bits(matrix: np.ndarray) -> bytes:
    m = matrix.copy()
    m[np.isnan(m)] = np.nan
    return m.tobytes()


def check(model, fmt: wire.AvroFormat, values: list, keys=None, key_as_id=False, id_field="id") -> Any:
    decoder = RecordDecoder(model, id_field=id_field, key_as_id=key_as_id)
    got = fmt.rows(decoder, values, keys)
    want = decoder.decode(values, keys, fmt.parse(values))
    if got is None:
        return None
    assert got.ids == want.ids, (values, got.ids, want.ids)
    assert got.features.reasons == want.features.reasons
    assert bits(got.features.matrix) == bits(want.features.matrix), (values, got.features.matrix,
                                                                    want.features.matrix)
    for i in want.features.reasons:  # the errors' raw column
        assert to_json(got.raw[i]) == to_json(want.raw[i])
    return got


NUMERIC = [(["null", "double"], st.none() | st.floats()), ("double", st.floats()), ("float", st.floats(width=32)),
           (["float", "null"], st.none() | st.floats(width=32)), ("long", st.integers(-2**63, 2**63 - 1)),
           ("int", st.integers(-2**31, 2**31 - 1)), (["null", "long", "double"], st.none() | st.integers(-9, 9)
                                                    | st.floats()), ("boolean", st.booleans()),
           (["null", "string"], st.none() | st.text(max_size=4))]
IDS = [("string", st.text(max_size=6) | st.just("x" * (MAX_ID_LENGTH + 1))), ("long", st.integers(-2**63, 2**63 - 1)),
       (["null", "string"], st.none() | st.text(min_size=1, max_size=4)), ("int", st.integers(-5, 5)),
       ("double", st.floats()), ("boolean", st.booleans())]


@st.composite
def schema_and_records(draw: Any, sid: int) -> tuple[dict, list[dict]]:
    names = draw(st.lists(st.sampled_from([*FEATURES, "id", "other", "note"]), unique=True, max_size=8))
    fields, strategies = [], []
    for k, name in enumerate(names):
        if name == "id":
            schema, values = draw(st.sampled_from(IDS))
        elif name in FEATURES and draw(st.integers(0, 3)):
            schema, values = draw(st.sampled_from(NUMERIC))
        else:
            schema, values = draw(field_types(k))
        fields.append({"name": name, "type": schema})
        strategies.append(values)
    schema = {"type": "record", "name": f"R{sid}", "namespace": "t", "fields": fields}
    recs = draw(st.lists(st.fixed_dictionaries(dict(zip(names, strategies, strict=True))), min_size=1, max_size=4))
    return schema, recs


def written(schema: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(schema_and_records(1), schema_and_records(2), st.data(), st.booleans())
def test_records_decode_as_the_python_path_does(model, one, two, data, key_as_id):
    fmt = fmt_with({1: one[0], 2: two[0]})
    values: list[bytes | None] = []
    for sid, (schema, recs) in ((1, one), (2, two)):
        for record in recs:
            payload = written(schema, record)
            values.append(header(sid) + payload)
            change = data.draw(st.integers(0, 5))
            if payload and change == 1:
                values.append(header(sid) + payload[:data.draw(st.integers(0, len(payload) - 1))])
            elif payload and change == 2:
                at = data.draw(st.integers(0, len(payload) - 1))
                values.append(header(sid) + payload[:at] + bytes([data.draw(st.integers(0, 255))])
                              + payload[at + 1:])
            elif change == 3:
                values.append(header(sid) + payload + b"\x00")
            elif change == 4:
                values.append(header(3 - sid) + payload)  # the other schema's id
    values += data.draw(st.lists(st.sampled_from([None, b"", b"\x00", b"\x01\x00\x00\x00\x01", header(9) + b"\x02",
                                                  header(1)]), max_size=2))
    keys = [None if i % 3 == 0 else (b"\xff" if i % 3 == 1 else f"k{i}".encode()) for i in range(len(values))]
    check(model, fmt, values, keys, key_as_id=key_as_id)
    check(model, fmt, values)


def test_edges(model):
    schema = {"type": "record", "name": "E", "fields": [
        {"name": "id", "type": ["null", "string", "long"]}, {"name": "x0", "type": ["null", "double", "long"]},
        {"name": "x1", "type": "float"}, {"name": "e", "type": {"type": "enum", "name": "C", "symbols": ["a", "b"]}},
        {"name": "f", "type": {"type": "fixed", "name": "F", "size": 2}}, {"name": "s", "type": "string"}]}
    fmt = fmt_with({1: schema})
    assert fmt._programs == {}

    def rec(**kw):
        base = {"id": "a", "x0": 1.5, "x1": 2.5, "e": "a", "f": b"ab", "s": "t"}
        return header(1) + written(schema, base | kw)

    good = rec()
    values = [good, rec(id=None), rec(id=2**63 - 1), rec(id=-5), rec(id=""), rec(id="é" * MAX_ID_LENGTH),
              rec(id="é" * (MAX_ID_LENGTH + 1)), rec(x0=None), rec(x0=2**53 + 1), rec(x0=-(2**63)), rec(x1=1e-45),
              rec(x0=float("nan")), rec(x0=float("-inf")), rec(s="\U0001f600"), good[:-1], good + b"\x00",
              # a union index out of range, an enum index out of range, a boolean that is 2, an overlong varint
              header(1) + b"\x06" + good[5:], header(1) + b"\x02\x02a\x00" + good[9:],
              header(1) + b"\x02\x02a" + b"\x80" * 10 + b"\x00" + good[9:],
              # ten-byte varints: the largest (64 bits) and one with bits beyond
              header(1) + b"\x02\x02a\x04" + b"\xff" * 9 + b"\x01" + good[17:],
              header(1) + b"\x02\x02a\x04" + b"\xff" * 9 + b"\x03" + good[17:],
              header(1) + b"\x02\x02a\x04" + b"\x80" * 9 + b"\x02" + good[17:],
              # a string with a lone surrogate, invalid UTF-8 in a skipped string
              rec(s="ok")[:-2] + b"\x04\xed\xa0", rec(s="ok")[:-2] + b"\x04\xc3\x28"]
    got = check(model, fmt, values)
    assert got is not None
    assert got.features.matrix[19, 0] == -(2**63)  # the beyond-64-bit ones: as the Python path reads them
    assert got.ids[2] == str(2**63 - 1) and got.features.matrix[8, 0] == float(2**53 + 1)
    assert struct.pack("<f", 1e-45) and got.features.matrix[10, 1] == struct.unpack("<f", struct.pack("<f", 1e-45))[0]
    keys = [b"key", None, b"\xff", b"", b"k" * (MAX_ID_LENGTH + 1)]
    check(model, fmt, [rec(id=None)] * len(keys), keys, key_as_id=True)
    # the id field also a feature, a logical type, a named type: no program (the Python path reads them)
    assert check(model, fmt, [good], id_field="x0") is None
    timed = {"type": "record", "name": "T", "fields": [{"name": "id", "type": "string"}, {
        "name": "x0", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}
    assert check(model, fmt_with({1: timed}), [header(1) + written(timed, {"id": "a", "x0": 5})]) is None


def test_a_flat_batch_takes_the_native_path(model, monkeypatch):
    schema = {"type": "record", "name": "N", "fields": [{"name": "id", "type": "string"}] + [
        {"name": f, "type": ["null", "double"]} for f in FEATURES]}
    fmt = fmt_with({7: schema})
    values = [header(7) + written(schema, {"id": f"r{i}", **{f: i * 0.5 for f in FEATURES}}) for i in range(50)]
    values[4] = b"\x00junk"
    parsed: list[int] = []
    parse = fmt.parse
    monkeypatch.setattr(fmt, "parse", lambda vals: parsed.append(len(vals)) or parse(vals))
    got = check(model, fmt, values)
    assert parsed == [1, 50]  # the native path asked for record 4 alone; the reference parsed all 50
    assert got.features.matrix[49, 0] == 24.5 and list(got.features.reasons) == [4]

"""workers/decode/avrofast.py against fastavro (the trusted reader): random record schemas of what it supports,
random values written by fastavro, and malformed payloads (bit flips, truncation, extra bytes, random bytes).
Whenever the compiled reader accepts a payload, fastavro must accept it too and give the same record; when it
refuses, wire.py asks fastavro (so reasons are fastavro's, as before)."""

from __future__ import annotations

import datetime as dt
import io
import math
import re
import uuid
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.decode.avrofast import compile_reader

UTC = dt.UTC

# (schema, strategy of values for it)
PRIMITIVES: list[tuple[Any, st.SearchStrategy]] = [
    ("null", st.none()),
    ("boolean", st.booleans()),
    ("int", st.integers(-2**31, 2**31 - 1)),
    ("long", st.integers(-2**63, 2**63 - 1)),
    ("float", st.floats(width=32, allow_nan=False)),
    ("double", st.floats(allow_nan=True)),
    ("string", st.text(max_size=8)),
    ("bytes", st.binary(max_size=8)),
    ({"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 3},
     st.decimals(min_value=-10**8, max_value=10**8, places=3, allow_nan=False)),
    ({"type": "int", "logicalType": "date"}, st.dates(dt.date(1900, 1, 1), dt.date(2200, 1, 1))),
    ({"type": "long", "logicalType": "timestamp-millis"},
     st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1), timezones=st.just(UTC))
     .map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))),
    ({"type": "long", "logicalType": "timestamp-micros"},
     st.datetimes(dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1), timezones=st.just(UTC))),
    ({"type": "string", "logicalType": "uuid"}, st.uuids()),
    ({"type": "long", "logicalType": "unknown-kind"}, st.integers(-5, 5)),
]


@st.composite
def field_types(draw: Any, k: int) -> tuple[Any, st.SearchStrategy]:
    kind = draw(st.sampled_from(["primitive", "nullable", "enum", "fixed", "nullable_enum"]))
    if kind == "enum":
        symbols = draw(st.lists(st.sampled_from("ABCDEFG"), min_size=1, max_size=5, unique=True))
        return {"type": "enum", "name": f"E{k}", "symbols": symbols}, st.sampled_from(symbols)
    if kind == "nullable_enum":
        symbols = ["red", "green"]
        return ["null", {"type": "enum", "name": f"E{k}", "symbols": symbols}], st.none() | st.sampled_from(symbols)
    if kind == "fixed":
        size = draw(st.integers(0, 4))
        return {"type": "fixed", "name": f"X{k}", "size": size}, st.binary(min_size=size, max_size=size)
    schema, values = draw(st.sampled_from(PRIMITIVES))
    if kind == "nullable" and schema != "null":
        union = ["null", schema] if draw(st.booleans()) else [schema, "null"]
        return union, st.none() | values
    return schema, values


@st.composite
def schemas_and_records(draw: Any) -> tuple[dict, list[dict]]:
    n = draw(st.integers(0, 8))
    # runs of nullable doubles (the struct fast path) are likely, beside any other field
    fields, strategies = [], []
    for k in range(n):
        if draw(st.booleans()):
            schema, values = draw(st.sampled_from([(["null", "double"], st.none() | st.floats()),
                                                   ("double", st.floats()), (["float", "null"],
                                                                             st.none() | st.floats(width=32))]))
        else:
            schema, values = draw(field_types(k))
        fields.append({"name": f"f{k}", "type": schema})
        strategies.append(values)
    schema = {"type": "record", "name": "R", "namespace": "t", "fields": fields}
    records = draw(st.lists(st.fixed_dictionaries({f"f{k}": s for k, s in enumerate(strategies)}), min_size=1,
                            max_size=3))
    return schema, records


def write(parsed: dict, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def trusted(parsed: dict, payload: bytes) -> Any:
    """fastavro's record, or the exception type it raises (wire.py's read: no byte may be left over)."""
    buf = io.BytesIO(payload)
    try:
        obj = fastavro.schemaless_reader(buf, parsed, None)
    except Exception as exc:  # noqa: BLE001 - any refusal is a reason
        return type(exc)
    return obj if buf.tell() == len(payload) else ValueError


def norm(value: Any) -> Any:
    """NaN equal to NaN (a double's payload); everything else as it is."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    return value


def check(parsed: dict, read: Any, payload: bytes) -> bool:
    """The compiled reader accepts only what fastavro gives the same record for; True when it accepted."""
    try:
        got = read(payload, 0)
    except Exception:  # noqa: BLE001 - refused: wire.py reads it with fastavro
        return False
    want = trusted(parsed, payload)
    assert isinstance(want, dict), (payload, got, want)
    assert norm(got) == norm(want)
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_records(), st.data())
def test_compiled_reader_equals_fastavro(case, data):
    schema, records = case
    parsed = fastavro.parse_schema(schema)
    read = compile_reader(parsed)
    assert read is not None
    for record in records:
        payload = write(parsed, record)
        assert check(parsed, read, payload), (schema, record)
        # malformed: truncated, extended, a byte changed, random bytes
        if payload:
            cut = data.draw(st.integers(0, len(payload) - 1))
            check(parsed, read, payload[:cut])
            at = data.draw(st.integers(0, len(payload) - 1))
            flipped = payload[:at] + bytes([data.draw(st.integers(0, 255))]) + payload[at + 1:]
            check(parsed, read, flipped)
        check(parsed, read, payload + data.draw(st.binary(min_size=1, max_size=3)))
        check(parsed, read, data.draw(st.binary(max_size=40)))


def test_the_strict_reader_refuses_what_fastavro_may_read_otherwise():
    parsed = fastavro.parse_schema({"type": "record", "name": "S", "fields": [
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a", "b"]}},
        {"name": "s", "type": "string"}, {"name": "b", "type": "boolean"},
        {"name": "x", "type": ["null", "double"]}, {"name": "y", "type": ["null", "double"]}]})
    read = compile_reader(parsed)
    good = write(parsed, {"e": "b", "s": "hé", "b": True, "x": 1.5, "y": None})
    assert read(good, 0) == {"e": "b", "s": "hé", "b": True, "x": 1.5, "y": None}
    for bad in (b"\x01" + good[1:],  # enum index -1 (Python would pick the last symbol)
                good[:1] + b"\x01" + good[2:],  # string length -1
                good[:1] + b"\x04\xff\xfe" + good[5:],  # not UTF-8
                good[:5] + b"\x02" + good[6:],  # boolean byte 2
                good[:6] + b"\x04" + good[7:],  # union index 2 of 2
                good + b"\x00",  # a byte left over
                good[:-1]):
        with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal: wire.py then asks fastavro
            read(bad, 0)


def test_values_and_types_of_logical_fields_are_fastavros():
    schema = {"type": "record", "name": "L", "fields": [
        {"name": "d", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}},
        {"name": "u", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "t", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]}]}
    parsed = fastavro.parse_schema(schema)
    read = compile_reader(parsed)
    record = {"d": Decimal("12.34"), "u": uuid.UUID(int=7), "t": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)}
    payload = write(parsed, record)
    assert read(payload, 0) == trusted(parsed, payload) == record


@pytest.mark.parametrize("field", [
    {"type": "record", "name": "N", "fields": [{"name": "a", "type": "int"}]},
    {"type": "array", "items": "int"}, {"type": "map", "values": "int"}, "t.Nope"])
def test_unsupported_schemas_are_left_to_fastavro(field):
    schema = {"type": "record", "name": "U", "namespace": "t", "fields": [{"name": "x", "type": field}]}
    if field == "t.Nope":
        schema["fields"].insert(0, {"name": "r", "type": {"type": "record", "name": "Nope", "fields": []}})
    assert compile_reader(fastavro.parse_schema(schema)) is None


def test_a_union_of_several_types_and_named_enums_are_read():
    schema = {"type": "record", "name": "M", "namespace": "t", "fields": [
        {"name": "c", "type": {"type": "enum", "name": "Color", "symbols": ["r", "g"]}},
        {"name": "c2", "type": ["null", "Color"]}, {"name": "v", "type": ["null", "int", "string", "double"]}]}
    parsed = fastavro.parse_schema(schema)
    read = compile_reader(parsed)
    assert read is not None
    for record in ({"c": "g", "c2": "r", "v": "x"}, {"c": "r", "c2": None, "v": 5}, {"c": "r", "c2": "g", "v": 2.5}):
        payload = write(parsed, record)
        assert read(payload, 0) == trusted(parsed, payload) == record


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_records(), st.data())
def test_wire_parse_gives_fastavros_objects_and_reasons(case, data):
    """AvroFormat.parse with compiled readers equals the same batch read by fastavro alone (the path before):
    objects and every reason text, for good, malformed, foreign and missing values mixed in one batch."""
    from workers.decode.wire import AvroFormat

    schema, records = case
    parsed = fastavro.parse_schema(schema)
    fast, slow = AvroFormat(None), AvroFormat(None)  # type: ignore[arg-type] - no registry: schemas given
    fast.compiled = {1: (parsed, compile_reader(parsed)), 3: "schema id 3 cannot be used: because"}
    slow.compiled = {1: (parsed, None), 3: "schema id 3 cannot be used: because"}
    head = b"\x00\x00\x00\x00\x01"
    values: list[bytes | None] = []
    for record in records:
        payload = write(parsed, record)
        values.append(head + payload)
        if payload:
            values.append(head + payload[:data.draw(st.integers(0, len(payload) - 1))])
        values.append(head + payload + b"\x00")
    values += [None, b"", b"\x01" + head[1:], head[:3], b"\x00\x00\x00\x00\x03" + b"\x02",
               b"\x00\x00\x00\x00\x09", head + data.draw(st.binary(max_size=20))]
    values = data.draw(st.permutations(values))
    got, want = fast.parse(values), slow.parse(values)
    assert norm_all(got) == norm_all(want)


def norm_all(parsed: tuple[list, dict]) -> tuple[list, dict]:
    """fastavro's EOFError texts name the BytesIO object's address (different in every read): left out."""
    return ([norm(o) if isinstance(o, dict) else o for o in parsed[0]],
            {i: re.sub(r" at 0x[0-9a-f]+", "", r) for i, r in parsed[1].items()})

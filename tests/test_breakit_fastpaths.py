"""Break-it review of the stream fast paths (issue #19 part 2): the batch JSON parse, the compiled Avro reader,
the column-wise sink rows, against the trusted paths they replace (one orjson call per value, fastavro alone,
one mapping per row). Each "Found (fixed)" comment names a defect the review found; its test failed until the
fix (the varint beyond 64 bits in avrofast, text split on '","' in rowjson, floor_temporal's overflow in
regformat)."""

from __future__ import annotations

import io
import math
import re
import threading
from typing import Any

import fastavro
import lightgbm as lgb
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.decode.avrofast import compile_reader
from workers.decode.jsonparse import parse_one, parse_values
from workers.decode.wire import AvroFormat

FEATURES = [f"x{j}" for j in range(8)]


# -- Avro: the compiled reader against fastavro ---------------------------------------------------------------
def _formats(schema: dict) -> tuple[AvroFormat, AvroFormat]:
    """(compiled readers, fastavro alone: the path before), the schema known as id 1 (no registry needed)."""
    parsed = fastavro.parse_schema(schema)
    fast, slow = AvroFormat(None), AvroFormat(None)  # type: ignore[arg-type] - schemas given, nothing fetched
    fast.compiled = {1: (parsed, compile_reader(parsed))}
    slow.compiled = {1: (parsed, None)}
    assert fast.compiled[1][1] is not None
    return fast, slow


def _normalised(parsed: tuple[list, dict]) -> tuple[str, dict]:
    """NaN equal to NaN (via repr), fastavro's BytesIO addresses left out of the reasons."""
    return repr(parsed[0]), {i: re.sub(r" at 0x[0-9a-f]+", "", r) for i, r in parsed[1].items()}


HEAD = b"\x00\x00\x00\x00\x01"
LONGS = {"type": "record", "name": "L", "fields": [{"name": "id", "type": "string"},
                                                    {"name": "x0", "type": "long"},
                                                    {"name": "x1", "type": ["null", "long"]}]}


# Found (fixed): avrofast._long accepts a 10-byte varint whose last byte carries bits above 64 and returns a Python
#   int outside int64 (2**63, -5.9e20...), where fastavro (the path before) reads the 64-bit value those
#   bits wrap to; the module promises such a payload is refused and read by fastavro
@pytest.mark.parametrize("last", [0x02, 0x03, 0x7F])
def test_an_overlong_varint_reads_as_fastavro_reads_it(last):
    fast, slow = _formats(LONGS)
    varint = b"\xff" * 9 + bytes([last])  # 10 bytes: 70 value bits, of which a long holds 64
    values = [HEAD + b"\x02a" + varint + b"\x00", HEAD + b"\x02b" + b"\x02" + b"\x02" + varint]
    got, want = fast.parse(values), slow.parse(values)
    assert _normalised(got) == _normalised(want)


# Found (fixed): the overlong varint reaches the model: the compiled reader's x0 is 9.223372036854776e18 where
#   fastavro gives 0 (another score for the same message)
def test_an_overlong_varint_scores_as_before(tmp_path):
    from workers.decode.records import RecordDecoder
    from workers.scoring.model import load_model
    from workers.settings import ModelSettings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "num_threads": 1},
                        lgb.Dataset(x, (x[:, 0] > 0).astype(int), feature_name=FEATURES), num_boost_round=5)
    path = str(tmp_path / "m.txt")
    booster.save_model(path)
    model = load_model(ModelSettings(path=path))
    fast, slow = _formats(LONGS)
    value = HEAD + b"\x02a" + b"\x80" * 9 + b"\x02" + b"\x00"  # x0: bit 64 set only (fastavro: 0)
    got = RecordDecoder(model).decode([value], None, fast.parse([value])).features.matrix
    want = RecordDecoder(model).decode([value], None, slow.parse([value])).features.matrix
    assert got.tobytes() == want.tobytes(), (got[0, 0], want[0, 0])


# Found (fixed): one overlong varint in a batch changes the passthrough column of every record of the batch: int64
#   (PostgreSQL bigint, Avro/Protobuf long) becomes uint64 (numeric, string) or arrow.json (jsonb)
#   because the compiled reader's value does not fit int64; fastavro's does
def test_an_overlong_varint_keeps_the_batch_passthrough_int64():
    from workers.decode.records import RecordDecoder

    schema = {"type": "record", "name": "P", "fields": [{"name": "id", "type": "string"},
                                                         {"name": "big", "type": "long"}]}
    fast, slow = _formats(schema)
    values = [HEAD + b"\x02a\x02", HEAD + b"\x02b" + b"\x80" * 9 + b"\x02", HEAD + b"\x02c\x04"]
    want = RecordDecoder.passthrough_array([o["big"] for o in slow.parse(values)[0]])
    got = RecordDecoder.passthrough_array([o["big"] for o in fast.parse(values)[0]])
    assert want.type == "int64"
    assert got.type == want.type and got.to_pylist() == want.to_pylist()


def test_canonical_varints_of_every_length_read_as_fastavro():
    """Survived: every 64-bit long at the edges of each varint length (1..10 bytes) reads the same."""
    fast, slow = _formats(LONGS)
    edges = sorted({s * (2 ** (7 * k) + d) for k in range(10) for d in (-1, 0, 1) for s in (1, -1)}
                   | {2**63 - 1, -(2**63)})
    edges = [v for v in edges if -(2**63) <= v < 2**63]
    parsed = fastavro.parse_schema(LONGS)
    values = []
    for v in edges:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, {"id": "e", "x0": v, "x1": v})
        values.append(HEAD + buf.getvalue())
    got, want = fast.parse(values), slow.parse(values)
    assert _normalised(got) == _normalised(want)
    assert [o["x0"] for o in got[0]] == edges


_LOGICAL: list[tuple[Any, st.SearchStrategy]] = [
    ({"type": "long", "logicalType": "timestamp-millis"}, st.integers(-62135596800000, 253402300799999)),
    ({"type": "long", "logicalType": "timestamp-micros"}, st.integers(-62135596800000000, 253402300799999999)),
    ({"type": "long", "logicalType": "local-timestamp-millis"}, st.integers(-62135596800000, 253402300799999)),
    ({"type": "long", "logicalType": "local-timestamp-micros"}, st.integers(-(10**16), 10**16)),
    ({"type": "int", "logicalType": "date"}, st.integers(-719162, 2932896)),
    ({"type": "int", "logicalType": "time-millis"}, st.integers(0, 86399999)),
    ({"type": "long", "logicalType": "time-micros"}, st.integers(0, 86399999999)),
]


@st.composite
def _logical_batches(draw: Any) -> tuple[dict, list[bytes]]:
    """A record of logical-type fields (raw counts written, so pre-1970, year 1 and 9999 and every branch order of
    their unions come up), a named decimal fixed used twice (second time by name), a 3-branch union."""
    fields: list[dict] = [{"name": "d", "type": {"type": "fixed", "name": "Dec", "size": 9, "logicalType": "decimal",
                                                 "precision": 20, "scale": 3}},
                          {"name": "d2", "type": ["null", "Dec"]},
                          {"name": "u", "type": draw(st.permutations(["string", "long", "null"]))}]
    raws: list[Any] = []
    picks = draw(st.lists(st.sampled_from(range(len(_LOGICAL))), min_size=1, max_size=5))
    for k, j in enumerate(picks):
        schema, _ = _LOGICAL[j]
        t = draw(st.sampled_from([schema, ["null", schema], [schema, "null"]]))
        fields.append({"name": f"f{k}", "type": t})
    record = {"type": "record", "name": "T", "namespace": "ns", "fields": fields}
    # the same record with the logical types stripped: the writer of raw counts
    raw_fields = [dict(f, type={"type": "fixed", "name": "Dec", "size": 9}) if f["name"] == "d" else f
                  for f in fields[:3]]
    raw_fields += [dict(f, type=[b if not isinstance(b, dict) else b["type"] for b in f["type"]]
                        if isinstance(f["type"], list) else f["type"]["type"]) for f in fields[3:]]
    writer = fastavro.parse_schema({"type": "record", "name": "T", "namespace": "ns", "fields": raw_fields})
    for _ in range(draw(st.integers(1, 4))):
        rec: dict[str, Any] = {"d": draw(st.binary(min_size=9, max_size=9)),
                               "d2": draw(st.none() | st.binary(min_size=9, max_size=9)),
                               "u": draw(st.none() | st.text(max_size=3) | st.integers(-(2**63), 2**63 - 1))}
        for k, j in enumerate(picks):
            rec[f"f{k}"] = draw(st.none() | _LOGICAL[j][1]) if isinstance(fields[3 + k]["type"], list) \
                else draw(_LOGICAL[j][1])
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, rec)
        raws.append(HEAD + buf.getvalue())
    return record, raws


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(_logical_batches())
def test_logical_types_at_their_edges_read_as_fastavro(case):
    """Survived: timestamps before 1970 and at years 1 / 9999 (millis, micros, local), dates, times, a named
    decimal fixed referenced by name, unions in any order: the compiled path's objects and reasons are
    fastavro's."""
    schema, values = case
    fast, slow = _formats(schema)
    assert _normalised(fast.parse(values)) == _normalised(slow.parse(values))


# -- JSON: the batch parse against one parse per value --------------------------------------------------------
_PIECES = [b'{"id":"a","x0":1}', b"1],[2", b'{"id":"a"},{"id":"b"}', b"[{}", b"{}]", b'{"a":"', b'"}', b"[1",
           b"2]", b"{},{}", b'"\\', b'\\"', b" ", b"", b"\xef\xbb\xbf{}", b"\xff", b"null", b'{"n":123456789012345678901}',
           b'{"n":0.12345678901234567890123}', b'{"n":1.5e12345678901234567890}', b'{"s":"\\u0000"}', b"[]", b"{",
           b"}", b",", b"]", b"[", b'{"id":"x"}\n', b'\t{"x0":-0.0}', b'{"x0":1e308}', b'{"x0":1e400}', b"NaN",
           b'{"a":1,"a":2}', b'{"k":"\n"}', b'{"id":"1234567890123456789012"}', b'{"12345678901234567890123":1}']


@settings(max_examples=600, deadline=None, database=None)
@given(st.lists(st.none() | st.sampled_from(_PIECES) | st.lists(st.sampled_from(_PIECES), max_size=3)
                .map(b"".join), max_size=8))
def test_batch_parse_is_one_parse_per_value(values):
    """Survived: neighbours that open and close brackets or strings across the joined text never shift, merge
    or swallow records; every value gets the object or reason it gets alone (tombstones, BOM, bad UTF-8,
    big integers kept exact)."""
    objs, reasons = parse_values(values)
    want = [parse_one(v) for v in values]
    assert repr(objs) == repr([o for o, _ in want])
    assert reasons == {i: r for i, (_, r) in enumerate(want) if r is not None}


def test_big_integers_stay_exact_in_a_batch():
    values = [b'{"id":"a","n":18446744073709551621}', b'{"id":"b","n":-9223372036854775809,"f":0.1234567890123456789}',
              b'{"id":"c","s":"12345678901234567890123","f":1.12345678901234567890123}']
    objs, reasons = parse_values(values)
    assert not reasons
    assert objs[0]["n"] == 18446744073709551621 and type(objs[0]["n"]) is int
    assert objs[1]["n"] == -9223372036854775809 and objs[1]["f"] == float("0.1234567890123456789")
    assert objs[2]["s"] == "12345678901234567890123" and objs[2]["f"] == float("1.12345678901234567890123")
    assert math.isfinite(objs[2]["f"])



# -- a real worker on the test broker, into PostgreSQL -------------------------------------------------------
def _adversarial_values() -> list[tuple[str | None, bytes | None]]:
    """(id expected stored, or None: expected dead-lettered; value) for records real producers send."""
    rng = np.random.default_rng(5)
    good: list[tuple[str | None, bytes | None]] = []
    for i in range(120):
        x = {f: float(v) for f, v in zip(FEATURES, rng.normal(size=8), strict=True)}
        rec: dict[str, Any] = {"id": f"g{i}", **x, "big": 2**64 + i if i % 3 else -(2**63) - i, "s": f'q"\\{i}\u00e9'}
        text = orjson.dumps({k: v for k, v in rec.items() if k != "big"})[:-1] + b',"big":' + str(rec["big"]).encode()
        text += b"}" if i % 4 else b',"x0":' + orjson.dumps(x["x0"]) + b"}"  # duplicate key, same value
        if i % 5 == 0:
            text = b" \n\t" + text.replace(b",", b" ,\r\n ") + b"\n"
        good.append((f"g{i}", text))
    bad: list[tuple[str | None, bytes | None]] = [
        (None, b"1],[2"), (None, b'{"id":"a1"},{"id":"b1"}'), (None, b"[{}"), (None, b"{}]"), (None, b""),
        (None, None), (None, b"\xef\xbb\xbf" + good[0][1].replace(b"g0", b"bom")), (None, b'{"id":"nan","x0":NaN}'),
        (None, b'{"id":"inf","x0":1e400}'), (None, b'{"id":"u8","x0":1,"s":"\xff"}'), (None, b'{"id":"", "x0":1}'),
        (None, b'{"id":"str","x0":"1"}'), (None, b'{"id":"list","x0":[1]}'), (None, b"[]"), (None, b"null"),
        (None, b'{"x0":1}'), (None, b'{"id":"' + b"y" * 1025 + b'"}'),
    ]
    out = good[:40] + bad[:9] + good[40:80] + bad[9:] + good[80:]
    out.append(("mega", b'{"id":"mega","x0":0.5,"s":"' + b"m" * 500_000 + b'","big":123456789012345678901234}'))
    return out


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_worker_stores_each_adversarial_record_once_or_dead_letters_it(models, kafka, pg_dsn, pg_table):
    """Survived: a real stream worker (batch JSON parse, column-wise COPY and dead letters) on the test broker:
    every record stored once with Booster.predict's score and its passthrough exact (integers beyond 64 bits,
    quotes, backslashes), or dead-lettered with a reason; records around bracket tricks are not shifted."""
    import json

    import psycopg

    from tests.kafka_util import wait_for
    from tests.test_stream_inputs import committed_sum
    from workers.runtime.stream.worker import StreamWorker
    from workers.settings import load_settings
    from workers.sinks.postgres import PostgresSink

    cases = _adversarial_values()
    topic = kafka.topic(partitions=2)
    group = f"g-{pg_table}"
    kafka.produce(topic, [(None if v is None else f"k{i}".encode(), v) for i, (_, v) in enumerate(cases)])
    settings = load_settings({
        "model": {"path": models["binary"]},
        "scoring": {"passthrough": ["big", "s"]},
        "kafka": {"bootstrap_servers": kafka.bootstrap},
        "stream": {"topics": [topic], "group": group, "metrics_port": 0, "session_timeout_ms": 6000,
                   "heartbeat_interval_ms": 2000, "max_records": 37, "retry_backoff_max_s": 0.5},
    })
    worker = StreamWorker(settings, sink=PostgresSink(f"{pg_dsn}?table={pg_table}", "SCORING_STREAM__SINK"))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    stored = [c for c in cases if c[0] is not None]
    try:
        wait_for(lambda: committed_sum(kafka, group, topic, 2) == len(cases), 90, what="all committed")
        dead = kafka.consume_all(f"{topic}.dlq", len(cases) - len(stored))
    finally:
        worker.request_stop()
        thread.join(30)
    assert not thread.is_alive()
    assert len(dead) == len(cases) - len(stored)
    assert all(dict(m.headers()).get("error.reason") for m in dead)
    assert sorted((m.value() or b"") for m in dead) == sorted((v or b"") for rid, v in cases if rid is None)
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(f'SELECT id, score, big::text, s FROM "{pg_table}"').fetchall()
    assert len(rows) == len({r[0] for r in rows}) == len(stored)
    by_id = {r[0]: r for r in rows}
    booster = lgb.Booster(model_file=models["binary"])
    objs = {rid: json.loads(v) for rid, v in stored}  # type: ignore[arg-type]
    want = booster.predict(np.array([[objs[rid].get(f, np.nan) for f in FEATURES] for rid, _ in stored],
                                    dtype=np.float64))
    for (rid, _), score in zip(stored, want, strict=True):
        assert by_id[rid][1] == score, rid
        assert by_id[rid][2] == str(objs[rid]["big"]), rid
        assert by_id[rid][3] == objs[rid]["s"], rid


# -- sinks: the column-wise JSON rows against one orjson.dumps per row ----------------------------------------
def _per_row(table: Any) -> list[bytes]:
    """The Kafka JSON value as it was built before (one mapping per row, one orjson.dumps): texts only here."""
    names = table.column_names
    return [orjson.dumps(dict(zip(names, row, strict=True))) for row in zip(*(table.column(n).to_pylist()
                                                                            for n in names), strict=True)]


# Found (fixed): rowjson._column_json splits the JSON of a text column on '","', but a value ending in '",' escapes
#   to '\\",' which, with the next separator, reads as '","': the value loses its tail and the next
#   record's value gets it ({"s":"a\\"} then {"s":","b"}: Kafka messages that are not JSON, text moved
#   between records)
@pytest.mark.parametrize("nulls", [False, True])
def test_kafka_messages_of_a_text_ending_in_quote_comma(nulls):
    import pyarrow as pa

    from workers.scoring.scorer import Scored
    from workers.sinks.kafka import result_messages

    texts = ['He said "hi",', "next", 'x",', None if nulls else "n", "last"]
    table = pa.table({"id": ["1", "2", "3", "4", "5"], "s": pa.array(texts, pa.string())})
    got = [v for _, v in result_messages(Scored(table, pa.table({})))]
    assert got == _per_row(table)
    assert [orjson.loads(v)["s"] for v in got] == texts


# Found (fixed): the same split on the id column (no nulls): an id ending in '",' corrupts its own message and the
#   next record's id in the Kafka JSON value
def test_kafka_messages_of_an_id_ending_in_quote_comma():
    import pyarrow as pa

    from workers.scoring.scorer import Scored
    from workers.sinks.kafka import result_messages

    table = pa.table({"id": ['order "7",', "order 8"], "score": [0.25, 0.5]})
    got = [v for _, v in result_messages(Scored(table, pa.table({})))]
    assert got == _per_row(table)


_TEXTS = st.text(alphabet=st.sampled_from(['"', ",", "\\", "a", "é", "\n", "%"]), max_size=5)


# Found (fixed): json_rows (Redis values, jsonschema payloads, Kafka JSON) moves text between records for values
#   ending in '",' (see above), in plain and nested (struct) text columns
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.none() | _TEXTS, min_size=1, max_size=6))
def test_json_rows_of_any_text_are_one_dumps_per_row(texts):
    import pyarrow as pa

    from workers.sinks.rowjson import json_rows

    n = len(texts)
    table = pa.table({"id": [str(i) for i in range(n)], "s": pa.array(texts, pa.string()),
                      "t": pa.array([t or "" for t in texts], pa.string()),
                      "st": pa.array([{"k": t} for t in texts], pa.struct([("k", pa.string())]))})
    assert json_rows(table) == _per_row(table)


# Found (fixed): regformat._utc_micros floors nanoseconds with pc.floor_temporal, which overflows for the first
#   instants of the ns range (-2**63+1 .. -2**63+807, 1677-09-21T00:12:43.145224Z): it wraps to
#   +9223372036854775616 and the checked cast raises ArrowInvalid for the whole batch's Avro/Protobuf
#   payloads; datetime.strftime (before) gave the instant's text
@pytest.mark.parametrize("tz", [None, "UTC"])
def test_registry_text_of_the_first_nanosecond_instants(tz):
    import pyarrow as pa

    from workers.sinks.regformat import _values

    col = pa.chunked_array([pa.array([-(2**63) + 1, 0], pa.timestamp("ns", tz=tz))])
    zone = "Z" if tz else ""
    assert _values(col, "time") == [f"1677-09-21T00:12:43.145224{zone}", f"1970-01-01T00:00:00.000000{zone}"]


@pytest.mark.postgres
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_copy_text_of_every_utc_zone_spelling_reads_back_as_the_instant(pg_dsn, unit):
    """Survived: the column-wise COPY text of UTC, zone-less and "+00:00" columns (the last spelled ``+0000``),
    before 1970 with fractions, at years 1 and 9999, across the Paris DST change, read by the real server in a
    session zone that is not UTC, is the instant itself (to PostgreSQL's microsecond, rounded as it rounds)."""
    from decimal import Decimal

    import psycopg
    import pyarrow as pa

    from workers.sinks.pgtables import PgTables
    from workers.sinks.tables import RESULT_KEY

    per = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[unit]
    counts = [0, -1, 1, -per - 1, 1774746000 * per - 1, 1774746000 * per, 1792890000 * per + per // 3, None]
    if unit != "ns":
        counts += [-62135596800 * per, 253402300799 * per + per - 1]
    n = len(counts)
    table = pa.table({"id": [str(i) for i in range(n)], "model_version": ["m"] * n,
                      **{f"t{k}": pa.array(counts, pa.timestamp(unit, tz=tz))
                         for k, tz in enumerate([None, "UTC", "+00:00"])}})
    types = {"id": "text", "model_version": "text", **{f"t{k}": "timestamp with time zone" for k in range(3)}}
    payload, bad = PgTables(None, "t").render(table, types, RESULT_KEY)
    assert not bad
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET TimeZone = 'Europe/Paris'")
        conn.execute("CREATE TEMP TABLE breakit_ts (id text, model_version text, t0 timestamptz, t1 timestamptz, "
                     "t2 timestamptz)")
        with conn.cursor() as cur, cur.copy("COPY breakit_ts FROM STDIN (FORMAT csv)") as copy:
            copy.write(payload)
        got = conn.execute("SELECT id, extract(epoch FROM t0), extract(epoch FROM t1), extract(epoch FROM t2) "
                           "FROM breakit_ts ORDER BY id::int").fetchall()  # epochs: no client-side zone
    for (rid, *stamps), c in zip(got, counts, strict=True):
        want = None
        if c is not None:
            micros = c * 10**6 // per if unit != "ns" else round(Decimal(c) / 1000)  # PostgreSQL rounds ns
            want = Decimal(micros) / 10**6
        assert stamps == [want] * 3, (rid, c, stamps)

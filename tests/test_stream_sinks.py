"""Stream mode into each sink's real counterpart: Kafka topic, Parquet dataset, SQLite (the default)."""

from __future__ import annotations

import os
import signal
import sqlite3

import lightgbm as lgb
import numpy as np
import orjson
import pyarrow.dataset as ds
import pytest

from tests.kafka_util import wait_for
from tests.test_stream import FEATURES, records
from workers.scoring.scorer import Scored

pytestmark = pytest.mark.kafka


def sqlite_count(db) -> int:
    try:
        return sqlite3.connect(db).execute("select count(*) from scores").fetchone()[0]
    except sqlite3.Error:
        return 0


def expected(models, recs):
    booster = lgb.Booster(model_file=models["binary"])
    return dict(zip([r["id"] for r in recs], booster.predict(np.array([[r[f] for f in FEATURES] for r in recs])),
                    strict=True))


def test_kafka_sink_results_keyed_by_id(models, kafka):
    src, out = kafka.topic(partitions=3), kafka.topic(partitions=2, prefix="out")
    recs = records(2000)
    kafka.produce_json(src, recs)
    worker = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                          f"kafka://{out}", "--metrics-port", "0")
    msgs = kafka.consume_all(out, 2000, timeout=60)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert len(msgs) == 2000
    exp = expected(models, recs)
    for m in msgs:
        row = orjson.loads(m.value())
        assert m.key().decode() == row["id"]
        assert abs(row["score"] - exp[row["id"]]) <= 1e-9
        assert row["topic"] == src and row["model_version"].startswith("binary-") and row["scored_at"]
    assert sorted(orjson.loads(m.value())["id"] for m in msgs) == sorted(exp)


def test_parquet_sink_redelivery_overwrites_instead_of_duplicating(models, kafka, tmp_path):
    src = kafka.topic(partitions=2)
    recs = records(40_000)
    kafka.produce_json(src, recs)
    out = str(tmp_path / "ds")
    args = ("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink", out,
            "--max-records", "500", "--metrics-port", "0")
    first = kafka.worker(*args)

    def files() -> int:
        return sum(len([f for f in fs if f.endswith(".parquet")]) for _, _, fs in os.walk(out))

    wait_for(lambda: files() >= 5, 60, interval=0.01, what="first files")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = kafka.worker(*args)

    def stored() -> int:
        try:
            return ds.dataset(out, format="parquet").count_rows()
        except (OSError, ValueError):
            return 0

    wait_for(lambda: stored() >= 40_000, 120, what="all rows in the dataset")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    table = ds.dataset(out, format="parquet").to_table(columns=["id", "score", "partition", "offset"])
    ids = table["id"].to_pylist()
    assert len(ids) == 40_000 and len(set(ids)) == 40_000
    exp = expected(models, recs)
    assert max(abs(s - exp[i]) for i, s in zip(ids, table["score"].to_pylist(), strict=True)) <= 1e-9
    assert all(name.startswith("partition=") for name in os.listdir(os.path.join(out, src)))


def test_default_sink_is_sqlite_without_any_server(models, kafka, tmp_path):
    src = kafka.topic(partitions=1)
    recs = records(500)
    kafka.produce_json(src, recs)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        worker = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}",
                              "--metrics-port", "0")
    finally:
        os.chdir(cwd)
    db = tmp_path / "scores.db"
    wait_for(lambda: sqlite_count(db) >= 500, 60, what="rows in sqlite")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    con = sqlite3.connect(db)
    assert con.execute("select count(*), count(distinct id) from scores").fetchone() == (500, 500)
    exp = expected(models, recs)
    assert max(abs(s - exp[i]) for i, s in con.execute("select id, score from scores")) <= 1e-9


def test_secrets_never_appear_in_help_or_logs(models, tmp_path):
    import subprocess
    import sys

    from tests.conftest import free_port

    env = {**os.environ, "SCORING_KAFKA__SASL_PASSWORD": "hunter2-very-secret"}
    helptext = subprocess.run([sys.executable, "-m", "workers", "stream", "--help"], capture_output=True, text=True,
                              env=env).stdout
    assert "hunter2" not in helptext and "--sasl-password" not in helptext
    proc = subprocess.run(
        [sys.executable, "-m", "workers", "stream", "--model", models["binary"], "--topic", "t",
         "--bootstrap-servers", f"127.0.0.1:{free_port()}", "--security-protocol", "SASL_PLAINTEXT",
         "--sasl-mechanism", "PLAIN", "--sasl-username", "u", "--metrics-port", "0",
         "--sink", f"postgresql://u:pg-secret-pw@127.0.0.1:{free_port()}/db?table=t", "--log-level", "DEBUG"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach Kafka")
    assert "hunter2" not in proc.stdout + proc.stderr and "pg-secret-pw" not in proc.stdout + proc.stderr


def test_batches_compressed_with_every_codec_are_consumed(models, kafka, tmp_path):
    from confluent_kafka import Producer

    src = kafka.topic(partitions=2)
    recs = records(400)
    for k, codec in enumerate(("gzip", "snappy", "lz4", "zstd")):
        p = Producer({"bootstrap.servers": kafka.bootstrap, "compression.type": codec, "linger.ms": 20})
        for r in recs[k * 100:(k + 1) * 100]:
            p.produce(src, key=r["id"].encode(), value=orjson.dumps(r))
        assert p.flush(30) == 0
    db = tmp_path / "c.db"
    worker = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                          f"sqlite:///{db}?table=scores", "--metrics-port", "0", log=str(tmp_path / "w.log"))

    wait_for(lambda: sqlite_count(db) >= 400, 60, what="all codecs consumed")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert sqlite_count(db) == 400


def test_group_timing_mistakes_get_one_line_naming_the_setting(models):
    import subprocess
    import sys

    base = [sys.executable, "-m", "workers", "stream", "--model", models["binary"], "--topic", "t"]
    cases = [(["--max-poll-interval-ms", "2000", "--session-timeout-ms", "6000"],
              "SCORING_STREAM__MAX_POLL_INTERVAL_MS", "must be at least SCORING_STREAM__SESSION_TIMEOUT_MS"),
             (["--heartbeat-interval-ms", "6000", "--session-timeout-ms", "6000"],
              "SCORING_STREAM__HEARTBEAT_INTERVAL_MS", "must be below SCORING_STREAM__SESSION_TIMEOUT_MS")]
    for extra, name, says in cases:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and name in lines[0] and says in lines[0], proc.stderr


@pytest.mark.postgres
def test_passthrough_whose_json_type_changes_is_stored_and_what_cannot_be_is_dead_lettered(models, kafka, pg_dsn,
                                                                                          pg_table, tmp_path):
    """Case 13 (sink side): a passthrough that is an int, then 15.5, then text, a list with a null, an integer
    of 2**63 and more, one micro-batch each (the type changes between batches; before, the first change was
    retried forever and blocked the partition): every record is stored (the column widens, values kept) or,
    when the table cannot hold it (a NUL in text), dead-lettered with its reason, and the partition moves on;
    a batch of 200 afterwards is stored too."""
    import psycopg

    src = kafka.topic(partitions=1)
    values = [1, 15.5, "text", [1, None], 2**63 + 5, {"a": [1, None]}, -3, "a\u0000b", True, None, 2**64 - 1]
    recs = [{**r, "extra": v} for r, v in zip(records(len(values)), values, strict=True)]
    worker = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                          f"{pg_dsn}?table={pg_table}", "--passthrough", "extra", "--metrics-port", "0",
                          log=str(tmp_path / "w.log"))

    def stored() -> int:
        try:
            with psycopg.connect(pg_dsn) as conn:
                return conn.execute(f'SELECT count(*) FROM "{pg_table}"').fetchone()[0]
        except psycopg.Error:
            return 0

    for r in recs:  # one record at a time, each its own micro-batch (the NUL one: the next one proves the
        before = stored()  # partition moved on)
        kafka.produce_json(src, [r])
        if "\x00" not in str(r["extra"]):
            wait_for(lambda before=before: stored() > before, 60, what=f"record {r['id']} stored")
    more = [{**r, "extra": k} for k, r in enumerate(records(200, start=100))]
    kafka.produce_json(src, more)
    total = len(recs) - 1 + len(more)
    wait_for(lambda: stored() >= total, 60, what="the last batch")
    dead = kafka.consume_all(f"{src}.dlq", 1, timeout=30)  # subscribed once the topic exists
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    # Each record exactly once: stored, or dead-lettered with a reason naming the column. How a stored value
    # reads back depends on the stream decoder (typed, or JSON text when it keeps the record's own text).
    with psycopg.connect(pg_dsn) as conn:
        got = dict(conn.execute(f'SELECT id, extra FROM "{pg_table}"').fetchall())
    letters = {m.key(): dict(m.headers())["error.reason"].decode() for m in dead}
    for r in recs + more:
        key = r["id"].encode()
        if key in letters:
            assert r["id"] not in got and "'extra'" in letters[key], (r, letters[key])
        else:
            assert got[r["id"]] in (r["extra"], orjson.dumps(r["extra"]).decode()), (r, got[r["id"]])
    assert len(got) + len(letters) == len(recs) + len(more)
    assert all(got[r["id"]] in (r["extra"], str(r["extra"])) for r in more)


def test_a_micro_batch_of_mixed_json_passthrough_is_stored_as_json_values(models, kafka, pg_dsn, pg_table, tmp_path):
    """Review 1 defects 6, 7 in stream mode: one micro-batch whose passthrough mixes JSON types (and integers
    beyond 64 bits) is JSON text; PostgreSQL stores the values as jsonb (not JSON strings of the text)."""
    import psycopg

    src = kafka.topic(partitions=1)
    values = [1, "x", {"k": [1, 2]}, 18446744073709551621, -9223372036854775809, True, None]
    recs = [{**r, "extra": v} for r, v in zip(records(len(values)), values, strict=True)]
    import json

    # produced before the worker starts: one micro-batch (json: orjson cannot write integers beyond 64 bits)
    kafka.produce(src, [(r["id"].encode(), json.dumps(r).encode()) for r in recs])
    worker = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                          f"{pg_dsn}?table={pg_table}", "--passthrough", "extra", "--metrics-port", "0",
                          log=str(tmp_path / "w.log"))

    def stored() -> dict:
        try:
            with psycopg.connect(pg_dsn) as conn:
                return dict(conn.execute(f'SELECT id, extra FROM "{pg_table}"').fetchall())
        except psycopg.Error:
            return {}

    wait_for(lambda: len(stored()) == len(recs), 60, what="the micro-batch stored")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    got = stored()
    assert [got[r["id"]] for r in recs] == values


# -- table sinks, stream writes: stale (zombie) writes and duplicates in one micro-batch ------------------
def _stream_rows(*rows: tuple) -> Scored:
    """A stream micro-batch's results: rows of (id, score, partition, offset[, timestamp ms])."""
    import datetime as dt

    import pyarrow as pa

    def stamp(r):
        return dt.datetime.fromtimestamp(r[4] / 1000, dt.UTC) if len(r) > 4 and r[4] is not None else None

    results = pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "model_version": pa.array(["v1"] * len(rows), pa.string()),
        "score": pa.array([float(r[1]) for r in rows], pa.float64()),
        "topic": pa.array(["in"] * len(rows), pa.string()),
        "partition": pa.array([r[2] for r in rows], pa.int32()),
        "offset": pa.array([r[3] for r in rows], pa.int64()),
        "timestamp": pa.array([stamp(r) for r in rows], pa.timestamp("ms", tz="UTC")),
    })
    return Scored(results, pa.table({"id": pa.array([], pa.string())}))


@pytest.fixture(params=["postgres", "sqlite"])
def table_sink(request, tmp_path):
    """(a fresh table sink on a real server / file, a function reading {id: (score, partition, offset)})."""
    if request.param == "postgres":
        import psycopg

        from workers.sinks.postgres import PostgresSink

        dsn, table = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_table")
        sink = PostgresSink(f"{dsn}?table={table}", "SCORING_STREAM__SINK")

        def read() -> dict:
            with psycopg.connect(dsn) as conn:
                rows = conn.execute(f'SELECT id, score, "partition", "offset" FROM "{table}"').fetchall()
            return {r[0]: tuple(r[1:]) for r in rows}
    else:
        from workers.sinks.sqlite import SqliteSink

        db = tmp_path / "s.db"
        sink = SqliteSink(f"sqlite:///{db}?table=scores", "SCORING_STREAM__SINK")

        def read() -> dict:
            con = sqlite3.connect(db)
            try:
                rows = con.execute('SELECT id, score, "partition", "offset" FROM scores').fetchall()
            finally:
                con.close()
            return {r[0]: tuple(r[1:]) for r in rows}
    yield sink, read
    sink.close()


@pytest.mark.postgres
def test_a_stale_stream_write_never_overwrites_a_newer_result_of_its_partition(table_sink):
    """Defect A (zombie worker after a rebalance): A's write of X@1 hangs, B stores X@1, X@2 and commits, then
    A's write lands. An older offset of the same topic-partition no longer overwrites the stored row; a newer
    one and a redelivery of the same offset do; across partitions there is no order, so the later write wins."""
    sink, read = table_sink
    sink.write_batch(_stream_rows(("X", 2.0, 0, 2)))
    sink.write_batch(_stream_rows(("X", 1.0, 0, 1)))  # the zombie's stale write
    assert read()["X"] == (2.0, 0, 2)
    sink.write_batch(_stream_rows(("Y", 1.0, 0, 1)))
    sink.write_batch(_stream_rows(("Y", 2.0, 0, 2)))  # newer: replaces
    assert read()["Y"] == (2.0, 0, 2)
    sink.write_batch(_stream_rows(("Y", 2.5, 0, 2)))  # redelivery of the same offset (rescored): replaces
    assert read()["Y"] == (2.5, 0, 2)
    sink.write_batch(_stream_rows(("X", 3.0, 1, 0)))  # another partition, lower offset: the later write wins
    assert read()["X"] == (3.0, 1, 0)
    sink.write_batch(_stream_rows(("X", 4.0, 0, 1)))  # back to partition 0: again the later write
    assert read()["X"] == (4.0, 0, 1)
    # a stale row among fresh ones: only it is skipped
    sink.write_batch(_stream_rows(("X", 5.0, 0, 0), ("Z", 1.0, 0, 7)))
    assert read()["X"] == (4.0, 0, 1) and read()["Z"] == (1.0, 0, 7)
    # no position (a serve event id that is not a Kafka position): nothing to compare, the write wins both ways
    sink.write_batch(_stream_rows(("Z", 2.0, None, None)))
    assert read()["Z"] == (2.0, None, None)
    sink.write_batch(_stream_rows(("Z", 3.0, 0, 1)))
    assert read()["Z"] == (3.0, 0, 1)


@pytest.mark.postgres
def test_duplicates_in_one_micro_batch_keep_the_newest_record_not_the_highest_offset_across_partitions(
        table_sink):
    """Defect B: within one partition the highest offset wins; across partitions offsets are unrelated, so the
    record with the later timestamp wins (dupX at p0@10, then dupX at p1@0 produced later: p1's is kept,
    whatever the batch order)."""
    sink, read = table_sink
    sink.write_batch(_stream_rows(("D", 1.0, 1, 0, 2_000), ("D", 2.0, 0, 10, 1_000)))
    assert read()["D"] == (1.0, 1, 0)
    sink.write_batch(_stream_rows(("E", 2.0, 0, 11, 900), ("E", 1.0, 0, 10, 1_000)))  # one partition: offset
    assert read()["E"] == (2.0, 0, 11)
    # several rows of one id from two partitions: p0's newest offset against p1's, by timestamp
    sink.write_batch(_stream_rows(("F", 1.0, 0, 5, 3_000), ("F", 2.0, 1, 9, 2_000), ("F", 3.0, 0, 6, 1_000),
                                   ("F", 4.0, 1, 8, 4_000)))
    assert read()["F"] == (2.0, 1, 9)  # p0 -> @6 (ts 1000), p1 -> @9 (ts 2000): p1@9 is the newer record
    # no timestamps: the later row in batch order
    sink.write_batch(_stream_rows(("G", 1.0, 1, 0, None), ("G", 2.0, 0, 10, None)))
    assert read()["G"] == (2.0, 0, 10)
    assert sink.duplicates_collapsed == 6  # D 1, E 1, F 3, G 1


def test_the_kafka_sink_sends_a_batch_through_a_full_local_queue_with_nothing_lost_or_reordered(kafka):
    """The Kafka sink sends a batch with one produce_batch call (#19); when librdkafka's local queue is full the
    rest, from the first refused message on, goes one message at a time as room frees (not the whole rest again
    per pass: quadratic, a core spun while a paused broker drained nothing; review). Against a real broker with a
    queue of 7 messages, 500 results (each key three times) all arrive, and for every key the last message is
    the last one sent."""
    from workers.settings import KafkaSettings
    from workers.sinks.kafka import Producer

    out = kafka.topic(partitions=1, prefix="out")
    producer = Producer(KafkaSettings(bootstrap_servers=kafka.bootstrap), **{"queue.buffering.max.messages": 7})
    messages = [(f"k{i % 167}".encode(), f"v{i}".encode()) for i in range(500)]

    class Counting:  # the librdkafka producer, its produce calls counted
        def __init__(self, inner):
            self.inner, self.batches, self.singles = inner, 0, 0

        def produce_batch(self, *a, **kw):
            self.batches += 1
            return self.inner.produce_batch(*a, **kw)

        def produce(self, *a, **kw):
            self.singles += 1
            return self.inner.produce(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    producer.producer = counting = Counting(producer.producer)
    producer.send_all(out, messages)
    assert counting.batches == 1 and counting.singles > 0, "the queue never filled: the rest was not exercised"
    producer.flush(30)
    got = kafka.consume_all(out, 500, timeout=60)
    values = [m.value() for m in got]
    assert set(values) == {v for _, v in messages}  # every message at least once
    last_sent = {k: v for k, v in messages}
    last_got = {m.key(): m.value() for m in got}
    assert last_got == last_sent
    # a resend repeats a run of messages: the order of first arrivals is the order sent
    first = list(dict.fromkeys(values))
    assert first == [v for _, v in messages]

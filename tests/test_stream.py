"""Stream mode against a real Kafka-protocol broker and a real PostgreSQL, workers as real processes."""

from __future__ import annotations

import signal
import time
import urllib.request

import lightgbm as lgb
import numpy as np
import orjson
import psycopg
import pytest

from tests.conftest import free_port
from tests.kafka_util import wait_for
from tests.proxy import proxied_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

FEATURES = [f"x{j}" for j in range(8)]


def records(n: int, start: int = 0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed + start)
    values = rng.normal(size=(n, 8))
    return [{"id": f"s{start + i}", **dict(zip(FEATURES, map(float, values[i]), strict=True))} for i in range(n)]


BAD = [
    (b"k-bad-1", b"\xff\x00 not json"),
    (b"k-bad-2", b"[1,2,3]"),
    (b"k-bad-3", orjson.dumps({"x0": 1.0})),
    (b"k-bad-4", orjson.dumps({"id": "bad-4", "x0": "abc"})),
    (b"k-bad-5", b'{"id": "bad-5", "x0": NaN}'),
    (b"k-bad-6", orjson.dumps({"id": "bad-6", "x1": True})),
    (None, None),
]


def count(dsn: str, table: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        try:
            return conn.execute(f'SELECT count(*), count(DISTINCT id) FROM "{table}"').fetchone()
        except psycopg.errors.UndefinedTable:
            return (0, 0)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def probe(port: int, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_thousands_of_records_stored_once_bad_ones_dead_lettered(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=6)
    good = records(3000)
    kafka.produce_json(topic, good)
    kafka.produce(topic, BAD)
    port = free_port()
    sink = f"{pg_dsn}?table={pg_table}"
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink", sink,
                          "--metrics-port", str(port), log=str(tmp_path / "w.log"))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 3000, 60, what="3000 stored")
    dead = kafka.consume_all(f"{topic}.dlq", len(BAD))
    wait_for(lambda: metric(port, "scoring_records_written_total") >= 3000, 10, what="metrics")
    assert metric(port, "scoring_records_consumed_total") == 3000 + len(BAD)
    assert metric(port, "scoring_records_written_total") == 3000
    assert metric(port, "scoring_records_dead_lettered_total") == len(BAD)
    assert probe(port, "/healthz") == 200 and probe(port, "/readyz") == 200
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert count(pg_dsn, pg_table) == (3000, 3000)
    booster = lgb.Booster(model_file=models["binary"])
    expected = dict(zip([r["id"] for r in good],
                        booster.predict(np.array([[r[f] for f in FEATURES] for r in good])), strict=True))
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(f'SELECT id, score, topic, "partition", "offset", "timestamp" FROM "{pg_table}"').fetchall()
    assert max(abs(score - expected[rid]) for rid, score, *_ in rows) <= 1e-9
    assert {r[2] for r in rows} == {topic} and len({(r[3], r[4]) for r in rows}) == 3000
    assert all(r[5] is not None for r in rows)
    # Dead letters: original key and value unchanged, headers naming the reason and the source.
    assert len(dead) == len(BAD)
    by_key = {m.key(): m for m in dead}
    for key, value in BAD:
        msg = by_key[key]
        headers = {k: v.decode() for k, v in msg.headers()}
        if value is None:  # a record with neither key nor value: sent empty, flagged
            assert msg.value() in (b"", None) and headers["error.value.null"] == "true"
        else:
            assert msg.value() == value
        assert headers["error.source.topic"] == topic
        assert int(headers["error.source.offset"]) >= 0 and headers["error.reason"]
    reasons = {m.key(): dict(m.headers())["error.reason"].decode() for m in dead}
    assert reasons[b"k-bad-4"] == "feature 'x0': expected a number, got str \"abc\""
    assert reasons[b"k-bad-3"] == "missing id field 'id'"
    assert reasons[None] == "empty value (tombstone)"


def test_sigkill_mid_stream_then_restart_keeps_each_record_once(models, kafka, pg_dsn, pg_table):
    topic = kafka.topic(partitions=4)
    total = 30_000
    kafka.produce_json(topic, records(total))
    args = ("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink",
            f"{pg_dsn}?table={pg_table}", "--max-records", "500", "--metrics-port", "0")
    first = kafka.worker(*args)
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 3000, 60, interval=0.02, what="first rows stored")
    first.send_signal(signal.SIGKILL)
    first.wait()
    at_kill = count(pg_dsn, pg_table)[0]
    assert at_kill < total, "the kill must land mid-stream"
    second = kafka.worker(*args)
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= total, 90, what="all stored after restart")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert count(pg_dsn, pg_table) == (total, total)


def test_two_workers_share_partitions_and_one_takes_over(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=6)
    args = ("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink",
            f"{pg_dsn}?table={pg_table}", "--max-records", "200")
    ports = [free_port(), free_port()]
    a = kafka.worker(*args, "--metrics-port", str(ports[0]), log=str(tmp_path / "a.log"))
    b = kafka.worker(*args, "--metrics-port", str(ports[1]), log=str(tmp_path / "b.log"))
    kafka.produce_json(topic, records(6000))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 6000, 90, what="first 6000 stored")
    # Both members got partitions: each one's lag gauges name the partitions it owns.
    def owned(port: int) -> set[str]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return {line.split('partition="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("scoring_consumer_lag{")}
    wait_for(lambda: owned(ports[0]) and owned(ports[1]), 30, what="both workers own partitions")
    assert owned(ports[0]).isdisjoint(owned(ports[1]))
    assert metric(ports[0], "scoring_records_written_total") > 0 and metric(ports[1], "scoring_records_written_total") > 0
    a.send_signal(signal.SIGKILL)
    a.wait()
    kafka.produce_json(topic, records(6000, start=6000))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 12000, 120, what="survivor stores everything")
    wait_for(lambda: len(owned(ports[1])) == 6, 30, what="survivor owns all partitions")
    b.send_signal(signal.SIGTERM)
    assert b.wait(30) == 0
    assert count(pg_dsn, pg_table) == (12000, 12000)


def test_sigterm_mid_batch_exits_0_and_commits_exactly_what_is_stored(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=3)
    group = f"g-{pg_table}"
    kafka.produce_json(topic, records(60_000))
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", group, "--sink",
                          f"{pg_dsn}?table={pg_table}", "--max-records", "2000", "--metrics-port", "0",
                          log=str(tmp_path / "w.log"))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 4000, 60, interval=0.02, what="some stored")
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(30)
    took = time.monotonic() - sent
    assert code == 0 and took < 20, (code, took)
    stored = count(pg_dsn, pg_table)[0]
    assert stored < 60_000, "the signal must land mid-stream"
    committed = kafka.committed(group, topic, 3)
    with psycopg.connect(pg_dsn) as conn:
        per_partition = dict(conn.execute(
            f'SELECT "partition", max("offset") + 1 FROM "{pg_table}" GROUP BY 1').fetchall())
        n_by_partition = dict(conn.execute(f'SELECT "partition", count(*) FROM "{pg_table}" GROUP BY 1').fetchall())
    for p in range(3):
        # Everything below the committed offset is stored, and nothing stored lies beyond it.
        assert committed[p] == per_partition.get(p, 0) == n_by_partition.get(p, 0), (p, committed, per_partition)


def test_postgres_outage_no_commit_then_everything_stored(models, kafka, pg_dsn, pg_table, tmp_path):
    w = proxied_worker(kafka, models["binary"], pg_dsn, pg_table, str(tmp_path / "w.log"), 2)
    proxy, topic, group, port, worker = w.proxy, w.topic, w.group, w.port, w.worker
    try:
        kafka.produce_json(topic, records(1000))
        wait_for(lambda: count(pg_dsn, pg_table)[0] >= 1000, 60, what="first 1000 stored")
        wait_for(lambda: sum(kafka.committed(group, topic, 2).values()) == 1000, 20, what="first commit")
        proxy.cut()
        kafka.produce_json(topic, records(2000, start=1000))
        wait_for(lambda: probe(port, "/readyz") == 503, 30, what="readiness false during the outage")
        for _ in range(5):  # several seconds of outage: nothing committed beyond what was stored
            time.sleep(1)
            assert sum(kafka.committed(group, topic, 2).values()) == 1000
            assert probe(port, "/healthz") == 200
        assert metric(port, "scoring_sink_errors_total") >= 1
        assert count(pg_dsn, pg_table)[0] == 1000
        proxy.restore()
        wait_for(lambda: count(pg_dsn, pg_table)[0] >= 3000, 60, what="everything stored after recovery")
        wait_for(lambda: probe(port, "/readyz") == 200, 30, what="ready again")
        wait_for(lambda: sum(kafka.committed(group, topic, 2).values()) == 3000, 20, what="commits resumed")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
        assert count(pg_dsn, pg_table) == (3000, 3000)
    finally:
        proxy.close()


def test_on_bad_record_fail_stops_without_committing(models, kafka, pg_dsn, pg_table):
    topic = kafka.topic(partitions=1)
    group = f"g-{pg_table}"
    kafka.produce_json(topic, records(10))
    kafka.produce(topic, [(b"k", b"garbage")])
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", group, "--sink",
                          f"{pg_dsn}?table={pg_table}", "--on-bad-record", "fail", "--metrics-port", "0")
    assert worker.wait(60) == 1
    assert kafka.committed(group, topic, 1)[0] == 0  # nothing committed
    assert count(pg_dsn, pg_table)[0] == 0


def test_check_command_reports_each_part(models, kafka, pg_dsn, pg_table):
    import subprocess
    import sys

    topic = kafka.topic(partitions=1)
    base = [sys.executable, "-m", "workers", "check", "--model", models["binary"], "--bootstrap-servers",
            kafka.bootstrap]
    ok = subprocess.run([*base, "--topic", topic, "--sink", f"{pg_dsn}?table={pg_table}"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [line.split()[:2] for line in ok.stdout.splitlines()] == [
        ["ok", "settings:"], ["ok", "model:"], ["ok", "broker:"], ["ok", "topics:"], ["ok", "sink:"]]
    bad = subprocess.run([*base, "--topic", "no-such-topic", "--sink",
                          f"postgresql://postgres@127.0.0.1:{free_port()}/x?table=t"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "FAIL topics: missing ['no-such-topic']" in bad.stdout and "FAIL sink:" in bad.stdout
    assert "Traceback" not in bad.stderr

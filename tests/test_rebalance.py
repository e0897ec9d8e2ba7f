"""Rebalancing (cooperative-sticky vs eager, static membership) and lag in seconds.

In-process tests use workers/testing.py's scripted source (lag seconds while the sink hangs); the rest run
against the real broker (Tansu here) with our ``KafkaSource`` or with worker processes and a real PostgreSQL.
The eager/cooperative pause under load is measured by benchmarks/rebalance.py (numbers in its output).
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
import uuid

import orjson
import psycopg
import pytest

from tests.conftest import free_port
from tests.kafka_util import wait_for
from tests.test_stream import count, records
from tests.test_stream_ordering import settings_for, worker_on
from workers.settings import load_settings
from workers.testing import Script, SinkHangs, rec


def gauges(port: int, name: str) -> dict[str, float]:
    """``name``'s value per partition label, from a worker's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.split('partition="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(name + "{")}


def sample(worker, partition: int) -> float | None:
    return worker.metrics.registry.get_sample_value("scoring_consumer_lag_seconds",
                                                    {"topic": "t", "partition": str(partition)})


def test_lag_seconds_is_the_age_of_the_oldest_uncommitted_record_and_0_when_caught_up(models):
    now_ms = int(time.time() * 1000)
    script = Script([rec("t", 0, {"id": "a", "x0": 1.0}, timestamp=now_ms - 100_000),
                     SinkHangs(seconds=1.5),
                     rec("t", 0, {"id": "b", "x0": 2.0}, timestamp=now_ms - 90_000),
                     rec("t", 1, {"id": "c", "x0": 3.0}, timestamp=-1)],  # no broker timestamp
                    partitions={"t": 2})
    worker = worker_on(script, settings_for(models, max_records=1))
    seen: dict[int, float] = {0: 0.0, 1: 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for p in (0, 1):
                value = sample(worker, p)
                if value is not None:
                    seen[p] = max(seen[p], value)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        worker.run()
    finally:
        done.set()
        watcher.join()
    assert sorted(script.stored_ids()) == ["a", "b", "c"]
    # While "b" hung in the store, partition 0's oldest uncommitted record was b (written 90 s ago).
    assert 90 <= seen[0] < 100, seen
    # "c" had no timestamp: it counts from when the worker got it (under the hang, not since the epoch).
    assert seen[1] < 5, seen
    assert sample(worker, 0) == 0 and sample(worker, 1) == 0  # caught up


def _source_settings(models, kafka, topic: str, group: str, strategy: str):
    return load_settings({"model": {"path": models["binary"]}, "kafka": {"bootstrap_servers": kafka.bootstrap},
                          "stream": {"topics": [topic], "group": group, "session_timeout_ms": 6000,
                                     "heartbeat_interval_ms": 2000, "metrics_port": None,
                                     "assignment_strategy": strategy}})


@pytest.mark.kafka
@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
def test_a_second_member_takes_only_what_moves_and_nothing_is_committed_for_it(models, kafka, strategy):
    """Two of our ``KafkaSource``s in one group on 4 partitions: with cooperative-sticky the first member gives up
    only the partitions the second gets (and keeps the others without a pause); with range (eager) it gives up
    all. Either way the assignments end disjoint and complete, and a commit for a partition moved away is refused."""
    from workers.observability import Metrics
    from workers.sources.kafka import KafkaSource

    topic, group = kafka.topic(partitions=4), f"g-{uuid.uuid4().hex[:8]}"
    kafka.produce(topic, [(None, orjson.dumps(r)) for r in records(40)])
    settings = _source_settings(models, kafka, topic, group, strategy)
    a, b = KafkaSource(settings, Metrics()), KafkaSource(settings, Metrics())
    revoked_a: list[tuple[str, int]] = []
    original = a._on_revoke

    def on_revoke(consumer, partitions):
        revoked_a.extend((p.topic, p.partition) for p in partitions)
        original(consumer, partitions)

    a._on_revoke = on_revoke  # type: ignore[method-assign]
    everything = {(topic, p) for p in range(4)}
    try:
        a.open()
        got = 0
        deadline = time.monotonic() + 30
        while (a.assignment() != everything or got < 40) and time.monotonic() < deadline:
            got += len(a.poll_batch(100, 200))
        assert a.assignment() == everything and got == 40
        b.open()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (b.assignment() and a.assignment() | b.assignment() == everything
                                                   and not a.assignment() & b.assignment()):
            a.poll_batch(100, 100)
            b.poll_batch(100, 100)
        moved = b.assignment()
        assert moved and a.assignment() == everything - moved, (a.assignment(), moved)
        if strategy == "cooperative-sticky":
            assert set(revoked_a) == moved, revoked_a  # the partitions kept were never stopped
        else:
            assert set(revoked_a) == everything, revoked_a
        lost = next(iter(moved))
        assert a.commit({lost: 7}) is False
        assert kafka.committed(group, topic, 4)[lost[1]] == 0
    finally:
        a.close()
        b.close()


@pytest.mark.kafka
@pytest.mark.postgres
def test_lag_seconds_on_a_live_worker_behind_then_caught_up(models, kafka, pg_dsn, pg_table, tmp_path):
    """A worker process whose table is locked (its write waits) reports the age of the oldest record it could
    not commit on that partition, 0 on the partition with nothing to do; once the lock goes, 0 everywhere."""
    topic = kafka.topic(partitions=2)
    port = free_port()
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink",
                          f"{pg_dsn}?table={pg_table}", "--metrics-port", str(port), "--max-wait-ms", "50",
                          log=str(tmp_path / "w.log"))
    kafka.produce_json(topic, records(10))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 10, 60, what="first records stored")
    wait_for(lambda: gauges(port, "scoring_consumer_lag_seconds") == {"0": 0.0, "1": 0.0}, 20, what="caught up")
    lock = psycopg.connect(pg_dsn)
    try:
        lock.execute(f'LOCK TABLE "{pg_table}" IN ACCESS EXCLUSIVE MODE')
        written = int((time.time() - 300) * 1000)  # records written 5 minutes ago (CreateTime)
        for i, r in enumerate(records(20, start=10)):
            kafka.producer.produce(topic, key=r["id"].encode(), value=orjson.dumps(r), partition=0,
                                   timestamp=written + i)
        assert kafka.producer.flush(10) == 0
        behind = wait_for(lambda: (g := gauges(port, "scoring_consumer_lag_seconds")).get("0", 0) >= 300 and g,
                          30, what="lag seconds of the blocked partition")
        assert behind["0"] < 330 and behind["1"] == 0, behind
        assert gauges(port, "scoring_consumer_lag")["0"] == 20
    finally:
        lock.rollback()
        lock.close()
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 30, 60, what="stored after the lock")
    wait_for(lambda: gauges(port, "scoring_consumer_lag_seconds") == {"0": 0.0, "1": 0.0}, 20,
             what="lag seconds back to 0")
    assert gauges(port, "scoring_consumer_lag") == {"0": 0.0, "1": 0.0}
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert count(pg_dsn, pg_table) == (30, 30)


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_static_member_restarted_gets_its_partitions_back_without_a_rebalance(models, kafka, pg_dsn, pg_table,
                                                                                 tmp_path):
    """Two static members (HOSTNAME as a pod name); one is SIGKILLed and restarted with the same name within the
    session timeout: it owns the same partitions again and the other member never gave any up."""
    topic = kafka.topic(partitions=4)
    group = f"g-{pg_table}"
    ports = {"a": free_port(), "b": free_port()}

    def start(name: str, n: int):
        return kafka.worker("--model", models["binary"], "--topic", topic, "--group", group, "--sink",
                            f"{pg_dsn}?table={pg_table}", "--metrics-port", str(ports[name]),
                            env={"HOSTNAME": f"{group}-{name}"}, log=str(tmp_path / f"{name}{n}.log"))

    def owned(name: str) -> set[str]:
        try:
            return set(gauges(ports[name], "scoring_consumer_lag"))
        except OSError:
            return set()

    a, b = start("a", 0), start("b", 0)
    kafka.produce_json(topic, records(400))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 400, 60, what="first records stored")
    wait_for(lambda: owned("a") and owned("b") and len(owned("a") | owned("b")) == 4, 30, what="both own some")
    before = owned("a"), owned("b")
    a.send_signal(signal.SIGKILL)
    a.wait()
    a = start("a", 1)
    kafka.produce_json(topic, records(400, start=400))
    wait_for(lambda: owned("a"), 30, what="the restarted member owns partitions")
    assert (owned("a"), owned("b")) == before
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 800, 60, what="all stored")
    revocations = [line for line in open(tmp_path / "b0.log") if '"partitions revoked"' in line]
    assert not revocations, revocations
    for w in (a, b):
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
    assert count(pg_dsn, pg_table) == (800, 800)

"""Kill loop: 3 workers on 6 partitions while a producer writes; SIGKILL a random worker every few seconds and
restart it; then drain and check every record."""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.faults.common import Producer, check, rebalances, stored_count
from tests.kafka_util import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def test_sigkill_loop_loses_and_duplicates_nothing(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=6)
    sink = f"{pg_dsn}?table={pg_table}"
    args = ("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink", sink,
            "--max-records", "300", "--metrics-port", "0")
    logs: list[str] = []

    def start(n: int):
        log = str(tmp_path / f"w{n}.log")
        logs.append(log)
        return kafka.worker(*args, log=log)

    workers = [start(i) for i in range(3)]
    producer = Producer(kafka, topic, rate=2000)
    producer.start()
    rng = random.Random(7)
    kills = 0
    started = time.monotonic()
    for _round in range(6):
        time.sleep(rng.uniform(3, 5))
        victim = rng.randrange(3)
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()
        kills += 1
        workers[victim] = start(len(logs))
    produced = producer.stop()
    wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 180, interval=0.5,
             what="drain after the kill loop")
    stops = []
    for w in workers:
        t = time.monotonic()
        w.send_signal(signal.SIGTERM)
        assert w.wait(30) == 0
        stops.append(round(time.monotonic() - t, 1))
    report = check("kill-loop", produced, pg_dsn, pg_table, kafka, topic, models["binary"], kills=kills,
                   rebalances=sum(rebalances(p) for p in logs), exit_times_s=stops,
                   seconds=round(time.monotonic() - started))
    report.assert_exact()
    assert report.records_in > 10_000 and report.bad > 100

"""PostgreSQL unreachable for 30 s mid-stream (a TCP proxy between worker and server): no commit during the
outage, readiness false (and the stalled partitions named), everything stored after recovery."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

import pytest

from tests.faults.common import check, produce, stored_count
from tests.kafka_util import wait_for
from tests.proxy import proxied_worker

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


def readyz(port: int) -> tuple[int, str]:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_thirty_second_outage(models, kafka, pg_dsn, pg_table, tmp_path):
    w = proxied_worker(kafka, models["binary"], pg_dsn, pg_table, str(tmp_path / "w.log"), 3, "--stall-seconds", "5")
    proxy, topic, group, port, worker = w.proxy, w.topic, w.group, w.port, w.worker
    try:
        produced = produce(kafka, topic, 2000)
        wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 60, what="first records stored")
        wait_for(lambda: sum(kafka.committed(group, topic, 3).values()) == produced.total, 20, what="committed")
        before = produced.total
        proxy.cut()
        outage_started = time.monotonic()
        produce(kafka, topic, 3000, start=2000, produced=produced)
        saw_not_ready = saw_stalled = False
        while time.monotonic() - outage_started < 30:
            code, text = readyz(port)
            saw_not_ready |= code == 503 and "sink unavailable" in text
            saw_stalled |= "stalled" in text
            assert sum(kafka.committed(group, topic, 3).values()) == before, "committed during the outage"
            time.sleep(1)
        assert saw_not_ready and saw_stalled
        proxy.restore()
        recovered = time.monotonic()
        wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 90, what="stored after recovery")
        catch_up = time.monotonic() - recovered
        wait_for(lambda: readyz(port)[0] == 200, 30, what="ready again")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        proxy.close()
    check("store-outage-30s", produced, pg_dsn, pg_table, kafka, topic, models["binary"],
          catch_up_s=round(catch_up, 1)).assert_exact()

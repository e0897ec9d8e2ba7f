"""A backlog of 1M records: the worker's memory stays bounded by its fetch and batch caps."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import orjson
import pytest
from confluent_kafka import Producer

from tests.faults.common import FEATURES
from tests.kafka_util import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def test_million_record_backlog_keeps_rss_bounded(models, kafka, tmp_path):
    topic = kafka.topic(partitions=4)
    n = 1_000_000
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 50, "batch.size": 1_000_000,
                         "queue.buffering.max.messages": 2_000_000, "compression.type": "lz4"})
    values = np.random.default_rng(0).normal(size=(1000, 8))
    for i in range(n):
        body = orjson.dumps({"id": f"m{i}", **dict(zip(FEATURES, values[i % 1000].tolist(), strict=True))})
        while True:
            try:
                producer.produce(topic, key=None, value=body)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(120) == 0
    out = str(tmp_path / "out")  # Parquet sink: the store itself adds no memory pressure of its own
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{topic}", "--sink", out,
                          "--max-records", "5000", "--fetch-max-bytes", str(8 * 1024 * 1024),
                          "--max-partition-fetch-bytes", str(2 * 1024 * 1024), "--metrics-port", "0",
                          log=str(tmp_path / "w.log"))

    def written() -> int:
        import pyarrow.dataset as ds

        try:
            return ds.dataset(out, format="parquet").count_rows()
        except (OSError, ValueError):
            return 0

    wait_for(lambda: written() >= 50_000, 120, interval=0.5, what="consumption under way")
    early_rss, _ = rss_kib(worker.pid)
    started = time.monotonic()
    samples = []
    while written() < n and time.monotonic() - started < 300:
        samples.append(rss_kib(worker.pid)[0])
        time.sleep(1)
    seconds = time.monotonic() - started
    _, peak = rss_kib(worker.pid)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert written() == n
    line = (f"[memory-backlog] records={n} early_rss_mib={early_rss / 1024:.0f} max_rss_mib={max(samples) / 1024:.0f} "
            f"peak_mib={peak / 1024:.0f} seconds={seconds:.0f} rate={n / seconds:,.0f}/s")
    print("\n" + line)
    with open(os.environ.get("FAULTS_REPORT", "/tmp/faults-report.txt"), "a") as f:
        f.write(line + "\n")
    # Bounded: consuming the rest of a 1M backlog adds little over the early working set.
    assert max(samples) < early_rss + 150 * 1024

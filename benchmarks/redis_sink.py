"""Rows/s into a Redis server through the Redis sink (not part of ``make bench``; run by hand).

    python benchmarks/redis_sink.py [redis://127.0.0.1:6379/0] [rows]

Builds result rows shaped like a binary model's (id, score, model_version, served, scored_at, two passthrough
columns), then times, per path: ``write_batch`` of 1000-row micro-batches of stream rows (with topic, partition
and offset) into new keys, the same again (each row then checked against the stored row's offset), and one batch
unit of all rows (``begin``/``write`` in 65536-row batches/``commit``, batch mode, over the keys written before),
with and without ``ttl_s``. Encoding is included (the time is the sink's whole cost). Everything written is
deleted afterwards (a prefix of its own).

Last runs (2026-12-03, 2 shared cores, load average 3-8 from other work, Redis 7.0 local, 300k rows, 3 runs):
batch unit 81k/161k/97k rows/s without TTL (client 2.7-4.0 us/row + Redis 3.9-6.5 us/row), 100k/101k/93k with
ttl_s; stream write_batch into new keys 85k/71k/94k without TTL, 51k/75k/51k with it; the same rows again (every
row's stored offset decoded and checked) 68k/74k/80k. The wall rate follows the machine's load; the CPU per row
(client + server about 7-11 us) is the steadier figure.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import redis

from workers.scoring.scorer import Scored
from workers.sinks.redis import RedisSink


def results(n: int, start: int = 0, stream: bool = False) -> pa.Table:
    """Result rows; ``stream`` adds topic/partition/offset (the sink then checks each against the stored row)."""
    rng = np.random.default_rng(start)
    at = pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC"))
    table = pa.table({"id": [f"r{i}" for i in range(start, start + n)], "score": rng.random(n),
                      "model_version": ["churn-0123456789ab"] * n, "served": [True] * n, "scored_at": at,
                      "country": ["de"] * n, "amount": rng.normal(size=n)})
    if stream:
        table = table.append_column("topic", pa.array(["events"] * n)).append_column(
            "partition", pa.array(np.arange(start, start + n) % 8, pa.int32())).append_column(
            "offset", pa.array(np.arange(start, start + n) // 8, pa.int64()))
    return table


class Clock:
    """Wall time, this process's CPU time and the Redis server's (INFO cpu), over one timed block: on a shared
    machine the CPU microseconds per row say more than the wall rate, which other work slows down."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def _server(self) -> float:
        cpu = self.client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def __enter__(self) -> Clock:
        self.wall, self.cpu, self.server = time.perf_counter(), time.process_time(), self._server()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.server = self._server() - self.server

    def line(self, rows: int) -> str:
        return (f"{rows / self.wall:>9,.0f} rows/s; client {self.cpu / rows * 1e6:.1f} us/row, "
                f"Redis {self.server / rows * 1e6:.1f} us/row")


def run(uri: str, rows: int) -> None:
    empty = pa.table({})
    client = redis.Redis.from_url(uri)
    for ttl in ("", "&ttl_s=3600"):
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        sink = RedisSink(f"{uri}?prefix={prefix}{ttl}", "bench")
        batches = [results(1000, s, stream=True) for s in range(0, rows, 1000)]
        with Clock(client) as stream:
            for b in batches:
                sink.write_batch(Scored(b, empty))
        with Clock(client) as again:
            for b in batches:
                sink.write_batch(Scored(b, empty))
        big = [results(min(65536, rows - s), s) for s in range(0, rows, 65536)]
        with Clock(client) as unit:
            writer = sink.begin("/bench/unit.parquet")
            for b in big:
                writer.write(Scored(b, empty))
            writer.commit()
        shown = "3600" if ttl else "none"
        print(f"ttl_s={shown:>4}  write_batch of 1000 stream rows (new keys): {stream.line(rows)}")
        print(f"ttl_s={shown:>4}  the same again (offsets checked):      {again.line(rows)}")
        print(f"ttl_s={shown:>4}  one batch unit of {rows:,} (overwrites): {unit.line(rows)}")
        for keys in _batched(client.scan_iter(f"{prefix}*", count=10_000), 10_000):
            client.delete(*keys)
        sink.close()


def _batched(it, n):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0", int(sys.argv[2]) if len(sys.argv) > 2
        else 200_000)

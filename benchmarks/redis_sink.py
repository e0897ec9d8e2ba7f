"""Rows/s into a Redis server through the Redis sink (not part of ``make bench``; run by hand).

    python benchmarks/redis_sink.py [redis://127.0.0.1:6379/0] [rows]

Builds result rows shaped like a binary model's (id, score, model_version, served, scored_at, two passthrough
columns), then times, per path: ``write_batch`` of 1000-row micro-batches (stream/serve) and one batch unit of all
rows (``begin``/``write`` in 65536-row batches/``commit``, batch mode), with and without ``ttl_s``. Encoding is
included (the time is the sink's whole cost). Everything written is deleted afterwards (a prefix of its own).
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


def results(n: int, start: int = 0) -> pa.Table:
    rng = np.random.default_rng(start)
    at = pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC"))
    return pa.table({"id": [f"r{i}" for i in range(start, start + n)], "score": rng.random(n),
                     "model_version": ["churn-0123456789ab"] * n, "served": [True] * n, "scored_at": at,
                     "country": ["de"] * n, "amount": rng.normal(size=n)})


def run(uri: str, rows: int) -> None:
    empty = pa.table({})
    for ttl in ("", "&ttl_s=3600"):
        prefix = f"bench-{uuid.uuid4().hex[:8]}:"
        sink = RedisSink(f"{uri}?prefix={prefix}{ttl}", "bench")
        batches = [results(1000, s) for s in range(0, rows, 1000)]
        started = time.perf_counter()
        for b in batches:
            sink.write_batch(Scored(b, empty))
        stream = rows / (time.perf_counter() - started)
        big = [results(min(65536, rows - s), s) for s in range(0, rows, 65536)]
        started = time.perf_counter()
        writer = sink.begin("/bench/unit.parquet")
        for b in big:
            writer.write(Scored(b, empty))
        writer.commit()
        unit = rows / (time.perf_counter() - started)
        print(f"ttl={'3600' if ttl else 'none':>5}: write_batch x1000 rows: {stream:,.0f} rows/s; "
              f"one unit of {rows:,} rows: {unit:,.0f} rows/s")
        client = redis.Redis.from_url(uri)
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

"""Rows/s of the MySQL / MariaDB sink into a local server (a small script, not part of `make bench`).

    PYTHONPATH=. .venv/bin/python benchmarks/mysql_sink_rate.py [URI] [--rows N] [--repeats R]

URI defaults to mysql://root@127.0.0.1:3306/test. Writes N result rows (id, model_version, score, served,
scored_at, two passthrough floats) into a fresh table: as batch units of 65,536 rows (one transaction each,
the unit's old rows deleted first), then once more over the same keys (every row an update), then as stream
micro-batches of 1,000 rows carrying topic/partition/offset (the stale-write guard in the update clause).
Prints one JSON line per case (median of the repeats) and drops its tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
import uuid

import numpy as np
import pyarrow as pa
import pymysql

from workers.scoring.scorer import Scored
from workers.sinks.mysql import MysqlSink


def results(n: int, start: int, stream: bool, rng: np.random.Generator) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    cols = {
        "id": pa.array([f"r{i}" for i in range(start, start + n)], pa.string()),
        "model_version": pa.array(["bench-0123456789ab"] * n, pa.string()),
        "score": pa.array(rng.random(n)),
        "served": pa.array(np.ones(n, bool)),
        "scored_at": pa.array([now] * n, pa.timestamp("us", "UTC")),
        "x0": pa.array(rng.normal(size=n)),
        "x1": pa.array(rng.normal(size=n)),
    }
    if stream:
        cols |= {"topic": pa.array(["events"] * n), "partition": pa.array(np.arange(n) % 4, pa.int32()),
                 "offset": pa.array(np.arange(start, start + n), pa.int64())}
    return pa.table(cols)


def run_case(uri: str, rows: int, stream: bool, passes: int) -> float:
    """Seconds to write ``rows`` rows ``passes`` times (the later passes over the same keys)."""
    sink = MysqlSink(uri, "bench")
    rng = np.random.default_rng(0)
    chunk = 1000 if stream else 65_536
    tables = [results(min(chunk, rows - s), s, stream, rng) for s in range(0, rows, chunk)]
    empty = pa.table({})
    took = 0.0
    try:
        for _ in range(passes):
            started = time.perf_counter()
            for k, table in enumerate(tables):
                if stream:
                    sink.write_batch(Scored(table, empty))
                else:
                    writer = sink.begin(f"bench/part-{k}.parquet")
                    writer.write(Scored(table, empty))
                    writer.commit()
            took = time.perf_counter() - started
    finally:
        sink.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri", nargs="?", default="mysql://root@127.0.0.1:3306/test")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for case, stream, passes in (("batch insert", False, 1), ("batch rewrite (delete + insert)", False, 2),
                                 ("stream upsert, 1000-row micro-batches", True, 1)):
        rates = []
        for _ in range(args.repeats):
            table = f"bench_{uuid.uuid4().hex[:8]}"
            uri = f"{args.uri}?table={table}"
            try:
                rates.append(args.rows / run_case(uri, args.rows, stream, passes))
            finally:
                conn = pymysql.connect(**MysqlSink(uri, "bench").connect_args)
                with conn.cursor() as cur:
                    for suffix in ("", "_errors", "_inputs"):
                        cur.execute(f"DROP TABLE IF EXISTS `{table}{suffix}`")
                conn.close()
        print(json.dumps({"case": case, "rows": args.rows, "rows_per_s": round(statistics.median(rates)),
                          "spread": [round(min(rates)), round(max(rates))]}))


if __name__ == "__main__":
    main()

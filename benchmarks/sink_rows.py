"""Microbenchmark: CPU microseconds per record that stream mode spends building what the sinks send, after scoring.

The results table is made the way ``workers.runtime.stream.score.ScoreStage.score`` makes it: a real LightGBM
model (tests/helpers.py's binary model), real JSON records decoded by the router, passthrough columns (a string,
an int, a float, a nested object) and the Kafka carry columns (topic, partition, offset, timestamp). Then each
builder is timed on that table, CPU time (``time.process_time``), min over the repeats:

    kafka json         ``kafka.result_messages`` (what ``KafkaSink.write_batch`` sends for format=json)
    kafka jsonschema   ``regformat.encoder("jsonschema")`` (registry formats: no registry needed to encode)
    kafka avro / protobuf   the same for those formats
    postgres copy      ``PgTables.render`` (the CSV text COPY reads), column types as the sink's ``ensure``
                       would create them (``pg_type``); no network: rendering needs only the column types

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sink_rows.py [--rows 2000] [--repeats 7] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import orjson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cputime import cpu_us  # noqa: E402

from tests import helpers  # noqa: E402
from workers.decode.records import carry_columns  # noqa: E402
from workers.scoring.model import load_model  # noqa: E402
from workers.scoring.router import Router  # noqa: E402
from workers.scoring.scorer import Scored  # noqa: E402
from workers.settings import ModelSettings, ScoringSettings  # noqa: E402
from workers.sinks.kafka import result_messages  # noqa: E402
from workers.sinks.pgtables import PgTables  # noqa: E402
from workers.sinks.pgtypes import exact_columns, pg_type  # noqa: E402
from workers.sinks.regformat import columns, encoder  # noqa: E402
from workers.sinks.rowjson import plain_columns  # noqa: E402
from workers.sinks.tables import RESULT_KEY  # noqa: E402

PASSTHROUGH = ["customer", "region", "amount", "attrs"]


def records(n: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, len(helpers.FEATURES)))
    out = []
    for i in range(n):
        rec: dict = {"id": f"rec-{i:07d}", **{f: float(v) for f, v in zip(helpers.FEATURES, x[i], strict=True)}}
        rec.update(customer=f"cust \"{i % 97}\" é", region=i % 13, amount=round(float(x[i, 0]) * 100, 2),
                   attrs={"tier": "gold" if i % 3 else "basic", "n": i})
        if i % 10 == 3:  # some records lack a passthrough field: null in its column
            del rec["customer" if i % 20 == 3 else "attrs"]
        out.append(orjson.dumps(rec))
    return out


def results_table(n: int) -> Scored:
    """The results of one n-record batch, as the stream score stage makes them."""
    folder = tempfile.mkdtemp(prefix="sinkrows-")
    path = helpers.save(helpers.train("binary"), folder, "binary")
    model = load_model(ModelSettings(path=path))
    router = Router.single(model, ScoringSettings(passthrough=PASSTHROUGH))
    values = records(n)
    routed, decoded = router.decode(values, [None] * n)
    now_ms = int(time.time() * 1000)
    carry = carry_columns(decoded.passthrough, ["scores-in"] * n, [i % 6 for i in range(n)], list(range(n)),
                          np.array([now_ms + i for i in range(n)], dtype=np.int64))
    return router.finish(routed, carry)


def builders(scored: Scored) -> dict[str, Callable[[], object]]:
    table = scored.results
    cols = columns(table.schema)
    pg = PgTables(None, "bench")
    types = {f.name: pg_type(f.type, f.name) for f in table.schema}
    out: dict[str, Callable[[], object]] = {
        "kafka json": lambda: result_messages(plain_columns(scored)),
    }
    for fmt in ("jsonschema", "avro", "protobuf"):
        enc = encoder(fmt, cols)
        out[f"kafka {fmt}"] = lambda enc=enc: enc(table)
    out["postgres copy"] = lambda: pg.render(exact_columns(table), types, RESULT_KEY)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default="", help="comma-separated builder names")
    args = parser.parse_args()
    scored = results_table(args.rows)
    print(f"{args.rows} records, results columns: {', '.join(scored.results.column_names)}")
    print(f"{'builder':<18} {'us/record (CPU, min of ' + str(args.repeats) + ')':>28}")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for name, fn in builders(scored).items():
        if only and name not in only:
            continue
        fn()  # warm-up (schemas, caches)
        print(f"{name:<18} {cpu_us(fn, args.rows, args.repeats):>28.2f}")


if __name__ == "__main__":
    main()

"""What traces cost on the hot paths, off and on (issue #17): `.venv/bin/python benchmarks/tracing_overhead.py`.

Three in-process cases, each run in a fresh process per measurement (tracing is process-wide), interleaved:
- stream: a real StreamWorker on ``workers.testing``'s scripted source and sink (no broker, no store: the
  pipeline's own cost is what is left), 20,000 records in micro-batches of 1,000, every record carrying a
  ``traceparent`` header (the worst case for links: 128 per batch);
- serve: OIP REST infer of one row through the ASGI app (routing, span, batcher, predict), one client, 2,000
  requests, in process over httpx's ASGI transport;
- batch: ``run_batch`` of one Parquet file of 200,000 rows into a Parquet folder, 10,000-row batches.
Modes: ``main`` (the code of --main-tree, before tracing existed: PYTHONPATH points there), ``off`` (this tree,
no OTEL_* set), ``on`` (OTEL_TRACES_EXPORTER=otlp, spans batched by the SDK and exported over OTLP/HTTP to a
closed port on 127.0.0.1: the export fails fast and is dropped, so only the worker's own cost is measured).
Prints the median CPU microseconds per unit (the process's CPU time, every thread) with their range, the
ratios off/main and on/off of those medians, and the wall-clock rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("stream", "serve", "batch")


class Clock:
    """Wall time and the process's CPU time (every thread): on a shared machine the wall time of one run swings
    by 2x with the neighbours' load, the CPU a run spends much less, so the ratios are taken on CPU time."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per(self, n: int) -> tuple[float, float]:
        """(units per wall second, CPU microseconds per unit)."""
        return n / (time.perf_counter() - self.wall), (time.process_time() - self.cpu) / n * 1e6


def _helpers():
    """tests/helpers.py of this tree, loaded by path (``workers`` must come from PYTHONPATH: main or this tree)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_helpers", os.path.join(ROOT, "tests", "helpers.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(folder: str) -> str:
    helpers = _helpers()
    path = os.path.join(folder, "binary.txt")
    if not os.path.exists(path):
        helpers.save(helpers.train("binary"), folder, "binary")
    return path


def case_stream(model: str, folder: str) -> float:
    from workers.runtime.stream.worker import StreamWorker
    from workers.settings import load_settings
    from workers.testing import Script, rec

    n = 20_000
    items = [rec("t", i % 4, {"id": f"r{i}", **{f"x{k}": float(i % 13 + k) for k in range(8)}},
                 headers=[("traceparent", f"00-{i + 1:032x}-{i + 1:016x}-01".encode())]) for i in range(n)]
    script = Script(items, partitions={"t": 4})
    settings = load_settings({"model": {"path": model}, "stream": {
        "topics": ["t"], "metrics_port": None, "max_records": 1000, "max_wait_ms": 5}})
    worker = StreamWorker(settings, source=script.source(), sink=script.sink, dead_letters=script.dead_letters(),
                          burst=True)
    clock = Clock()
    assert worker.run() == 0
    assert len(script.sink.rows) == n
    return clock.per(n)


def case_serve(model: str, folder: str) -> float:
    import asyncio

    import httpx
    import orjson

    from workers.runtime.serve.app import App
    from workers.settings import load_settings

    app = App(load_settings({"model": {"path": model}, "serve": {"grpc_port": None}}))
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP64", "data": [0.5] * 8}]})
    n = 2000

    async def go() -> float:
        await app.plane.start()
        try:
            transport = httpx.ASGITransport(app=app.asgi())
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                for _ in range(100):  # warm-up
                    (await client.post("/v2/models/binary/infer", content=body)).raise_for_status()
                clock = Clock()
                for _ in range(n):
                    (await client.post("/v2/models/binary/infer", content=body)).raise_for_status()
                return clock.per(n)
        finally:
            await app.plane.stop()

    return asyncio.run(go())


def case_batch(model: str, folder: str) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    helpers = _helpers()
    from workers.runtime.batch import run_batch
    from workers.settings import load_settings

    inputs = os.path.join(folder, "batch-in")
    if not os.path.exists(inputs):
        os.makedirs(inputs)
        df = helpers.frame(200_000, seed=3)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), os.path.join(inputs, "part.parquet"),
                       row_group_size=50_000)
    out = tempfile.mkdtemp(dir=folder)
    settings = load_settings({"model": {"path": model}, "batch": {"input": inputs, "output": out,
                                                                  "batch_rows": 10_000}})
    clock = Clock()
    report = run_batch(settings)
    assert report.rows == 200_000, report.summary()
    return clock.per(report.rows)


def one(case: str, folder: str) -> None:
    """Child process: set tracing up as the CLI does, run one case, print its rate."""
    tracing_on = False
    try:
        from workers import tracing
    except ImportError:  # the tree before tracing
        tracing = None
    if tracing is not None:
        tracing_on = tracing.setup(case)
    import workers

    print(f"workers from {os.path.dirname(workers.__file__)}, tracing {'on' if tracing_on else 'off'}", file=sys.stderr)
    model = _model(folder)
    rate, cpu_us = {"stream": case_stream, "serve": case_serve, "batch": case_batch}[case](model, folder)
    if tracing is not None and tracing_on:
        tracing.shutdown()
    print(json.dumps({"rate": rate, "cpu_us": cpu_us}))


def args_folder(folder: str) -> str:
    """The child's working directory: not a source tree, so ``workers`` is imported from PYTHONPATH only."""
    return folder


def measure(case: str, mode: str, folder: str, main_tree: str) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SCORING_"))}
    env["PYTHONPATH"] = main_tree if mode == "main" else ROOT
    if mode == "on":
        env.update({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                    "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    script = os.path.abspath(__file__)
    out = subprocess.run([sys.executable, script, "--child", case, "--folder", folder], env=env,
                         capture_output=True, text=True, cwd=args_folder(folder), timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{case}/{mode} failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return float(got["rate"]), float(got["cpu_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--main-tree", default="", help="a checkout without tracing, for the `main` mode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=os.path.join(ROOT, ".bench", "tracing"))
    args = parser.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    if args.child:
        one(args.child, args.folder)
        return
    modes = (["main"] if args.main_tree else []) + ["off", "on"]
    for case in args.cases.split(","):
        rates: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:  # interleaved: a slow moment of the machine hits every mode alike
                rate, cpu_us = measure(case, mode, args.folder, args.main_tree)
                rates[mode].append(rate)
                cpu[mode].append(cpu_us)
        unit = {"serve": "request", "stream": "record", "batch": "row"}[case]
        med = {m: statistics.median(v) for m, v in cpu.items()}
        shown = "  ".join(f"{m} {med[m]:.2f} [{min(cpu[m]):.2f}-{max(cpu[m]):.2f}]" for m in modes)
        walls = "  ".join(f"{m} {statistics.median(rates[m]):,.0f}/s" for m in modes)
        ratios = (f"off/main {med['off'] / med['main']:.3f}  " if "main" in med else "") + \
            f"on/off {med['on'] / med['off']:.3f}"
        print(f"{case:<7} CPU us/{unit:<8} {shown}  {ratios}  (wall medians: {walls})", flush=True)


if __name__ == "__main__":
    main()

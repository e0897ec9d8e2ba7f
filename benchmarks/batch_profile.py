"""Where batch mode's time goes with the compiled backend (issue #19 part 2):
`.venv/bin/python benchmarks/batch_profile.py [--repeats N] [--profile]`.

The bench's model (500 trees of 63 leaves, 30 features, as ``benchmarks/run.py`` trains it) over 3 Parquet
files of 100k rows (row groups of 50k), ``scoring-worker batch`` in-process with the lleaves backend. Each
repeat runs, back to back, raw compiled predict on a matrix read from the same files (10000 rows per call, the
bench's denominator, and one call per row group, what batch mode makes), then the batch run; both as wall and
CPU time (``time.process_time``: this machine's 2 cores are shared, so wall time drifts between minutes and
CPU time is the steadier figure). The ratio of each pair is reported, median over the repeats.

Threads: the compiled model's predict uses ``n_jobs`` threads, which is ``SCORING_MODEL__THREADS`` (1 here)
both in the raw call and in batch mode (``Model.predict``), so the comparison is one predict thread against one.
Batch mode also reads the next row group on a helper thread while it scores (``sources.parquet.iter_batches``),
so its CPU time may exceed its wall time.

The stage breakdown runs each step alone on the same data, in the main thread: read Parquet, build the matrix
(``feature_matrix``), predict, build the results (``Scorer.finish`` given the predictions), write Parquet (zstd,
as the sink does), publish and ledger (a whole ``run_batch`` minus the rest is not attempted: threads overlap).
``--profile`` also prints cProfile's top functions of one batch run (main thread only).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import time
import uuid

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightgbm as lgb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ``--serve TREE`` (a child of ``--compare``) scores with the ``workers`` package of another checkout.
TREE = sys.argv[sys.argv.index("--serve") + 1] if "--serve" in sys.argv else ROOT
sys.path.insert(0, TREE)

from workers.runtime.batch import run_batch  # noqa: E402
from workers.scoring.features import feature_matrix  # noqa: E402
from workers.scoring.model import Model, load_model  # noqa: E402
from workers.scoring.scorer import Scorer  # noqa: E402
from workers.settings import ModelSettings, load_settings  # noqa: E402

BENCH = os.path.join(ROOT, ".bench")
N_FEATURES = 30
NAMES = [f"f{i}" for i in range(N_FEATURES)]
FILES, ROWS, ROW_GROUP = 3, 100_000, 50_000


def frame(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES))


def model_path() -> str:
    """The bench's 500-tree model (trained exactly as ``benchmarks/run.py`` does, so the same file)."""
    path = f"{BENCH}/models/binary500.txt"
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        x = frame(20_000, 0)
        y = (x[:, 0] + x[:, 1] * x[:, 2] - x[:, 3] + np.random.default_rng(1).normal(size=20_000) > 0).astype(int)
        params = {"objective": "binary", "num_leaves": 63, "verbose": -1, "seed": 1, "num_threads": 2}
        lgb.train(params, lgb.Dataset(x, y, feature_name=NAMES), 500).save_model(path)
    return path


def data_folder() -> str:
    folder = f"{BENCH}/data/batch"
    if os.path.isdir(folder) and len(os.listdir(folder)) == FILES:
        return folder
    os.makedirs(folder, exist_ok=True)
    for k in range(FILES):
        x = frame(ROWS, 100 + k)
        table = pa.table({"id": pa.array([f"r{k}-{i}" for i in range(ROWS)]),
                          **{n: x[:, j] for j, n in enumerate(NAMES)}})
        pq.write_table(table, f"{folder}/part-{k}.parquet", row_group_size=ROW_GROUP)
    return folder


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def matrices(folder: str, model: Model) -> list[np.ndarray]:
    """The feature matrix of every row group of the inputs, as batch mode builds it."""
    out = []
    for name in sorted(os.listdir(folder)):
        pf = pq.ParquetFile(f"{folder}/{name}")
        for rb in pf.iter_batches(batch_size=65536, columns=["id", *NAMES], use_threads=False):
            out.append(feature_matrix(model, rb).matrix)
    return out


def raw(model: Model, mats: list[np.ndarray], rows_per_call: int | None) -> Clock:
    """Raw compiled predict over all rows: ``rows_per_call`` slices (C-contiguous copies made beforehand,
    as the bench's raw case does), or one call per row group (None)."""
    if rows_per_call is None:
        calls = mats
    else:
        whole = np.concatenate(mats)
        calls = [np.ascontiguousarray(whole[i:i + rows_per_call]) for i in range(0, len(whole), rows_per_call)]
    with Clock() as c:
        for x in calls:
            model.predict(x)
    return c


def batch(path: str, folder: str) -> tuple[Clock, float]:
    """One ``run_batch`` into a new output folder: its clock (the model's load left out) and ``report.seconds``
    (what the bench divides by: from the sink's opening to its closing, the model already loaded)."""
    out = f"{BENCH}/out/{uuid.uuid4().hex}"
    settings = load_settings({"model": {"path": path, "backend": "lleaves", "cache_dir": f"{BENCH}/cache"},
                              "batch": {"input": folder, "output": out, "progress": "log"}})
    import workers.runtime.batch as rb

    build, load = rb.build_router, Clock()

    def timed_build(*args, **kwargs):
        with load:
            return build(*args, **kwargs)

    rb.build_router = timed_build
    try:
        with Clock() as c:
            report = run_batch(settings)
    finally:
        rb.build_router = build
    c.wall -= load.wall  # the model's load (parse, checks, compiled object from the cache) is not batch work
    c.cpu -= load.cpu
    assert report.rows == FILES * ROWS and not report.failed, report.summary()
    shutil.rmtree(out, ignore_errors=True)
    return c, report.seconds


class Timed:
    """Wall seconds spent in named functions during one batch run, by monkeypatching them (main thread's view:
    what the scoring loop waits for)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.undo: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        self.undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def wrap_iter(self, owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            it = original(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
                yield item

        self.undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)


def timed_run(path: str, folder: str) -> tuple[dict[str, float], float]:
    """Where the scoring loop's wall time goes in one batch run (``report.seconds``)."""
    import workers.runtime.batch as rb
    from workers.scoring.router import Router
    from workers.sinks import parquet as sink

    t = Timed()
    t.wrap_iter(rb, "iter_batches", "wait for the next row group (read-ahead)")
    t.wrap(rb, "open_parquet", "open Parquet file")
    t.wrap(Router, "from_table", "build matrix (Router.from_table)")
    t.wrap(Model, "predict", "predict")
    t.wrap(Scorer, "finish", "build results (Scorer.finish)")
    t.wrap(sink._ParquetUnit, "write", "write Parquet")
    t.wrap(sink._ParquetUnit, "commit", "publish (close, rename)")
    t.wrap(sink.ParquetSink, "mark_done", "ledger mark_done")
    t.wrap(sink.ParquetSink, "done", "ledger done")
    try:
        from workers.runtime.write_behind import WriteBehind
    except ImportError:  # a checkout without the write thread: its writes are timed above, inline
        pass
    else:
        t.wrap(WriteBehind, "wait", "wait for the write before (write thread)")
    try:
        _, seconds = batch(path, folder)
    finally:
        t.restore()
    return t.seconds, seconds


def dictionary(schema: pa.Schema) -> list[str] | bool:
    """The dictionary columns the Parquet sink of this checkout writes with (all, before it chose)."""
    try:
        from workers.sinks.parquet import dictionary_columns
    except ImportError:
        return True
    return dictionary_columns(schema)


def stages(model: Model, folder: str, repeats: int) -> dict[str, float]:
    """CPU seconds of each step alone over all the inputs (min over ``repeats``)."""
    scorer = Scorer(model)
    best: dict[str, float] = {}

    def keep(name: str, c: Clock) -> None:
        best[name] = min(best.get(name, float("inf")), c.cpu)

    for _ in range(repeats):
        batches = []
        with Clock() as c:
            for name in sorted(os.listdir(folder)):
                pf = pq.ParquetFile(f"{folder}/{name}", pre_buffer=False)
                batches += list(pf.iter_batches(batch_size=65536, columns=["id", *NAMES], use_threads=False))
        keep("read Parquet", c)
        with Clock() as c:
            feats = [scorer.features(rb) for rb in batches]
        keep("build matrix", c)
        with Clock() as c:
            preds = [model.predict(f.matrix) for f in feats]
        keep("predict", c)
        with Clock() as c:
            scored = [scorer.finish(rb.column("id"), f, predictions=p) for rb, f, p in zip(batches, feats, preds,
                                                                                           strict=True)]
        keep("build results", c)
        out = f"{BENCH}/out/stage-{uuid.uuid4().hex}"
        os.makedirs(out)
        with Clock() as c:
            for k in range(FILES):
                parts = scored[k * len(scored) // FILES:(k + 1) * len(scored) // FILES]
                schema = parts[0].results.schema
                with pq.ParquetWriter(f"{out}/.tmp-{k}", schema, compression="zstd",
                                      use_dictionary=dictionary(schema)) as w:
                    for s in parts:
                        w.write_table(s.results)
        keep("write Parquet (zstd)", c)
        with Clock() as c:
            for k in range(FILES):
                os.replace(f"{out}/.tmp-{k}", f"{out}/part-{k}.parquet")
                with open(f"{out}/.state-{k}", "w") as f:
                    f.write('{"unit": "x"}')
                os.replace(f"{out}/.state-{k}", f"{out}/state-{k}.json")
        keep("publish + ledger", c)
        shutil.rmtree(out, ignore_errors=True)
    return best


def serve(path: str, folder: str) -> None:
    """Child of ``--compare``: one batch run per line read from stdin, its figures as a JSON line."""
    import json

    batch(path, folder)  # warm
    import workers

    print(json.dumps({"ready": os.path.dirname(os.path.dirname(os.path.abspath(workers.__file__)))}), flush=True)
    for _ in sys.stdin:
        c, seconds = batch(path, folder)
        print(json.dumps({"wall": c.wall, "cpu": c.cpu, "seconds": seconds}), flush=True)


class Child:
    """A ``--serve`` process scoring with the checkout ``tree``."""

    def __init__(self, tree: str):
        import json
        import subprocess

        self.tree, self.json = tree, json
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", tree], cwd=tree,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        ready = self.json.loads(self.proc.stdout.readline())
        assert ready["ready"] == tree, ready

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def compare(model: Model, mats: list[np.ndarray], base: str, repeats: int) -> None:
    """This checkout against ``base`` (another checkout of the project), runs interleaved (A B raw, B A raw...),
    each paired with raw predict measured between them."""
    total = sum(len(m) for m in mats)
    children = {"before": Child(os.path.abspath(base)), "after": Child(ROOT)}
    out: dict[str, list[float]] = {}
    try:
        for i in range(repeats):
            for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                r10k = raw(model, mats, 10_000)
                got = children[name].run()
                out.setdefault(f"{name} rows/s (report)", []).append(total / got["seconds"])
                out.setdefault(f"{name}/raw10k wall", []).append(r10k.wall / got["wall"])
                out.setdefault(f"{name}/raw10k cpu", []).append(r10k.cpu / got["cpu"])
                out.setdefault("raw 10000 rows/call wall", []).append(total / r10k.wall)
                out.setdefault("raw 10000 rows/call cpu", []).append(total / r10k.cpu)
    finally:
        for c in children.values():
            c.close()
    print(f"\nbefore ({base}) -> after ({ROOT}), {repeats} interleaved pairs, median [min - max]")
    for key in sorted(out):
        values = out[key]
        digits = 3 if "/raw" in key else 0
        print(f"  {key:<34} {statistics.median(values):>12,.{digits}f}  [{min(values):,.{digits}f} - "
              f"{max(values):,.{digits}f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one batch run (main thread)")
    parser.add_argument("--compare", metavar="TREE", help="another checkout (e.g. `git archive` of main) to run "
                                                          "interleaved against this one, before -> after")
    parser.add_argument("--serve", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    path, folder = model_path(), data_folder()
    if args.serve:
        serve(path, folder)
        return
    model = load_model(ModelSettings(path=path, backend="lleaves", cache_dir=f"{BENCH}/cache"))
    assert model.backend == "lleaves", "lleaves unavailable"
    print(f"model threads (lleaves n_jobs) {model.threads}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    mats = matrices(folder, model)
    total = sum(len(m) for m in mats)
    if args.compare:
        compare(model, mats, args.compare, args.repeats)
        return
    batch(path, folder)  # warm: compiled model cached, files in the page cache
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        r10k, rgroup = raw(model, mats, 10_000), raw(model, mats, None)
        b, seconds = batch(path, folder)
        for key, c in (("raw 10000 rows/call", r10k), ("raw one call per row group", rgroup),
                       ("batch (model load excluded)", b)):
            rows.setdefault(f"{key} wall", []).append(total / c.wall)
            rows.setdefault(f"{key} cpu", []).append(total / c.cpu)
        rows.setdefault("batch report (bench figure)", []).append(total / seconds)
        rows.setdefault("batch report/raw10k wall", []).append(r10k.wall / seconds)
        rows.setdefault("batch/raw10k wall", []).append(r10k.wall / b.wall)
        rows.setdefault("batch/raw10k cpu", []).append(r10k.cpu / b.cpu)
        rows.setdefault("batch cpu/wall", []).append(b.cpu / b.wall)
    print(f"\n{total:,} rows, {len(mats)} row groups, {args.repeats} repeats (median [min - max])")
    for key, values in rows.items():
        digits = 3 if "/" in key else 0
        print(f"  {key:<34} {statistics.median(values):>12,.{digits}f}  [{min(values):,.{digits}f} - "
              f"{max(values):,.{digits}f}]")
    spent, seconds = timed_run(path, folder)
    print(f"\none instrumented batch run: {seconds:.3f} s (report.seconds), main thread's wall time in:")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<44} {s:8.3f} s  {100 * s / seconds:5.1f} %")
    print(f"  {'other':<44} {seconds - sum(spent.values()):8.3f} s")
    best = stages(model, folder, max(2, args.repeats // 2))
    whole = sum(best.values())
    print("\nstages alone, CPU seconds (min over repeats), main thread:")
    for name, s in best.items():
        print(f"  {name:<24} {s:8.3f} s  {100 * s / whole:5.1f} %")
    print(f"  {'sum':<24} {whole:8.3f} s  -> {total / whole:,.0f} rows/s if run one after another")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        batch(path, folder)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

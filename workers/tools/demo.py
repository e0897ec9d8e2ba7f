"""``scoring-worker demo``: everything on embedded defaults, written only under one folder."""

from __future__ import annotations

import os
import time

import click
import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import ConfigError
from workers.runtime.batch import run_batch
from workers.settings import load_settings

N_FEATURES = 20


def make_frame(rows: int, seed: int) -> pd.DataFrame:
    """Generated records: numeric features f0..f19, a categorical 'segment', an id and a passthrough."""
    rng = np.random.default_rng(seed)
    data = {f"f{i}": rng.normal(size=rows) for i in range(N_FEATURES)}
    df = pd.DataFrame(data)
    df["segment"] = pd.Categorical(rng.choice(["web", "store", "phone"], rows), categories=["web", "store", "phone"])
    df.insert(0, "id", [f"rec-{seed}-{i}" for i in range(rows)])
    df["customer"] = rng.integers(0, 10_000, rows)
    return df


def train(df: pd.DataFrame) -> lgb.Booster:
    rng = np.random.default_rng(1)
    logit = df.f0 * 1.5 - df.f1 + 0.5 * df.f2 * df.f3 + (df.segment == "store") * 0.8
    y = (logit + rng.normal(size=len(df)) * 0.5 > 0).astype(int)
    features = [f"f{i}" for i in range(N_FEATURES)] + ["segment"]
    params = {"objective": "binary", "num_leaves": 31, "learning_rate": 0.1, "verbose": -1, "seed": 1}
    return lgb.train(params, lgb.Dataset(df[features], y), num_boost_round=100)


def run_demo(folder: str, rows: int) -> None:
    """Write everything under ``folder`` and print what was scored where, and how fast compared with plain
    LightGBM and pandas doing the same work (each figure says what it includes)."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError("--dir", f"{folder} is a file, not a folder")
    try:
        _run(folder, max(rows, 4))
    except OSError as exc:
        raise ConfigError("--dir", f"cannot write under {folder}: {exc.strerror or exc}") from None


def _run(folder: str, rows: int) -> None:
    inputs, output = os.path.join(folder, "inputs"), os.path.join(folder, "results")
    if os.path.exists(output):
        import shutil

        shutil.rmtree(output)  # a fresh dataset each demo run, so the resume shown below is real
    os.makedirs(inputs, exist_ok=True)
    click.echo(f"demo folder: {folder}")

    booster = train(make_frame(20_000, seed=0))
    model_path = os.path.join(folder, "model.txt")
    booster.save_model(model_path)
    click.echo(f"model:       {model_path} (binary, 100 trees, {booster.num_feature()} features)")

    files = 4
    per_file = max(rows // files, 1)
    clean = [os.path.join(inputs, f"part-{k}.parquet") for k in range(files)]
    for k, path in enumerate(clean):
        table = pa.Table.from_pandas(make_frame(per_file, seed=10 + k), preserve_index=False)
        pq.write_table(table, path, row_group_size=20_000)
    # One file whose f3 column arrived as text, with a few values that are not numbers: those rows
    # go to the errors output with a reason, the rest of the file is scored.
    messy = make_frame(1_000, seed=99)
    text = messy["f3"].map(lambda v: f"{v:.6f}").astype(object)
    text.iloc[[3, 250, 777]] = ["n/a", "", "12,5"]
    messy["f3"] = text
    pq.write_table(pa.Table.from_pandas(messy, preserve_index=False), os.path.join(inputs, "messy.parquet"))
    click.echo(f"inputs:      {inputs} ({files} files x {per_file:,} rows, plus messy.parquet with 3 bad rows)")

    runs = [output, output, f"sqlite:///{os.path.join(folder, 'results.db')}?table=scores"]
    first = None
    for out in runs:
        settings = load_settings({
            "model": {"path": model_path},
            "scoring": {"passthrough": ["customer"]},
            "batch": {"input": inputs, "output": out, "allow_bad_rows": True, "progress": "log"},
        })
        report = run_batch(settings)
        first = first or report
        click.echo(
            f"scored:      {report.rows:,} rows, rejected {report.rejected}, skipped {report.files_skipped} files "
            f"-> {out} in {report.seconds:.2f}s"
        )
        if report.failed:
            raise click.ClickException(f"demo failed: {report.failed}")
    _compare_speed(booster, model_path, clean, inputs, first)
    click.echo(f"errors:      {os.path.join(output, '_errors')}  (id, reason, raw values)")
    click.echo("the second run into the same dataset skipped every finished input: that is how a rerun resumes")


def _compare_speed(booster: lgb.Booster, model_path: str, clean: list[str], inputs: str, batch_report) -> None:
    """Like against like, LightGBM predicting on one thread in each: scoring data already in memory, then the
    whole job from Parquet files to Parquet results. The batch figure is the first run above (not the resumed one)."""
    from workers.scoring.build import build_router

    features = booster.feature_name()
    table = pq.read_table(clean[0]).slice(0, 100_000)
    frame = table.to_pandas()
    router = build_router(load_settings({"model": {"path": model_path}, "scoring": {"passthrough": ["customer"]}}))
    ours = _rate(len(frame), lambda: router.score_table(table))
    plain = _rate(len(frame), lambda: booster.predict(frame[features], num_threads=1))
    click.echo(f"in memory, {len(frame):,} rows already read, predict on 1 thread:")
    click.echo(f"  Router.score_table on the Arrow table:{ours:>10,.0f} rows/s  (features checked and converted, "
               f"predict, the result table with ids and passthrough)")
    click.echo(f"  Booster.predict on the pandas frame:  {plain:>10,.0f} rows/s  (predict only)")

    baseline_dir = os.path.join(os.path.dirname(inputs), "baseline")
    os.makedirs(baseline_dir, exist_ok=True)
    n = sum(pq.ParquetFile(p).metadata.num_rows for p in clean)

    def pandas_job() -> None:
        for path in clean:
            df = pd.read_parquet(path)
            out = pd.DataFrame({"id": df["id"], "score": booster.predict(df[features], num_threads=1),
                                "customer": df["customer"]})
            out.to_parquet(os.path.join(baseline_dir, os.path.basename(path)), index=False)

    job = _rate(n, pandas_job)
    click.echo(f"end to end, Parquet in and out, predict on 1 thread ({len(clean) + 1} files, "
               f"{batch_report.rows:,} rows):")
    click.echo(f"  scoring-worker batch:                 {batch_report.rows_per_s:>10,.0f} rows/s  (the first run: "
               f"read ahead on a thread, check, score, write results and errors atomically, the resume ledger)")
    click.echo(f"  pandas read + predict + to_parquet:   {job:>10,.0f} rows/s  (the {len(clean)} clean files only: "
               f"no bad-row handling, no resume, no atomic writes)")


def _rate(rows: int, fn) -> float:
    """Rows per second of the faster of two runs of ``fn`` (the first also warms caches)."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return rows / best if best > 0 else 0.0

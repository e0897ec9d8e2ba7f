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
    folder = os.path.abspath(folder)
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
    for k in range(files):
        table = pa.Table.from_pandas(make_frame(per_file, seed=10 + k), preserve_index=False)
        pq.write_table(table, os.path.join(inputs, f"part-{k}.parquet"), row_group_size=20_000)
    # One file whose f3 column arrived as text, with a few values that are not numbers: those rows
    # go to the errors output with a reason, the rest of the file is scored.
    messy = make_frame(1_000, seed=99)
    text = messy["f3"].map(lambda v: f"{v:.6f}").astype(object)
    text.iloc[[3, 250, 777]] = ["n/a", "", "12,5"]
    messy["f3"] = text
    pq.write_table(pa.Table.from_pandas(messy, preserve_index=False), os.path.join(inputs, "messy.parquet"))
    click.echo(f"inputs:      {inputs} ({files} files x {per_file:,} rows, plus messy.parquet with 3 bad rows)")

    runs = [output, output, f"sqlite:///{os.path.join(folder, 'results.db')}?table=scores"]
    for out in runs:
        settings = load_settings({
            "model": {"path": model_path},
            "scoring": {"passthrough": ["customer"]},
            "batch": {"input": inputs, "output": out, "allow_bad_rows": True, "progress": "log"},
        })
        report = run_batch(settings)
        click.echo(
            f"scored:      {report.rows:,} rows, rejected {report.rejected}, skipped {report.files_skipped} files "
            f"-> {out} in {report.seconds:.2f}s ({report.rows_per_s:,.0f} rows/s)"
        )
        if report.failed:
            raise click.ClickException(f"demo failed: {report.failed}")

    sample = pq.read_table(os.path.join(inputs, "part-0.parquet")).slice(0, 100_000).to_pandas()
    features = booster.feature_name()
    started = time.perf_counter()
    booster.predict(sample[features], num_threads=1)
    raw = len(sample) / (time.perf_counter() - started)
    click.echo(f"reference:   Booster.predict on a pandas frame, 1 thread: {raw:,.0f} rows/s")
    click.echo(f"errors:      {os.path.join(output, '_errors')}  (id, reason, raw values)")
    click.echo("the second run into the same dataset skipped every finished input: that is how a rerun resumes")

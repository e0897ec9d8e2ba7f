"""Batch units: a large file cut into row-group ranges, planned alike on every pod, spread over an Indexed Job's
shards, resumed mid-file, and never doubled when the cut changes (#19 part 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.helpers import FEATURES, frame, write_inputs
from workers.settings import S3Settings
from workers.sources.parquet import find_inputs
from workers.sources.units import file_units, plan, split_range


def cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def big_file(folder: str, rows: int = 40_000, row_group: int = 2_500, seed: int = 500, name: str = "big") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.parquet")
    pq.write_table(pa.Table.from_pandas(frame(rows, seed=seed), preserve_index=False), path,
                   row_group_size=row_group)
    return path


def unit_bytes_for(path: str, groups_per_unit: int) -> int:
    """A unit size that cuts ``path`` into ranges of about ``groups_per_unit`` row groups."""
    meta = pq.read_metadata(path)
    sizes = [sum(meta.row_group(i).column(c).total_compressed_size for c in range(meta.num_columns))
             for i in range(meta.num_row_groups)]
    return int(np.mean(sizes) * groups_per_unit) - 1


def results(out: str) -> pd.DataFrame:
    return ds.dataset(out, format="parquet").to_table().to_pandas()


def expected(model: str, path: str) -> pd.Series:
    df = pq.read_table(path).to_pandas()
    return pd.Series(lgb.Booster(model_file=model).predict(df[FEATURES]), index=df["id"])


def test_the_cut_depends_on_the_file_alone_and_ranges_cover_every_row_group_once(tmp_path):
    path = big_file(str(tmp_path / "in"), rows=40_000, row_group=2_500)  # 16 row groups
    size = unit_bytes_for(path, 3)
    listing = find_inputs(str(tmp_path / "in"), S3Settings())
    units = file_units(listing.fs, listing.files[0], size)
    assert len(units) > 1
    covered = [g for u in units for g in u.row_groups]
    assert covered == list(range(16))
    assert [u.first_row for u in units] == [u.first * 2_500 for u in units]
    assert all(split_range(u.name)[1:] == (u.first, u.last, 16) for u in units)
    # Small files, a single row group, or splitting off: the file is the unit, named as before.
    assert [u.name for u in file_units(listing.fs, listing.files[0], 0)] == [listing.files[0].source]
    assert [u.name for u in file_units(listing.fs, listing.files[0], 10**12)] == [listing.files[0].source]
    # More shards or more files around it do not move the cut.
    write_inputs(str(tmp_path / "in"), files=5, rows=100)
    listing = find_inputs(str(tmp_path / "in"), S3Settings())
    for shards in (1, 3, 8):
        planned = plan(listing.fs, listing.files, size, shards)
        names = [u.name for s in planned for u in s]
        assert len(names) == len(set(names)) == len(units) + 5
        assert {u.name for u in units} <= set(names)


def test_ten_files_over_eight_shards_are_balanced_by_bytes(tmp_path):
    """Whole-file shards left pods idle or doubled; units of a few row groups balance within one unit."""
    folder = str(tmp_path / "in")
    for k in range(10):
        big_file(folder, rows=20_000, row_group=2_000, seed=600 + k, name=f"day-{k}")
    listing = find_inputs(folder, S3Settings())
    size = unit_bytes_for(os.path.join(folder, "day-0.parquet"), 2)
    planned = plan(listing.fs, listing.files, size, 8)
    loads = [sum(u.size for u in s) for s in planned]
    biggest = max(u.size for s in planned for u in s)
    assert min(loads) > 0 and max(loads) - min(loads) <= biggest
    whole = plan(listing.fs, listing.files, 0, 8)  # whole files: two pods get two files, six get one
    assert sorted(len(s) for s in whole) == [1] * 6 + [2] * 2


def test_one_big_file_over_four_pods_scores_every_row_once(models, tmp_path):
    path = big_file(str(tmp_path / "in"))
    out, size = str(tmp_path / "out"), str(unit_bytes_for(path, 3))
    units_seen = 0
    for index in range(4):
        proc = cli("--model", models["binary"], "--input", str(tmp_path / "in"), "--output", out,
                   "--shard-count", "4", "--unit-bytes", size, env={"JOB_COMPLETION_INDEX": str(index)})
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["files_in_shard"] == 1 and summary["units_in_shard"] >= 1  # every pod has a part of it
        units_seen += summary["units_in_shard"]
    got = results(out).set_index("id")
    want = expected(models["binary"], path)
    assert len(got) == len(want) == 40_000 and got.index.is_unique
    assert np.allclose(got.loc[want.index, "score"], want, rtol=0, atol=1e-12)
    parts = sorted(n for n in os.listdir(os.path.dirname(os.path.join(out, os.path.realpath(path)[1:])))
                   if n.endswith(".parquet"))
    assert len(parts) == units_seen and all(".row-groups-" in n for n in parts)
    # A rerun of any pod finds its units finished.
    again = cli("--model", models["binary"], "--input", str(tmp_path / "in"), "--output", out,
                "--shard-count", "4", "--unit-bytes", size, env={"JOB_COMPLETION_INDEX": "2"})
    summary = json.loads(again.stdout)
    assert again.returncode == 0 and summary["files_scored"] == 0 and summary["files_skipped"] >= 1


def test_a_killed_pod_is_resumed_mid_file_by_its_replacement(models, tmp_path, pg_dsn, pg_table):
    """SIGKILL while a pod scores its ranges; the replacement (same index) scores what is not finished, and
    PostgreSQL holds each row once, counted against the ledger."""
    import psycopg

    path = big_file(str(tmp_path / "in"), rows=200_000, row_group=5_000)
    size = str(unit_bytes_for(path, 2))
    args = ["--model", models["binary"], "--input", str(tmp_path / "in"), "--output",
            f"{pg_dsn}?table={pg_table}", "--shard-count", "2", "--unit-bytes", size, "--batch-rows", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "workers", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JOB_COMPLETION_INDEX": "0"})
    deadline = time.monotonic() + 60
    finished = 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                finished = conn.execute(f'SELECT count(*) FROM "{pg_table}_inputs"').fetchone()[0]
            except psycopg.errors.UndefinedTable:
                finished = 0
            if finished >= 2:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail(f"the pod finished before it could be killed: {proc.stderr.read()[-500:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for index in ("0", "1"):
            run = cli(*args, env={"JOB_COMPLETION_INDEX": index})
            assert run.returncode == 0, run.stderr
            if index == "0":
                assert json.loads(run.stdout)["files_skipped"] >= finished  # resumed, not redone
        rows = conn.execute(f'SELECT id, score FROM "{pg_table}"').fetchall()
        units = conn.execute(f'SELECT unit, rows FROM "{pg_table}_inputs"').fetchall()
    got = pd.Series({r[0]: r[1] for r in rows})
    want = expected(models["binary"], path)
    assert len(rows) == len(got) == 200_000
    assert np.allclose(got.loc[want.index], want, rtol=0, atol=1e-12)
    assert sum(r for _, r in units) == 200_000 and all("#row-groups=" in u for u, _ in units)


def test_a_changed_cut_or_a_replaced_file_never_doubles_rows_in_a_parquet_output(models, tmp_path):
    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    path = big_file(folder, rows=40_000, row_group=2_500)
    base = ["--model", models["binary"], "--input", folder, "--output", out]
    # Whole, then cut in 3s, then cut in 5s, then whole again: each time every row exactly once.
    for size in ("0", str(unit_bytes_for(path, 3)), str(unit_bytes_for(path, 5)), "0"):
        run = cli(*base, "--unit-bytes", size)
        assert run.returncode == 0, run.stderr
        got = results(out)
        assert len(got) == 40_000 and got["id"].is_unique, (size, len(got))
    # Scored whole already: a run that now cuts the file skips it (the upgrade path: no rescoring).
    run = cli(*base, "--unit-bytes", str(unit_bytes_for(path, 4)))
    assert json.loads(run.stdout)["files_scored"] == 0
    # The file replaced by a shorter one with other row groups: the old ranges go, the new rows are there.
    run = cli(*base, "--unit-bytes", str(unit_bytes_for(path, 3)))
    big_file(folder, rows=30_000, row_group=3_000, seed=501)
    run = cli(*base, "--unit-bytes", str(unit_bytes_for(path, 3)))
    assert run.returncode == 0, run.stderr
    got = results(out).set_index("id")
    want = expected(models["binary"], path)
    assert len(got) == 30_000 and got.index.is_unique
    assert np.allclose(got.loc[want.index, "score"], want, rtol=0, atol=1e-12)


def test_rejected_rows_of_a_range_are_named_by_their_row_in_the_file(models, tmp_path):
    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    df = frame(20_000, seed=9)
    df["x3"] = df["x3"].astype(object)
    df.loc[17_500, "x3"] = "not a number"
    df["x3"] = df["x3"].astype(str)
    os.makedirs(folder)
    path = os.path.join(folder, "mixed.parquet")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=2_500)
    run = cli("--model", models["binary"], "--input", folder, "--output", out, "--allow-bad-rows",
              "--unit-bytes", str(unit_bytes_for(path, 2)))
    assert run.returncode == 0, run.stderr
    errors = ds.dataset(os.path.join(out, "_errors"), format="parquet").to_table().to_pandas()
    assert len(errors) == 1 and errors["source"].iloc[0].endswith("mixed.parquet#17500")


def test_a_partial_run_cut_otherwise_then_a_rerun_keeps_every_row(models, tmp_path):
    """Found by a break-it review: a run cut in 3s, then one shard of a run cut in 5s (a run with another
    SCORING_BATCH__UNIT_BYTES killed part-way), then a rerun cut in 3s exited 0 with rows missing for good: the
    5s deleted overlapping 3s results whose ledger entries still said done. Removed results take their ledger
    entries with them, so the rerun scores those ranges again."""
    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    path = big_file(folder, rows=40_000, row_group=1_000)
    base = ["--model", models["binary"], "--input", folder, "--output", out]
    threes, fives = str(unit_bytes_for(path, 3)), str(unit_bytes_for(path, 5))
    assert cli(*base, "--unit-bytes", threes).returncode == 0
    part = cli(*base, "--unit-bytes", fives, "--shard-count", "4", "--shard-index", "0")
    assert part.returncode == 0, part.stderr
    rerun = cli(*base, "--unit-bytes", threes)
    assert rerun.returncode == 0, rerun.stderr
    got = results(out).set_index("id")
    want = expected(models["binary"], path)
    assert len(got) == 40_000 and got.index.is_unique
    assert np.allclose(got.loc[want.index, "score"], want, rtol=0, atol=1e-12)


def test_two_runs_cut_otherwise_at_once_never_both_report_done_with_rows_missing(tmp_path):
    """Two runs into one output at the same time, cut in 3s and in 4s: each publish removes the other cut's
    overlapping results (and their ledger entries). That once left both runs exiting 0 with rows missing until
    some rerun; a unit whose record is gone by the end of its run now fails it, naming the setting, so the Job
    retries, and a rerun with one cut restores every row exactly once. Both start together; a 3,000-tree model
    keeps each scoring for several seconds, so their publishes interleave."""
    from tests import helpers

    model = helpers.save(helpers.train("binary", rounds=3000), str(tmp_path), "slow")
    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    path = big_file(folder, rows=60_000, row_group=1_000)
    base = [sys.executable, "-m", "workers", "batch", "--model", model, "--input", folder, "--output", out]

    def run(groups: int) -> subprocess.Popen:
        return subprocess.Popen([*base, "--unit-bytes", str(unit_bytes_for(path, groups))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    first, second = run(3), run(4)
    done = [(p.wait(180), p.stderr.read()) for p in (first, second)]
    assert first.returncode is not None and second.returncode is not None
    got = results(out)
    if all(code == 0 for code, _ in done):
        assert len(got) == 60_000 and got["id"].is_unique, "both runs reported done with rows missing or doubled"
    else:
        failed = [err for code, err in done if code != 0]
        assert all("cut with another SCORING_BATCH__UNIT_BYTES" in err for err in failed), failed
    rerun = cli("--model", model, "--input", folder, "--output", out, "--unit-bytes", str(unit_bytes_for(path, 3)))
    assert rerun.returncode == 0, rerun.stderr
    got = results(out).set_index("id")
    want = expected(model, path)
    assert len(got) == 60_000 and got.index.is_unique
    assert np.allclose(got.loc[want.index, "score"], want, rtol=0, atol=1e-12)


def test_two_runs_with_other_models_at_once_both_succeed_and_every_row_is_there_once(tmp_path):
    """Two runs into one output at the same time with one cut but different models: each unit's results are
    one run's or the other's (every row once, scored by one of the two models). Found by a break-it review:
    the end-of-run check took the other run's record for a removal and failed the first run, blaming
    SCORING_BATCH__UNIT_BYTES (a Job retry would only have replaced the other run's results back)."""
    from tests import helpers

    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    models = [helpers.save(helpers.train("binary", rounds=3000, seed=seed), str(tmp_path), f"m{seed}")
              for seed in (1, 7)]
    path = big_file(folder, rows=40_000, row_group=1_000)
    unit_bytes = str(unit_bytes_for(path, 3))
    runs = [subprocess.Popen([sys.executable, "-m", "workers", "batch", "--model", m, "--input", folder,
                              "--output", out, "--unit-bytes", unit_bytes],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for m in models]
    done = [(p.wait(180), p.stderr.read()) for p in runs]
    assert [code for code, _ in done] == [0, 0], [err[-2000:] for _, err in done]
    got = results(out).set_index("id")
    assert len(got) == 40_000 and got.index.is_unique
    a, b = (expected(m, path) for m in models)
    score = got.loc[a.index, "score"]
    assert (np.isclose(score, a, rtol=0, atol=1e-12) | np.isclose(score, b, rtol=0, atol=1e-12)).all()


def _stored_ids(kind: str, tmp_path, pg_dsn: str | None, table: str) -> pd.DataFrame:
    """``id`` and ``score`` as the store's own client reads them back."""
    if kind == "delta":
        from deltalake import DeltaTable

        return DeltaTable(str(tmp_path / "out")).to_pyarrow_table(columns=["id", "score"]).to_pandas()
    if kind == "iceberg":
        from pyiceberg.catalog.sql import SqlCatalog

        cat = SqlCatalog("lake", uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"file://{tmp_path}/wh")
        try:
            return cat.load_table("ns.scores").scan(selected_fields=("id", "score")).to_arrow().to_pandas()
        finally:
            cat.engine.dispose()
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        return pd.DataFrame(conn.execute(f'SELECT id, score FROM "{table}"').fetchall(), columns=["id", "score"])


@pytest.mark.parametrize("kind", ["delta", "iceberg", "postgres"])
def test_two_runs_cut_otherwise_at_once_into_a_table_lose_nothing(kind, tmp_path, request):
    """The table sinks upsert on the row's key, so two runs cut in 3s and in 4s at the same time (their unit
    names differ, their keys do not) both succeed and leave every row once with predict's score; a rerun with
    either cut finds every unit done."""
    from tests import helpers

    pg_dsn = table = None
    env = dict(os.environ)
    if kind == "delta":
        output = f"delta+file://{tmp_path}/out"
    elif kind == "iceberg":
        output = "iceberg://lake/ns.scores"
        env |= {"SCORING_ICEBERG__CATALOG_URI": f"sqlite:///{tmp_path}/catalog.db",
                "SCORING_ICEBERG__WAREHOUSE": f"file://{tmp_path}/wh"}
    else:
        pg_dsn, table = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_table")
        output = f"{pg_dsn}?table={table}"
    model = helpers.save(helpers.train("binary", rounds=2000), str(tmp_path), "slow")
    folder = str(tmp_path / "in")
    path = big_file(folder, rows=40_000, row_group=1_000)
    base = [sys.executable, "-m", "workers", "batch", "--model", model, "--input", folder, "--output", output]
    runs = [subprocess.Popen([*base, "--unit-bytes", str(unit_bytes_for(path, groups))], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for groups in (3, 4)]
    done = [(p.wait(180), p.stderr.read()) for p in runs]
    assert [code for code, _ in done] == [0, 0], [err[-2000:] for _, err in done]
    got = _stored_ids(kind, tmp_path, pg_dsn, table).set_index("id")
    want = expected(model, path)
    assert len(got) == 40_000 and got.index.is_unique
    assert np.allclose(got.loc[want.index, "score"], want, rtol=0, atol=1e-12)
    for groups in (3, 4):
        rerun = subprocess.run([*base, "--unit-bytes", str(unit_bytes_for(path, groups))], env=env,
                               capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert json.loads(rerun.stdout)["files_scored"] == 0

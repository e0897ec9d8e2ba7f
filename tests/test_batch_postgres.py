"""Batch mode into the real PostgreSQL server."""

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
import psycopg
import pytest

from tests.helpers import frame, write_inputs
from tests.test_batch import cli

pytestmark = pytest.mark.postgres


def uri(dsn: str, table: str) -> str:
    return f"{dsn}?table={table}"


def test_folder_to_postgres_with_correct_scores_and_no_duplicates_on_rerun(models, pg_dsn, pg_table, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=3, rows=2000)
    messy = tmp_path / "in" / "messy.parquet"
    df = frame(10, seed=42)
    df["x2"] = df["x2"].map(str).astype(object)
    df.loc[4, "x2"] = "bad"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), messy)
    args = ["batch", "--model", models["multiclass"], "--input", inputs, "--output", uri(pg_dsn, pg_table),
            "--passthrough", "x0", "--allow-bad-rows"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["rows_scored"] == 6009
    # Rerun after forgetting the ledger: every row is written again, and upserts keep one copy.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DELETE FROM "{pg_table}_inputs"')
    second = cli(*args)
    assert second.returncode == 0 and json.loads(second.stdout)["files_scored"] == 4
    booster = lgb.Booster(model_file=models["multiclass"])
    expected_df = pd.concat([frame(2000, seed=100 + k) for k in range(3)])
    expected = booster.predict(expected_df[booster.feature_name()])
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f'SELECT count(*), count(DISTINCT id) FROM "{pg_table}"').fetchone() == (6009, 6009)
        rows = conn.execute(f'SELECT id, score, label, scores, x0, model_version, scored_at FROM "{pg_table}"').fetchall()
        errors = conn.execute(f'SELECT id, reason, source, raw FROM "{pg_table}_errors"').fetchall()
        types = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                  "WHERE table_name = %s", (pg_table,)).fetchall())
    got = {r[0]: r for r in rows}
    for i, rid in enumerate(expected_df["id"]):
        _, score, label, scores, x0, version, scored_at = got[rid]
        assert abs(score - expected[i].max()) <= 1e-9 and label == expected[i].argmax()
        assert np.max(np.abs(np.array(scores) - expected[i])) <= 1e-9
        assert x0 == expected_df["x0"].iloc[i]
        assert version.startswith("multiclass-") and scored_at.tzinfo is not None
    assert types["scores"] == "ARRAY" and types["scored_at"] == "timestamp with time zone"
    # the source names the file (relative or absolute, as the batch runtime spells the unit) and the row
    assert errors == [("r42-4", "feature 'x2': 'bad' is not a number", errors[0][2], errors[0][3])]
    assert errors[0][2].endswith("messy.parquet#4")
    assert errors[0][3]["x2"] == "bad"


def test_sigkill_then_rerun_into_postgres_keeps_each_row_once(models, pg_dsn, pg_table, tmp_path):
    inputs = str(tmp_path / "in")
    files, rows = 10, 20000
    write_inputs(inputs, files=files, rows=rows, row_group=2000)
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
            "--output", uri(pg_dsn, pg_table), "--batch-rows", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    stored = 0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while time.monotonic() < deadline and stored < 50_000:
            try:
                stored = conn.execute(f'SELECT count(*) FROM "{pg_table}"').fetchone()[0]
            except psycopg.errors.UndefinedTable:
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = conn.execute(f'SELECT count(*) FROM "{pg_table}"').fetchone()[0]
    assert 50_000 <= before < files * rows, "the kill must land partway through the run"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, env=os.environ)
    assert rerun.returncode == 0, rerun.stderr
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f'SELECT count(*), count(DISTINCT id) FROM "{pg_table}"').fetchone() == (
            files * rows, files * rows)


def test_unreachable_postgres_is_a_clear_failure(models, tmp_path):
    from tests.conftest import free_port

    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=10)
    proc = cli("batch", "--model", models["binary"], "--input", inputs,
               "--output", f"postgresql://nobody:secret@127.0.0.1:{free_port()}/x?table=t")
    assert proc.returncode == 1
    assert "cannot connect" in proc.stderr and "secret" not in proc.stderr and "Traceback" not in proc.stderr

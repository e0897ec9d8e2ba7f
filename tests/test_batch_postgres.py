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


# -- issue #14: the table sinks' guarantees ---------------------------------------------------------
def _table_uri(kind: str, pg_dsn: str, pg_table: str, tmp_path) -> tuple[str, callable]:
    """(output URI, query(sql) -> rows) for the table sink ``kind``; ``{t}`` in sql names the table."""
    import sqlite3

    if kind == "sqlite":
        db = tmp_path / "out.db"
        return f"sqlite:///{db}?table={pg_table}", lambda q: sqlite3.connect(db).execute(
            q.replace("{t}", pg_table)).fetchall()

    def query(q):
        with psycopg.connect(pg_dsn) as conn:
            return conn.execute(q.replace("{t}", pg_table)).fetchall()

    return uri(pg_dsn, pg_table), query


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_duplicate_ids_in_one_file_keep_the_later_row_every_time(kind, models, pg_dsn, pg_table, tmp_path):
    """Case 8: among rows with the same id in one file the later one is stored (PostgreSQL kept an arbitrary
    one: DISTINCT ON without a tiebreak), in every batch, and the sink counts what it collapsed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, query = _table_uri(kind, pg_dsn, pg_table, tmp_path)
    (tmp_path / "in").mkdir()
    df = frame(1000, seed=7)
    df["id"] = [f"r{i % 600}" for i in range(1000)]  # rows 600..999 repeat the ids of rows 0..399
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in" / "dups.parquet",
                   row_group_size=250)
    proc = cli("batch", "--model", models["binary"], "--input", str(tmp_path / "in"), "--output", out,
               "--batch-rows", "1000")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["duplicates_collapsed"] == 400  # the summary reports what was collapsed
    booster = lgb.Booster(model_file=models["binary"])
    predicted = booster.predict(df[booster.feature_name()])
    later = {rid: predicted[i] for i, rid in enumerate(df["id"])}  # the last assignment wins
    stored = dict(query('SELECT id, score FROM "{t}"'))
    assert len(stored) == 600
    assert max(abs(stored[k] - later[k]) for k in later) <= 1e-9

    from workers.scoring.scorer import Scored
    from workers.settings import S3Settings
    from workers.sinks import open_sink

    sink = open_sink(out, S3Settings(), setting="SCORING_BATCH__OUTPUT")
    table = pa.table({"id": df["id"].tolist(), "model_version": ["v2"] * 1000, "score": predicted})
    writer = sink.begin("dups.parquet")
    writer.write(Scored(table, pa.table({})))
    writer.commit()
    sink.close()
    assert sink.duplicates_collapsed == 400


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_rewritten_input_replaces_its_old_results_and_errors(kind, models, pg_dsn, pg_table, tmp_path):
    """Case 10 (tables): a row fixed and rescored leaves NAME_errors; an emptied input leaves no results;
    another input's rows are untouched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, query = _table_uri(kind, pg_dsn, pg_table, tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    a = frame(20, seed=1)
    a["x2"] = a["x2"].map(str).astype(object)
    a.loc[3, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2), preserve_index=False), folder / "b.parquet")
    pq.write_table(pa.Table.from_pandas(frame(5, seed=3), preserve_index=False), folder / "c.parquet")
    args = ["batch", "--model", models["binary"], "--input", str(folder), "--output", out, "--allow-bad-rows"]
    assert cli(*args).returncode == 0
    assert query('SELECT id FROM "{t}_errors"') == [("r1-3",)]
    assert query('SELECT count(*) FROM "{t}"') == [(34,)]
    a.loc[3, "x2"] = "0.5"  # fixed
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2).iloc[:0], preserve_index=False), folder / "b.parquet")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert query('SELECT count(*) FROM "{t}_errors"') == [(0,)]
    ids = {r[0] for r in query('SELECT id FROM "{t}"')}
    assert ids == {f"r1-{i}" for i in range(20)} | {f"r3-{i}" for i in range(5)}


def test_shards_creating_the_tables_at_once_all_succeed(pg_dsn):
    """Case 15: 8 sinks creating the same new tables at the same moment (CREATE TABLE IF NOT EXISTS races
    on the catalog without the advisory lock), five times over."""
    import threading
    import uuid as _uuid

    import pyarrow as pa

    from workers.scoring.scorer import Scored
    from workers.sinks.postgres import PostgresSink

    for _ in range(5):
        name = f"t_race_{_uuid.uuid4().hex[:8]}"
        barrier = threading.Barrier(8, timeout=60)
        failures: list[BaseException] = []

        def shard(k: int, name=name, barrier=barrier, failures=failures) -> None:
            sink = PostgresSink(uri(pg_dsn, name), "SCORING_BATCH__OUTPUT")
            try:
                sink.check()
                table = pa.table({"id": [f"s{k}-{i}" for i in range(50)], "model_version": ["v"] * 50,
                                  "score": [0.5] * 50, f"extra{k % 3}": [k] * 50})
                errors = pa.table({"id": [f"s{k}"], "reason": ["bad"], "raw": ["{}"], "model_version": ["v"],
                                   "source": [f"f{k}#0"]})
                barrier.wait()
                writer = sink.begin(f"f{k}")
                writer.write(Scored(table, errors))
                writer.commit()
                barrier.wait()
                sink.ledger().done(f"f{k}")  # the ledger table too
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(exc)
                barrier.abort()  # the others must not wait for this one
            finally:
                sink.close()

        threads = [threading.Thread(target=shard, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        try:
            assert not failures, failures
            with psycopg.connect(pg_dsn) as conn:
                assert conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] == 400
                assert conn.execute(f'SELECT count(*) FROM "{name}_errors"').fetchone()[0] == 8
        finally:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                for suffix in ("", "_errors", "_inputs"):
                    conn.execute(f'DROP TABLE IF EXISTS "{name}{suffix}"')


def test_a_write_to_a_locked_table_fails_within_the_lock_timeout(pg_dsn, pg_table):
    """Case 17 (sink part): a table locked by someone else gives a retryable SinkError after lock_timeout
    instead of a write that hangs forever; the next write after the lock is released succeeds."""
    import pyarrow as pa

    from workers.errors import SinkError
    from workers.scoring.scorer import Scored
    from workers.sinks.postgres import PostgresSink

    sink = PostgresSink(uri(pg_dsn, pg_table), "SCORING_STREAM__SINK", lock_timeout_s=1.0)
    table = pa.table({"id": ["a"], "model_version": ["v"], "score": [0.5]})
    sink.write_batch(Scored(table, pa.table({})))
    holder = psycopg.connect(pg_dsn)
    holder.execute(f'LOCK TABLE "{pg_table}" IN ACCESS EXCLUSIVE MODE')
    started = time.monotonic()
    with pytest.raises(SinkError, match="lock timeout"):
        sink.write_batch(Scored(table, pa.table({})))
    assert time.monotonic() - started < 5
    holder.rollback()
    holder.close()
    sink.write_batch(Scored(table, pa.table({})))
    sink.close()


def test_long_table_names_fit_or_are_refused_with_one_line(models, pg_dsn, tmp_path):
    """Case 22: a name whose NAME_errors would pass PostgreSQL's 63 bytes is refused at start-up (exit 2);
    names up to that length work, with rejected rows (staging tables have short hashed names), and two long
    names sharing a prefix do not collide."""
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=10)
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = frame(5, seed=9)
    df["x2"] = df["x2"].map(str).astype(object)
    df.loc[1, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in" / "messy.parquet")
    too_long = "t" * 57
    proc = cli("batch", "--model", models["binary"], "--input", inputs, "--output", uri(pg_dsn, too_long))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "too long" in lines[0] and "Traceback" not in proc.stderr
    names = ["p" * 50 + "aaaaaa", "p" * 50 + "bbbbbb"]  # 56 bytes each: NAME_errors is exactly 63
    try:
        for name in names:
            proc = cli("batch", "--model", models["binary"], "--input", inputs, "--output", uri(pg_dsn, name),
                       "--allow-bad-rows")
            assert proc.returncode == 0, proc.stderr
        with psycopg.connect(pg_dsn) as conn:
            for name in names:
                assert conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] == 14
                assert conn.execute(f'SELECT count(*) FROM "{name}_errors"').fetchone()[0] == 1
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for name in names:
                for suffix in ("", "_errors", "_inputs"):
                    conn.execute(f'DROP TABLE IF EXISTS "{name}{suffix}"')


def test_sink_names_never_hold_a_password():
    """Case 21 (sink part): what summaries and logs print as the sink's name."""
    from workers.settings import KafkaSettings, S3Settings
    from workers.sinks import open_sink
    from workers.sinks.shadow import SplitSink

    pg = open_sink("postgresql://u:pw-in-netloc@db:5432/x?table=t&password=pw-in-query&sslpassword=pw3",
                   S3Settings(), setting="SCORING_BATCH__OUTPUT")
    kafka = open_sink("kafka://scores", S3Settings(), setting="SCORING_ROUTING__SHADOW_SINK", kafka=KafkaSettings())
    split = SplitSink(pg, kafka)
    for name in (pg.name, kafka.name, split.name):
        assert "pw-in" not in name and "pw3" not in name, name
    assert "table=t" in pg.name and pg.name.startswith("postgresql://u:***@db:5432/x")
    from workers.errors import ConfigError

    with pytest.raises(ConfigError) as info:  # credentials in a kafka:// URI: refused, and not echoed
        open_sink("kafka://user:sasl-secret@broker:9092/scores", S3Settings(), setting="SCORING_STREAM__SINK",
                  kafka=KafkaSettings())
    assert "sasl-secret" not in str(info.value) and "not a topic name" in str(info.value)
    assert info.value.setting == "SCORING_STREAM__SINK"  # the setting it came from

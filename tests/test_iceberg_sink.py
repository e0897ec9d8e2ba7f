"""The Iceberg sink on real Iceberg tables (pyiceberg) in a SQL catalog on the PostgreSQL here and in SQLite, with
warehouses on local disk and on moto S3 (moto_server fixture): batch end to end with the ledger, a changed input,
four shard processes committing into one table at once (local and S3), a SIGKILL and a rerun, stream crash +
redelivery on ``workers.testing``'s script, the stale-write guard, the type mapping and matrix, a type Iceberg
cannot hold, bad URIs and settings, redaction, compare and report."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
from sqlalchemy.exc import OperationalError

from tests.helpers import frame, write_inputs
from tests.test_delta_sink import _Both, batch_settings, no_errors, stream_rows
from tests.test_stream import FEATURES, records
from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.runtime.batch import run_batch
from workers.scoring.scorer import Scored
from workers.settings import IcebergSettings, S3Settings, load_settings
from workers.sinks import open_sink
from workers.sinks.iceberg import IcebergSink

SECRET_PW = "pg-secret-pw-123"  # PostgreSQL here trusts 127.0.0.1: the password is sent, and never shown


@dataclass
class Catalog:
    """One SQL catalog of the test: its settings, its name in URIs, the env a subprocess needs."""

    settings: IcebergSettings
    name: str
    s3: S3Settings

    def uri(self, table: str = "scores") -> str:
        return f"iceberg://{self.name}/ns.{table}"

    @property
    def env(self) -> dict[str, str]:
        env = {"SCORING_ICEBERG__CATALOG_URI": self.settings.catalog_uri or "",
               "SCORING_ICEBERG__WAREHOUSE": self.settings.warehouse or ""}
        if self.s3.endpoint_url:
            env |= {"SCORING_S3__ENDPOINT_URL": self.s3.endpoint_url, "SCORING_S3__ACCESS_KEY_ID": "test",
                    "SCORING_S3__SECRET_ACCESS_KEY": self.s3.secret_access_key.get_secret_value()}
        return env

    def sink(self, table: str = "scores", setting: str = "SCORING_STREAM__SINK") -> IcebergSink:
        return IcebergSink(self.uri(table), self.s3, self.settings, setting)

    def table(self, table: str = "scores"):
        """The table through pyiceberg's own catalog (not the sink's code)."""
        uri = (self.settings.catalog_uri or "").replace("postgresql://", "postgresql+psycopg://")
        props = {"uri": uri, "warehouse": self.settings.warehouse or ""}
        if self.s3.endpoint_url:
            props |= {"s3.endpoint": self.s3.endpoint_url, "s3.access-key-id": "test",
                      "s3.secret-access-key": "test", "s3.region": "us-east-1"}
        cat = SqlCatalog(self.name, **props)
        try:
            return cat.load_table(f"ns.{table}")
        finally:
            cat.engine.dispose()

    def read(self, table: str = "scores") -> pa.Table:
        return self.table(table).scan().to_arrow()

    def settings_for(self, model: str, inputs: str, table: str = "scores", **batch):
        base = batch_settings(model, inputs, self.uri(table), **batch)
        return base.model_copy(update={"iceberg": self.settings, "s3": self.s3})


@pytest.fixture
def sqlite_cat(tmp_path) -> Catalog:
    return Catalog(IcebergSettings(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=f"file://{tmp_path}/wh"),
                   "lake", S3Settings())


def _pg_catalog(pg_dsn: str, warehouse: str, s3: S3Settings):
    """A catalog of its own name in the test database (its rows removed afterwards), reached with a password."""
    import psycopg

    name = f"c_{uuid.uuid4().hex[:10]}"
    dsn = pg_dsn.replace("postgres@", f"postgres:{SECRET_PW}@", 1)
    yield Catalog(IcebergSettings(catalog_uri=dsn, warehouse=warehouse), name, s3)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("iceberg_tables", "iceberg_namespace_properties"):
            try:
                conn.execute(f"DELETE FROM {table} WHERE catalog_name = %s", (name,))
            except psycopg.errors.UndefinedTable:
                pass


@pytest.fixture
def pg_cat(pg_dsn, tmp_path):
    yield from _pg_catalog(pg_dsn, f"file://{tmp_path}/wh", S3Settings())


@pytest.fixture
def pg_s3_cat(pg_dsn, s3_endpoint, s3_bucket):
    s3 = S3Settings(endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test")
    yield from _pg_catalog(pg_dsn, f"s3://{s3_bucket[0]}/warehouse", s3)


# -- batch --------------------------------------------------------------------------------------------------
def test_batch_scores_equal_predict_rerun_writes_nothing_new_and_the_ledger_resumes(models, tmp_path, sqlite_cat):
    inputs = tmp_path / "in"
    write_inputs(str(inputs), files=3, rows=1500, row_group=500)
    df = frame(10, seed=42)
    df["x2"] = df["x2"].map(str).astype(object)
    df.loc[4, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), inputs / "messy.parquet")
    settings = sqlite_cat.settings_for(models["multiclass"], str(inputs), batch_rows=400)
    report = run_batch(settings)
    assert (report.files_scored, report.rows, report.rejected, report.failed) == (4, 4509, 1, [])
    booster = lgb.Booster(model_file=models["multiclass"])
    expected_df = pd.concat([frame(1500, seed=100 + k) for k in range(3)])
    expected = booster.predict(expected_df[booster.feature_name()])
    rows = {r["id"]: r for r in sqlite_cat.read().to_pylist()}
    assert len(rows) == 4509
    for i, rid in enumerate(expected_df["id"]):
        r = rows[rid]
        assert abs(r["score"] - expected[i].max()) <= 1e-9 and r["label"] == expected[i].argmax()
        assert np.max(np.abs(np.array(r["scores"]) - expected[i])) <= 1e-9
        assert r["x0"] == expected_df["x0"].iloc[i] and r["model_version"].startswith("multiclass-")
        assert r["input_file"].endswith(".parquet")
    table = sqlite_cat.table()
    assert table.schema().identifier_field_names() == {"id", "model_version"}
    errors = sqlite_cat.read("scores_errors").to_pylist()
    assert [(e["id"], e["reason"]) for e in errors] == [("r42-4", "feature 'x2': 'bad' is not a number")]
    assert errors[0]["source"].endswith("messy.parquet#4") and json.loads(errors[0]["raw"])["x2"] == "bad"
    # Every results commit is one snapshot naming its unit: four units, one append each.
    units = [s.summary.get("scoring.unit") for s in table.snapshots()]
    assert len(units) == 4 and len(set(units)) == 4 and all(u.endswith(".parquet") for u in units)
    # Rerun: the ledger skips every input; nothing new is written (no new snapshot).
    snapshot = table.current_snapshot().snapshot_id
    again = run_batch(settings)
    assert (again.files_skipped, again.files_scored, again.rows) == (4, 0, 0)
    assert sqlite_cat.table().current_snapshot().snapshot_id == snapshot
    # An input missing from the ledger (a run killed after the results commit, before mark_done) is the only
    # one written again, and the upsert keeps one copy of each row.
    _forget(sqlite_cat)
    fourth = run_batch(settings)
    assert (fourth.files_scored, fourth.files_skipped, fourth.rows) == (1, 3, 1500)
    ids = sqlite_cat.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4509
    assert sqlite_cat.read("scores_errors").num_rows == 1


def _forget(cat: Catalog, suffix: str = "part-001.parquet") -> None:
    """Delete the ledger entry of one input with pyiceberg itself, as a crash before mark_done leaves it."""
    from pyiceberg.expressions import EqualTo

    ledger = cat.table("scores_inputs")
    unit = next(u for u in ledger.scan().to_arrow().column("unit").to_pylist() if u.endswith(suffix))
    ledger.delete(EqualTo("unit", unit))


def test_a_changed_input_leaves_nothing_stale(models, tmp_path, pg_cat):
    folder = tmp_path / "in"
    folder.mkdir()
    a = frame(20, seed=1)
    a["x2"] = a["x2"].map(str).astype(object)
    a.loc[3, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2), preserve_index=False), folder / "b.parquet")
    pq.write_table(pa.Table.from_pandas(frame(5, seed=3), preserve_index=False), folder / "c.parquet")
    settings = pg_cat.settings_for(models["binary"], str(folder))
    assert run_batch(settings).exit_code == 0
    assert pg_cat.read("scores_errors").column("id").to_pylist() == ["r1-3"]
    assert pg_cat.read().num_rows == 35 - 1
    a.loc[3, "x2"] = "0.5"  # fixed
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2).iloc[:0], preserve_index=False), folder / "b.parquet")
    report = run_batch(settings)
    assert (report.files_scored, report.files_skipped, report.exit_code) == (2, 1, 0)
    assert pg_cat.read("scores_errors").num_rows == 0
    assert set(pg_cat.read().column("id").to_pylist()) == {f"r1-{i}" for i in range(20)} | {f"r3-{i}" for i in
                                                                                             range(5)}


def test_a_replaced_file_cut_otherwise_leaves_no_stale_results_or_errors(models, tmp_path, sqlite_cat):
    """A big file scored in row-group ranges, then replaced by one with fewer rows and another row-group count,
    then by a small one: the dropped rows and the old rejected row go under every cut (the Delta sink's break-it
    scenario, tests/test_breakit_lake.py)."""
    from tests.test_breakit_lake import replace_a_file_cut_otherwise

    inputs = tmp_path / "in"
    inputs.mkdir()
    replace_a_file_cut_otherwise(
        sqlite_cat.settings_for(models["binary"], str(inputs), unit_bytes=30000), inputs,
        lambda: (sorted(sqlite_cat.read().column("id").to_pylist()),
                 sorted(sqlite_cat.read("scores_errors").column("id").to_pylist())))


def test_a_dropped_results_table_is_scored_again_although_its_ledger_table_was_left(models, tmp_path, sqlite_cat):
    """Dropping ``ns.scores`` to start over leaves ``ns.scores_inputs``: the rerun scores every input again
    (the Delta sink's break-it finding, ported), and the ledger works again from there."""
    from pyiceberg.catalog.sql import SqlCatalog

    inputs = tmp_path / "in"
    write_inputs(str(inputs), files=2, rows=30)
    settings = sqlite_cat.settings_for(models["binary"], str(inputs))
    assert run_batch(settings).rows == 60
    cat = SqlCatalog(sqlite_cat.name, uri=sqlite_cat.settings.catalog_uri, warehouse=sqlite_cat.settings.warehouse)
    cat.drop_table("ns.scores")
    cat.engine.dispose()
    again = run_batch(settings)
    assert (again.files_scored, again.files_skipped, again.rows) == (2, 0, 60)
    assert sqlite_cat.read().num_rows == 60
    third = run_batch(settings)
    assert (third.files_scored, third.files_skipped) == (0, 2)


def _four_shards(models, inputs: str, cat: Catalog) -> list[dict]:
    """Four shard processes at once (``JOB_COMPLETION_INDEX`` 0..3), every file cut into row-group units."""
    procs = [subprocess.Popen([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                               inputs, "--output", cat.uri(), "--shard-count", "4", "--unit-bytes", "20000",
                               "--log-level", "INFO"],
                              env={**os.environ, **cat.env, "JOB_COMPLETION_INDEX": str(k)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [r[1][-2000:] for r in results]
    summaries = [json.loads(r[0]) for r in results]
    assert all(s["files_scored"] > 0 for s in summaries)  # every shard had work and committed it
    for s, (out, err) in zip(summaries, results, strict=True):
        s["conflicts"] = err.count("lost to another writer")
        assert SECRET_PW not in out + err
    return summaries


@pytest.mark.postgres
def test_four_shards_at_once_into_one_new_local_table(models, tmp_path, pg_cat):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=4, rows=2000, row_group=500)
    summaries = _four_shards(models, inputs, pg_cat)
    assert sum(s["conflicts"] for s in summaries) > 0  # the shards' commits did race, and were retried
    ids = pg_cat.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8000
    assert pg_cat.read("scores_inputs").num_rows == sum(s["files_scored"] for s in summaries)


@pytest.mark.postgres
@pytest.mark.s3
def test_four_shards_at_once_on_s3_and_the_secrets_are_never_shown(models, tmp_path, pg_s3_cat, s3_bucket):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=4, rows=1000, row_group=250)
    summaries = _four_shards(models, inputs, pg_s3_cat)
    assert sum(s["conflicts"] for s in summaries) > 0
    ids = pg_s3_cat.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4000
    assert pg_s3_cat.read("scores_inputs").num_rows == sum(s["files_scored"] for s in summaries)
    keys = [o["Key"] for o in s3_bucket[1].list_objects_v2(Bucket=s3_bucket[0], Prefix="warehouse/ns/scores/")
            .get("Contents", [])]
    assert any(k.endswith(".parquet") for k in keys) and any(k.endswith(".metadata.json") for k in keys)
    sink = pg_s3_cat.sink()
    assert SECRET_PW not in sink.name + repr(sink.name) and sink.name == pg_s3_cat.uri()
    env = {**os.environ, **pg_s3_cat.env, "SCORING_S3__SECRET_ACCESS_KEY": "s3-secret-xyz",
           "SCORING_BATCH__OUTPUT": pg_s3_cat.uri()}
    shown = subprocess.run([sys.executable, "-m", "workers", "settings", "--env"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "SCORING_ICEBERG__CATALOG_URI=postgresql://postgres:***@127.0.0.1" in shown.stdout
    assert f"SCORING_BATCH__OUTPUT={pg_s3_cat.uri()}" in shown.stdout
    assert SECRET_PW not in shown.stdout + shown.stderr and "s3-secret-xyz" not in shown.stdout + shown.stderr


def test_sigkill_then_rerun_keeps_each_row_once(models, tmp_path, sqlite_cat):
    inputs = str(tmp_path / "in")
    files, rows = 8, 4000
    write_inputs(inputs, files=files, rows=rows, row_group=1000)
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
            "--output", sqlite_cat.uri(), "--unit-bytes", "30000"]
    env = {**os.environ, **sqlite_cat.env}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    stored = 0
    while time.monotonic() < deadline and stored < 8_000:
        with contextlib.suppress(NoSuchTableError, NoSuchNamespaceError, OperationalError):  # not created yet
            stored = sqlite_cat.read().num_rows
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sqlite_cat.read().num_rows
    assert 8_000 <= before < files * rows, "the kill must land partway through the run"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["files_skipped"] >= 1
    ids = sqlite_cat.read().column("id").to_pylist()
    assert len(ids) == len(set(ids)) == files * rows


# -- stream -------------------------------------------------------------------------------------------------
def test_stream_crash_and_redelivery_store_each_result_once_with_the_scores_of_predict(models, sqlite_cat):
    from tests.test_stream_ordering import interleaved, settings_for
    from workers.runtime.stream.worker import StreamWorker
    from workers.testing import Crash, Crashed, CrashInStore, Script

    items = interleaved(120, partitions=3)
    items.insert(40, CrashInStore())
    items.insert(90, Crash())
    script = Script(items)

    def worker() -> StreamWorker:
        return StreamWorker(settings_for(models), source=script.source(), sink=_Both(sqlite_cat.sink(), script),
                            dead_letters=script.dead_letters(), burst=True)

    for _ in range(2):
        with pytest.raises(Crashed):
            worker().run()
    assert worker().run() == 0
    assert script.committed == {tp: len(log) for tp, log in script.logs.items()}
    stored = sqlite_cat.read().to_pylist()
    assert len(stored) == len({r["id"] for r in stored}) == 120
    recs = records(120)
    booster = lgb.Booster(model_file=models["binary"])
    predicted = dict(zip([r["id"] for r in recs], booster.predict(np.array([[r[f] for f in FEATURES]
                                                                            for r in recs])), strict=True))
    assert max(abs(r["score"] - predicted[r["id"]]) for r in stored) <= 1e-9


def test_a_stale_stream_write_never_overwrites_a_newer_result_of_its_partition(pg_cat):
    sink = pg_cat.sink()

    def got() -> dict:
        return {r["id"]: (r["score"], r["partition"], r["offset"]) for r in pg_cat.read().to_pylist()}

    sink.write_batch(stream_rows(("X", 2.0, 0, 2)))
    sink.write_batch(stream_rows(("X", 1.0, 0, 1)))  # the zombie's stale write
    assert got()["X"] == (2.0, 0, 2)
    sink.write_batch(stream_rows(("X", 3.0, 1, 0)))  # another partition (a re-keyed topic): the write wins
    assert got()["X"] == (3.0, 1, 0)
    sink.write_batch(stream_rows(("Y", 1.0, 0, 5), ("Y", 4.0, 0, 7)))  # one batch: the later offset, counted
    assert got()["Y"] == (4.0, 0, 7) and sink.duplicates_collapsed == 1
    sink.write_batch(stream_rows(("Y", 5.0, 0, 8), ("X", 0.5, 1, 0)))  # redelivered X, newer Y: both replace
    assert got() == {"X": (0.5, 1, 0), "Y": (5.0, 0, 8)}
    sink.close()


# -- types --------------------------------------------------------------------------------------------------
def test_values_iceberg_has_no_type_for_are_stored_as_documented(sqlite_cat):
    sink = sqlite_cat.sink()
    u = uuid.UUID(int=0x1234567)
    ts = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    results = pa.table({
        "id": pa.array(["a"]), "model_version": ["v1"], "score": [0.5],
        "i8": pa.array([-5], pa.int8()), "u8": pa.array([255], pa.uint8()),
        "u32": pa.array([2**32 - 1], pa.uint32()), "u64": pa.array([2**64 - 1], pa.uint64()),
        "ts_ns": pa.array([ts.replace(tzinfo=None)], pa.timestamp("ns")),
        "ts_tz": pa.array([ts], pa.timestamp("ms", tz="Europe/Paris")),
        "t": pa.array([dt.time(12, 30, 1)], pa.time32("s")), "d": pa.array([dt.timedelta(seconds=90)],
                                                                        pa.duration("s")),
        "u": pa.ExtensionArray.from_storage(pa.uuid(), pa.array([u.bytes], pa.binary(16))),
        "dec": pa.array([decimal.Decimal("12.345")], pa.decimal128(10, 3)),
        "lst": pa.array([[1, 2]], pa.large_list(pa.uint16())),
        "iv": pa.array([pa.MonthDayNano([1, 2, 3])], pa.month_day_nano_interval()),
        "cat": pa.array(["x"]).dictionary_encode(),
    })
    sink.write_batch(Scored(results, no_errors()))
    table = sqlite_cat.table()
    types = {f.name: str(f.field_type) for f in table.schema().fields}
    assert (types["i8"], types["u8"], types["u32"], types["u64"]) == ("int", "int", "long", "decimal(20, 0)")
    assert (types["ts_ns"], types["ts_tz"], types["t"], types["d"], types["u"]) == (
        "timestamp", "timestamptz", "time", "long", "string")
    row = table.scan().to_arrow().to_pylist()[0]
    assert (row["i8"], row["u8"], row["u32"], row["u64"]) == (-5, 255, 2**32 - 1, decimal.Decimal(2**64 - 1))
    assert row["ts_ns"] == ts.replace(tzinfo=None) and row["ts_tz"] == ts.replace(microsecond=678000)
    assert (row["t"], row["d"], row["u"]) == (dt.time(12, 30, 1), 90, str(u))
    assert row["dec"] == decimal.Decimal("12.345") and row["lst"] == [1, 2] and row["cat"] == "x"
    assert json.loads(row["iv"]) == {"months": 1, "days": 2, "nanoseconds": 3}


def test_a_type_iceberg_cannot_hold_fails_its_file_alone_and_is_dead_lettered_in_stream(models, tmp_path,
                                                                                         sqlite_cat):
    folder = tmp_path / "in"
    folder.mkdir()
    wide = pa.Table.from_pandas(frame(10, seed=5), preserve_index=False)
    wide = wide.append_column("big", pa.array([decimal.Decimal(1)] * 10, pa.decimal256(50, 0)))
    pq.write_table(wide, folder / "wide.parquet")
    good = pa.Table.from_pandas(frame(10, seed=6), preserve_index=False)
    pq.write_table(good.append_column("big", pa.array([decimal.Decimal(2)] * 10, pa.decimal128(38, 0))),
                   folder / "good.parquet")
    settings = sqlite_cat.settings_for(models["binary"], str(folder)).model_copy(
        update={"scoring": load_settings({"scoring": {"passthrough": ["big"]}}).scoring})
    report = run_batch(settings)
    assert report.files_scored == 1 and len(report.failed) == 1
    rel, reason = report.failed[0]
    assert rel.endswith("wide.parquet") and "Iceberg holds decimals of at most 38 digits" in reason, reason
    assert set(sqlite_cat.read().column("id").to_pylist()) == {f"r6-{i}" for i in range(10)}
    # Stream: the records of that write are refused with the reason (the pipeline dead-letters them).
    sink = sqlite_cat.sink("s")
    with pytest.raises(RowsRejected) as err:
        sink.write_batch(Scored(stream_rows(("A", 1.0, 0, 0)).results.append_column(
            "big", pa.array([decimal.Decimal(1)], pa.decimal256(50, 0))), no_errors()))
    assert list(err.value.rows) == [0] and "at most 38 digits" in err.value.rows[0]


def _iceberg_mapping(case: str):
    """What Iceberg reads back for a value the sink was handed (the module docstring of workers/sinks/iceberg.py);
    None: as written; "rejected": the write is refused with the reason."""
    mapping = {
        "uint64": lambda v: None if v is None else decimal.Decimal(v),
        "uuid": lambda v: None if v is None else str(v),
        "duration": lambda v: None if v is None else int(v / dt.timedelta(milliseconds=1)),
        "month_day_nano": lambda v: None if v is None else json.dumps(
            {"months": v.months, "days": v.days, "nanoseconds": v.nanoseconds}, separators=(",", ":")),
        "decimal256": "rejected",  # 45 digits: Iceberg holds at most 38
    }
    return mapping.get(case)


def _matrix_cases():
    from tests.test_type_matrix import CASES

    return sorted(CASES)


@pytest.mark.parametrize("case", _matrix_cases())
def test_passthrough_of_every_type_reads_back_or_is_refused_with_the_reason(case, sqlite_cat):
    from tests.test_type_matrix import CASES, results, same, with_order, written

    t, values, _, _, _ = CASES[case]
    sink = sqlite_cat.sink("t")
    batch = Scored(with_order(results(pa.array(["a", "b", "c"]), p=pa.array(values, t))), no_errors())
    mapping = _iceberg_mapping(case)
    if mapping == "rejected":
        with pytest.raises(RowsRejected) as err:
            sink.write_batch(batch)
        assert set(err.value.rows) == {0, 1, 2} and "at most 38 digits" in err.value.rows[0]
        assert sink._load(sink.location) is None  # nothing of the write stored
        return
    sink.write_batch(batch)
    got = sqlite_cat.read("t").sort_by("offset").column("p").to_pylist()
    want = [v if mapping is None else mapping(v) for v in written(values, t)]
    assert all(same(g, w) for g, w in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("case", _matrix_cases())
def test_id_of_every_type_is_a_key_or_rejected(case, sqlite_cat):
    from tests.test_type_matrix import CASES, results, same, with_order, written

    t, _, id_values, _, _ = CASES[case]
    sink = sqlite_cat.sink("t")
    mapping = _iceberg_mapping(case)
    nested = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or \
        pa.types.is_struct(t) or pa.types.is_map(t)
    if id_values is None or None in id_values or mapping == "rejected" or nested:
        ids = pa.array(id_values or [None] * 3, t)
        with pytest.raises(RowsRejected) as info:
            sink.write_batch(Scored(with_order(results(ids)), no_errors()))
        nulls = {i for i, v in enumerate(ids.to_pylist()) if v is None}
        assert set(info.value.rows) == (nulls or {0, 1, 2})
        if nested and not nulls:
            assert "Iceberg cannot key rows by a nested value" in info.value.rows[0]
        return
    batch = Scored(with_order(results(pa.array(id_values, t))), no_errors())
    sink.write_batch(batch)
    sink.write_batch(batch)  # redelivered: every key replaced, nothing doubles
    got = sqlite_cat.read("t").sort_by("offset").column("id").to_pylist()
    want = [v if mapping is None else mapping(v) for v in written(id_values, t)]
    assert len(got) == 3 and all(same(g, w) for g, w in zip(got, want, strict=True)), (got, want)


def test_a_column_whose_type_changes_is_cast_when_every_value_survives_and_refused_when_not(models, tmp_path,
                                                                                            sqlite_cat):
    sink = sqlite_cat.sink("s")

    def with_p(rid: str, p: pa.Array) -> Scored:
        return Scored(stream_rows((rid, 1.0, 0, 0)).results.append_column("p", p), no_errors())

    sink.write_batch(with_p("a", pa.array([1], pa.int64())))
    sink.write_batch(with_p("b", pa.array([2], pa.int32())))  # narrower: cast, nothing lost
    sink.write_batch(with_p("c", pa.array([3.0])))  # a whole number: cast
    for bad in (pa.array([2.5]), pa.array(["x"])):  # would be truncated or cannot be held: refused, not retried
        with pytest.raises(InputError, match="column 'p' is int64 in iceberg://lake/ns.s"):
            sink.write_batch(with_p("d", bad))
    sink.write_batch(Scored(stream_rows(("e", 1.0, 0, 0)).results.append_column("q", pa.array(["new"])),
                            no_errors()))  # a new column: added to the table's schema in the same commit
    assert sorted((r["id"], r["p"], r["q"]) for r in sqlite_cat.read("s").to_pylist()) == [
        ("a", 1, None), ("b", 2, None), ("c", 3, None), ("e", None, "new")]
    # Batch: the file whose column the table cannot hold fails alone, the others are stored.
    folder = tmp_path / "in"
    folder.mkdir()
    for name, values in (("a", [1, 2]), ("b", [0.5, 1.5])):
        df = frame(5, seed=ord(name))
        df["p"] = values * 2 + values[:1]
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), folder / f"{name}.parquet")
    settings = sqlite_cat.settings_for(models["binary"], str(folder), table="t").model_copy(
        update={"scoring": load_settings({"scoring": {"passthrough": ["p"]}}).scoring})
    report = run_batch(settings)
    assert report.files_scored == 1 and [r.endswith("b.parquet") for r, _ in report.failed] == [True]
    assert "column 'p' is int64" in report.failed[0][1]
    assert sqlite_cat.read("t").num_rows == 5


# -- settings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["iceberg://", "iceberg://cat", "iceberg://cat/table", "iceberg://cat/ns.",
                                 "iceberg://cat/ns.t/x", "iceberg://cat/ns.t-1", "iceberg:///ns.t",
                                 "iceberg://cat/ns.t?x=1"])
def test_a_bad_uri_is_a_config_error_naming_the_setting(uri):
    ice = IcebergSettings(catalog_uri="sqlite:////tmp/x.db", warehouse="file:///tmp/wh")
    with pytest.raises(ConfigError) as err:
        open_sink(uri, S3Settings(), setting="SCORING_BATCH__OUTPUT", iceberg=ice)
    assert err.value.setting == "SCORING_BATCH__OUTPUT" and "is not an Iceberg table" in err.value.reason


@pytest.mark.parametrize(("ice", "setting", "words"), [
    ({"warehouse": "file:///tmp/wh"}, "SCORING_ICEBERG__CATALOG_URI", "needed by iceberg:// outputs"),
    ({"catalog_uri": "mysql://u:pw-xyz@h/db", "warehouse": "file:///tmp/wh"}, "SCORING_ICEBERG__CATALOG_URI",
     "use postgresql://"),
    ({"catalog_uri": "sqlite:////tmp/x.db"}, "SCORING_ICEBERG__WAREHOUSE", "needed by iceberg:// outputs"),
    ({"catalog_uri": "sqlite:////tmp/x.db", "warehouse": "relative/wh"}, "SCORING_ICEBERG__WAREHOUSE",
     "is not a warehouse location"),
    ({"catalog_uri": "sqlite:////tmp/x.db", "warehouse": "gs://b/wh"}, "SCORING_ICEBERG__WAREHOUSE",
     "is not a warehouse location"),
])
def test_a_missing_or_bad_catalog_setting_is_named(ice, setting, words):
    with pytest.raises(ConfigError) as err:
        open_sink("iceberg://c/ns.t", S3Settings(), setting="SCORING_BATCH__OUTPUT", iceberg=IcebergSettings(**ice))
    assert err.value.setting == setting and words in err.value.reason and "pw-xyz" not in str(err.value)


def test_a_bad_iceberg_uri_or_catalog_stops_batch_at_start_up_with_one_line(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=5)
    base = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs, "--output"]
    env = {**os.environ, "SCORING_ICEBERG__CATALOG_URI": f"sqlite:///{tmp_path}/c.db",
           "SCORING_ICEBERG__WAREHOUSE": f"file://{tmp_path}/wh"}
    proc = subprocess.run([*base, "iceberg://c/scores"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: SCORING_BATCH__OUTPUT (--output): 'iceberg://c/scores' is not an Iceberg table: use "
        "iceberg://CATALOG/namespace.table (letters, digits and _)"]
    env.pop("SCORING_ICEBERG__WAREHOUSE")
    proc = subprocess.run([*base, "iceberg://c/ns.scores"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: SCORING_ICEBERG__WAREHOUSE: needed by iceberg:// outputs: file:///abs/path or s3://bucket/prefix"]


def test_an_unreachable_catalog_is_one_line_without_its_password(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=5)
    from tests.conftest import free_port

    env = {**os.environ, "SCORING_ICEBERG__CATALOG_URI": f"postgresql://u:{SECRET_PW}@127.0.0.1:{free_port()}/db",
           "SCORING_ICEBERG__WAREHOUSE": f"file://{tmp_path}/wh"}
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
                           "--output", "iceberg://c/ns.scores"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and SECRET_PW not in proc.stderr + proc.stdout
    assert "iceberg://c/ns.scores" in proc.stderr
    check = subprocess.run([sys.executable, "-m", "workers", "check", "--output", "iceberg://c/ns.scores"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode != 0 and "Traceback" not in check.stderr + check.stdout
    assert "cannot reach the catalog of iceberg://c/ns.scores" in check.stdout + check.stderr
    assert SECRET_PW not in check.stdout + check.stderr


# -- tools --------------------------------------------------------------------------------------------------
def test_compare_and_report_read_an_iceberg_table_as_they_read_sqlite(models, tmp_path, monkeypatch, sqlite_cat):
    from tests.test_report import run
    from tests.test_rollout import ab_with_shadow

    for k, v in sqlite_cat.env.items():
        monkeypatch.setenv(k, v)
    inputs, routing = ab_with_shadow(models, tmp_path, files=2, rows=1000,
                                     names=("champion", "challenger", "shadow-x"), weights=(70, 30))
    ice = sqlite_cat.uri()
    sqlite = f"sqlite:///{tmp_path / 'r.db'}?table=scores"
    for results in (ice, sqlite):
        run("batch", "--routing", routing, "--input", str(inputs), "--output", results)
    mine, theirs = (json.loads(run("compare", "--results", r, "--json")) for r in (ice, sqlite))
    assert mine["rows"] == 4000 and {v["version"] for v in mine["versions"]} == {"champion", "challenger", "shadow-x"}
    for report in (mine, theirs):
        report.pop("results", None)
    assert mine == theirs
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()
    assert json.loads(run("compare", "--results", ice, "--json", "--since", later))["rows"] == 0
    assert json.loads(run("compare", "--results", ice, "--json", "--since", "1h"))["rows"] == 4000
    page = tmp_path / "report.html"
    assert "4,000 rows, 3 version(s)" in run("report", "--routing", routing, "--results", ice, "--output",
                                             str(page))
    assert "shadow-x" in page.read_text()
    missing = subprocess.run([sys.executable, "-m", "workers", "compare", "--results", sqlite_cat.uri("nothing")],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **sqlite_cat.env})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == ["error: --results: no Iceberg table ns.nothing in catalog lake"]


def test_compare_on_a_catalog_never_written_creates_nothing(tmp_path):
    from workers.tools.compare import read_results

    ice = IcebergSettings(catalog_uri=f"sqlite:///{tmp_path}/c.db", warehouse=f"file://{tmp_path}/wh")
    with pytest.raises(ConfigError, match="no Iceberg table ns.t in catalog c"):
        read_results("iceberg://c/ns.t", S3Settings(), iceberg=ice)
    import sqlite3

    tables = sqlite3.connect(tmp_path / "c.db").execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [] and not (tmp_path / "wh").exists()


def test_a_warehouse_inside_the_input_folder_is_never_read_as_input(models, tmp_path):
    inputs = tmp_path / "in"
    write_inputs(str(inputs), files=2, rows=50)
    cat = Catalog(IcebergSettings(catalog_uri=f"sqlite:///{tmp_path}/c.db", warehouse=f"file://{inputs}/wh"),
                  "lake", S3Settings())
    settings = cat.settings_for(models["binary"], str(inputs))
    assert run_batch(settings).files_scored == 2
    again = run_batch(settings)  # the table's own Parquet files are not inputs
    assert (again.files_found, again.files_skipped, again.files_scored) == (2, 2, 0)
    with pytest.raises(ConfigError, match="is the input folder"):
        run_batch(cat.settings_for(models["binary"], str(inputs / "wh" / "ns" / "scores")))


def test_check_looks_without_creating_anything(tmp_path, s3_endpoint, s3_bucket):
    s3 = S3Settings(endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test")

    def sink(warehouse: str) -> IcebergSink:
        ice = IcebergSettings(catalog_uri=f"sqlite:///{tmp_path}/c.db", warehouse=warehouse)
        return IcebergSink("iceberg://c/ns.t", s3, ice, "SCORING_BATCH__OUTPUT")

    sink(f"file://{tmp_path}/new/wh").check()
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SinkError, match="is not a writable folder"):
        sink(f"file://{tmp_path}/file/wh").check()
    sink(f"s3://{s3_bucket[0]}/wh").check()
    with pytest.raises(SinkError, match="cannot use the warehouse of iceberg://c/ns.t"):
        sink(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/wh").check()

"""The Delta Lake sink on real Delta tables (delta-rs), on local disk and on moto S3 (moto_server fixture): batch end
to end with the ledger, a changed input, four shard processes committing into one table at once, a SIGKILL and a
rerun, stream crash + redelivery on ``workers.testing``'s script, the stale-write guard, the type mapping, a type
Delta cannot hold, bad URIs and redaction."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from tests.helpers import frame, write_inputs
from tests.test_stream import FEATURES, records
from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.runtime.batch import run_batch
from workers.scoring.scorer import Scored
from workers.settings import S3Settings, load_settings
from workers.sinks import open_sink
from workers.sinks.base import DirectUnit, Sink
from workers.sinks.delta import DeltaSink


def read(location: str, options: dict | None = None) -> pa.Table:
    return DeltaTable(location, storage_options=options).to_pyarrow_table()


def batch_settings(model: str, inputs: str, output: str, **batch) -> object:
    return load_settings({"model": {"path": model}, "scoring": {"passthrough": ["x0"]},
                          "batch": {"input": inputs, "output": output, "allow_bad_rows": True, **batch}})


def no_errors() -> pa.Table:
    return pa.table({"id": pa.array([], pa.string())})


def stream_rows(*rows: tuple) -> Scored:
    """A stream micro-batch's results: rows of (id, score, partition, offset)."""
    return Scored(pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "model_version": pa.array(["v1"] * len(rows), pa.string()),
        "score": pa.array([float(r[1]) for r in rows], pa.float64()),
        "topic": pa.array(["in"] * len(rows), pa.string()),
        "partition": pa.array([r[2] for r in rows], pa.int32()),
        "offset": pa.array([r[3] for r in rows], pa.int64()),
    }), no_errors())


# -- batch --------------------------------------------------------------------------------------------------
def test_batch_scores_equal_predict_rerun_writes_nothing_new_and_the_ledger_resumes(models, tmp_path):
    inputs = tmp_path / "in"
    write_inputs(str(inputs), files=3, rows=1500, row_group=500)
    df = frame(10, seed=42)
    df["x2"] = df["x2"].map(str).astype(object)
    df.loc[4, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), inputs / "messy.parquet")
    table = str(tmp_path / "lake" / "scores")
    settings = batch_settings(models["multiclass"], str(inputs), f"delta+file://{table}", batch_rows=400)
    report = run_batch(settings)
    assert (report.files_scored, report.rows, report.rejected, report.failed) == (4, 4509, 1, [])
    booster = lgb.Booster(model_file=models["multiclass"])
    expected_df = pd.concat([frame(1500, seed=100 + k) for k in range(3)])
    expected = booster.predict(expected_df[booster.feature_name()])
    rows = {r["id"]: r for r in read(table).to_pylist()}
    assert len(rows) == 4509
    for i, rid in enumerate(expected_df["id"]):
        r = rows[rid]
        assert abs(r["score"] - expected[i].max()) <= 1e-9 and r["label"] == expected[i].argmax()
        assert np.max(np.abs(np.array(r["scores"]) - expected[i])) <= 1e-9
        assert r["x0"] == expected_df["x0"].iloc[i] and r["model_version"].startswith("multiclass-")
        assert r["input_file"].endswith(".parquet")
    errors = read(table + "_errors").to_pylist()
    assert [(e["id"], e["reason"]) for e in errors] == [("r42-4", "feature 'x2': 'bad' is not a number")]
    assert errors[0]["source"].endswith("messy.parquet#4") and json.loads(errors[0]["raw"])["x2"] == "bad"
    # Every results commit names its unit in the commit metadata.
    units = {h.get("scoring.unit") for h in DeltaTable(table).history() if h.get("operation") == "MERGE"}
    assert len(units) == 4 and all(u.endswith(".parquet") for u in units)
    # Rerun: the ledger skips every input; nothing new is written (no new Delta version).
    version = DeltaTable(table).version()
    again = run_batch(settings)
    assert (again.files_skipped, again.files_scored, again.rows) == (4, 0, 0)
    assert DeltaTable(table).version() == version
    # An input missing from the ledger (a run killed after the results commit, before mark_done) is the only
    # one written again, and the MERGE keeps one copy of each row.
    DeltaTable(table + "_inputs").delete("unit LIKE '%part-001.parquet'")
    fourth = run_batch(settings)
    assert (fourth.files_scored, fourth.files_skipped, fourth.rows) == (1, 3, 1500)
    ids = read(table).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4509
    assert read(table + "_errors").num_rows == 1


def test_a_changed_input_leaves_nothing_stale(models, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    a = frame(20, seed=1)
    a["x2"] = a["x2"].map(str).astype(object)
    a.loc[3, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2), preserve_index=False), folder / "b.parquet")
    pq.write_table(pa.Table.from_pandas(frame(5, seed=3), preserve_index=False), folder / "c.parquet")
    table = str(tmp_path / "t")
    settings = batch_settings(models["binary"], str(folder), f"delta+file://{table}")
    assert run_batch(settings).exit_code == 0
    assert read(table + "_errors").column("id").to_pylist() == ["r1-3"]
    assert read(table).num_rows == 35 - 1
    a.loc[3, "x2"] = "0.5"  # fixed
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2).iloc[:0], preserve_index=False), folder / "b.parquet")
    report = run_batch(settings)
    assert (report.files_scored, report.files_skipped, report.exit_code) == (2, 1, 0)
    assert read(table + "_errors").num_rows == 0
    assert set(read(table).column("id").to_pylist()) == {f"r1-{i}" for i in range(20)} | {f"r3-{i}" for i in
                                                                                            range(5)}


def _four_shards(models, inputs: str, output: str, env: dict) -> list[dict]:
    """Four shard processes at once (``JOB_COMPLETION_INDEX`` 0..3), every file cut into row-group units."""
    procs = [subprocess.Popen([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                               inputs, "--output", output, "--shard-count", "4", "--unit-bytes", "20000",
                               "--log-level", "INFO"],
                              env={**os.environ, **env, "JOB_COMPLETION_INDEX": str(k)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [r[1][-2000:] for r in results]
    summaries = [json.loads(r[0]) for r in results]
    assert all(s["files_scored"] > 0 for s in summaries)  # every shard had work and committed it
    for s, (_, err) in zip(summaries, results, strict=True):
        s["conflicts"] = err.count("lost to another writer")
    return summaries


def test_four_shards_at_once_into_one_new_local_table(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=6, rows=3000, row_group=500)
    table = str(tmp_path / "t")
    summaries = _four_shards(models, inputs, f"delta+file://{table}", {})
    assert sum(s["conflicts"] for s in summaries) > 0  # the shards' commits did race, and were retried
    ids = read(table).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 18000
    assert read(table + "_inputs").num_rows == sum(s["files_scored"] for s in summaries)


def test_four_shards_at_once_on_s3_and_the_secret_is_never_shown(models, s3_endpoint, s3_bucket, tmp_path):
    bucket, _ = s3_bucket
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=4, rows=2000, row_group=500)
    env = {"SCORING_S3__ENDPOINT_URL": s3_endpoint, "SCORING_S3__ACCESS_KEY_ID": "test",
           "SCORING_S3__SECRET_ACCESS_KEY": "test-secret-xyz"}
    location = f"s3://{bucket}/lake/scores"
    summaries = _four_shards(models, inputs, f"delta+{location}", env)
    opts = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    ids = read(location, opts).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8000
    assert read(location + "_inputs", opts).num_rows == sum(s["files_scored"] for s in summaries)
    sink = DeltaSink(f"delta+{location}", S3Settings(endpoint_url=s3_endpoint, access_key_id="test",
                                                     secret_access_key="test-secret-xyz"), "SCORING_BATCH__OUTPUT")
    assert "test-secret-xyz" not in sink.name + repr(sink.__dict__.get("name")) and sink.name.startswith("delta+s3")
    shown = subprocess.run([sys.executable, "-m", "workers", "settings", "--env"],
                           env={**os.environ, **env, "SCORING_BATCH__OUTPUT": f"delta+{location}"},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr  # a refused command would print nothing to leak
    assert f"SCORING_BATCH__OUTPUT=delta+{location}" in shown.stdout
    assert env["SCORING_S3__SECRET_ACCESS_KEY"] not in shown.stdout + shown.stderr


def test_sigkill_then_rerun_keeps_each_row_once(models, tmp_path):
    inputs = str(tmp_path / "in")
    files, rows = 8, 5000
    write_inputs(inputs, files=files, rows=rows, row_group=1000)
    table = str(tmp_path / "t")
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
            "--output", f"delta+file://{table}", "--unit-bytes", "30000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    stored = 0
    while time.monotonic() < deadline and stored < 10_000:
        if os.path.isdir(os.path.join(table, "_delta_log")):  # created by the run's first write
            stored = read(table).num_rows
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read(table).num_rows
    assert 10_000 <= before < files * rows, "the kill must land partway through the run"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["files_skipped"] >= 1
    ids = read(table).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == files * rows


# -- stream -------------------------------------------------------------------------------------------------
class _Both(Sink):
    """The Delta sink, then the script's sink (which acts the script's markers): a ``CrashInStore`` lands after
    Delta stored the batch and before its offsets are committed, so the restart writes the same rows again."""

    def __init__(self, real: DeltaSink, script):
        self.real, self.script, self.name = real, script, real.name

    def begin(self, unit: str):
        return DirectUnit(self.write_batch)

    def write_batch(self, scored: Scored) -> None:
        self.real.write_batch(scored)
        self.script.sink.write_batch(scored)


def test_stream_crash_and_redelivery_store_each_result_once_with_the_scores_of_predict(models, tmp_path):
    from tests.test_stream_ordering import interleaved, settings_for
    from workers.runtime.stream.worker import StreamWorker
    from workers.testing import Crash, Crashed, CrashInStore, Script

    items = interleaved(120, partitions=3)
    items.insert(40, CrashInStore())
    items.insert(90, Crash())
    script = Script(items)
    table = str(tmp_path / "s")

    def worker() -> StreamWorker:
        sink = _Both(DeltaSink(f"delta+file://{table}", S3Settings(), "SCORING_STREAM__SINK"), script)
        return StreamWorker(settings_for(models), source=script.source(), sink=sink,
                            dead_letters=script.dead_letters(), burst=True)

    for _ in range(2):
        with pytest.raises(Crashed):
            worker().run()
    assert worker().run() == 0
    assert script.committed == {tp: len(log) for tp, log in script.logs.items()}
    stored = read(table).to_pylist()
    assert len(stored) == len({r["id"] for r in stored}) == 120
    recs = records(120)
    booster = lgb.Booster(model_file=models["binary"])
    predicted = dict(zip([r["id"] for r in recs], booster.predict(np.array([[r[f] for f in FEATURES]
                                                                            for r in recs])), strict=True))
    assert max(abs(r["score"] - predicted[r["id"]]) for r in stored) <= 1e-9


def test_a_stale_stream_write_never_overwrites_a_newer_result_of_its_partition(tmp_path):
    table = str(tmp_path / "s")
    sink = DeltaSink(f"delta+file://{table}", S3Settings(), "SCORING_STREAM__SINK")

    def got() -> dict:
        return {r["id"]: (r["score"], r["partition"], r["offset"]) for r in read(table).to_pylist()}

    sink.write_batch(stream_rows(("X", 2.0, 0, 2)))
    sink.write_batch(stream_rows(("X", 1.0, 0, 1)))  # the zombie's stale write
    assert got()["X"] == (2.0, 0, 2)
    sink.write_batch(stream_rows(("X", 3.0, 1, 0)))  # another partition (a re-keyed topic): the write wins
    assert got()["X"] == (3.0, 1, 0)
    sink.write_batch(stream_rows(("Y", 1.0, 0, 5), ("Y", 4.0, 0, 7)))  # one batch: the later offset, counted
    assert got()["Y"] == (4.0, 0, 7) and sink.duplicates_collapsed == 1


# -- types --------------------------------------------------------------------------------------------------
def test_values_delta_has_no_type_for_are_stored_as_documented(tmp_path):
    table = str(tmp_path / "t")
    sink = DeltaSink(f"delta+file://{table}", S3Settings(), "SCORING_STREAM__SINK")
    u = uuid.UUID(int=0x1234567)
    ts = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    results = pa.table({
        "id": pa.array(["a"]), "model_version": ["v1"], "score": [0.5],
        "u8": pa.array([255], pa.uint8()), "u32": pa.array([2**32 - 1], pa.uint32()),
        "u64": pa.array([2**64 - 1], pa.uint64()),
        "ts_ns": pa.array([ts.replace(tzinfo=None)], pa.timestamp("ns")),
        "ts_tz": pa.array([ts], pa.timestamp("ms", tz="Europe/Paris")),
        "t": pa.array([dt.time(12, 30, 1)], pa.time64("us")), "d": pa.array([dt.timedelta(seconds=90)],
                                                                         pa.duration("s")),
        "u": pa.ExtensionArray.from_storage(pa.uuid(), pa.array([u.bytes], pa.binary(16))),
        "dec": pa.array([decimal.Decimal("12.345")], pa.decimal128(10, 3)),
        "lst": pa.array([[1, 2]], pa.large_list(pa.uint16())),
        "iv": pa.array([pa.MonthDayNano([1, 2, 3])], pa.month_day_nano_interval()),
        "cat": pa.array(["x"]).dictionary_encode(),
    })
    sink.write_batch(Scored(results, no_errors()))
    row = read(table).to_pylist()[0]
    assert (row["u8"], row["u32"], row["u64"]) == (255, 2**32 - 1, decimal.Decimal(2**64 - 1))
    assert row["ts_ns"] == ts.replace(tzinfo=None) and row["ts_tz"] == ts.replace(microsecond=678000)
    assert (row["t"], row["d"], row["u"]) == ("12:30:01.000000", 90, str(u))
    assert row["dec"] == decimal.Decimal("12.345") and row["lst"] == [1, 2] and row["cat"] == "x"
    assert json.loads(row["iv"]) == {"months": 1, "days": 2, "nanoseconds": 3}


def test_a_type_delta_cannot_hold_fails_its_file_alone_and_is_dead_lettered_in_stream(models, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    wide = pa.Table.from_pandas(frame(10, seed=5), preserve_index=False)
    wide = wide.append_column("big", pa.array([decimal.Decimal(1)] * 10, pa.decimal256(50, 0)))
    pq.write_table(wide, folder / "wide.parquet")
    good = pa.Table.from_pandas(frame(10, seed=6), preserve_index=False)
    pq.write_table(good.append_column("big", pa.array([decimal.Decimal(2)] * 10, pa.decimal128(38, 0))),
                   folder / "good.parquet")
    table = str(tmp_path / "t")
    settings = load_settings({"model": {"path": models["binary"]}, "scoring": {"passthrough": ["big"]},
                              "batch": {"input": str(folder), "output": f"delta+file://{table}"}})
    report = run_batch(settings)
    assert report.files_scored == 1 and len(report.failed) == 1
    rel, reason = report.failed[0]
    assert rel.endswith("wide.parquet") and "Delta holds decimals of at most 38 digits" in reason, reason
    assert set(read(table).column("id").to_pylist()) == {f"r6-{i}" for i in range(10)}
    # Stream: the records of that write are refused with the reason (the pipeline dead-letters them).
    sink = DeltaSink(f"delta+file://{tmp_path / 's'}", S3Settings(), "SCORING_STREAM__SINK")
    with pytest.raises(RowsRejected) as err:
        sink.write_batch(Scored(stream_rows(("A", 1.0, 0, 0)).results.append_column(
            "big", pa.array([decimal.Decimal(1)], pa.decimal256(50, 0))), no_errors()))
    assert list(err.value.rows) == [0] and "at most 38 digits" in err.value.rows[0]


# -- settings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["delta+file://", "delta+file://host/x", "delta+s3://bucket", "delta+s3:///x"])
def test_a_bad_uri_is_a_config_error_naming_the_setting(uri):
    with pytest.raises(ConfigError) as err:
        open_sink(uri, S3Settings(), setting="SCORING_BATCH__OUTPUT")
    assert err.value.setting == "SCORING_BATCH__OUTPUT" and "not a Delta table location" in err.value.reason


def test_a_bad_delta_uri_stops_batch_at_start_up_with_one_line(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=5)
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
                           "--output", "delta+s3://bucket"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: SCORING_BATCH__OUTPUT (--output): 'delta+s3://bucket' is not a Delta table location: use "
        "delta+file:///abs/path or delta+s3://bucket/path"]


# -- tools --------------------------------------------------------------------------------------------------
def test_compare_and_report_read_a_delta_table_as_they_read_sqlite(models, tmp_path):
    from tests.test_report import run
    from tests.test_rollout import ab_with_shadow

    inputs, routing = ab_with_shadow(models, tmp_path, files=2, rows=1000,
                                     names=("champion", "challenger", "shadow-x"), weights=(70, 30))
    delta = f"delta+file://{tmp_path / 'lake' / 'scores'}"
    sqlite = f"sqlite:///{tmp_path / 'r.db'}?table=scores"
    for results in (delta, sqlite):
        run("batch", "--routing", routing, "--input", str(inputs), "--output", results)
    mine, theirs = (json.loads(run("compare", "--results", r, "--json")) for r in (delta, sqlite))
    assert mine["rows"] == 4000 and {v["version"] for v in mine["versions"]} == {"champion", "challenger", "shadow-x"}
    for report in (mine, theirs):
        report.pop("results", None)
    assert mine == theirs
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()
    assert json.loads(run("compare", "--results", delta, "--json", "--since", later))["rows"] == 0
    assert json.loads(run("compare", "--results", delta, "--json", "--since", "1h"))["rows"] == 4000
    page = tmp_path / "report.html"
    assert "4,000 rows, 3 version(s)" in run("report", "--routing", routing, "--results", delta, "--output",
                                             str(page))
    assert "shadow-x" in page.read_text()
    missing = subprocess.run([sys.executable, "-m", "workers", "compare", "--results",
                              f"delta+file://{tmp_path / 'nothing'}"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error: --results: no Delta table at delta+file://{tmp_path}/nothing"]


# -- the type matrix (tests/test_type_matrix.py's cases) --------------------------------------------------
def _delta_mapping(case: str):
    """What Delta reads back for a value the sink was handed (the module docstring of workers/sinks/delta.py);
    None: as written; "rejected": the write is refused with the reason."""
    mapping = {
        "uint64": lambda v: None if v is None else decimal.Decimal(v),
        "uuid": lambda v: None if v is None else str(v),
        "time32": lambda v: None if v is None else v.isoformat(),
        "time64": lambda v: None if v is None else v.strftime("%H:%M:%S.%f"),
        "duration": lambda v: None if v is None else int(v / dt.timedelta(milliseconds=1)),
        "month_day_nano": lambda v: None if v is None else json.dumps(
            {"months": v.months, "days": v.days, "nanoseconds": v.nanoseconds}, separators=(",", ":")),
        "decimal256": "rejected",  # 45 digits: Delta holds at most 38
    }
    return mapping.get(case)


def _matrix_cases():
    from tests.test_type_matrix import CASES

    return sorted(CASES)


@pytest.mark.parametrize("case", _matrix_cases())
def test_passthrough_of_every_type_reads_back_or_is_refused_with_the_reason(case, tmp_path):
    from tests.test_type_matrix import CASES, results, same, with_order, written

    t, values, _, _, _ = CASES[case]
    table = str(tmp_path / "t")
    sink = DeltaSink(f"delta+file://{table}", S3Settings(), "SCORING_STREAM__SINK")
    batch = Scored(with_order(results(pa.array(["a", "b", "c"]), p=pa.array(values, t))), no_errors())
    mapping = _delta_mapping(case)
    if mapping == "rejected":
        with pytest.raises(RowsRejected) as err:
            sink.write_batch(batch)
        assert set(err.value.rows) == {0, 1, 2} and "at most 38 digits" in err.value.rows[0]
        assert not os.path.exists(table)  # nothing of the write stored
        return
    sink.write_batch(batch)
    got = read(table).sort_by("offset").column("p").to_pylist()
    want = [v if mapping is None else mapping(v) for v in written(values, t)]
    assert all(same(g, w) for g, w in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize("case", _matrix_cases())
def test_id_of_every_type_is_a_key_or_rejected(case, tmp_path):
    from tests.test_type_matrix import CASES, results, same, with_order, written

    t, _, id_values, _, _ = CASES[case]
    table = str(tmp_path / "t")
    sink = DeltaSink(f"delta+file://{table}", S3Settings(), "SCORING_STREAM__SINK")
    mapping = _delta_mapping(case)
    if id_values is None or None in id_values or mapping == "rejected":
        ids = pa.array(id_values or [None] * 3, t)
        with pytest.raises(RowsRejected) as info:
            sink.write_batch(Scored(with_order(results(ids)), no_errors()))
        nulls = {i for i, v in enumerate(ids.to_pylist()) if v is None}
        assert set(info.value.rows) == (nulls or {0, 1, 2})
        return
    batch = Scored(with_order(results(pa.array(id_values, t))), no_errors())
    sink.write_batch(batch)
    sink.write_batch(batch)  # redelivered: the MERGE matches every key, nothing doubles
    got = read(table).sort_by("offset").column("id").to_pylist()
    want = [v if mapping is None else mapping(v) for v in written(id_values, t)]
    assert len(got) == 3 and all(same(g, w) for g, w in zip(got, want, strict=True)), (got, want)


def test_a_column_whose_type_changes_is_cast_when_every_value_survives_and_refused_when_not(models, tmp_path):
    table = str(tmp_path / "s")
    sink = DeltaSink(f"delta+file://{table}", S3Settings(), "SCORING_STREAM__SINK")

    def with_p(rid: str, p: pa.Array) -> Scored:
        return Scored(stream_rows((rid, 1.0, 0, 0)).results.append_column("p", p), no_errors())

    sink.write_batch(with_p("a", pa.array([1], pa.int64())))
    sink.write_batch(with_p("b", pa.array([2], pa.int32())))  # narrower: cast, nothing lost
    sink.write_batch(with_p("c", pa.array([3.0])))  # a whole number: cast
    for bad in (pa.array([2.5]), pa.array(["x"])):  # would be truncated or cannot be held: refused, not retried
        with pytest.raises(InputError, match="column 'p' is int64 in delta"):
            sink.write_batch(with_p("d", bad))
    assert sorted((r["id"], r["p"]) for r in read(table).to_pylist()) == [("a", 1), ("b", 2), ("c", 3)]
    # Batch: the file whose column the table cannot hold fails alone, the others are stored.
    folder = tmp_path / "in"
    folder.mkdir()
    for name, values in (("a", [1, 2]), ("b", [0.5, 1.5])):
        df = frame(5, seed=ord(name))
        df["p"] = values * 2 + values[:1]
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), folder / f"{name}.parquet")
    out = str(tmp_path / "t")
    settings = load_settings({"model": {"path": models["binary"]}, "scoring": {"passthrough": ["p"]},
                              "batch": {"input": str(folder), "output": f"delta+file://{out}"}})
    report = run_batch(settings)
    assert report.files_scored == 1 and [r.endswith("b.parquet") for r, _ in report.failed] == [True]
    assert "column 'p' is int64" in report.failed[0][1]
    assert read(out).num_rows == 5


def test_a_delta_table_inside_the_input_folder_is_never_read_as_input(models, tmp_path):
    inputs = tmp_path / "in"
    write_inputs(str(inputs), files=2, rows=50)
    settings = batch_settings(models["binary"], str(inputs), f"delta+file://{inputs / 'scores'}")
    assert run_batch(settings).files_scored == 2
    again = run_batch(settings)  # the table's own Parquet files are not inputs
    assert (again.files_found, again.files_skipped, again.files_scored) == (2, 2, 0)
    with pytest.raises(ConfigError, match="is the input folder"):
        run_batch(batch_settings(models["binary"], str(inputs / "scores"), f"delta+file://{inputs / 'scores'}"))


def test_check_looks_without_creating_anything(tmp_path, s3_endpoint, s3_bucket):
    s3 = S3Settings(endpoint_url=s3_endpoint, access_key_id="test", secret_access_key="test")
    DeltaSink(f"delta+file://{tmp_path / 'new' / 't'}", s3, "SCORING_BATCH__OUTPUT").check()
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SinkError, match="is not a writable folder"):
        DeltaSink(f"delta+file://{tmp_path / 'file' / 't'}", s3, "SCORING_BATCH__OUTPUT").check()
    DeltaSink(f"delta+s3://{s3_bucket[0]}/lake/t", s3, "SCORING_BATCH__OUTPUT").check()
    with pytest.raises(SinkError, match="cannot use delta\\+s3://no-such-bucket-"):
        DeltaSink(f"delta+s3://no-such-bucket-{uuid.uuid4().hex[:8]}/t", s3, "SCORING_BATCH__OUTPUT").check()

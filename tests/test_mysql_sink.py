"""The MySQL / MariaDB sink against the real MariaDB server on 127.0.0.1:3306 (root, empty password, db ``test``;
``TEST_MYSQL_URI`` overrides): batch end to end, stream in process on ``workers.testing``'s script, the stale-write
guard, rejected rows, failures, redaction."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import subprocess
import sys
import threading

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import MYSQL_URI, free_port
from tests.conftest import query_mysql as query
from tests.helpers import frame, write_inputs
from tests.test_stream import FEATURES, records
from workers.errors import ConfigError, RowsRejected, SinkError
from workers.runtime.batch import run_batch
from workers.scoring.scorer import Scored
from workers.settings import load_settings
from workers.sinks.base import DirectUnit, Sink
from workers.sinks.mysql import MysqlSink


def out(table: str) -> str:
    return f"{MYSQL_URI}?table={table}"


def batch_settings(model: str, inputs: str, table: str, **batch) -> object:
    return load_settings({"model": {"path": model}, "scoring": {"passthrough": ["x0"]},
                          "batch": {"input": inputs, "output": out(table), "allow_bad_rows": True, **batch}})


def _stream_rows(*rows: tuple) -> Scored:
    """A stream micro-batch's results: rows of (id, score, partition, offset)."""
    results = pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "model_version": pa.array(["v1"] * len(rows), pa.string()),
        "score": pa.array([float(r[1]) for r in rows], pa.float64()),
        "topic": pa.array(["in"] * len(rows), pa.string()),
        "partition": pa.array([r[2] for r in rows], pa.int32()),
        "offset": pa.array([r[3] for r in rows], pa.int64()),
    })
    return Scored(results, pa.table({"id": pa.array([], pa.string())}))


# -- batch --------------------------------------------------------------------------------------------------
def test_batch_scores_equal_predict_rerun_writes_nothing_new_and_the_ledger_resumes(models, my_table, tmp_path):
    inputs = tmp_path / "in"
    write_inputs(str(inputs), files=3, rows=1500, row_group=500)
    df = frame(10, seed=42)
    df["x2"] = df["x2"].map(str).astype(object)
    df.loc[4, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), inputs / "messy.parquet")
    settings = batch_settings(models["multiclass"], str(inputs), my_table, batch_rows=400)
    report = run_batch(settings)
    assert (report.files_scored, report.rows, report.rejected, report.failed) == (4, 4509, 1, [])
    booster = lgb.Booster(model_file=models["multiclass"])
    expected_df = pd.concat([frame(1500, seed=100 + k) for k in range(3)])
    expected = booster.predict(expected_df[booster.feature_name()])
    rows = {r[0]: r for r in query(f"SELECT id, score, label, scores, x0, model_version, scored_at, input_file "
                                   f"FROM `{my_table}`")}
    assert len(rows) == 4509
    for i, rid in enumerate(expected_df["id"]):
        _, score, label, scores, x0, version, scored_at, unit = rows[rid]
        assert abs(score - expected[i].max()) <= 1e-9 and label == expected[i].argmax()
        assert np.max(np.abs(np.array(json.loads(scores)) - expected[i])) <= 1e-9
        assert x0 == expected_df["x0"].iloc[i] and version.startswith("multiclass-")
        assert isinstance(scored_at, dt.datetime) and unit.endswith(".parquet")
    assert abs((rows["r100-0"][6] - dt.datetime.now(dt.UTC).replace(tzinfo=None)).total_seconds()) < 120  # UTC
    errors = query(f"SELECT id, reason, source, raw FROM `{my_table}_errors`")
    assert [(e[0], e[1]) for e in errors] == [("r42-4", "feature 'x2': 'bad' is not a number")]
    assert errors[0][2].endswith("messy.parquet#4") and json.loads(errors[0][3])["x2"] == "bad"
    # Rerun: the ledger skips every input; nothing new is written.
    again = run_batch(settings)
    assert (again.files_skipped, again.files_scored, again.rows) == (4, 0, 0)
    # Forget the ledger: every input is written again, and the upsert keeps one copy of each row.
    query(f"DELETE FROM `{my_table}_inputs`")
    third = run_batch(settings)
    assert third.files_scored == 4
    assert query(f"SELECT count(*), count(DISTINCT id) FROM `{my_table}`") == [(4509, 4509)]
    assert query(f"SELECT count(*) FROM `{my_table}_errors`") == [(1,)]
    # Resume: an input missing from the ledger (a run killed after its commit, before mark_done) is the only
    # one written again.
    query(f"DELETE FROM `{my_table}_inputs` WHERE unit LIKE %s", ("%part-001.parquet",))
    fourth = run_batch(settings)
    assert (fourth.files_scored, fourth.files_skipped, fourth.rows) == (1, 3, 1500)
    assert query(f"SELECT count(*) FROM `{my_table}`") == [(4509,)]


def test_a_changed_input_leaves_nothing_stale(models, my_table, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    a = frame(20, seed=1)
    a["x2"] = a["x2"].map(str).astype(object)
    a.loc[3, "x2"] = "bad"
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2), preserve_index=False), folder / "b.parquet")
    pq.write_table(pa.Table.from_pandas(frame(5, seed=3), preserve_index=False), folder / "c.parquet")
    settings = batch_settings(models["binary"], str(folder), my_table)
    assert run_batch(settings).exit_code == 0
    assert query(f"SELECT id FROM `{my_table}_errors`") == [("r1-3",)]
    assert query(f"SELECT count(*) FROM `{my_table}`") == [(34,)]
    a.loc[3, "x2"] = "0.5"  # fixed
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), folder / "a.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=2).iloc[:0], preserve_index=False), folder / "b.parquet")
    report = run_batch(settings)
    assert (report.files_scored, report.files_skipped, report.exit_code) == (2, 1, 0)
    assert query(f"SELECT count(*) FROM `{my_table}_errors`") == [(0,)]
    ids = {r[0] for r in query(f"SELECT id FROM `{my_table}`")}
    assert ids == {f"r1-{i}" for i in range(20)} | {f"r3-{i}" for i in range(5)}
    booster = lgb.Booster(model_file=models["binary"])
    a["x2"] = a["x2"].astype(float)
    stored = dict(query(f"SELECT id, score FROM `{my_table}` WHERE id LIKE 'r1-%%'"))
    assert max(abs(stored[k] - v) for k, v in zip(a["id"], booster.predict(a[booster.feature_name()]),
                                                  strict=True)) <= 1e-9


def test_two_shards_at_once_into_one_new_table(models, my_table, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=6, rows=800)
    procs = [subprocess.Popen([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                               inputs, "--output", out(my_table), "--shard-count", "2", "--shard-index", str(k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    summaries = [json.loads(r[0]) for r in results]
    assert sorted(s["files_scored"] for s in summaries) != [0, 6]  # both shards had work
    assert sum(s["files_scored"] for s in summaries) == 6
    assert query(f"SELECT count(*), count(DISTINCT id) FROM `{my_table}`") == [(4800, 4800)]
    assert query(f"SELECT count(*) FROM `{my_table}_inputs`") == [(6,)]


def test_a_row_the_table_cannot_hold_fails_its_file_alone(models, my_table, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    long = frame(10, seed=5)
    long.loc[6, "id"] = "x" * 300  # longer than the id column's 255 characters
    pq.write_table(pa.Table.from_pandas(long, preserve_index=False), folder / "long.parquet")
    pq.write_table(pa.Table.from_pandas(frame(10, seed=6), preserve_index=False), folder / "good.parquet")
    report = run_batch(batch_settings(models["binary"], str(folder), my_table))
    assert report.files_scored == 1 and len(report.failed) == 1
    rel, reason = report.failed[0]
    assert rel.endswith("long.parquet") and "300 characters is longer than the key column's 255" in reason
    assert {r[0] for r in query(f"SELECT id FROM `{my_table}`")} == {f"r6-{i}" for i in range(10)}
    assert [r[0].endswith("good.parquet") for r in query(f"SELECT unit FROM `{my_table}_inputs`")] == [True]


# -- stream -------------------------------------------------------------------------------------------------
class _Both(Sink):
    """The MariaDB sink, then the script's sink (which acts the script's sink markers and lets the script check
    every commit against what was stored): a ``CrashInStore`` then lands after MariaDB stored the batch and
    before its offsets are committed, the case where a restart writes the same rows again."""

    def __init__(self, real: MysqlSink, script):
        self.real, self.script = real, script
        self.name = real.name

    def begin(self, unit: str):
        return DirectUnit(self.write_batch)

    def write_batch(self, scored: Scored) -> None:
        self.real.write_batch(scored)
        self.script.sink.write_batch(scored)

    def check(self) -> None:
        self.real.check()

    def close(self) -> None:
        self.real.close()


def test_stream_crash_and_rerun_stores_each_result_once_with_the_scores_of_predict(models, my_table):
    from tests.test_stream_ordering import interleaved, settings_for
    from workers.runtime.stream.worker import StreamWorker
    from workers.testing import Crash, Crashed, CrashInStore, Script

    items = interleaved(120, partitions=3)
    items.insert(40, CrashInStore())
    items.insert(90, Crash())
    script = Script(items)

    def worker() -> StreamWorker:
        sink = _Both(MysqlSink(out(my_table), "SCORING_STREAM__SINK"), script)
        return StreamWorker(settings_for(models), source=script.source(), sink=sink,
                            dead_letters=script.dead_letters(), burst=True)

    for _ in range(2):
        with pytest.raises(Crashed):
            worker().run()
    assert sum(script.committed.values()) < 120
    assert worker().run() == 0
    assert script.committed == {tp: len(log) for tp, log in script.logs.items()}
    stored = query(f"SELECT id, score, `partition`, `offset` FROM `{my_table}`")
    assert len(stored) == len({r[0] for r in stored}) == 120
    recs = records(120)
    booster = lgb.Booster(model_file=models["binary"])
    predicted = dict(zip([r["id"] for r in recs], booster.predict(np.array([[r[f] for f in FEATURES]
                                                                            for r in recs])), strict=True))
    assert max(abs(score - predicted[rid]) for rid, score, _, _ in stored) <= 1e-9
    position = {r[0]: (r[2], r[3]) for r in stored}
    assert position["s0"] == (0, 0) and position["s4"] == (1, 1)  # round robin over 3 partitions


def test_rows_the_table_refuses_are_dead_lettered_and_the_rest_stored(models, my_table):
    from tests.test_stream_ordering import interleaved, settings_for
    from workers.runtime.stream.worker import StreamWorker
    from workers.testing import Script, rec

    items = interleaved(30)
    items[7] = rec("t", 1, {**records(1, start=500)[0], "id": "y" * 256})
    script = Script(items)
    sink = _Both(MysqlSink(out(my_table), "SCORING_STREAM__SINK"), script)
    assert StreamWorker(settings_for(models), source=script.source(), sink=sink,
                        dead_letters=script.dead_letters(), burst=True).run() == 0
    assert [(r.partition, reason) for r, reason, _ in script.letters] == [
        (1, "column 'id': 256 characters is longer than the key column's 255 (MariaDB keys are bounded)")]
    assert query(f"SELECT count(*) FROM `{my_table}`") == [(29,)]
    assert script.committed == {("t", 0): 15, ("t", 1): 15}


def test_a_stale_stream_write_never_overwrites_a_newer_result_of_its_partition(my_table):
    sink = MysqlSink(out(my_table), "SCORING_STREAM__SINK")

    def read() -> dict:
        return {r[0]: tuple(r[1:]) for r in query(f"SELECT id, score, `partition`, `offset` FROM `{my_table}`")}

    try:
        sink.write_batch(_stream_rows(("X", 2.0, 0, 2)))
        sink.write_batch(_stream_rows(("X", 1.0, 0, 1)))  # the zombie's stale write
        assert read()["X"] == (2.0, 0, 2)
        sink.write_batch(_stream_rows(("Y", 1.0, 0, 1)))
        sink.write_batch(_stream_rows(("Y", 2.0, 0, 2)))  # newer: replaces
        assert read()["Y"] == (2.0, 0, 2)
        sink.write_batch(_stream_rows(("Y", 2.5, 0, 2)))  # redelivery of the same offset: replaces
        assert read()["Y"] == (2.5, 0, 2)
        sink.write_batch(_stream_rows(("X", 3.0, 1, 0)))  # another partition, lower offset: the later write wins
        assert read()["X"] == (3.0, 1, 0)
        sink.write_batch(_stream_rows(("X", 4.0, 0, 1)))  # back to partition 0 (its offset 1 < the stored p0@2)
        assert read()["X"] == (4.0, 0, 1)
        sink.write_batch(_stream_rows(("X", 5.0, 0, 0), ("Z", 1.0, 0, 7)))  # stale among fresh: only it skipped
        assert read()["X"] == (4.0, 0, 1) and read()["Z"] == (1.0, 0, 7)
        sink.write_batch(_stream_rows(("Z", 2.0, None, None)))  # no position: nothing to compare, the write wins
        assert read()["Z"] == (2.0, None, None)
        sink.write_batch(_stream_rows(("Z", 3.0, 0, 1)))
        assert read()["Z"] == (3.0, 0, 1)
        sink.write_batch(_stream_rows(("D", 1.0, 0, 4), ("D", 2.0, 0, 9), ("D", 0.5, 0, 3)))  # one write: p0@9
        assert read()["D"] == (2.0, 0, 9) and sink.duplicates_collapsed == 2
    finally:
        sink.close()


# -- values, rejected rows ----------------------------------------------------------------------------------
def test_values_round_trip_and_rows_the_server_cannot_take_are_rejected_before_anything_is_stored(my_table):
    sink = MysqlSink(out(my_table), "SCORING_STREAM__SINK")
    try:
        ids = ["a", "A", "a ", "😀", "nul\x00"]  # distinct ids: case, trailing space, 4-byte UTF-8, NUL
        when = dt.datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        good = pa.table({"id": ids, "model_version": ["v"] * 5, "score": [0.1, 0.2, float("nan"), 0.4, 0.5],
                         "n": pa.array([1, 2, 3, 4, 2**64 - 1], pa.uint64()),
                         "d": pa.array([decimal.Decimal("1.25")] * 5, pa.decimal128(5, 2)),
                         "at": pa.array([when] * 5, pa.timestamp("us", "+02:00")),
                         "flag": [True, False, None, True, False],
                         "blob": [b"\x00\xff", None, b"", b"x", b"y"],
                         "tags": [["a"], [], None, ["b", "c"], ["d"]],
                         "note": ["it's", "back\\slash \\'", "line\nbreak\r", "\x1a ctrl-z", 'quote" \\0']})
        sink.write_batch(Scored(good, pa.table({})))
        rows = {r[0]: r[1:] for r in query(f"SELECT id, score, n, d, `at`, flag, `blob`, tags FROM `{my_table}`")}
        assert sorted(rows) == sorted(ids)
        assert rows["a "][0] is None and rows["A"][0] == 0.2  # NaN stored as NULL
        assert rows["nul\x00"][1] == 2**64 - 1 and rows["a"][2] == decimal.Decimal("1.25")
        assert rows["a"][3] == dt.datetime(2026, 3, 4, 3, 6, 7, 123456)  # UTC
        assert rows["a"][4:] == (1, b"\x00\xff", '["a"]')
        notes = dict(query(f"SELECT id, note FROM `{my_table}`"))  # quoting: what was written reads back
        assert [notes[i] for i in ids] == good.column("note").to_pylist()
        bad_utf8 = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 1, 2], np.int32)),
                                                          pa.py_buffer(b"o\xff")])
        cases = [
            ({"id": pa.array(["b1", "b2"]), "score": [0.1, float("inf")]}, 1, "cannot hold inf"),
            ({"id": pa.array(["b1", "b2"]), "score": [0.1, 0.2], "text": bad_utf8}, 1, "not valid UTF-8"),
            ({"id": pa.array(["b1", "z" * 256]), "score": [0.1, 0.2]}, 1, "longer than the key column's 255"),
            ({"id": pa.array(["b1", "b2"]), "score": [0.1, 0.2],
              "at": pa.array([0, (12000 - 1970) * 365 * 86400 * 10**6], pa.int64()).cast(pa.timestamp("us", "UTC"))},
             1, "MariaDB refuses the row"),  # beyond DATETIME's year 9999: the server's check, found by bisection
        ]
        for columns, row, reason in cases:
            table = pa.table({**columns, "model_version": ["v", "v"]})
            with pytest.raises(RowsRejected) as err:
                sink.write_batch(Scored(table, pa.table({})))
            assert list(err.value.rows) == [row] and reason in err.value.rows[row], err.value.rows
            assert query(f"SELECT count(*) FROM `{my_table}` WHERE id = 'b1'") == [(0,)]  # nothing of the call
        sink.write_batch(Scored(pa.table({"id": ["b1"], "model_version": ["v"], "score": [0.7]}), pa.table({})))
        assert query(f"SELECT score FROM `{my_table}` WHERE id = 'b1'") == [(0.7,)]
        # a decimal of another precision widens the column once, keeping the stored values
        sink.write_batch(Scored(pa.table({"id": ["b2"], "model_version": ["v"],
                                          "d": pa.array([decimal.Decimal("123456.789")], pa.decimal128(9, 3))}),
                                pa.table({})))
        assert dict(query(f"SELECT id, d FROM `{my_table}` WHERE id IN ('a', 'b2')")) == {
            "a": decimal.Decimal("1.250"), "b2": decimal.Decimal("123456.789")}
    finally:
        sink.close()


# -- failures, settings, redaction --------------------------------------------------------------------------
def test_server_away_is_a_sink_error_and_the_password_is_never_shown(models, tmp_path, caplog):
    uri = f"mysql://scorer:s3cr3t-pw@127.0.0.1:{free_port()}/test?table=t"
    sink = MysqlSink(uri, "SCORING_STREAM__SINK")
    assert "s3cr3t-pw" not in sink.name and "***" in sink.name
    with pytest.raises(SinkError) as err:
        sink.check()
    assert "cannot connect" in str(err.value) and "s3cr3t-pw" not in str(err.value)
    with pytest.raises(SinkError):
        sink.write_batch(_stream_rows(("X", 1.0, 0, 1)))
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=10)
    with caplog.at_level(logging.DEBUG):
        proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                               inputs, "--output", uri], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    assert "s3cr3t-pw" not in proc.stderr + proc.stdout and "scorer:***@" in proc.stdout


def test_a_wrong_password_is_a_sink_error_without_the_password(my_uri):
    sink = MysqlSink("mysql://root:wr0ng-secret@127.0.0.1:3306/test?table=t", "SCORING_STREAM__SINK")
    with pytest.raises(SinkError) as err:
        sink.check()
    assert "wr0ng-secret" not in str(err.value) and "Access denied" in str(err.value)


@pytest.mark.parametrize(("uri", "says"), [
    ("mysql://root@127.0.0.1:3306/?table=t", "names no database"),
    ("mysql://root@127.0.0.1:3306/test?table=t&sslmode=x", "unknown option 'sslmode'"),
    ("mysql://root@127.0.0.1:3306/test?table=" + "n" * 58, "too long"),
    ("mysql://root@127.0.0.1:3306/test?table=a.b", "plain NAME"),
    ("mysql://root:pw@127.0.0.1:99999/test", "cannot read"),
    ("mysql://root@127.0.0.1/test?connect_timeout=soon", "connect_timeout"),
])
def test_a_bad_uri_is_a_config_error_naming_the_setting(uri, says):
    from workers.settings import S3Settings
    from workers.sinks import open_sink

    with pytest.raises(ConfigError) as err:
        open_sink(uri, S3Settings(), setting="SCORING_BATCH__OUTPUT")
    assert err.value.setting == "SCORING_BATCH__OUTPUT" and says in err.value.reason
    assert ":pw@" not in str(err.value)


def test_mariadb_scheme_and_a_locked_row_fails_within_the_lock_timeout(my_table):
    import time

    import pymysql

    from workers.settings import S3Settings
    from workers.sinks import open_sink

    sink = open_sink(f"mariadb://root@127.0.0.1:3306/test?table={my_table}", S3Settings(), setting="S")
    assert isinstance(sink, MysqlSink)
    sink.write_batch(_stream_rows(("L", 1.0, 0, 1)))
    fast = MysqlSink(out(my_table), "S", lock_timeout_s=1)
    holder = pymysql.connect(**fast.connect_args)
    try:
        with holder.cursor() as cur:
            cur.execute(f"SELECT * FROM `{my_table}` WHERE id = 'L' FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(SinkError) as err:
            fast.write_batch(_stream_rows(("L", 2.0, 0, 2)))
        assert time.monotonic() - started < 10 and "Lock wait timeout" in str(err.value)
        holder.rollback()
        fast.write_batch(_stream_rows(("L", 2.0, 0, 2)))  # the same session, once the lock is gone
        assert query(f"SELECT score FROM `{my_table}` WHERE id = 'L'") == [(2.0,)]
    finally:
        holder.close()
        fast.close()
        sink.close()


def test_eight_sinks_creating_the_tables_at_once_all_succeed(my_table):
    barrier = threading.Barrier(8, timeout=60)
    failures: list[BaseException] = []

    def shard(k: int) -> None:
        sink = MysqlSink(out(my_table), "SCORING_BATCH__OUTPUT")
        try:
            table = pa.table({"id": [f"s{k}-{i}" for i in range(50)], "model_version": ["v"] * 50,
                              "score": [0.5] * 50, f"extra{k % 3}": [k] * 50})
            errors = pa.table({"id": [f"s{k}"], "reason": ["bad"], "raw": ["{}"], "model_version": ["v"],
                               "source": [f"f{k}#0"]})
            barrier.wait()
            writer = sink.begin(f"f{k}")
            writer.write(Scored(table, errors))
            writer.commit()
            sink.ledger().mark_done(f"f{k}", "fp", 50, 1)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(exc)
            barrier.abort()
        finally:
            sink.close()

    threads = [threading.Thread(target=shard, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not failures, failures
    assert query(f"SELECT count(*) FROM `{my_table}`") == [(400,)]
    assert query(f"SELECT count(*) FROM `{my_table}_errors`") == [(8,)]
    assert query(f"SELECT count(*) FROM `{my_table}_inputs`") == [(8,)]


# -- compare and report read the table ----------------------------------------------------------------------
def test_compare_and_report_read_a_mysql_table_as_they_read_sqlite(models, my_table, tmp_path):
    from tests.test_report import run
    from tests.test_rollout import ab_with_shadow

    inputs, routing = ab_with_shadow(models, tmp_path, files=2, rows=1000,
                                     names=("champion", "challenger", "shadow-x"), weights=(70, 30))
    sqlite = f"sqlite:///{tmp_path / 'r.db'}?table=scores"
    for results in (out(my_table), sqlite):
        run("batch", "--routing", routing, "--input", str(inputs), "--output", results)
    mine, theirs = (json.loads(run("compare", "--results", r, "--json")) for r in (out(my_table), sqlite))
    assert mine["rows"] == 4000 and {v["version"] for v in mine["versions"]} == {"champion", "challenger", "shadow-x"}
    for report in (mine, theirs):
        report.pop("results", None)
    assert mine == theirs
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()
    assert json.loads(run("compare", "--results", out(my_table), "--json", "--since", later))["rows"] == 0
    assert json.loads(run("compare", "--results", out(my_table), "--json", "--since", "1h"))["rows"] == 4000
    page = tmp_path / "report.html"
    assert "4,000 rows, 3 version(s)" in run("report", "--routing", routing, "--results", out(my_table), "--output",
                                             str(page))
    assert "shadow-x" in page.read_text()


def test_a_lost_connection_is_a_sink_error_and_the_next_write_reconnects(my_table):
    sink = MysqlSink(out(my_table), "SCORING_STREAM__SINK")
    try:
        sink.write_batch(_stream_rows(("K", 1.0, 0, 1)))
        query(f"KILL {sink._connection().thread_id()}")  # the server drops the session (a restart, a proxy)
        with pytest.raises(SinkError) as err:
            sink.write_batch(_stream_rows(("K", 2.0, 0, 2)))
        assert "writing results in mysql://root@127.0.0.1:3306/test" in str(err.value)
        sink.write_batch(_stream_rows(("K", 2.0, 0, 2)))  # the retry: a new session
        assert query(f"SELECT score FROM `{my_table}`") == [(2.0,)]
    finally:
        sink.close()


def test_new_columns_in_the_middle_of_a_unit_fail_it_alone_and_keep_its_old_rows(my_table):
    """MariaDB commits on DDL: a unit's later write that needs a new column must not commit the unit half done."""
    from workers.errors import InputError

    sink = MysqlSink(out(my_table), "SCORING_BATCH__OUTPUT")

    def table(ids: list[str], **extra) -> Scored:
        return Scored(pa.table({"id": ids, "model_version": ["v"] * len(ids), "score": [0.5] * len(ids),
                                **extra}), pa.table({}))

    try:
        writer = sink.begin("f")
        writer.write(table(["old1", "old2"]))
        writer.commit()
        writer = sink.begin("f")
        writer.write(table(["new1"]))
        with pytest.raises(InputError, match="needed new columns in the middle of this input"):
            writer.write(table(["new2"], extra=[1]))
        writer.abort()
        assert sorted(r[0] for r in query(f"SELECT id FROM `{my_table}`")) == ["old1", "old2"]
        writer = sink.begin("f")  # the next run: the column exists now, the unit goes in whole
        writer.write(table(["new1"]))
        writer.write(table(["new2"], extra=[1]))
        writer.commit()
        assert query(f"SELECT id, extra FROM `{my_table}` ORDER BY id") == [("new1", None), ("new2", 1)]
    finally:
        sink.close()


def test_sigkill_then_rerun_keeps_each_row_once(models, my_table, tmp_path):
    import signal
    import time

    inputs = str(tmp_path / "in")
    files, rows = 8, 20000
    write_inputs(inputs, files=files, rows=rows, row_group=2000)
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
            "--output", out(my_table), "--batch-rows", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    stored = 0
    while time.monotonic() < deadline and stored < 40_000:
        if query("SHOW TABLES LIKE %s", (my_table,)):  # created by the run's first write
            stored = query(f"SELECT count(*) FROM `{my_table}`")[0][0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = query(f"SELECT count(*) FROM `{my_table}`")[0][0]
    assert 40_000 <= before < files * rows, "the kill must land partway through the run"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["files_skipped"] >= 1
    assert query(f"SELECT count(*), count(DISTINCT id) FROM `{my_table}`") == [(files * rows, files * rows)]


def test_a_bad_mysql_uri_stops_batch_at_start_up_with_one_line(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=5)
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
                           "--output", "mysql://writer:hunter2@db:3306/?table=t"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "hunter2" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: SCORING_BATCH__OUTPUT (--output): 'mysql://writer:***@db:3306/?table=t' names no database: use "
        "mysql://user@host:3306/DB?table=NAME"]


def test_only_mariadb_10_7_or_later_is_used():
    """No MySQL server here: the version rule alone (a MySQL server lacks the uuid type, the nopad collation and
    max_statement_time, so it is refused on connect with a SinkError saying so)."""
    from workers.sinks.mysql import _supported

    assert _supported("10.11.19-MariaDB-0+deb12u1") and _supported("5.5.5-10.11.6-MariaDB") and _supported(
        "11.4.2-MariaDB-log")
    assert not any(map(_supported, ["8.0.36", "8.4.0-commercial", "10.6.12-MariaDB", "5.7.44-log", "junk"]))


def test_a_row_larger_than_the_servers_packet_is_rejected_not_retried(my_table):
    """max_allowed_packet is global on MariaDB (other sessions share this server): the sink's copy of it is
    lowered instead, as a server with a small packet would set it on connect."""
    sink = MysqlSink(out(my_table), "SCORING_STREAM__SINK")
    try:
        sink.check()
        assert sink.packet >= 1 << 20  # read from the server
        sink.packet = 20_000
        rows = pa.table({"id": ["p0", "p1", "p2"], "model_version": ["v"] * 3, "note": ["a", "x" * 30_000, "b"]})
        with pytest.raises(RowsRejected) as err:
            sink.write_batch(Scored(rows, pa.table({})))
        assert list(err.value.rows) == [1] and "max_allowed_packet (20000)" in err.value.rows[1]
        sink.write_batch(Scored(rows.take([0, 2]), pa.table({})))  # the rest, in statements under the packet
        assert sorted(r[0] for r in query(f"SELECT id FROM `{my_table}`")) == ["p0", "p2"]
    finally:
        sink.close()


def test_a_table_made_by_hand_with_other_cased_columns_is_written_not_given_a_second_column(my_table):
    query(f"CREATE TABLE `{my_table}` (ID varchar(255) NOT NULL, Model_Version varchar(255) NOT NULL, SCORE double, "
          "PRIMARY KEY (ID, Model_Version))")
    sink = MysqlSink(out(my_table), "SCORING_STREAM__SINK")
    try:
        sink.write_batch(Scored(pa.table({"id": ["h1"], "model_version": ["v"], "score": [0.25]}), pa.table({})))
        sink.write_batch(Scored(pa.table({"id": ["h1"], "model_version": ["v"], "score": [0.5]}), pa.table({})))
        assert query(f"SELECT * FROM `{my_table}`") == [("h1", "v", 0.5)]
    finally:
        sink.close()

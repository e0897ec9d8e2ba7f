"""Batch mode over real Parquet files, through the real CLI where the contract is the process."""

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

from tests.helpers import frame, write_inputs
from workers.runtime.batch import run_batch
from workers.settings import load_settings


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def read_results(out: str) -> pd.DataFrame:
    return ds.dataset(out, format="parquet").to_table().to_pandas()


def result_files(out: str) -> list[str]:
    """Result files under a Parquet output, relative to it (not ``_state``/``_errors``, no temporary file)."""
    found = []
    for folder, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        found += [os.path.relpath(os.path.join(folder, n), out) for n in names
                  if n.endswith(".parquet") and not n.startswith((".", "_"))]
    return sorted(found)


def temporary_files(out: str) -> list[str]:
    return [n for _, _, names in os.walk(out) for n in names if n.startswith(".tmp-")]


def result_of(path: str) -> str:
    """Where an input's results land under the output root: the input's real path without its leading '/'."""
    return os.path.realpath(path)[1:]


def expected_scores(model_path: str, files: int, rows: int, categorical: bool = False) -> pd.Series:
    """Booster.predict on the very frames write_inputs wrote (pandas categoricals intact)."""
    booster = lgb.Booster(model_file=model_path)
    df = pd.concat([frame(rows, seed=100 + k, categorical=categorical) for k in range(files)])
    return pd.Series(booster.predict(df[booster.feature_name()]), index=df["id"])


def test_folder_to_parquet_dataset_scores_every_row_once(models, tmp_path):
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_inputs(inputs, files=3, rows=4000, categorical=True, row_group=1000)
    proc = cli("batch", "--model", models["categorical"], "--input", inputs, "--output", out, "--batch-rows", "700")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows_scored"] == 12000 and summary["files_scored"] == 3
    got = read_results(out)
    assert len(got) == 12000 and got["id"].is_unique
    assert sorted(os.listdir(out)) == ["_state", result_of(out).split("/")[0]]
    assert result_files(out) == [result_of(f"{inputs}/part-00{k}.parquet") for k in range(3)]
    expected = expected_scores(models["categorical"], 3, 4000, categorical=True)
    assert np.max(np.abs(got.set_index("id")["score"] - expected.loc[got["id"]].to_numpy()).to_numpy()) <= 1e-9
    # A rerun skips finished inputs and changes nothing.
    again = json.loads(cli("batch", "--model", models["categorical"], "--input", inputs, "--output", out).stdout)
    assert again["files_skipped"] == 3 and again["rows_scored"] == 0
    assert len(read_results(out)) == 12000


def test_glob_input_and_single_file(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=3, rows=100)
    out = str(tmp_path / "out")
    proc = cli("batch", "--model", models["binary"], "--input", f"{inputs}/part-00[02].parquet", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert result_files(out) == [result_of(f"{inputs}/part-000.parquet"), result_of(f"{inputs}/part-002.parquet")]
    single = str(tmp_path / "single")
    assert cli("batch", "--model", models["binary"], "--input", f"{inputs}/part-001.parquet",
               "--output", single).returncode == 0
    assert len(read_results(single)) == 100


def test_sigkill_partway_then_rerun_gives_every_row_exactly_once(models, tmp_path):
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    files, rows = 16, 20000
    write_inputs(inputs, files=files, rows=rows, row_group=2000)
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs,
            "--output", out, "--batch-rows", "500"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(out, "_state")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.isdir(state) and len(os.listdir(state)) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(os.listdir(state))
    assert 3 <= finished_before < files, "the kill must land partway through the run"
    rerun = cli("batch", "--model", models["binary"], "--input", inputs, "--output", out)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["files_skipped"] >= finished_before and summary["files_scored"] == files - summary["files_skipped"]
    got = read_results(out)
    assert len(got) == files * rows and got["id"].is_unique
    assert not temporary_files(out), "no temporary file may be left visible"


def test_two_shards_cover_every_file_exactly_once(models, tmp_path):
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_inputs(inputs, files=12, rows=50)
    seen: list[str] = []
    for index in (0, 1):
        proc = cli("batch", "--model", models["binary"], "--input", inputs, "--output", out,
                   "--shard-count", "2", env={"JOB_COMPLETION_INDEX": str(index)})
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert 0 < summary["files_in_shard"] < 12  # both shards got work
        seen += [f for f in result_files(out) if f not in seen]
    assert len(seen) == 12
    assert len(read_results(out)) == 600
    # The plan is a pure function of the listing: the same in any process (no hash() of str involved).
    script = ("import sys; from workers.sources.parquet import find_inputs; from workers.sources.units import plan;"
              "from workers.settings import S3Settings; l = find_inputs(sys.argv[1], S3Settings());"
              "print([[u.name for u in s] for s in plan(l.fs, l.files, 1000, 3)])")
    runs = {subprocess.run([sys.executable, "-c", script, inputs], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "123")}
    assert len(runs) == 1 and "part-" in runs.pop()


def test_bad_files_fail_alone_and_bad_rows_go_to_errors(models, tmp_path):
    inputs, out = tmp_path / "in", str(tmp_path / "out")
    write_inputs(str(inputs), files=2, rows=300)
    (inputs / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.Table.from_pandas(frame(20).drop(columns=["x3"]), preserve_index=False),
                   inputs / "nofeature.parquet")
    messy = frame(10, seed=5)
    messy["x1"] = messy["x1"].map(str).astype(object)
    messy.loc[[2, 7], "x1"] = ["oops", "1,5"]
    pq.write_table(pa.Table.from_pandas(messy, preserve_index=False), inputs / "messy.parquet")
    proc = cli("batch", "--model", models["binary"], "--input", str(inputs), "--output", out)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "failed: corrupt.parquet: cannot read corrupt.parquet as Parquet" in proc.stderr
    assert "failed: nofeature.parquet: missing feature column(s) 'x3'" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files_failed"] == 2 and summary["rows_scored"] == 608 and summary["rows_rejected"] == 2
    got = read_results(out)
    assert len(got) == 608 and got["id"].is_unique
    errors = pq.read_table(os.path.join(out, "_errors", result_of(inputs / "messy.parquet"))).to_pandas()
    assert errors["id"].tolist() == ["r5-2", "r5-7"]
    # The source is the input's canonical location: unique across input roots (the errors tables' key).
    assert errors["source"].tolist() == [f"{inputs.resolve()}/messy.parquet#2", f"{inputs.resolve()}/messy.parquet#7"]
    assert errors["reason"].tolist() == ["feature 'x1': 'oops' is not a number",
                                         "feature 'x1': '1,5' is not a number"]
    # --allow-bad-rows: rejected rows alone do not fail the run; failed files still do.
    os.remove(inputs / "corrupt.parquet")
    os.remove(inputs / "nofeature.parquet")
    out2 = str(tmp_path / "out2")
    assert cli("batch", "--model", models["binary"], "--input", str(inputs), "--output", out2,
               "--allow-bad-rows").returncode == 0


def test_user_mistakes_get_one_line_and_exit_2(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=10)
    base = ["batch", "--input", inputs, "--output", str(tmp_path / "o")]
    pickle_path = tmp_path / "m.pkl"
    import pickle

    pickle_path.write_bytes(pickle.dumps({"x": 1}))
    cases = [
        (["--model", str(pickle_path)], {}, "SCORING_MODEL__PATH (--model): ", "pickle"),
        (["--model", models["binary"], "--model-sha256", "f" * 64], {}, "SCORING_MODEL__SHA256", "not the pinned"),
        (["--model", models["binary"], "--threads", "many"], {}, "--threads", "integer"),
        (["--model", models["binary"]], {"SCORING_MODEL__THREAD": "2"}, "SCORING_MODEL__THREAD:", "unknown setting"),
        (["--model", models["binary"], "--shard-index", "2", "--shard-count", "2"], {},
         "SCORING_BATCH__SHARD_INDEX", "must be below"),
        ([], {}, "SCORING_MODEL__PATH", "no model given"),
    ]
    for extra, env, names, says in cases:
        proc = cli(*base, *extra, env=env)
        assert proc.returncode == 2, (extra, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0] and says in lines[0], lines
    assert not os.path.exists(tmp_path / "o" / "_state")


def test_help_names_every_env_var():
    out = cli("batch", "--help").stdout
    for name in ("SCORING_MODEL__PATH", "SCORING_MODEL__SHA256", "SCORING_BATCH__INPUT", "SCORING_BATCH__OUTPUT",
                 "SCORING_BATCH__SHARD_COUNT", "SCORING_SCORING__ID_COLUMN"):
        assert name in out.replace("\n", "").replace(" ", ""), name


def test_run_batch_in_process_with_passthrough_and_sqlite(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=2, rows=500)
    db = tmp_path / "r.db"
    settings = load_settings({"model": {"path": models["regression"]}, "scoring": {"passthrough": ["x7"]},
                              "batch": {"input": inputs, "output": f"sqlite:///{db}?table=res"}})
    report = run_batch(settings)
    assert report.exit_code == 0 and report.rows == 1000
    run_batch(settings)  # rerun: skipped by the ledger
    import sqlite3

    con = sqlite3.connect(db)
    assert con.execute("select count(*), count(distinct id) from res").fetchone() == (1000, 1000)
    rows = dict(con.execute("select id, x7 from res").fetchall())
    df = ds.dataset(inputs).to_table().to_pandas()
    assert rows["r100-5"] == df.set_index("id").loc["r100-5", "x7"]


def test_a_bad_sink_uri_names_the_setting_it_came_from(models, tmp_path):
    import pytest

    from workers.errors import ConfigError
    from workers.settings import S3Settings
    from workers.sinks import open_sink

    for setting in ("SCORING_BATCH__OUTPUT", "SCORING_STREAM__SINK", "SCORING_SERVE__SINK"):
        for uri in ("postgresql://u@h/db?table=a.b.c", "sqlite://", "kafka://"):
            with pytest.raises(ConfigError) as err:
                open_sink(uri, S3Settings(), setting=setting)
            assert err.value.setting == setting, uri
    write_inputs(str(tmp_path / "in"), files=1, rows=5)
    proc = cli("batch", "--model", models["binary"], "--input", str(tmp_path / "in"), "--output",
               "postgresql://u@h/db?table=a.b.c")
    assert proc.returncode == 2 and proc.stderr.startswith("error: SCORING_BATCH__OUTPUT (--output): table 'a.b.c'")


def test_only_a_sink_that_keeps_a_ledger_takes_batch_output(models, tmp_path):
    """The ledger is the sink's own (results and ledger in one store); a topic keeps none, so batch mode refuses
    it at start-up naming the setting, listed or queued, before any input or event is read."""
    import pytest

    from workers.errors import ConfigError
    from workers.runtime.batch import batch_ledger
    from workers.runtime.batch_queue import run_batch_queue
    from workers.settings import KafkaSettings, S3Settings
    from workers.sinks.kafka import KafkaSink
    from workers.sinks.parquet import ParquetSink
    from workers.sinks.postgres import PostgresSink
    from workers.sinks.shadow import SplitSink
    from workers.sinks.sqlite import SqliteSink

    topic = KafkaSink("kafka://results", KafkaSettings(), "SCORING_BATCH__OUTPUT")
    folder = ParquetSink(str(tmp_path / "o"), S3Settings())
    assert batch_ledger(folder) is folder
    for sink in (SqliteSink(f"sqlite:///{tmp_path / 'r.db'}?table=t", "SCORING_BATCH__OUTPUT"),
                 PostgresSink("postgresql://u@127.0.0.1:1/db?table=t", "SCORING_BATCH__OUTPUT")):
        assert batch_ledger(sink) is sink.ledger() is not None
    assert batch_ledger(SplitSink(folder, topic)) is folder  # shadow rows to a topic: the ledger stays main's
    for sink in (topic, SplitSink(topic, folder)):
        with pytest.raises(ConfigError, match="kafka://results cannot keep the batch ledger") as err:
            batch_ledger(sink, "SCORING_BATCH__OUTPUT")
        assert err.value.setting == "SCORING_BATCH__OUTPUT"
    assert not os.path.exists(tmp_path / "o")  # asking created nothing
    # Queue mode refuses it before reaching the broker (nothing listens on port 1: that would take 10 s).
    settings = load_settings({"model": {"path": models["binary"]}, "kafka": {"bootstrap_servers": "127.0.0.1:1"},
                              "batch": {"queue_topic": "files", "output": "kafka://results"}})
    started = time.monotonic()
    with pytest.raises(ConfigError, match="SCORING_BATCH__OUTPUT: kafka://results cannot keep the batch ledger"):
        run_batch_queue(settings)
    assert time.monotonic() - started < 5


def test_rows_the_store_cannot_hold_fail_that_file_alone(models, tmp_path, monkeypatch):
    """A sink raising RowsRejected (the store cannot hold a value) fails that input alone, with the reason.

    The store here is the real Parquet sink with one rule added (it "cannot hold" one id), because the table
    sinks that raise RowsRejected for real (PostgreSQL/SQLite values out of range) have their own tests; what
    is under test is batch's handling of the contract, so the rule stands in for any such store.
    """
    from workers import sinks
    from workers.errors import RowsRejected
    from workers.sinks.parquet import ParquetSink, _ParquetUnit

    class PickyUnit(_ParquetUnit):
        def write(self, scored):
            ids = scored.results["id"].to_pylist()
            if "r101-7" in ids:
                raise RowsRejected({ids.index("r101-7"): "column 'id': the store cannot hold 'r101-7'"})
            super().write(scored)

    class PickySink(ParquetSink):
        def begin(self, unit):
            return PickyUnit(self, unit)

    monkeypatch.setitem(sinks.SINKS, "picky", lambda uri, s3, setting, **_: PickySink(uri[len("picky://"):], s3))
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_inputs(inputs, files=3, rows=300, row_group=100)
    settings = load_settings({"model": {"path": models["binary"]},
                              "batch": {"input": inputs, "output": f"picky://{out}", "batch_rows": 100}})
    report = run_batch(settings)
    assert report.files_scored == 2 and report.rows == 600 and report.exit_code == 1
    assert len(report.failed) == 1
    name, reason = report.failed[0]
    assert name.endswith("part-001.parquet")
    assert "r101-7" in reason and "column 'id': the store cannot hold 'r101-7'" in reason
    # Nothing of the failed file is published or recorded as done; the others are complete.
    got = read_results(out)
    assert len(got) == 600 and not got["id"].str.startswith("r101-").any()
    assert not temporary_files(out)
    assert len(os.listdir(os.path.join(out, "_state"))) == 2
    # A rerun tries the failed file again (it is not in the ledger) and skips the two finished ones.
    again = run_batch(settings)
    assert again.files_skipped == 2 and len(again.failed) == 1


def test_a_shadow_that_cannot_score_a_file_is_skipped_not_the_file(models, tmp_path):
    """Only served versions decide whether a file can be scored (issue #14 case 16): a shadow version needing
    columns a file lacks is skipped for that file (counted in the summary, logged); the served results stay."""
    import yaml

    plain, rich = tmp_path / "in" / "plain", tmp_path / "in" / "rich"
    write_inputs(str(plain), files=2, rows=150)  # no 'color' / 'size': the shadow's model needs them
    write_inputs(str(rich), files=1, rows=80, categorical=True, prefix="cat")
    routing = tmp_path / "routing.yaml"
    routing.write_text(yaml.safe_dump({"versions": [
        {"name": "v1", "model": models["binary"], "weight": 100},
        {"name": "cat", "model": models["categorical"], "shadow": True}]}))
    out = str(tmp_path / "out")
    proc = cli("batch", "--routing", str(routing), "--input", str(tmp_path / "in"), "--output", out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files_scored"] == 3 and summary["files_failed"] == 0 and summary["rows_scored"] == 380
    assert summary["shadow_rows_skipped"] == {"cat": 300}
    assert "shadow version skipped" in proc.stderr and "'color'" in proc.stderr
    got = read_results(out)
    served, shadow = got[got["served"]], got[~got["served"]]
    assert len(served) == 380 and set(served["model_version"]) == {"v1"}
    # The file that has the shadow's columns is shadowed, with the shadow model's own scores.
    booster = lgb.Booster(model_file=models["categorical"])
    df = frame(80, seed=100, categorical=True)
    assert sorted(shadow["id"]) == sorted(df["id"]) and set(shadow["model_version"]) == {"cat"}
    want = pd.Series(booster.predict(df[booster.feature_name()]), index=df["id"])
    assert np.max(np.abs(shadow.set_index("id")["score"] - want.loc[shadow["id"]].to_numpy())) <= 1e-9


def test_redact_hides_userinfo_passwords_and_secret_query_parameters():
    from workers.storage import redact

    assert redact("postgresql://scorer:hunter2@db:5432/prod?table=scores") == \
        "postgresql://scorer:***@db:5432/prod?table=scores"
    shown = redact("postgresql://scorer@db/prod?table=s&password=hunter2&sslpassword=pw2&application_name=x")
    assert "hunter2" not in shown and "pw2" not in shown and "table=s" in shown and "application_name=x" in shown
    assert redact("s3://bucket/out/") == "s3://bucket/out/" and redact("results/") == "results/"
    assert "hunter2" not in redact("postgresql://u:hunter2@db:notaport/x")


def test_the_summary_never_prints_the_output_password(models, pg_dsn, pg_table, tmp_path):
    from urllib.parse import urlsplit, urlunsplit

    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=20)
    p = urlsplit(pg_dsn)
    user = p.username or "postgres"
    # The server trusts local connections, so any password works; what is checked is that none is shown.
    uri = urlunsplit(p._replace(netloc=f"{user}:hunter2@{p.hostname}:{p.port or 5432}", query=f"table={pg_table}"))
    proc = cli("batch", "--model", models["binary"], "--input", inputs, "--output", uri)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"].startswith(f"postgresql://{user}:***@")
    assert "hunter2" not in proc.stdout and "hunter2" not in proc.stderr


def _view_inputs(folder) -> None:
    """a.parquet: view-typed id and passthrough columns (pyarrow had no take kernel for some); zz.parquet:
    plain types. Each has one rejected row, so rejected rows (a take of ids and passthrough) are built too."""
    folder.mkdir()
    feats = {**{f"x{i}": [0.1, 0.2, 0.3] for i in range(1, 8)}, "x0": ["0.1", "oops", "0.3"]}
    pq.write_table(pa.table({"id": pa.array(["a", "b", "c"], pa.string_view()), **feats,
                             "p": pa.array([b"x", b"y", b"z"], pa.binary_view()),
                             "q": pa.array([[1], [2, 3], None], pa.list_view(pa.int32())),
                             "s": pa.array(["s1", None, "s3"], pa.string_view())}), folder / "a.parquet")
    pq.write_table(pa.table({"id": ["d", "e", "f"], **feats, "p": [b"x", b"y", b"z"], "q": [[1], [2, 3], None],
                             "s": ["s1", None, "s3"]}), folder / "zz.parquet")


def test_view_typed_id_and_passthrough_are_scored_in_every_table_sink(models, tmp_path, pg_dsn, pg_table):
    """Review defect 1: a string_view id or passthrough stopped the whole run (ArrowNotImplementedError:
    'array_take' has no kernel for string_view), exit 1, no summary, later files never scored. Columns are
    now read into their classic layout once, where the file is read."""
    inputs = tmp_path / "in"
    _view_inputs(inputs)
    db = tmp_path / "r.db"
    for output in (str(tmp_path / "out"), f"sqlite:///{db}?table=res", f"{pg_dsn}?table={pg_table}"):
        proc = cli("batch", "--model", models["binary"], "--input", str(inputs), "--output", output,
                   "--passthrough", "p,q,s", "--allow-bad-rows")
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert (summary["files_scored"], summary["rows_scored"], summary["rows_rejected"]) == (2, 4, 2), output
    for name in ("a.parquet", "zz.parquet"):
        got = pq.read_table(tmp_path / "out" / result_of(inputs / name)).to_pylist()
        assert [(r["id"], r["p"], r["q"], r["s"]) for r in got] == [
            ("a" if name == "a.parquet" else "d", b"x", [1], "s1"), ("c" if name == "a.parquet" else "f", b"z",
                                                                    None, "s3")]
        errors = pq.read_table(tmp_path / "out" / "_errors" / result_of(inputs / name)).to_pylist()
        assert [(r["id"], r["p"], r["q"]) for r in errors] == [("b" if name == "a.parquet" else "e", b"y", [2, 3])]
    import sqlite3

    con = sqlite3.connect(db)
    assert sorted(r[0] for r in con.execute("select id from res")) == ["a", "c", "d", "f"]
    import psycopg

    with psycopg.connect(pg_dsn) as pg:
        assert sorted(r[0] for r in pg.execute(f"select id from {pg_table}")) == ["a", "c", "d", "f"]


def test_a_duplicated_column_name_fails_that_file_alone_naming_it(models, tmp_path):
    """Review defect 2: a file with a column name twice (id, feature or passthrough) stopped the run with a
    KeyError traceback. Now that file fails alone, naming the column; the others are scored."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = frame(5, seed=3)
    for dup in ("id", "x0", "x7"):
        t = pa.Table.from_pandas(good, preserve_index=False)
        t = t.append_column(dup, t.column(dup))
        pq.write_table(t, inputs / f"dup_{dup}.parquet")
    pq.write_table(pa.Table.from_pandas(frame(5, seed=4), preserve_index=False), inputs / "z.parquet")
    proc = cli("batch", "--model", models["binary"], "--input", str(inputs), "--output", str(tmp_path / "out"),
               "--passthrough", "x7")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    for dup in ("id", "x0", "x7"):
        assert (f"failed: dup_{dup}.parquet: dup_{dup}.parquet has more than one column named '{dup}'; which "
                "one to score is ambiguous, rename or drop the others") in proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["files_scored"], summary["files_failed"], summary["rows_scored"]) == (1, 3, 5)


_LIVE_WRITER = """
import sys
import pyarrow as pa, pyarrow.fs as pafs
from workers.sinks.parquet import _File
f = _File(pafs.LocalFileSystem(), sys.argv[1], True)
f.write(pa.table({"a": [1]}))
print(f.tmp, flush=True)
sys.stdin.readline()
f.commit()
print("committed", flush=True)
"""


def test_a_run_never_deletes_the_temporary_file_of_another_live_writer(models, tmp_path):
    """Review defect 12: a second run into the same Parquet output deleted the first run's in-flight
    temporary file (stale-temp removal took every temp of the unit), and the first run failed renaming it.
    Now only temps of dead writers go: a process of this host that is gone, or an old file of another host."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_inputs(str(inputs), files=1, rows=50)
    name = next(n for n in os.listdir(inputs) if n.endswith(".parquet"))
    final = out / result_of(inputs / name)
    final.parent.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, str(final)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        live = writer.stdout.readline().strip()
        assert os.path.exists(live)
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        host = os.path.basename(live).split("-")[-3]
        dead = final.parent / f".tmp-{final.name}-{host}-{gone}-{'0' * 12}"
        foreign_new = final.parent / f".tmp-{final.name}-ffffffff-1-{'1' * 12}"
        foreign_old = final.parent / f".tmp-{final.name}-ffffffff-1-{'2' * 12}"
        legacy_old = final.parent / f".tmp-{final.name}-{'3' * 12}"
        for p in (dead, foreign_new, foreign_old, legacy_old):
            p.write_bytes(b"partial")
        for p in (foreign_old, legacy_old):
            os.utime(p, (time.time() - 7 * 3600,) * 2)
        proc = cli("batch", "--model", models["binary"], "--input", str(inputs), "--output", str(out))
        assert proc.returncode == 0, proc.stderr
        assert os.path.exists(live), "the live writer's temporary file was deleted"
        assert os.path.exists(foreign_new)
        assert not dead.exists() and not foreign_old.exists() and not legacy_old.exists()
        out_text, _ = writer.communicate("go\n", timeout=30)
        assert writer.returncode == 0 and "committed" in out_text
    finally:
        if writer.poll() is None:
            writer.kill()


def test_an_empty_input_gets_an_empty_results_file_with_the_result_columns(models, tmp_path):
    """Review defect 18: an input of 0 rows (an empty row group, or no row group at all) was counted in
    files_scored but got no output file (README: one output file per input file). Now it gets a results file
    with the results' columns (passthrough included) and no rows; no errors file."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    schema = pa.Table.from_pandas(frame(1), preserve_index=False).schema.remove_metadata()
    pq.write_table(schema.empty_table(), inputs / "no_rows.parquet")
    pq.ParquetWriter(inputs / "no_row_groups.parquet", schema).close()
    assert pq.ParquetFile(inputs / "no_row_groups.parquet").num_row_groups == 0
    pq.write_table(pa.Table.from_pandas(frame(4), preserve_index=False), inputs / "some.parquet")
    proc = cli("batch", "--model", models["binary"], "--input", str(inputs), "--output", str(out),
               "--passthrough", "x7")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["files_scored"], summary["rows_scored"]) == (3, 4)
    assert result_files(str(out)) == sorted(result_of(inputs / n) for n in
                                            ("no_rows.parquet", "no_row_groups.parquet", "some.parquet"))
    some = pq.read_schema(out / result_of(inputs / "some.parquet"))
    for name in ("no_rows.parquet", "no_row_groups.parquet"):
        table = pq.read_table(out / result_of(inputs / name))
        assert table.num_rows == 0 and table.schema.names == some.names
        assert table.schema.field("score").type == pa.float64()
        assert table.schema.field("x7").type == some.field("x7").type
    assert not (out / "_errors").exists()
    assert len(read_results(str(out))) == 4


def test_the_parquet_sink_stores_month_day_nano_intervals_exactly(tmp_path):
    """From the sinks engineer: a month_day_nano_interval value (a passthrough from a mode whose inputs have
    them) made the Parquet sink raise ArrowNotImplementedError (Parquet has no such type). It is stored as a
    struct of its three parts, top-level or nested; results and rejected rows alike."""
    from workers.scoring.scorer import Scored
    from workers.settings import S3Settings
    from workers.sinks.parquet import ParquetSink

    mdn = pa.month_day_nano_interval()
    values = [pa.MonthDayNano([1, 2, 3]), None, pa.MonthDayNano([-1, 0, 2**62])]
    results = pa.table({"id": ["a", "b", "c"], "score": [0.1, 0.2, 0.3], "p": pa.array(values, mdn),
                        "q": pa.array([[values[0]], None, [values[2], None]], pa.list_(mdn))})
    errors = pa.table({"id": ["d"], "reason": ["r"], "raw": ["{}"], "p": pa.array([values[2]], mdn)})
    sink = ParquetSink(str(tmp_path / "out"), S3Settings())
    sink.check()
    unit = sink.begin(str(tmp_path / "in" / "x.parquet"))
    unit.write(Scored(results, errors))
    unit.commit()
    got = read_results(str(tmp_path / "out"))
    assert got["p"].tolist() == [{"months": 1, "days": 2, "nanoseconds": 3}, None,
                                 {"months": -1, "days": 0, "nanoseconds": 2**62}]
    assert got["q"].tolist()[0].tolist() == [{"months": 1, "days": 2, "nanoseconds": 3}]
    assert got["q"].tolist()[2].tolist() == [{"months": -1, "days": 0, "nanoseconds": 2**62}, None]
    err = ds.dataset(str(tmp_path / "out" / "_errors"), format="parquet").to_table()
    assert err["p"].to_pylist() == [{"months": -1, "days": 0, "nanoseconds": 2**62}]


def test_an_arrow_error_from_a_files_data_fails_that_file_alone(models, tmp_path):
    """Review defect 1's class: any Arrow kernel error on a file's data escaped as a traceback and stopped the
    run. Real trigger: two served versions split rows by id, and a list-typed id has no text cast
    (ArrowNotImplementedError). That file now fails alone with the reason; the next file is scored."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    feats = {f: [0.1, 0.2] for f in [f"x{i}" for i in range(8)]}
    pq.write_table(pa.table({"id": pa.array([[1], [2]]), **feats}), inputs / "a.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], **feats}), inputs / "z.parquet")
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"versions": [{"name": "v1", "model": models["binary"], "weight": 50},
                                                {"name": "v2", "model": models["binary_v2"], "weight": 50}]}))
    proc = cli("batch", "--routing", str(routing), "--input", str(inputs), "--output", str(tmp_path / "out"))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    assert ("failed: a.parquet: cannot score a.parquet: ArrowNotImplementedError: Unsupported cast from "
            "list<element: int64> to utf8") in proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["files_scored"], summary["files_failed"], summary["rows_scored"]) == (1, 1, 2)


def test_the_allocator_returns_freed_memory_in_the_commands_and_is_not_claimed_after_pyarrow_loaded():
    """workers/__init__.py sets MIMALLOC_PURGE_DELAY=0 (batch peak RSS, #19) only where it takes effect: before
    pyarrow loads. Imported after pyarrow, it leaves the environment alone (the setting would not apply, and
    child processes would inherit a claim); a value the user set wins."""
    import subprocess
    import sys

    def setting(code: str, **env: str) -> str:
        clean = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
        return subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('MIMALLOC_PURGE_DELAY'))"],
                              capture_output=True, text=True, check=True, env={**clean, **env}).stdout.strip()

    assert setting("import workers.cli") == "0"
    assert setting("import pyarrow; import workers.cli") == "None"
    assert setting("import workers.cli", MIMALLOC_PURGE_DELAY="25") == "25"

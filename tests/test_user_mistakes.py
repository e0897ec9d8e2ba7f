"""Every user mistake in every command: one line naming the setting, the documented exit code, no traceback.

Each case runs the real CLI as a subprocess (env-var mistakes need a real process environment), from an
empty working folder. The documented exit codes (``scoring-worker --help``, README): 2 for a wrong setting or
usage, 1 for `check` failing a check (its FAIL line names the setting).
"""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import socket
import sqlite3
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import click
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import helpers


@dataclass
class Case:
    id: str
    args: list[str]
    names: str  # text the one error line must contain (the setting or option)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2
    where: str = "stderr"  # `check` prints its FAIL lines on stdout


def run_cli(args: list[str], cwd, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.upper().startswith("SCORING_")
            and k != "JOB_COMPLETION_INDEX"}
    if args[:1] == ["serve"]:
        full["SCORING_SERVE__GRPC_PORT"] = ""  # REST only, unless a case asks (8081 may be another test's)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "workers", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(models, tmp_path_factory):
    """Paths the cases name: a model, inputs, a results SQLite db, routing files good and bad, a taken port."""
    root = tmp_path_factory.mktemp("mistakes")
    inputs = root / "in"
    helpers.write_inputs(str(inputs), files=1, rows=50)
    (root / "bad.yaml").write_text("versions: [\n")
    (root / "list.json").write_text("[1, 2]")
    (root / "results").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "model_version": ["v1", "v1"], "score": [0.2, 0.7]}),
                   root / "results" / "part.parquet")  # the result columns compare/report read
    (root / "props.json").write_text('{"properties": 5}')
    (root / "ftp.yaml").write_text('versions: [{name: a, model: "ftp://host/m.txt", weight: 100}]\n')
    (root / "afile").write_text("not a folder")
    empty = root / "empty"
    empty.mkdir()
    table = pa.Table.from_pandas(helpers.frame(1), preserve_index=False)
    pq.write_table(table.slice(0, 0), empty / "none.parquet")  # a file of the right columns and no rows
    two = root / "two-models"  # a KServe storageUri prefix holding two model files
    (two / "v1").mkdir(parents=True)
    (two / "v1" / "model.bst").write_text("tree\n")
    (two / "model.txt").write_text("tree\n")
    (root / "no-model").mkdir()
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))  # noqa: S104 - the workers bind every interface by default
    taken.listen()
    yield {"model": models["binary"], "in": str(inputs), "root": root, "bad_routing": str(root / "bad.yaml"),
           "afile": str(root / "afile"), "empty": str(empty), "port": str(taken.getsockname()[1])}
    taken.close()


def cases(w: dict) -> list[Case]:
    m, inp, root, port = w["model"], w["in"], w["root"], w["port"]
    out = str(root / "out")
    sink = f"sqlite:///{root / 'stream.db'}?table=t"
    batch = ["batch", "--model", m, "--input", inp, "--output", out]
    stream = ["stream", "--model", m, "--topic", "t", "--bootstrap-servers", "127.0.0.1:1", "--sink", sink]
    return [
        # batch
        Case("batch-missing-model", ["batch", "--model", "nope.txt", "--input", inp, "--output", out],
             "SCORING_MODEL__PATH (--model)"),
        Case("batch-bad-uri-scheme", [*batch[:-1], "ftp://host/x"], "SCORING_BATCH__OUTPUT (--output)"),
        # A topic cannot say which inputs are finished: refused at start-up, not by a failure mid-run.
        Case("batch-output-without-ledger", [*batch[:-1], "kafka://results"],
             "SCORING_BATCH__OUTPUT (--output): kafka://results cannot keep the batch ledger"),
        Case("batch-bad-model-uri-scheme", ["batch", "--model", "ftp://host/m.txt", "--input", inp, "--output", out],
             "SCORING_MODEL__PATH (--model): unknown scheme 'ftp'"),
        Case("batch-bad-input-uri-scheme", ["batch", "--model", m, "--input", "ftp://host/day=1/", "--output", out],
             "SCORING_BATCH__INPUT (--input): unknown scheme 'ftp'"),
        Case("batch-bad-int-flag", [*batch, "--batch-rows", "lots"], "'--batch-rows'"),
        Case("batch-int-out-of-range", [*batch, "--batch-rows", "0"], "SCORING_BATCH__BATCH_ROWS (--batch-rows)"),
        Case("batch-bad-int-env", batch, "SCORING_BATCH__BATCH_ROWS", {"SCORING_BATCH__BATCH_ROWS": "lots"}),
        Case("batch-bad-choice-flag", [*batch, "--progress", "fancy"], "'--progress'"),
        Case("batch-bad-choice-env", batch, "SCORING_MODEL__BACKEND", {"SCORING_MODEL__BACKEND": "gpu"}),
        Case("batch-group-name-as-variable", batch, "SCORING_MODEL", {"SCORING_MODEL": "x"}),
        Case("batch-unknown-variable", batch, "SCORING_MODLE__PATH", {"SCORING_MODLE__PATH": m}),
        Case("batch-missing-input", ["batch", "--model", m, "--input", str(root / "nope"), "--output", out],
             "SCORING_BATCH__INPUT (--input)"),
        Case("batch-missing-output", ["batch", "--model", m, "--input", inp], "SCORING_BATCH__OUTPUT"),
        Case("batch-missing-routing-file", [*batch, "--routing", str(root / "nope.yaml")],
             "SCORING_ROUTING__PATH (--routing)"),
        Case("batch-bad-routing-file", [*batch, "--routing", w["bad_routing"]], "SCORING_ROUTING__PATH (--routing)"),
        Case("batch-routing-model-bad-scheme", [*batch, "--routing", str(root / "ftp.yaml")],
             "versions[0].model: unknown scheme 'ftp'"),
        Case("batch-profile-is-not-a-profile", batch, "SCORING_SCORING__PROFILE",
             {"SCORING_SCORING__PROFILE": str(root / "list.json")}),
        Case("serve-profile-is-not-a-profile", ["serve", "--model", m, "--port", "0"], "SCORING_SCORING__PROFILE",
             {"SCORING_SCORING__PROFILE": str(root / "list.json")}),
        Case("batch-job-index-garbage", batch, "JOB_COMPLETION_INDEX", {"JOB_COMPLETION_INDEX": "abc"}),
        Case("batch-job-index-out-of-range", [*batch, "--shard-count", "2"], "JOB_COMPLETION_INDEX",
             {"JOB_COMPLETION_INDEX": "3"}),
        Case("batch-shard-index-out-of-range", [*batch, "--shard-index", "3", "--shard-count", "2"],
             "SCORING_BATCH__SHARD_INDEX (--shard-index)"),
        Case("batch-unknown-option", [*batch, "--bogus"], "'--bogus'"),
        # stream
        Case("stream-missing-model", ["stream", "--model", "nope.txt", "--topic", "t"], "SCORING_MODEL__PATH"),
        Case("stream-bad-uri-scheme", [*stream, "--sink", "ftp://x"], "SCORING_STREAM__SINK (--sink)"),
        Case("stream-bad-int-flag", [*stream, "--max-records", "many"], "'--max-records'"),
        Case("stream-bad-choice-env", stream, "SCORING_STREAM__ON_BAD_RECORD",
             {"SCORING_STREAM__ON_BAD_RECORD": "skip"}),
        Case("stream-heartbeat-above-session", [*stream, "--heartbeat-interval-ms", "50000"],
             "SCORING_STREAM__HEARTBEAT_INTERVAL_MS"),
        Case("stream-metrics-port-in-use", [*stream, "--metrics-port", port], "SCORING_STREAM__METRICS_PORT"),
        Case("stream-group-name-as-variable", stream, "SCORING_KAFKA", {"SCORING_KAFKA": "broker:9092"}),
        # An empty group id aborted librdkafka (SIGABRT, exit 134); an empty id field dead-lettered everything;
        # a topic name Kafka refuses was retried forever; a sink or dead-letter topic that is an input topic looped.
        Case("stream-empty-group", [*stream, "--group", ""], "SCORING_STREAM__GROUP (--group)"),
        Case("stream-blank-group-env", stream, "SCORING_STREAM__GROUP", {"SCORING_STREAM__GROUP": " "}),
        Case("stream-empty-id-column", [*stream, "--id-column", ""], "SCORING_SCORING__ID_COLUMN (--id-column)"),
        Case("stream-bad-topic-name", [*stream, "--topic", "bad topic!"], "SCORING_STREAM__TOPICS (--topic)"),
        Case("stream-bad-dead-letter-topic", [*stream, "--dead-letter-topic", "x y"],
             "SCORING_STREAM__DEAD_LETTER_TOPIC (--dead-letter-topic)"),
        Case("stream-sink-is-the-input-topic", [*stream, "--sink", "kafka://t"], "SCORING_STREAM__SINK (--sink)"),
        Case("stream-dead-letter-is-the-input-topic", [*stream, "--dead-letter-topic", "t"],
             "SCORING_STREAM__DEAD_LETTER_TOPIC (--dead-letter-topic)"),
        # libpq refuses these at every connect: the worker retried them as an outage forever.
        Case("stream-bad-sslmode", [*stream, "--sink", "postgresql://u@127.0.0.1/db?table=x&sslmode=bogus"],
             "SCORING_STREAM__SINK (--sink)"),
        Case("stream-bad-connect-timeout", [*stream, "--sink", "postgresql://u@127.0.0.1/db?table=x&connect_timeout=abc"],
             "SCORING_STREAM__SINK (--sink)"),
        Case("stream-two-tables", [*stream, "--sink", "postgresql://u@127.0.0.1/db?table=a&table=b"],
             "SCORING_STREAM__SINK (--sink)"),
        Case("stream-unclosed-bracket-in-uri", [*stream, "--sink", "postgresql://u:pw@[::1:5432/db?table=x"],
             "SCORING_STREAM__SINK (--sink)"),
        # serve
        Case("serve-missing-model", ["serve", "--model", "nope.txt", "--port", "0"], "SCORING_MODEL__PATH"),
        Case("serve-model-dir-two-models", ["serve", "--model_dir", str(root / "two-models"), "--port", "0"],
             "SCORING_MODEL__DIR (--model-dir): "),
        Case("serve-model-dir-empty", ["serve", "--model-dir", str(root / "no-model"), "--port", "0"],
             "SCORING_MODEL__DIR (--model-dir): "),
        Case("serve-model-dir-missing", ["serve", "--model-dir", str(root / "nope"), "--port", "0"],
             "SCORING_MODEL__DIR (--model-dir): "),
        Case("serve-model-and-model-dir", ["serve", "--model", m, "--model-dir", str(root / "two-models"),
                                           "--port", "0"], "not both"),
        Case("serve-port-in-use", ["serve", "--model", m, "--port", port], "SCORING_SERVE__PORT"),
        Case("serve-bad-port", ["serve", "--model", m, "--port", "http"], "'--port'"),
        Case("serve-grpc-port-in-use", ["serve", "--model", m, "--port", "0", "--grpc-port", port],
             "SCORING_SERVE__GRPC_PORT"),
        Case("serve-grpc-port-is-the-http-port", ["serve", "--model", m, "--port", "8089", "--grpc-port", "8089"],
             "SCORING_SERVE__GRPC_PORT"),
        Case("serve-host-not-here", ["serve", "--model", m, "--host", "192.0.2.1", "--port", "8080"],
             "SCORING_SERVE__HOST (--host)"),
        Case("serve-host-unknown", ["serve", "--model", m, "--host", "no-such-host.invalid", "--port", "8080"],
             "SCORING_SERVE__HOST (--host)"),
        Case("serve-bad-uri-scheme", ["serve", "--model", m, "--port", "0", "--sink", "ftp://x"],
             "SCORING_SERVE__SINK (--sink)"),
        # check: settings mistakes stop it like any command; a model it cannot load is a FAIL line (exit 1)
        Case("check-bad-int-env", ["check", "--model", m], "SCORING_MODEL__THREADS", {"SCORING_MODEL__THREADS": "0"}),
        Case("check-missing-model", ["check", "--model", "nope.txt"], "SCORING_MODEL__PATH", code=1, where="stdout"),
        Case("check-bad-output-scheme", ["check", "--model", m, "--output", "ftp://x"], "SCORING_BATCH__OUTPUT",
             code=1, where="stdout"),
        Case("check-bad-sink-scheme", ["check", "--model", m, "--sink", "nosuch://x"],
             "SCORING_STREAM__SINK: unknown scheme 'nosuch'", code=1, where="stdout"),
        Case("check-unclosed-bracket-in-sink", ["check", "--model", m, "--sink", "postgresql://u:pw@[::1:5432/db?table=x"],
             "SCORING_STREAM__SINK: cannot read", code=1, where="stdout"),
        Case("check-output-without-ledger", ["check", "--model", m, "--output", "kafka://results"],
             "SCORING_BATCH__OUTPUT: kafka://results cannot keep the batch ledger", code=1, where="stdout"),
        Case("check-bad-shadow-sink", ["check", "--model", m, "--shadow-sink", "sqlite:///"],
             "SCORING_ROUTING__SHADOW_SINK", code=1, where="stdout"),
        Case("check-missing-routing-file", ["check", "--routing", str(root / "nope.yaml")],
             "SCORING_ROUTING__PATH", code=1, where="stdout"),
        # settings
        Case("settings-group-name-as-variable", ["settings", "--env"], "SCORING_SERVE", {"SCORING_SERVE": "1"}),
        Case("settings-bad-choice", ["settings", "--env", "--log-level", "loud"], "'--log-level'"),
        # schema, compile
        Case("schema-missing-model", ["schema", "--model", "nope.txt"], "SCORING_MODEL__PATH (--model)"),
        Case("schema-missing-producer-schema", ["schema", "--model", m, "--check", "nope.json"], "--check"),
        Case("schema-producer-schema-is-a-list", ["schema", "--model", m, "--check", str(root / "list.json")],
             "--check"),
        Case("schema-producer-properties-not-an-object", ["schema", "--model", m, "--check",
                                                          str(root / "props.json")], "--check"),
        Case("schema-has-no-routing", ["schema", "--routing", w["bad_routing"]], "'--routing'"),
        Case("compile-missing-model", ["compile", "--model", "nope.txt"], "SCORING_MODEL__PATH (--model)"),
        Case("compile-missing-routing-file", ["compile", "--routing", str(root / "nope.yaml")],
             "SCORING_ROUTING__PATH (--routing)"),
        # profile
        Case("profile-output-folder-missing", ["profile", "--model", m, "--data", inp, "--output",
                                               str(root / "nope" / "p.json")], "--output"),
        Case("profile-data-missing", ["profile", "--model", m, "--data", str(root / "nope"), "--output",
                                      str(root / "p.json")], "--data"),
        Case("profile-data-without-rows", ["profile", "--model", m, "--data", w["empty"], "--output", "p.json"],
             "--data"),
        Case("profile-bad-bins", ["profile", "--model", m, "--data", inp, "--output", "p.json", "--bins", "x"],
             "'--bins'"),
        Case("profile-missing-model", ["profile", "--model", "nope.txt", "--data", inp, "--output", "p.json"],
             "SCORING_MODEL__PATH (--model)"),
        # report, compare
        Case("report-output-folder-missing", ["report", "--results", out, "--output", str(root / "nope" / "r.html")],
             "--output"),
        Case("report-bad-since", ["report", "--results", inp, "--output", "r.html", "--since", "garbage"],
             "--since"),
        Case("report-results-are-not-results", ["report", "--results", inp, "--output", "r.html"], "--results"),
        Case("report-profile-without-data", ["report", "--results", inp, "--output", "r.html", "--profile", "p"],
             "--data"),
        Case("report-profile-is-not-a-profile", ["report", "--model", m, "--results", str(root / "results"),
                                                 "--output", str(root / "r.html"), "--profile",
                                                 str(root / "list.json"), "--data", inp], "--profile"),
        Case("compare-bad-since", ["compare", "--results", inp, "--since", "yesterday-ish"], "--since"),
        Case("compare-missing-sqlite-db", ["compare", "--results", "sqlite:///nope.db?table=t"], "--results"),
        Case("compare-bad-uri-scheme", ["compare", "--results", "ftp://x/t"], "--results"),
        Case("compare-bad-threshold", ["compare", "--results", inp, "--threshold", "half"], "'--threshold'"),
        # demo, produce
        Case("demo-bad-rows", ["demo", "--rows", "many"], "'--rows'"),
        Case("demo-dir-is-a-file", ["demo", "--dir", w["afile"], "--rows", "100"], "--dir"),
        Case("produce-missing-input", ["produce", "--topic", "t", "--input", str(root / "nope")], "--input"),
        Case("produce-missing-topic", ["produce", "--input", inp], "'--topic'"),
        Case("unknown-command", ["scroe"], "'scroe'"),
    ]


# The workspace's keys with dummy values: enough to list the cases (ids, commands) before any fixture runs.
DRY = {"model": "", "in": "", "root": pathlib.Path("/"), "port": "0", "bad_routing": "", "afile": "", "empty": ""}
CASE_IDS = [c.id for c in cases(DRY)]


@pytest.fixture(scope="module")
def outcomes(workspace, tmp_path_factory):
    """Every case run once, four at a time (each is a separate process of about a second of CPU)."""

    def one(case: Case):
        cwd = tmp_path_factory.mktemp(case.id)
        return case, cwd, run_cli(case.args, cwd, case.env)

    with ThreadPoolExecutor(4) as pool:
        return {case.id: (case, cwd, proc) for case, cwd, proc in pool.map(one, cases(workspace))}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_a_user_mistake_gets_one_line_naming_the_setting(outcomes, case_id):
    case, cwd, proc = outcomes[case_id]
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, shown
    assert proc.returncode == case.code, shown
    text = proc.stdout if case.where == "stdout" else proc.stderr
    marker = "FAIL" if case.where == "stdout" else "error:"
    lines = [line for line in text.splitlines() if line.startswith(marker)]
    assert len(lines) == 1, shown
    assert case.names in lines[0], shown
    assert not [p for p in cwd.iterdir()], f"{case.id} left files in the working folder: {list(cwd.iterdir())}"


def test_help_shows_integer_float_and_choices_not_text():
    """Each option bound to a setting has the click type of the setting's type; --help shows it."""
    from workers.cli import FLAGS, cli
    from workers.settings import field_for

    wrong = []
    for name, command in cli.commands.items():
        for param in command.params:
            parts = tuple(param.name.split("__"))
            if parts not in FLAGS or getattr(param, "is_flag", False) or param.multiple:
                continue
            ann = field_for(parts).annotation
            base = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
            base = base[0] if len(base) == 1 else ann
            want = ("choice" if typing.get_origin(base) is typing.Literal else
                    {int: "integer", float: "float"}.get(base, "text"))
            if param.type.name != want:
                wrong.append(f"{name} {param.opts[0]}: {param.type.name}, want {want}")
    assert not wrong, wrong
    proc = run_cli(["stream", "--help"], None)
    for text in ("--threads INTEGER", "--routing-poll-s FLOAT", "--backend [lightgbm|lleaves]",
                 "--on-bad-record [dead-letter|fail]", "--metrics-port INTEGER"):
        assert text in " ".join(proc.stdout.split()), text


def test_empty_metrics_port_disables_it_and_settings_env_says_so(tmp_path):
    from workers.settings import load_settings

    os.environ["SCORING_STREAM__METRICS_PORT"] = ""
    try:
        assert load_settings().stream.metrics_port is None
    finally:
        del os.environ["SCORING_STREAM__METRICS_PORT"]
    assert load_settings({"stream": {"metrics_port": ""}}).stream.metrics_port is None
    proc = run_cli(["settings", "--env"], tmp_path, {"SCORING_STREAM__METRICS_PORT": ""})
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["SCORING_STREAM__METRICS_PORT="], proc.stderr
    proc = run_cli(["settings", "--env", "--metrics-port", ""], tmp_path)
    assert proc.stdout.splitlines() == ["SCORING_STREAM__METRICS_PORT="], proc.stderr


def test_job_completion_index_picks_the_shard_and_within_range_scores(models, tmp_path):
    inputs = tmp_path / "in"
    helpers.write_inputs(str(inputs), files=6, rows=20)
    counts = []
    for index in ("0", "1"):
        proc = run_cli(["batch", "--model", models["binary"], "--input", str(inputs), "--output",
                        str(tmp_path / f"out{index}"), "--shard-count", "2"], tmp_path, {"JOB_COMPLETION_INDEX": index})
        assert proc.returncode == 0, proc.stderr
        counts.append(orjson.loads(proc.stdout)["files_in_shard"])
    assert sum(counts) == 6 and all(counts), counts


def test_profile_reads_the_routing_files_primary_version(models, tmp_path):
    from tests.test_rollout import write_routing

    inputs = tmp_path / "in"
    helpers.write_inputs(str(inputs), files=1, rows=300, categorical=True)
    routing = write_routing(tmp_path / "routing.yaml", [
        {"name": "cat", "model": models["categorical"], "weight": 100},
        {"name": "plain", "model": models["binary"], "shadow": True},
    ])
    proc = run_cli(["profile", "--routing", str(routing), "--data", str(inputs), "--output", "p.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    profile = orjson.loads((tmp_path / "p.json").read_bytes())
    assert {"color", "size"} <= set(profile["features"]), sorted(profile["features"])


def _sqlite_results(models, tmp_path) -> tuple[str, list[dt.datetime]]:
    inputs = tmp_path / "in"
    helpers.write_inputs(str(inputs), files=2, rows=40)
    db = tmp_path / "results.db"
    uri = f"sqlite:///{db}?table=scores"
    proc = run_cli(["batch", "--model", models["binary"], "--input", str(inputs), "--output", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(db) as conn:
        stamps = [dt.datetime.fromisoformat(r[0]) for r in conn.execute("SELECT scored_at FROM scores")]
    return uri, stamps


def test_compare_since_compares_times_not_text(models, tmp_path):
    uri, stamps = _sqlite_results(models, tmp_path)
    first, last = min(stamps), max(stamps)
    plus2 = dt.timezone(dt.timedelta(hours=2))

    def rows(since: str) -> int:
        proc = run_cli(["compare", "--results", uri, "--json", "--since", since], tmp_path)
        assert proc.returncode == 0, proc.stderr
        return orjson.loads(proc.stdout)["rows"]

    # The same instant spelled with a +02:00 offset: as text it sorts after every stored UTC time.
    assert rows((first - dt.timedelta(seconds=1)).astimezone(plus2).isoformat()) == 80
    assert rows((last + dt.timedelta(seconds=1)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")) == 0
    assert rows("1h") == 80  # a duration ago
    assert rows("2000-01-01") == 80


def test_check_and_compare_create_no_file_in_the_working_folder(models, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for args in (["check", "--model", models["binary"]],  # the default sink: sqlite:///scores.db
                 ["check", "--model", models["binary"], "--output", "results/"],
                 ["check", "--model", models["binary"], "--shadow-sink", "sqlite:///shadow.db?table=s"],
                 ["compare", "--results", "sqlite:///scores.db?table=scores"]):
        proc = run_cli(args, work)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert list(work.iterdir()) == [], f"{args} created {list(work.iterdir())}"
    proc = run_cli(["check", "--model", models["binary"]], work)
    assert proc.returncode == 0 and "ok   sink: sqlite:///scores.db" in proc.stdout, proc.stdout + proc.stderr


def test_settings_env_and_check_never_print_a_password(models, tmp_path):
    sink = "postgresql://scorer:pa55word@db.internal:5432/prod?table=t&sslpassword=k3y"
    proc = run_cli(["settings", "--env", "--sink", sink, "--shadow-sink", "sqlite:///s.db?table=s"], tmp_path,
                   {"SCORING_KAFKA__SASL_PASSWORD": "sasl-secret"})
    assert proc.returncode == 0, proc.stderr
    assert "pa55word" not in proc.stdout and "k3y" not in proc.stdout and "sasl-secret" not in proc.stdout
    assert "SCORING_STREAM__SINK=postgresql://scorer:***@db.internal:5432/prod?table=t&sslpassword=***" in \
        proc.stdout.splitlines()
    assert proc.stderr.startswith("note: passwords inside URIs are shown as ***"), proc.stderr


@pytest.mark.postgres
def test_batch_summary_and_logs_never_print_the_database_password(models, pg_dsn, pg_table, tmp_path):
    # The test server trusts every local connection, so any password is accepted: the run succeeds.
    user_host = pg_dsn.split("://", 1)[1]
    user, host = user_host.split("@", 1)
    output = f"postgresql://{user}:Sup3rSecret@{host}?table={pg_table}"
    inputs = tmp_path / "in"
    helpers.write_inputs(str(inputs), files=1, rows=30)
    proc = run_cli(["batch", "--model", models["binary"], "--input", str(inputs), "--output", output,
                    "--progress", "log"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Sup3rSecret" not in proc.stdout + proc.stderr
    assert orjson.loads(proc.stdout)["output"] == f"postgresql://{user}:***@{host}?table={pg_table}"
    proc = run_cli(["check", "--model", models["binary"], "--output", output], tmp_path)
    assert proc.returncode == 0 and "Sup3rSecret" not in proc.stdout + proc.stderr, proc.stdout


def test_usage_errors_are_one_line():
    proc = run_cli(["batch", "--bogus"], None)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: No such option '--bogus'. (see 'scoring-worker batch --help')"]


def test_click_type_keeps_empty_for_optional_numbers():
    from workers.cli import click_type

    assert click_type(int | None).convert("", None, None) == ""
    assert click_type(int | None).convert("7", None, None) == 7
    with pytest.raises(click.BadParameter):
        click_type(int).convert("", None, None)


def test_redact_hides_passwords_and_keeps_every_other_spelling():
    from workers.settings import redact

    assert redact("sqlite:///rel.db?table=a.b") == "sqlite:///rel.db?table=a.b"
    assert redact("sqlite:////abs/x.db?table=t") == "sqlite:////abs/x.db?table=t"
    assert redact("postgresql://u:pa/ss@h:5432/db?table=t") == "postgresql://u:***@h:5432/db?table=t"
    assert redact("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://h/db?table=t&password=x&sslpassword=y") == \
        "postgresql://h/db?table=t&password=***&sslpassword=***"
    assert redact("postgresql://u@h/db?table=t") == "postgresql://u@h/db?table=t"
    assert redact("s3://bucket/day=1/") == "s3://bucket/day=1/"
    assert redact("plain/folder") == "plain/folder"
    # Passwords pasted unencoded: a ? or # before the @ is still the password's.
    assert redact("postgresql://postgres:Xy?z9secret@127.0.0.1:5432/test?table=t") == \
        "postgresql://postgres:***@127.0.0.1:5432/test?table=t"
    assert redact("postgresql://u:p#x@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://h/db?email=a@b") == "postgresql://h/db?email=a@b"


def test_driver_messages_quoting_the_password_are_scrubbed():
    """psycopg quotes what it cannot parse, a password with a bare % included; the sink's errors must not."""
    from workers.errors import SinkError
    from workers.settings import scrub
    from workers.sinks.postgres import PostgresSink

    uri = "postgresql://postgres:s3%cret@127.0.0.1:5432/test?table=t&sslpassword=hunter22"
    assert scrub('invalid percent-encoded token: "s3%cret"; hunter22', uri) == \
        'invalid percent-encoded token: "***"; ***'
    with pytest.raises(SinkError) as info:
        PostgresSink(uri, "SCORING_STREAM__SINK").check()
    assert "s3%cret" not in str(info.value) and "hunter22" not in str(info.value)


def test_a_multi_line_driver_error_is_one_line(tmp_path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()  # nothing listens there: psycopg's refusal message spans two lines
    proc = run_cli(["compare", "--results", f"postgresql://postgres:pw@127.0.0.1:{closed}/test?table=t"], tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot read postgresql://postgres:***@127.0.0.1:") and "pw" not in \
        proc.stderr.replace("postgresql", ""), proc.stderr


@pytest.mark.postgres
def test_compare_since_in_postgres_takes_durations_and_offsets(models, pg_dsn, pg_table, tmp_path):
    inputs = tmp_path / "in"
    helpers.write_inputs(str(inputs), files=1, rows=25)
    results = f"{pg_dsn}?table={pg_table}"
    proc = run_cli(["batch", "--model", models["binary"], "--input", str(inputs), "--output", results], tmp_path)
    assert proc.returncode == 0, proc.stderr
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).astimezone(dt.timezone(dt.timedelta(hours=-7)))
    for since, rows in (("1h", 25), (later.isoformat(), 0), ("2000-01-01T00:00", 25)):
        proc = run_cli(["compare", "--results", results, "--json", "--since", since], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert orjson.loads(proc.stdout)["rows"] == rows, since


def test_every_command_has_mistake_cases():
    """A command added later must bring its mistakes here too."""
    from workers.cli import cli

    covered = {c.args[0] for c in cases(DRY)}
    assert set(cli.commands) <= covered, sorted(set(cli.commands) - covered)


def test_a_refused_value_is_shown_without_its_password(models, tmp_path):
    proc = run_cli(["schema", "--model", "ftp://reader:hunter2@models.internal/m.txt"], tmp_path)
    assert proc.returncode == 2 and "hunter2" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("error: SCORING_MODEL__PATH (--model): unknown scheme 'ftp'; use a path, file:// "
                                   "or s3:// (got 'ftp://reader:***@models.internal/m.txt')")
    helpers.write_inputs(str(tmp_path / "in"), files=1, rows=5)
    proc = run_cli(["batch", "--model", models["binary"], "--input", str(tmp_path / "in"), "--output",
                    "postgres+psycopg://writer:hunter2@db/prod?table=t"], tmp_path)
    assert proc.returncode == 2 and "hunter2" not in proc.stderr and "writer:***@db" in proc.stderr, proc.stderr

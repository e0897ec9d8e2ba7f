"""The Redis sink against the real Redis server on 127.0.0.1:6379 (``TEST_REDIS_URL`` to override): batch mode end
to end, stream mode in process (``workers.testing``), shadow/A-B versions kept apart, TTL, refused rows, bad URIs,
secrets, and an unreachable server. Every test writes under a prefix of its own and deletes it afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import lightgbm as lgb
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, need
from tests.helpers import frame, write_inputs
from tests.test_rollout import write_routing
from tests.test_stream import records
from workers.errors import ConfigError, RowsRejected, SinkError
from workers.runtime.batch import run_batch
from workers.scoring.scorer import Scored
from workers.settings import S3Settings, load_settings
from workers.sinks import open_sink
from workers.sinks.redis import RedisSink
from workers.testing import Crash, CrashInStore, Script, rec

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SETTING = "SCORING_BATCH__OUTPUT"


@pytest.fixture(scope="module")
def client():
    import redis

    c = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        c.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        need("Redis", f"{REDIS_URL}: {exc}")
    yield c
    c.close()


@pytest.fixture
def prefix(client):
    """A fresh key prefix; every key under it is deleted afterwards."""
    p = f"t-{uuid.uuid4().hex[:10]}:"
    yield p
    keys = list(client.scan_iter(match=p + "*", count=1000))
    if keys:
        client.delete(*keys)


def uri(prefix: str, extra: str = "") -> str:
    return f"{REDIS_URL}?prefix={prefix}{extra}"


def state(client, prefix: str) -> dict:
    """Every key under the prefix with its value (hash fields, set members) and whether it expires."""
    out = {}
    for key in client.scan_iter(match=prefix + "*", count=1000):
        kind = client.type(key)
        value = client.hgetall(key) if kind == b"hash" else sorted(client.smembers(key))
        out[key.decode("utf-8", "replace")[len(prefix):]] = (kind.decode(), value)
    return out


def results_of(client, prefix: str) -> dict[str, dict]:
    """id -> the hash of its results (fields decoded; version fields parsed from JSON), meta keys left out."""
    out = {}
    for key, (kind, fields) in state(client, prefix).items():
        if key.startswith("_") or kind != "hash":
            continue
        out[key] = {f.decode(): (v.decode() if f == b"served" else orjson.loads(v)) for f, v in fields.items()}
    return out


def expected(model: str, inputs: list[pd.DataFrame]) -> pd.Series:
    booster = lgb.Booster(model_file=model)
    df = pd.concat(inputs)
    return pd.Series(booster.predict(df[booster.feature_name()]), index=df["id"])


def batch_settings(models, inputs, output, **more):
    return load_settings({"model": {"path": models["binary"]}, "scoring": {"passthrough": ["x7"]},
                          "batch": {"input": inputs, "output": output, **more}})


# -- batch mode -----------------------------------------------------------------------------------------------
def test_batch_end_to_end_scores_once_rerun_writes_nothing_a_changed_file_rewrites_and_the_ledger_resumes(
        models, tmp_path, client, prefix):
    inputs = str(tmp_path / "in")
    paths = write_inputs(inputs, files=3, rows=400, row_group=150)
    settings = batch_settings(models, inputs, uri(prefix), batch_rows=100)
    report = run_batch(settings)
    assert report.exit_code == 0 and report.rows == 1200
    got = results_of(client, prefix)
    assert len(got) == 1200
    version = next(iter(got.values()))["served"]
    want = expected(models["binary"], [frame(400, seed=100 + k) for k in range(3)])
    scores = pd.Series({i: h[h["served"]]["score"] for i, h in got.items()})
    assert np.max(np.abs(scores.loc[want.index].to_numpy() - want.to_numpy())) <= 1e-12
    row = got["r100-5"][version]
    assert row["x7"] == frame(400, seed=100).set_index("id").loc["r100-5", "x7"]  # passthrough kept
    assert row["served"] is True and row["model_version"] == version and row["scored_at"].endswith("Z")
    assert set(got["r100-5"]) == {version, "served"}
    ledger = {k.decode(): orjson.loads(v) for k, v in client.hgetall(prefix + "_ledger").items()}
    assert sorted(ledger) == sorted(os.path.realpath(p) for p in paths)
    assert all(e["rows"] == 400 and e["rejected"] == 0 and e["fingerprint"] for e in ledger.values())

    # A rerun skips every input and writes nothing: the whole keyspace under the prefix is unchanged.
    before = state(client, prefix)
    again = run_batch(settings)
    assert again.exit_code == 0 and again.rows == 0 and again.files_skipped == 3
    assert state(client, prefix) == before

    # A changed file is scored again: its old ids go, the others' results stay as they were.
    changed = frame(50, seed=100, id_prefix="n")  # ids n100-0..49 replace r100-*
    pq.write_table(pa.Table.from_pandas(changed, preserve_index=False), paths[0])
    third = run_batch(settings)
    assert third.exit_code == 0 and third.rows == 50 and third.files_skipped == 2
    got = results_of(client, prefix)
    assert len(got) == 850 and not any(i.startswith("r100-") for i in got)
    want = expected(models["binary"], [changed])
    assert max(abs(got[i][version]["score"] - want[i]) for i in want.index) <= 1e-12
    after = state(client, prefix)
    assert all(after[k] == before[k] for k in before if k.startswith("r101-"))
    assert sorted(client.smembers(f"{prefix}_unit:{os.path.realpath(paths[0])}")) == sorted(
        i.encode() for i in changed["id"])

    # Resume: an input whose ledger entry is missing (the run died after its commit) is scored again, alone.
    client.hdel(prefix + "_ledger", os.path.realpath(paths[2]))
    fourth = run_batch(settings)
    assert fourth.rows == 400 and fourth.files_skipped == 2
    assert len(results_of(client, prefix)) == 850


def test_batch_rejected_rows_are_kept_with_reason_and_rewritten_with_their_file(models, tmp_path, client, prefix):
    inputs = tmp_path / "in"
    inputs.mkdir()
    df = frame(6, seed=3)
    df["id"] = df["id"].astype(object)
    df.loc[2, "id"] = None  # a missing id: the scorer rejects the row
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), inputs / "a.parquet")
    settings = batch_settings(models, str(inputs), uri(prefix, "&ttl_s=600"), allow_bad_rows=True)
    report = run_batch(settings)
    assert report.exit_code == 0 and report.rows == 5 and report.rejected == 1
    source = f"{os.path.realpath(inputs / 'a.parquet')}#2"
    errors = client.hgetall(f"{prefix}_errors:{source}")
    (version, body), = errors.items()
    entry = orjson.loads(body)
    assert entry["id"] is None and "id" in entry["reason"] and entry["raw"]["x0"] == df.loc[2, "x0"]
    assert entry["model_version"] == version.decode() and entry["source"] == source
    assert 0 < client.ttl(f"{prefix}_errors:{source}") <= 600
    # The file fixed: its error entry goes with the rewrite.
    pq.write_table(pa.Table.from_pandas(frame(6, seed=3), preserve_index=False), inputs / "a.parquet")
    assert run_batch(settings).rows == 6
    assert not client.exists(f"{prefix}_errors:{source}")
    assert len(results_of(client, prefix)) == 6


def test_ttl_is_set_on_every_result_key(models, tmp_path, client, prefix):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=30)
    assert run_batch(batch_settings(models, inputs, uri(prefix, "&ttl_s=3600"))).rows == 30
    ttls = [client.ttl(prefix + i) for i in results_of(client, prefix)]
    assert len(ttls) == 30 and all(3500 < t <= 3600 for t in ttls)
    unit = next(k for k in state(client, prefix) if k.startswith("_unit:"))
    assert 3500 < client.ttl(prefix + unit) <= 3600
    assert client.ttl(prefix + "_ledger") == -1  # the ledger does not expire (see the module docstring)
    # Without ttl_s nothing expires.
    other = prefix + "n:"
    try:
        run_batch(batch_settings(models, inputs, uri(other)))
        assert {client.ttl(other + i) for i in results_of(client, other)} == {-1}
    finally:
        client.delete(*client.scan_iter(match=other + "*"))


# -- shadow and A/B ----------------------------------------------------------------------------------------------
def test_shadow_and_ab_versions_are_kept_apart_and_a_shadow_never_moves_the_served_pointer(models, tmp_path,
                                                                                           client, prefix):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=2, rows=300)
    routing = write_routing(tmp_path / "routing.yaml", [
        {"name": "v1", "model": models["binary"], "weight": 50},
        {"name": "v2", "model": models["binary_v2"], "weight": 50},
        {"name": "v3", "model": models["binary_v2"], "shadow": True}])
    settings = load_settings({"routing": {"path": routing}, "batch": {"input": inputs, "output": uri(prefix)}})
    assert run_batch(settings).exit_code == 0
    got = results_of(client, prefix)
    assert len(got) == 600
    served = {i: h["served"] for i, h in got.items()}
    assert set(served.values()) == {"v1", "v2"}  # the A/B split
    df = pd.concat([frame(300, seed=100 + k) for k in range(2)]).set_index("id")
    for name, model in (("v1", "binary"), ("v2", "binary_v2"), ("v3", "binary_v2")):
        ids = [i for i in got if name in got[i]]
        assert ids, name
        booster = lgb.Booster(model_file=models[model])
        want = booster.predict(df.loc[ids, booster.feature_name()])
        assert np.max(np.abs(np.array([got[i][name]["score"] for i in ids]) - want)) <= 1e-12
    for i, h in got.items():
        assert set(h) == {"served", served[i], "v3"}  # the served version, the shadow, the pointer
        assert h[served[i]]["served"] is True and h["v3"]["served"] is False
    # A shadow row written later (another run, stream or serve) never moves the pointer.
    sink = RedisSink(uri(prefix), "SCORING_STREAM__SINK")
    some = list(got)[:5]
    sink.write_batch(Scored(pa.table({"id": some, "score": [0.5] * 5, "model_version": ["v9"] * 5,
                                      "served": [False] * 5}), pa.table({})))
    sink.close()
    after = results_of(client, prefix)
    assert all(after[i]["served"] == served[i] and after[i]["v9"]["score"] == 0.5 for i in some)
    # compare reads the Redis results: every version, served and shadow rows counted.
    out = subprocess.run([sys.executable, "-m", "workers", "compare", "--results", uri(prefix), "--json"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = {v["version"]: (v["served_rows"], v["shadow_rows"]) for v in report["versions"]}
    n1 = sum(1 for v in served.values() if v == "v1")
    assert rows == {"v1": (n1, 0), "v2": (600 - n1, 0), "v3": (0, 600), "v9": (0, 5)}


# -- stream mode, in process -----------------------------------------------------------------------------------
class RedisBehindScript(RedisSink):
    """The Redis sink, telling the script what it stored (the script checks every commit against it). A script
    marker in the batch acts after Redis stored it: CrashInStore is then a crash between the store and the
    commit, so the restarted worker writes those rows again (idempotency)."""

    def __init__(self, target: str, script: Script):
        super().__init__(target, "SCORING_STREAM__SINK")
        self.script = script

    def write_batch(self, scored: Scored) -> None:
        super().write_batch(scored)
        self.script.sink.write_batch(scored)


def stream_settings(models):
    return load_settings({"model": {"path": models["binary"]}, "stream": {
        "topics": ["t"], "metrics_port": None, "max_records": 10, "max_wait_ms": 5, "retry_backoff_max_s": 0.05,
        "shutdown_timeout_s": 2.0}})


def test_stream_in_process_stores_every_record_once_through_a_crash_and_a_restart(models, client, prefix):
    from workers.runtime.stream.worker import StreamWorker

    recs = records(60)
    items: list = [rec("t", i % 2, r) for i, r in enumerate(recs)]
    items.insert(40, Crash())
    items.insert(17, CrashInStore())
    script = Script(items)

    def worker() -> StreamWorker:
        return StreamWorker(stream_settings(models), source=script.source(), sink=RedisBehindScript(uri(prefix),
                            script), dead_letters=script.dead_letters(), burst=True)

    from workers.testing import Crashed

    runs = 0
    while True:
        runs += 1
        try:
            assert worker().run() == 0
            break
        except Crashed:
            assert runs < 5
    # Both crashes happened (the one in the store may end the same run as the one while polling: stages overlap).
    assert runs >= 2 and script.fired == {0} and list(script.sink.spent.values()) == [1]
    assert script.committed == {tp: len(log) for tp, log in script.logs.items()}
    got = results_of(client, prefix)
    assert sorted(got) == sorted(r["id"] for r in recs)
    booster = lgb.Booster(model_file=models["binary"])
    df = pd.DataFrame(recs).set_index("id")
    want = pd.Series(booster.predict(df[booster.feature_name()]), index=df.index)
    version = got["s0"]["served"]
    for i, h in got.items():
        assert set(h) == {"served", version}
        row = h[version]
        assert abs(row["score"] - want[i]) <= 1e-12 and row["topic"] == "t"
        tp = ("t", row["partition"])
        assert orjson.loads(script.logs[tp][row["offset"]].value())["id"] == i  # where the record was read


# -- rows the store refuses, bad URIs, secrets, an unreachable server ---------------------------------------------
def test_rows_without_a_usable_id_are_refused_before_anything_of_the_call_is_stored(client, prefix):
    sink = RedisSink(uri(prefix), "SCORING_STREAM__SINK")
    table = pa.table({"id": ["a", None, "", "_ledger", "_errors:x", "b"], "score": [0.1] * 6,
                      "model_version": ["v1"] * 6, "served": [True] * 6})
    with pytest.raises(RowsRejected) as err:
        sink.write_batch(Scored(table, pa.table({})))
    assert sorted(err.value.rows) == [1, 2, 3, 4]
    assert "missing" in err.value.rows[1] and "empty" in err.value.rows[2] and "own keys" in err.value.rows[3]
    assert state(client, prefix) == {}
    with pytest.raises(RowsRejected, match="served-pointer"):
        sink.write_batch(Scored(pa.table({"id": ["a"], "score": [0.1], "model_version": ["served"]}), pa.table({})))
    # Ids of other types are keys as text; binary ids as their bytes; values of any type have a JSON form.
    import decimal

    sink.write_batch(Scored(pa.table({"id": pa.array([7, 8], pa.int64()), "score": [0.25, 0.5],
                                      "model_version": ["v1", "v1"], "served": [True, True],
                                      "d": pa.array([decimal.Decimal("1.10"), None], pa.decimal128(5, 2)),
                                      "b": [b"\x00\xff", b"x"]}), pa.table({})))
    sink.write_batch(Scored(pa.table({"id": [b"\xff\x00"], "score": [1.0], "model_version": ["v1"]}), pa.table({})))
    sink.close()
    got = results_of(client, prefix)
    assert got["7"]["v1"] == {"id": 7, "score": 0.25, "model_version": "v1", "served": True, "d": 1.10,
                              "b": "AP8="}
    assert client.hget(prefix.encode() + b"\xff\x00", "served") == b"v1"


def test_a_duplicated_key_in_one_write_keeps_the_later_row_and_is_counted(client, prefix):
    sink = RedisSink(uri(prefix), "SCORING_STREAM__SINK")
    sink.write_batch(Scored(pa.table({"id": ["a", "a", "b"], "score": [0.1, 0.2, 0.3],
                                      "model_version": ["v1", "v1", "v1"]}), pa.table({})))
    assert sink.duplicates_collapsed == 1
    sink.write_batch(Scored(pa.table({"id": ["a"], "score": [0.2], "model_version": ["v1"]}), pa.table({})))
    sink.close()
    assert results_of(client, prefix)["a"] == {"v1": {"id": "a", "score": 0.2, "model_version": "v1"},
                                               "served": "v1"}


@pytest.mark.parametrize(("target", "message"), [
    ("redis://127.0.0.1:notaport/0", "the port must be a whole number"),
    ("redis://127.0.0.1:70000/0", "the port must be a whole number from 1 to 65535"),
    ("redis://:pw-s3cret@127.0.0.1:6379/zero", "the database (the path after the port) must be a whole number"),
    ("redis://127.0.0.1:6379/0?ttl_s=0", "ttl_s (seconds) must be a whole number at least 1"),
    ("redis://127.0.0.1:6379/0?ttl_s=1.5", "ttl_s (seconds) must be a whole number"),
    ("redis://:pw-s3cret@127.0.0.1:6379/0?prefx=a:", "unknown query key(s) 'prefx'"),
    ("redis://127.0.0.1:6379/0?password=pw-s3cret", "unknown query key(s) 'password'"),
    ("redis://127.0.0.1:6379/0?ca_file=/etc/hosts", "ca_file is for TLS: use rediss://"),
    ("rediss://127.0.0.1:6379/0?ca_file=/nonexistent/ca.pem", "ca_file '/nonexistent/ca.pem' is not a file"),
])
def test_a_bad_uri_is_one_line_naming_the_setting_without_the_password(target, message):
    for setting in ("SCORING_BATCH__OUTPUT", "SCORING_STREAM__SINK", "SCORING_SERVE__SINK"):
        with pytest.raises(ConfigError) as err:
            open_sink(target, S3Settings(), setting=setting)
        assert err.value.setting == setting and message in err.value.reason
        assert "\n" not in str(err.value) and "pw-s3cret" not in str(err.value)


def test_a_bad_uri_stops_the_cli_with_exit_2_and_one_line(models, tmp_path):
    write_inputs(str(tmp_path / "in"), files=1, rows=5)
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                           str(tmp_path / "in"), "--output", "redis://:pw-s3cret@127.0.0.1:6379/x"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: SCORING_BATCH__OUTPUT (--output): redis://:***@127.0.0.1:6379/x: the "
                                  "database") and len(proc.stderr.strip().splitlines()) == 1
    assert "pw-s3cret" not in proc.stderr + proc.stdout


def test_an_unreachable_server_is_a_retryable_sink_error_naming_the_redacted_address(models, tmp_path):
    closed = free_port()  # nothing listens there
    target = f"redis://user:pw-s3cret@127.0.0.1:{closed}/0?prefix=x:"
    sink = RedisSink(target, SETTING)
    assert sink.name == f"redis://user:***@127.0.0.1:{closed}/0?prefix=x:"
    table = Scored(pa.table({"id": ["a"], "score": [0.1], "model_version": ["v1"]}), pa.table({}))
    for call in (sink.check, lambda: sink.write_batch(table), lambda: sink.ledger().done("u"),
                 lambda: sink.ledger().mark_done("u", "f", 1, 0), lambda: sink.write_unit("u", table)):
        with pytest.raises(SinkError) as err:
            call()
        assert f"127.0.0.1:{closed}" in str(err.value) and "pw-s3cret" not in str(err.value)
        assert sink.name in str(err.value)
    sink.close()
    # Through the CLI: the run stops with the reason, exit 1, and the password appears nowhere.
    write_inputs(str(tmp_path / "in"), files=1, rows=5)
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                           str(tmp_path / "in"), "--output", target], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"127.0.0.1:{closed}" in proc.stderr and "pw-s3cret" not in proc.stderr + proc.stdout
    assert json.loads(proc.stdout)["output"] == sink.name


def test_redis_going_away_mid_run_is_a_sink_error_and_writes_resume_when_it_is_back(client, prefix):
    """The server becomes unreachable (``tests.proxy.Proxy`` in front of the real Redis is cut): the write fails
    with a retryable SinkError naming the address; after ``restore`` the same sink writes again."""
    from urllib.parse import urlparse

    from tests.proxy import Proxy

    real = urlparse(REDIS_URL)
    proxy = Proxy(real.hostname or "127.0.0.1", real.port or 6379)
    try:
        sink = RedisSink(f"redis://127.0.0.1:{proxy.port}{real.path}?prefix={prefix}", "SCORING_STREAM__SINK")
        one = Scored(pa.table({"id": ["a"], "score": [0.1], "model_version": ["v1"]}), pa.table({}))
        sink.write_batch(one)
        proxy.cut()
        two = Scored(pa.table({"id": ["b"], "score": [0.2], "model_version": ["v1"]}), pa.table({}))
        for call in (lambda: sink.write_batch(two), sink.check, lambda: sink.write_unit("u", two)):
            with pytest.raises(SinkError, match=f"127.0.0.1:{proxy.port}"):
                call()
        assert sorted(results_of(client, prefix)) == ["a"]
        proxy.restore()
        sink.write_batch(two)
        sink.close()
        assert sorted(results_of(client, prefix)) == ["a", "b"]
    finally:
        proxy.close()


def test_a_run_with_a_password_never_shows_it(models, tmp_path, client, prefix):
    """The local server has no password: Redis accepts AUTH with one (redis-py's documented fallback), so the
    whole run goes through with a secret in the URI, which must appear in no output, log line or summary."""
    write_inputs(str(tmp_path / "in"), files=2, rows=20)
    target = f"redis://:pw-s3cret@{REDIS_URL.split('://', 1)[1]}?prefix={prefix}"
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                           str(tmp_path / "in"), "--output", target], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd(), "SCORING_LOG_LEVEL": "DEBUG"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == target.replace("pw-s3cret", "***")
    assert "pw-s3cret" not in proc.stdout + proc.stderr
    assert len(results_of(client, prefix)) == 40


def test_rediss_takes_a_ca_file_and_the_uri_parts_are_read_as_given(tmp_path):
    from workers.sinks.redis import RedisTarget

    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before connecting")
    t = RedisTarget(f"rediss://app:p%40ss@cache.internal:6380/3?prefix=s:&ttl_s=60&ca_file={ca}", SETTING)
    assert (t.tls, t.host, t.port, t.db, t.username, t.password, t.prefix, t.ttl_s, t.ca_file) == (
        True, "cache.internal", 6380, 3, "app", "p@ss", "s:", 60, str(ca))
    assert t.name == f"rediss://app:***@cache.internal:6380/3?prefix=s:&ttl_s=60&ca_file={ca}"
    plain_target = RedisTarget("redis://[::1]", SETTING)
    assert (plain_target.tls, plain_target.host, plain_target.port, plain_target.db, plain_target.prefix,
            plain_target.ttl_s) == (False, "::1", 6379, 0, "scores:", 0)


def test_a_rewritten_unit_keeps_only_its_new_rows_and_an_emptied_one_leaves_nothing(client, prefix):
    sink = RedisSink(uri(prefix), SETTING)

    def unit(ids, version, name="/in/a.parquet"):
        table = pa.table({"id": ids, "score": [0.5] * len(ids), "model_version": [version] * len(ids),
                          "served": [True] * len(ids)})
        writer = sink.begin(name)
        if ids:
            writer.write(Scored(table, pa.table({})))
        writer.commit()

    unit(["a", "b"], "v1")
    unit(["c"], "v1", name="/in/other.parquet")
    unit(["b", "d"], "v2")  # a new model: v1's rows of this unit go, the pointer follows v2
    got = results_of(client, prefix)
    assert set(got) == {"b", "c", "d"}
    assert got["b"] == {"served": "v2", "v2": {"id": "b", "score": 0.5, "model_version": "v2", "served": True}}
    # An aborted rewrite stores nothing and deletes nothing.
    writer = sink.begin("/in/a.parquet")
    writer.write(Scored(pa.table({"id": ["z"], "score": [0.1], "model_version": ["v3"]}), pa.table({})))
    writer.abort()
    assert set(results_of(client, prefix)) == {"b", "c", "d"}
    unit([], "v2")  # the input emptied: its rows, id set and unit entry go; the other input's stay
    assert set(results_of(client, prefix)) == {"c"}
    assert sorted(state(client, prefix)) == ["_unit:/in/other.parquet", "_units", "c"]
    sink.close()


def test_a_foreign_key_of_another_type_under_the_prefix_fails_the_write_naming_it(client, prefix):
    client.set(prefix + "b", "not a hash")
    sink = RedisSink(uri(prefix), "SCORING_STREAM__SINK")
    with pytest.raises(SinkError, match=f"WRONGTYPE .*key {prefix}b"):
        sink.write_batch(Scored(pa.table({"id": ["a", "b"], "score": [0.1, 0.2], "model_version": ["v1", "v1"]}),
                                pa.table({})))
    sink.close()
    assert client.get(prefix + "b") == b"not a hash"  # left as it was


def test_a_result_that_settles_an_earlier_rejection_deletes_its_error_entry(client, prefix):
    """Serve mode: an event rejected once, redelivered and now scored (``Scored.resolved``)."""
    sink = RedisSink(uri(prefix), "SCORING_SERVE__SINK")
    errors = pa.table({"id": ["e1"], "reason": ["x0 is not a number"], "raw": ['{"x0": "abc"}'],
                       "model_version": ["v1"], "source": ["events/0@5"]})
    sink.write_batch(Scored(pa.table({"id": ["a"], "score": [0.1], "model_version": ["v1"]}), errors))
    body = orjson.loads(client.hget(f"{prefix}_errors:events/0@5", "v1"))
    assert body == {"id": "e1", "reason": "x0 is not a number", "raw": {"x0": "abc"}, "model_version": "v1",
                    "source": "events/0@5"}
    sink.write_batch(Scored(pa.table({"id": ["e1"], "score": [0.7], "model_version": ["v1"]}), pa.table({}),
                            resolved=[("events/0@5", "v1")]))
    sink.close()
    assert not client.exists(f"{prefix}_errors:events/0@5")
    assert results_of(client, prefix)["e1"]["v1"]["score"] == 0.7


def test_a_stale_stream_write_never_replaces_a_later_offset_of_the_same_partition(client, prefix):
    """A zombie worker (its partition reassigned) writes offset 5 after the new owner stored offset 9: skipped,
    served pointer included. Another partition's row is not ordered against it: the later write wins."""
    sink = RedisSink(uri(prefix), "SCORING_STREAM__SINK")

    def write(partition, offset, score, served=True, version="v1"):
        sink.write_batch(Scored(pa.table({"id": ["a"], "score": [score], "model_version": [version],
                                          "served": [served], "topic": ["t"],
                                          "partition": pa.array([partition], pa.int32()),
                                          "offset": pa.array([offset], pa.int64())}), pa.table({})))

    write(0, 9, 0.9)
    write(0, 5, 0.5)  # stale
    assert results_of(client, prefix)["a"]["v1"]["score"] == 0.9
    write(0, 9, 0.91)  # the same offset again (a redelivery): written
    assert results_of(client, prefix)["a"]["v1"]["score"] == 0.91
    write(0, 3, 0.3, version="v2")  # another version has its own order
    write(1, 2, 0.2)  # another partition: the later write wins
    sink.close()
    got = results_of(client, prefix)["a"]
    assert (got["v1"]["score"], got["v1"]["partition"], got["v2"]["score"], got["served"]) == (0.2, 1, 0.3, "v1")


def test_shadow_rows_to_their_own_redis_prefix(models, tmp_path, client, prefix):
    """``--shadow-sink``: served rows (and the ledger) in the main prefix, shadow rows in the other, where no
    served pointer is ever set."""
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=50)
    routing = write_routing(tmp_path / "routing.yaml", [{"name": "v1", "model": models["binary"]},
                                                        {"name": "v3", "model": models["binary_v2"], "shadow": True}])
    shadow = "s" + prefix  # not under the main prefix: nested prefixes would mix their keys
    settings = load_settings({"routing": {"path": routing, "shadow_sink": uri(shadow)},
                              "batch": {"input": inputs, "output": uri(prefix)}})
    try:
        assert run_batch(settings).exit_code == 0
        main, side = results_of(client, prefix), results_of(client, shadow)
        assert len(main) == len(side) == 50
        assert all(set(h) == {"v1", "served"} and h["served"] == "v1" for h in main.values())
        assert all(set(h) == {"v3"} and h["v3"]["served"] is False for h in side.values())
        assert client.hlen(prefix + "_ledger") == 1 and not client.exists(shadow + "_ledger")
    finally:
        keys = list(client.scan_iter(match=shadow + "*"))
        if keys:
            client.delete(*keys)


def test_sigkill_partway_then_rerun_gives_every_row_exactly_once(models, tmp_path, client, prefix):
    import signal
    import time

    inputs = str(tmp_path / "in")
    files, rows = 12, 3000
    write_inputs(inputs, files=files, rows=rows, row_group=500)
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs, "--output",
            uri(prefix), "--batch-rows", "500"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and client.hlen(prefix + "_ledger") < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = client.hlen(prefix + "_ledger")
    assert 3 <= finished_before < files, "the kill must land partway through the run"
    rerun = subprocess.run(args, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["files_skipped"] >= finished_before and summary["files_scored"] == files - summary["files_skipped"]
    got = results_of(client, prefix)
    assert len(got) == files * rows
    assert all(len(h) == 2 for h in got.values())  # one version and the pointer: nothing twice, nothing stale
    assert client.hlen(prefix + "_ledger") == files

"""Break-it review of the Redis and MariaDB sinks, used as a new user would from the README: ``scoring-worker
batch`` as a process, Parquet written by pyarrow and by pandas in daily folders (``dt=2026-12-01/part-0.parquet``)
with every Arrow type as passthrough and as id, nulls everywhere, duplicate ids, column names that collide with
ours, the store cut away mid-run (a TCP proxy, ``tests/proxy.py``), and two runs at once on one output.

Real Redis (127.0.0.1:6379) and MariaDB (127.0.0.1:3306); the fixtures of ``tests/test_redis_sink.py`` and
``tests/test_mysql_sink.py`` give each test its own prefix / table and clean up.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import os
import subprocess
import sys
import time

import lightgbm as lgb
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests import test_redis_sink
from tests.conftest import MYSQL_URI
from tests.conftest import query_mysql as query
from tests.helpers import FEATURES, write_inputs
from tests.proxy import Proxy
from tests.test_redis_sink import REDIS_URL, results_of
from workers.errors import ConfigError
from workers.sinks.redis import RedisSink, RedisTarget

client, prefix = test_redis_sink.client, test_redis_sink.prefix  # its fixtures: a Redis client, a fresh prefix

PASSTHROUGH = ["i8", "u8", "i16", "u32", "i64", "u64", "dec", "ts", "d32", "ls", "bin", "dict", "lst", "st", "b",
               "f16", "nanf"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")} | {"PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def rich_inputs(root) -> tuple[str, pd.DataFrame]:
    """Two daily folders: pyarrow-written (every type, a null in every third row, a null id, an id twice, ours
    ``score``/``model_version`` as input columns) and pandas-written (unicode ids, ``a``/``A``/``a `` distinct,
    ``a`` twice, a ``label`` column). Returns the input root and the rows that must be stored (the later of
    duplicates, no null id) with their expected score."""
    n = 12
    rng = np.random.default_rng(5)
    feats = {f: pa.array(rng.normal(size=n)) for f in FEATURES}
    cols = {
        "i8": pa.array(range(-6, 6), pa.int8()), "u8": pa.array(range(n), pa.uint8()),
        "i16": pa.array(range(n), pa.int16()), "u32": pa.array([2**32 - 1] * n, pa.uint32()),
        "i64": pa.array([-(2**63)] * n, pa.int64()), "u64": pa.array([2**64 - 1] * n, pa.uint64()),
        "dec": pa.array([decimal.Decimal("12345678901234567890.123456789")] * n, pa.decimal128(38, 9)),
        "ts": pa.array([dt.datetime(2026, 12, 1, 23, 59, 59, 123456, tzinfo=dt.UTC)] * n,
                       pa.timestamp("us", "Europe/Paris")),
        "d32": pa.array([dt.date(2026, 12, 1)] * n, pa.date32()),
        "ls": pa.array(["é" * 300 + "\u0000x"] * n, pa.large_string()),
        "bin": pa.array([b"\x00\xff"] * n, pa.binary()),
        "dict": pa.array(["a", "b", "c"] * 4).dictionary_encode(),
        "lst": pa.array([[1.0, None]] * n, pa.list_(pa.float64())),
        "st": pa.array([{"a": 1, "b": "x"}] * n, pa.struct([("a", pa.int64()), ("b", pa.string())])),
        "b": pa.array([True, False] * 6), "f16": pa.array(np.array([1.5] * n, np.float16)),
        "nanf": pa.array([float("nan"), 1.0, 2.0] * 4),
    }
    mask = pa.array([i % 3 == 1 for i in range(n)])
    cols = {k: pc.if_else(mask, pa.nulls(n, v.type), v) for k, v in cols.items()}
    ids = pa.array([1, 2, 3, 3, None, 2**62, 7, 8, 9, 10, 11, 12], pa.int64())
    table = pa.table({"id": ids, **feats, **cols, "score": pa.array([9.0] * n), "model_version": ["x"] * n})
    for day in ("2026-12-01", "2026-12-02"):
        os.makedirs(root / f"dt={day}")
    pq.write_table(table, root / "dt=2026-12-01" / "part-0.parquet")
    df = pd.DataFrame({f: rng.normal(size=6) for f in FEATURES})
    df.insert(0, "id", ["ü-1", "😀" * 200, "a", "A", "a ", "a"])
    df["label"] = ["L"] * 6
    df.to_parquet(root / "dt=2026-12-02" / "part-0.parquet")
    first = table.to_pandas()
    first = first[first["id"].notna()].drop_duplicates("id", keep="last")
    first["id"] = first["id"].astype("int64").astype(str)
    second = df.drop_duplicates("id", keep="last")
    keep = pd.concat([first[["id", *FEATURES]], second[["id", *FEATURES]]])
    return str(root), keep


def _expected(models, keep: pd.DataFrame) -> dict[str, float]:
    booster = lgb.Booster(model_file=models["binary"])
    return dict(zip(keep["id"], booster.predict(keep[FEATURES]), strict=True))


def test_batch_into_redis_every_arrow_type_daily_folders_duplicates_and_a_null_id(models, tmp_path, client, prefix):
    root, keep = rich_inputs(tmp_path / "lake")
    # Only the pyarrow day has the passthrough columns: score that day with them, then the pandas day without.
    day1 = cli("batch", "--model", models["binary"], "--input", f"{root}/dt=2026-12-01", "--output",
               f"{REDIS_URL}?prefix={prefix}", "--passthrough", ",".join(PASSTHROUGH))
    s1 = summary(day1)
    assert (s1["rows_scored"], s1["rows_rejected"], s1["duplicates_collapsed"]) == (11, 1, 1)
    assert day1.returncode == 1 and day1.stderr.strip().splitlines()[-1].startswith("rejected 1 rows")
    day2 = cli("batch", "--model", models["binary"], "--input", f"{root}/dt=2026-12-02", "--output",
               f"{REDIS_URL}?prefix={prefix}")
    s2 = summary(day2)
    assert day2.returncode == 0 and (s2["rows_scored"], s2["duplicates_collapsed"]) == (6, 1)
    got = results_of(client, prefix)
    want = _expected(models, keep)
    assert set(got) == set(want)
    for key, fields in got.items():
        row = fields[fields["served"]]
        assert abs(row["score"] - want[key]) <= 1e-12 and row["model_version"] == fields["served"]
    row = got["1"][got["1"]["served"]]
    assert (row["u64"], row["i64"], row["u32"], row["i8"]) == (2**64 - 1, -(2**63), 2**32 - 1, -6)
    raw = client.hget(prefix + "1", got["1"]["served"])
    assert b'"dec":12345678901234567890.123456789,' in raw  # exact digits (a JSON number)
    assert row["ts"] == "2026-12-02T00:59:59.123456+01:00" and row["d32"] == "2026-12-01"
    assert row["ls"] == "é" * 300 + "\u0000x" and row["bin"] == "AP8=" and row["dict"] == "a"
    assert row["lst"] == [1.0, None] and row["st"] == {"a": 1, "b": "x"} and row["b"] is True
    assert row["f16"] == 1.5 and row["nanf"] is None  # NaN: JSON has none, null
    assert all(got["2"][got["2"]["served"]][c] is None for c in PASSTHROUGH)  # nulls stay null
    errors = [k for k in client.scan_iter(match=prefix + "_errors:*")]
    assert [k.decode().rsplit("#", 1)[1] for k in errors] == ["4"]  # the null id, with its reason
    again = summary(cli("batch", "--model", models["binary"], "--input", root, "--output",
                        f"{REDIS_URL}?prefix={prefix}"))
    assert again["files_skipped"] == 2 and again["rows_scored"] == 0  # ledger by canonical location


def test_batch_into_mariadb_every_arrow_type_daily_folders_and_distinct_unicode_ids(models, tmp_path, my_table):
    root, keep = rich_inputs(tmp_path / "lake")
    day1 = cli("batch", "--model", models["binary"], "--input", f"{root}/dt=2026-12-01", "--output",
               f"{MYSQL_URI}?table={my_table}", "--passthrough", ",".join(PASSTHROUGH))
    s1 = summary(day1)
    assert (s1["rows_scored"], s1["rows_rejected"], s1["duplicates_collapsed"]) == (11, 1, 1)
    day2 = summary(cli("batch", "--model", models["binary"], "--input", f"{root}/dt=2026-12-02", "--output",
                       f"{MYSQL_URI}?table=x{my_table}"))
    # A text id table of its own (the first has a bigint id): 😀*200 is 200 characters, within varchar(255).
    try:
        assert (day2["rows_scored"], day2["duplicates_collapsed"]) == (6, 1)
        ids = {r[0]: r[1] for r in query(f"SELECT id, score FROM `x{my_table}`")}
    finally:
        for suffix in ("", "_errors", "_inputs"):
            query(f"DROP TABLE IF EXISTS `x{my_table}{suffix}`")
    rows = {str(r["id"]): r for r in query(f"SELECT * FROM `{my_table}`", dicts=True)}
    want = _expected(models, keep)
    assert set(rows) | set(ids) == set(want) and len(ids) == 5  # a, A, "a " are three ids
    for key, score in [*((k, r["score"]) for k, r in rows.items()), *ids.items()]:
        assert abs(score - want[key]) <= 1e-12
    r = rows["1"]
    assert (r["u64"], r["i64"], r["u32"]) == (2**64 - 1, -(2**63), 2**32 - 1)
    assert r["dec"] == decimal.Decimal("12345678901234567890.123456789")
    assert r["ts"] == dt.datetime(2026, 12, 1, 23, 59, 59, 123456)  # UTC
    assert r["ls"] == "é" * 300 + "\u0000x" and r["bin"] == b"\x00\xff" and json.loads(r["st"]) == {"a": 1, "b": "x"}
    assert r["nanf"] is None and r["f16"] == 1.5
    assert [e["source"].rsplit("#", 1)[1] for e in query(f"SELECT source FROM `{my_table}_errors`", dicts=True)] \
        == ["4"]


def test_mariadb_ids_that_differ_only_in_nanoseconds_are_not_silently_made_one(models, tmp_path, my_table):
    """Defect: datetime(6) keeps microseconds, so two timestamp ids 1 ns apart became one row while the summary
    said both were scored and none collapsed (a result lost without a word). Now such rows are refused with the
    reason (the file fails alone, as any row the table cannot hold), never merged."""
    ids = pa.array([1_700_000_000_123_456_789, 1_700_000_000_123_456_788, 1_700_000_000_000_000_000],
                   pa.timestamp("ns", "UTC"))
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": ids, **{f: pa.array([0.1, 0.2, 0.3]) for f in FEATURES}}), folder / "p.parquet")
    run = cli("batch", "--model", models["binary"], "--input", str(folder), "--output", f"{MYSQL_URI}?table={my_table}")
    s = summary(run)
    stored = query(f"SELECT COUNT(*) FROM `{my_table}`")[0][0] if s["files_failed"] == 0 else 0
    assert stored == s["rows_scored"] - s["duplicates_collapsed"], "every scored row is stored or refused, none merged"
    assert s["files_failed"] == 1 and "nanosecond" in run.stderr.strip().splitlines()[-1]
    # Whole microseconds (what pandas writes for most data) are stored as before.
    whole = pa.array([1_700_000_000_123_456_000, 1_700_000_000_123_457_000], pa.timestamp("ns", "UTC"))
    pq.write_table(pa.table({"id": whole, **{f: pa.array([0.1, 0.2]) for f in FEATURES}}), folder / "p.parquet")
    s = summary(cli("batch", "--model", models["binary"], "--input", str(folder), "--output",
                    f"{MYSQL_URI}?table={my_table}"))
    assert s["files_failed"] == 0 and query(f"SELECT COUNT(*) FROM `{my_table}`")[0][0] == 2


def test_a_hash_in_the_redis_prefix_is_refused_not_silently_cut(tmp_path):
    """Defect: ``?prefix=team#1:`` wrote under ``team`` (``#`` starts a URI fragment, which was dropped), so
    the keys and the ledger landed in another namespace without a word. Now a ConfigError naming the setting."""
    with pytest.raises(ConfigError) as err:
        RedisTarget("redis://127.0.0.1:6379/0?prefix=team#1:", "SCORING_BATCH__OUTPUT")
    assert err.value.setting == "SCORING_BATCH__OUTPUT" and "%23" in str(err.value)
    assert RedisTarget("redis://127.0.0.1:6379/0?prefix=team%231:", "S").prefix == "team#1:"
    assert RedisTarget("redis://127.0.0.1:6379/0?prefix=a%20b%7B%C3%A9%7D*?:", "S").prefix == "a b{é}*?:"


def test_a_plus_in_the_redis_prefix_is_a_plus_not_a_space():
    """Defect: ``?prefix=team+v2:`` wrote under ``team v2:`` (query form decoding), a namespace nobody named."""
    assert RedisTarget("redis://127.0.0.1:6379/0?prefix=team+v2:", "S").prefix == "team+v2:"
    assert RedisTarget("redis://127.0.0.1:6379/0?prefix=team%2Bv2:&ttl_s=5", "S").prefix == "team+v2:"


def test_a_redis_database_number_the_server_lacks_stops_start_up_naming_the_setting(models, tmp_path, client):
    """Defect: ``redis://host/16`` on a server with 16 databases (0-15) ran, failed as a retryable store outage
    ("sink failed; rerun to resume", exit 1) although no rerun can help. Now exit 2 with one line naming the
    setting and the database."""
    write_inputs(str(tmp_path / "in"), files=1, rows=10)
    count = int(client.config_get("databases")["databases"])
    run = cli("batch", "--model", models["binary"], "--input", str(tmp_path / "in"), "--output",
              f"{REDIS_URL.rsplit('/', 1)[0]}/{count}?prefix=t-db:")
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "Traceback" not in run.stderr and "SCORING_BATCH__OUTPUT" in last and f"database {count}" in last
    sink = RedisSink(f"{REDIS_URL.rsplit('/', 1)[0]}/{count - 1}?prefix=t-db:", "S")
    sink.check()  # the last one exists
    sink.close()


@pytest.mark.parametrize("store", ["redis", "mariadb"])
def test_the_store_cut_mid_run_then_a_rerun_gives_every_row_once(models, tmp_path, client, prefix, store, request):
    """The store goes away while a run writes (a TCP proxy cut, the shared server stays up): the run stops with
    one line naming the output, exit 1; a rerun through the restored proxy ends with every row exactly once, with
    the scores of predict."""
    inputs = str(tmp_path / "in")
    paths = write_inputs(inputs, files=12, rows=3000, row_group=500)
    if store == "mariadb":
        table = request.getfixturevalue("my_table")
        proxy = Proxy("127.0.0.1", 3306)
        output = f"{MYSQL_URI.replace('127.0.0.1:3306', f'127.0.0.1:{proxy.port}')}?table={table}"
    else:
        proxy = Proxy("127.0.0.1", int(REDIS_URL.rsplit(":", 1)[1].split("/")[0]))
        output = f"{REDIS_URL.replace(REDIS_URL.split('/')[2], f'127.0.0.1:{proxy.port}')}?prefix={prefix}"
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs, "--output",
            output, "--batch-rows", "500"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")} | {"PYTHONPATH": os.getcwd()}

    def finished() -> int:  # inputs in the ledger, read past the proxy
        if store == "redis":
            return int(client.hlen(prefix + "_ledger"))
        try:
            return int(query(f"SELECT COUNT(*) FROM `{table}_inputs`")[0][0])
        except Exception:  # not created yet
            return 0

    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and finished() < 2 and proc.poll() is None:
            time.sleep(0.005)
        proxy.cut()
        out, err = proc.communicate(timeout=120)
        assert finished() < len(paths), "the cut must land partway through the run"
        assert proc.returncode == 1 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("failed: ") and "127.0.0.1" in err.strip().splitlines()[-1]
        proxy.restore()
        rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    finally:
        proxy.close()
    frames = pd.concat([pd.read_parquet(p) for p in paths])
    want = dict(zip(frames["id"], lgb.Booster(model_file=models["binary"]).predict(frames[FEATURES]), strict=True))
    if store == "mariadb":
        got = dict(query(f"SELECT id, score FROM `{table}`"))
        assert query(f"SELECT COUNT(*) FROM `{table}`")[0][0] == len(want)
    else:
        got = {k: v[v["served"]]["score"] for k, v in results_of(client, prefix).items()}
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-12


@pytest.mark.parametrize("store", ["redis", "mariadb"])
def test_two_runs_at_once_on_one_output_store_every_row_once(models, tmp_path, client, prefix, store, request):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=8, rows=1500, row_group=500)
    output = (f"{MYSQL_URI}?table={request.getfixturevalue('my_table')}" if store == "mariadb"
              else f"{REDIS_URL}?prefix={prefix}")
    args = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input", inputs, "--output",
            output, "--batch-rows", "500"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORING_")} | {"PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    if store == "mariadb":
        table = request.getfixturevalue("my_table")
        assert query(f"SELECT COUNT(*), COUNT(DISTINCT id) FROM `{table}`")[0] == (12000, 12000)
    else:
        got = results_of(client, prefix)
        assert len(got) == 12000 and all(len(h) == 2 for h in got.values())
        assert client.hlen(prefix + "_ledger") == 8


def test_redis_rows_are_json_a_reader_in_another_language_parses(models, tmp_path, client, prefix):
    """Every stored value is strict JSON (no NaN/Infinity literals, which JSON.parse and cjson refuse)."""
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], **{f: pa.array([0.1, 0.2]) for f in FEATURES},
                             "f": pa.array([float("inf"), float("-inf")])}), folder / "p.parquet")
    s = summary(cli("batch", "--model", models["binary"], "--input", str(folder), "--output",
                    f"{REDIS_URL}?prefix={prefix}", "--passthrough", "f"))
    assert s["rows_scored"] == 2
    for key in client.scan_iter(match=prefix + "[ab]"):
        for field, value in client.hgetall(key).items():
            if field != b"served":
                orjson.loads(value)
                assert b"Infinity" not in value and b"NaN" not in value


# -- stream mode: a real broker and a real worker process --------------------------------------------------------
def _stream_into(kafka, models, tmp_path, sink: str, good: list[dict], bad: list[tuple], refused: list[dict],
                 stored):
    """Produce good, malformed and store-refused records, run a worker until every good one is stored and every
    other one dead-lettered, SIGKILL it, start a second worker that reads the same records again from an earlier
    commit point (redelivery), then stop it. Returns the dead letters."""
    import signal

    from tests.kafka_util import wait_for

    topic = kafka.topic(partitions=2)
    kafka.produce_json(topic, good[: len(good) // 2])
    kafka.produce(topic, bad)
    kafka.produce_json(topic, refused)
    kafka.produce_json(topic, good[len(good) // 2:])
    log = str(tmp_path / "w.log")
    args = ("--model", models["binary"], "--topic", topic, "--group", f"g-{topic}", "--sink", sink,
            "--metrics-port", "0")
    first = kafka.worker(*args, log=log)
    wait_for(lambda: stored() >= len(good) or first.poll() is not None, 90, what="every good record stored")
    dead = kafka.consume_all(f"{topic}.dlq", len(bad) + len(refused), timeout=30)
    assert first.poll() is None, open(log).read()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    kafka.produce_json(topic, good[:5])  # the same records again: an upsert, not a second row
    second = kafka.worker(*args, log=log + "2")
    time.sleep(8)  # joins the group (about 3 s) and reads the records after the last commit again
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, open(log + "2").read()[-3000:]
    return dead


@pytest.mark.kafka
def test_stream_into_redis_with_an_odd_prefix_a_db_number_ttl_bad_and_refused_records(models, tmp_path, kafka):
    import redis as redis_py

    from tests.test_stream import BAD, records

    good = records(120, start=7000)
    refused = [{"id": "_ledger", "x0": 1.0, **{f: 0.1 for f in FEATURES[1:]}},
               {"id": "", **{f: 0.1 for f in FEATURES}}]
    odd = "rv é{x}*?[ ]:"
    db = 3
    r = redis_py.Redis.from_url(f"{REDIS_URL.rsplit('/', 1)[0]}/{db}")
    from urllib.parse import quote

    sink = f"{REDIS_URL.rsplit('/', 1)[0]}/{db}?prefix={quote(odd)}&ttl_s=3600"
    try:
        dead = _stream_into(kafka, models, tmp_path, sink, good, BAD[:6], refused,
                            lambda: sum(1 for _ in r.scan_iter(match="rv \u00e9{x}\\*\\?\\[ \\]:s*")))
        reasons = {m.key(): dict(m.headers() or []) for m in dead}
        assert len(dead) == 8 and {b"_ledger", b""} <= set(reasons)
        keys = {k for k in r.scan_iter(match=odd.replace("*", "\\*").replace("?", "\\?").replace("[", "\\[")
                                       .replace("]", "\\]") + "*")}
        ids = {k.decode()[len(odd):] for k in keys}
        assert ids == {g["id"] for g in good}
        assert all(0 < r.ttl(k) <= 3600 for k in keys)
        booster = lgb.Booster(model_file=models["binary"])
        frame = pd.DataFrame(good)
        want = dict(zip(frame["id"], booster.predict(frame[FEATURES]), strict=True))
        for k in keys:
            h = r.hgetall(k)
            assert set(h) == {b"served", h[b"served"]}  # one version, once, redelivery or not
            assert abs(orjson.loads(h[h[b"served"]])["score"] - want[k.decode()[len(odd):]]) <= 1e-12
    finally:
        for k in r.scan_iter(match="rv \u00e9*"):
            r.delete(k)
        r.close()


@pytest.mark.kafka
def test_stream_into_mariadb_bad_and_refused_records_are_dead_lettered_and_redelivery_keeps_one_row(
        models, tmp_path, kafka, my_table):
    from tests.test_stream import BAD, records

    good = records(120, start=8000)
    refused = [{"id": "x" * 256, **{f: 0.1 for f in FEATURES}}]
    def stored() -> int:
        try:
            return int(query(f"SELECT COUNT(*) FROM `{my_table}`")[0][0])
        except Exception:  # the table is created with the first write
            return 0

    dead = _stream_into(kafka, models, tmp_path, f"{MYSQL_URI}?table={my_table}", good, BAD[:6], refused, stored)
    assert len(dead) == 7 and b"x" * 256 in {m.key() for m in dead}
    rows = dict(query(f"SELECT id, score FROM `{my_table}`"))
    frame = pd.DataFrame(good)
    want = dict(zip(frame["id"], lgb.Booster(model_file=models["binary"]).predict(frame[FEATURES]), strict=True))
    assert rows.keys() == want.keys() and max(abs(rows[k] - want[k]) for k in want) <= 1e-12

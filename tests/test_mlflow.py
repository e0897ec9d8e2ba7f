"""Models from a real MLflow registry (`mlflow server`, SQLite backend, artifacts through its proxy): batch, serve
and stream with models:/ and runs:/ URIs, refusals, and a stream worker following an alias while records flow
(promotion waiting for its load, a failed download retried, a version that cannot load, the registry cut away,
rollback mid-stream), checked per record against the alias history.

Kept fast: one server per session, every model logged by one client process (importing mlflow takes seconds),
aliases moved with the REST call, the worker CLI runs in parallel, and waits are on conditions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import lightgbm as lgb
import numpy as np
import psycopg
import pytest
import tritonclient.http as triton

from tests.conftest import free_port, wait_port
from tests.helpers import FEATURES, write_inputs
from tests.kafka_util import wait_for
from tests.mlflow_util import RegistryProxy
from tests.test_batch import cli, expected_scores, read_results
from tests.test_stream import count, records
from tests.test_stream_rollout import sample
from workers.observability import Metrics
from workers.runtime.watch import RoutingWatcher
from workers.settings import Settings

pytestmark = [pytest.mark.mlflow]
SECRET = "tok-Zq81-never-shown"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def registered(mlflow_server, models):
    """Every model the module uses, logged by one client process. ``name``: version 1 = models["binary"],
    2 = models["binary_v2"], alias champion -> 2. ``sk``/``skops``: a pickled / skops LGBMClassifier.
    ``stream``: 1 = binary, 2 = binary_v2, 3 = a pickle (cannot load), 4 = binary_v2 again (an artifact not
    downloaded yet); alias prod -> 1."""
    name, sk, skops, stream = unique("fraud"), unique("sk"), unique("skops"), unique("stream")
    got = mlflow_server.client({"op": "booster", "name": name, "file": models["binary"]},
                               {"op": "booster", "name": name, "file": models["binary_v2"]},
                               {"op": "sklearn", "name": sk, "format": "pickle"},
                               {"op": "sklearn", "name": skops, "format": "skops"},
                               {"op": "booster", "name": stream, "file": models["binary"]},
                               {"op": "booster", "name": stream, "file": models["binary_v2"]},
                               {"op": "sklearn", "name": stream},
                               {"op": "booster", "name": stream, "file": models["binary_v2"]},
                               {"op": "alias", "name": name, "alias": "champion", "version": "2"},
                               {"op": "alias", "name": stream, "alias": "prod", "version": "1"})
    assert [g.get("version") for g in got[:8]] == ["1", "2", "1", "1", "1", "2", "3", "4"]
    return {"name": name, "sk": sk, "skops": skops, "stream": stream, "run_v1": got[0]["run_id"]}


def parallel(*commands: tuple[tuple[str, ...], dict]) -> list[subprocess.CompletedProcess]:
    """``cli(*args, env=env)`` for each command, a few at a time (each is a process that imports the worker)."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda c: cli(*c[0], env=c[1]), commands))


def mlflow_env(server) -> dict:
    return {"SCORING_MLFLOW__TRACKING_URI": server.url, "SCORING_MLFLOW__TOKEN": SECRET}


def test_batch_with_alias_version_and_run_uris(mlflow_server, registered, models, tmp_path):
    name = registered["name"]
    inputs = str(tmp_path / "in")
    write_inputs(inputs, 2, 300)
    cases = [(f"models:/{name}@champion", f"{name}/2", models["binary_v2"]),
             (f"models:/{name}/1", f"{name}/1", models["binary"]),
             (f"runs:/{registered['run_v1']}/model", f"{registered['run_v1']}/model", models["binary"])]
    procs = parallel(*((("batch", "--model", uri, "--input", inputs, "--output", str(tmp_path / f"out{i}"),
                         "--cache-dir", str(tmp_path / "cache")), mlflow_env(mlflow_server))
                       for i, (uri, _, _) in enumerate(cases)))
    for i, ((_, version, file), proc) in enumerate(zip(cases, procs, strict=True)):
        assert proc.returncode == 0, proc.stderr
        assert SECRET not in proc.stdout + proc.stderr
        df = read_results(str(tmp_path / f"out{i}"))
        assert len(df) == 600 and df["id"].is_unique
        assert set(df["model_version"]) == {version}
        expected = expected_scores(file, 2, 300)
        assert np.allclose(df.set_index("id")["score"].loc[expected.index], expected, atol=1e-12)
    # Downloads are cached by content hash: version 1 (asked for twice, by two URIs) is one file.
    blobs = sorted(p.name for p in (tmp_path / "cache" / "mlflow").glob("*.lgb"))
    assert len(blobs) == 2


def test_serve_routing_file_with_registry_versions(mlflow_server, registered, models, tmp_path, monkeypatch):
    """A/B between two registry versions and a shadow, named by models:/ URIs in a routing file."""
    name = registered["name"]
    routing = tmp_path / "routing.yaml"
    routing.write_text(json.dumps({"versions": [
        {"name": "champion", "model": f"models:/{name}@champion", "weight": 50},
        {"name": "v1", "model": f"models:/{name}/1", "weight": 50},
        {"name": "shadow", "model": f"models:/{name}/1", "shadow": True}]}))
    for key, value in mlflow_env(mlflow_server).items():
        monkeypatch.setenv(key, value)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--routing", str(routing), "--port", str(port),
                             "--model-name", "fraud", "--cache-dir", str(tmp_path / "cache")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    assert wait_port(port, 60), "server did not start"
    addr = f"127.0.0.1:{port}"
    try:
        client = triton.InferenceServerClient(addr)
        x = np.random.default_rng(3).normal(size=(5, len(FEATURES)))
        boosters = {"champion": lgb.Booster(model_file=models["binary_v2"]),
                    "v1": lgb.Booster(model_file=models["binary"])}
        for version, booster in boosters.items():
            inputs = []
            for j, f in enumerate(FEATURES):
                inp = triton.InferInput(f, [5], "FP64")
                inp.set_data_from_numpy(np.ascontiguousarray(x[:, j]))
                inputs.append(inp)
            result = client.infer("fraud", inputs, model_version=version)
            assert result.get_response()["model_version"] == version
            assert np.allclose(result.as_numpy("score").reshape(-1), booster.predict(x), atol=1e-12)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def one_line_exit_2(proc, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert SECRET not in proc.stdout + proc.stderr
    return lines[0]


def test_refusals_are_one_line_and_never_show_the_token(mlflow_server, registered, tmp_path):
    name, env = registered["name"], mlflow_env(mlflow_server)
    inputs = str(tmp_path / "in")
    write_inputs(inputs, 1, 10)

    def batch(uri: str, extra_env: dict | None = None, *more: str) -> tuple[tuple[str, ...], dict]:
        return (("batch", "--model", uri, *more, "--input", inputs, "--output", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")), {**env, **(extra_env or {})})

    dead = f"http://127.0.0.1:{free_port()}"
    cases = [(batch(f"models:/{registered['sk']}/1"), ("SCORING_MODEL__PATH", "model.pkl", "pickle", "booster_",
                                                       "LGBMClassifier")),
             (batch(f"models:/{registered['skops']}/1"), ("model.skops", "booster_")),
             (batch(f"models:/{name}@nosuchalias"), ("SCORING_MODEL__PATH", "nosuchalias")),
             (batch(f"models:/{name}/99"), ("SCORING_MODEL__PATH", "99", "not found")),
             (batch("models:/no-such-model-xyz/1"), ("SCORING_MODEL__PATH", "no-such-model-xyz")),
             (batch("runs:/0123456789abcdef/model"), ("SCORING_MODEL__PATH", "0123456789abcdef")),
             (batch(f"models:/{name}@champion", {"SCORING_MLFLOW__TRACKING_URI": dead}),
              ("SCORING_MLFLOW__TRACKING_URI", "cannot reach", dead)),
             (batch(f"models:/{name}@champion", {"SCORING_MLFLOW__TRACKING_URI": ""}),
              ("SCORING_MLFLOW__TRACKING_URI", "must be set")),
             # A pin on a registry model applies as to a file.
             (batch(f"models:/{name}/1", None, "--model-sha256", "0" * 64), ("SCORING_MODEL__SHA256",
                                                                            "not the pinned"))]
    procs = parallel(*(c for c, _ in cases), (("settings", "--env"), env))
    for (_, needles), proc in zip(cases, procs, strict=False):
        one_line_exit_2(proc, *needles)
    shown = procs[-1]
    assert shown.returncode == 0 and SECRET not in shown.stdout + shown.stderr
    assert "SCORING_MLFLOW__TRACKING_URI=" in shown.stdout


def test_a_switch_waits_for_the_new_version_bounded(mlflow_server, registered, tmp_path):
    """Two watchers follow one alias through a proxy that holds the new version's download: one with a long
    SWITCH_WAIT_S (a serve request, ``current_async``, waits and is answered by the new version), one with a
    short one (the batch goes on with the old version after the wait, counted; the late version takes over)."""
    name, v1, v2 = registered["name"], f"{registered['name']}/1", f"{registered['name']}/2"
    mlflow_server.set_alias(name, "canary", "1")
    proxy = RegistryProxy(mlflow_server.port)

    def watcher(wait_s: float, cache: str) -> tuple[RoutingWatcher, Metrics]:
        settings = Settings(model={"path": f"models:/{name}@canary", "cache_dir": str(tmp_path / cache)},
                            mlflow={"tracking_uri": proxy.url, "poll_s": 0.1, "switch_wait_s": wait_s})
        metrics = Metrics()
        return RoutingWatcher(settings, metrics), metrics

    def value(metrics: Metrics, name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    (patient, pm), (hasty, hm) = watcher(60, "a"), watcher(0.3, "b")
    try:
        assert patient.current().primary.model.version == hasty.current().primary.model.version == v1
        proxy.script("model.lgb", "hold", "hold")
        mlflow_server.set_alias(name, "canary", "2")
        patient.start()
        hasty.start()
        wait_for(lambda: proxy.held == 2, 30, what="both downloads of version 2 held")
        assert "waiting for version 2" in patient.waiting and value(pm, "scoring_mlflow_switch_waiting") == 1
        started = time.monotonic()
        assert hasty.current().primary.model.version == v1  # waited SWITCH_WAIT_S, then the old version
        assert 0.3 <= time.monotonic() - started < 10
        assert value(hm, "scoring_mlflow_switches_total", result="timeout") == 1
        assert value(hm, "scoring_mlflow_switch_waiting") == 0 and hasty.waiting == ""

        async def request() -> str:
            task = asyncio.ensure_future(patient.current_async())
            await asyncio.sleep(0.5)  # the window in which the old code answered with version 1
            assert not task.done(), "a request during the switch did not wait for the new version"
            proxy.release()
            return (await asyncio.wait_for(task, 30)).primary.model.version

        assert asyncio.run(request()) == v2
        assert value(pm, "scoring_mlflow_switches_total", result="ok") == 1
        assert value(pm, "scoring_mlflow_switch_wait_seconds_total") >= 0.5
        # The version that outlasted the wait takes over when it is loaded, at a later batch.
        wait_for(lambda: hasty.pending is not None, 30, what="version 2 loaded late")
        assert hasty.current().primary.model.version == v2
        assert value(hm, "scoring_mlflow_switches_total", result="ok") == 0  # that move was counted a timeout
    finally:
        patient.stop()
        hasty.stop()
        proxy.close()


def stored(dsn: str, table: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f'SELECT id, model_version, score, "partition", "offset" FROM "{table}"').fetchall()


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.kafka
@pytest.mark.postgres
def test_stream_follows_the_alias_with_each_record_scored_by_the_version_it_named(
        mlflow_server, registered, models, kafka, pg_dsn, pg_table, tmp_path):
    """A stream worker on ``models:/NAME@prod`` (through a proxy the test steers) while records flow:
    a: version 1. b: promotion to 2 whose download is held: batches wait (readiness says so), nothing is
    scored by 1 meanwhile, every record of b by 2. c: move to 4, whose download fails once (2 keeps serving,
    every record of c1 by 2 while the retry is held), then the retry loads it (c2 by 4). d: move to a pickle
    (3): refused, retried, 4 serves. e: registry cut away: 4 serves. f: rollback to 1 while records flow: per
    partition 4 then 1, every record stored before the move by 4, every record produced after the worker
    resolved the move by 1. Every record scored exactly once, with its version's own score."""
    name = registered["stream"]
    proxy = RegistryProxy(mlflow_server.port)
    topic = kafka.topic(partitions=3)
    port = free_port()
    log = tmp_path / "w.log"
    worker = kafka.worker("--model", f"models:/{name}@prod", "--mlflow-tracking-uri", proxy.url,
                          "--mlflow-poll-s", "0.3", "--routing-poll-s", "0.3",
                          "--cache-dir", str(tmp_path / "cache"), "--topic", topic, "--group", f"g-{pg_table}",
                          "--sink", f"{pg_dsn}?table={pg_table}", "--metrics-port", str(port),
                          env={"SCORING_MLFLOW__TOKEN": SECRET, "SCORING_MLFLOW__RETRY_S": "0.3",
                               "SCORING_MLFLOW__RETRY_MAX_S": "1", "SCORING_MLFLOW__SWITCH_WAIT_S": "120"},
                          log=str(log))

    def serving(version: str) -> bool:
        try:
            return sample(port, f'scoring_routing_weight{{model_version="{name}/{version}",role="served"}}') == 100
        except OSError:
            return False

    def metric(line: str) -> float:
        return sample(port, line) or 0.0

    phases: dict[str, list[str]] = {}
    values: dict[str, list[float]] = {}
    total = 0

    def produce(phase: str, n: int, wait: bool = True) -> list[str]:
        nonlocal total
        batch = records(n, total)
        values.update({r["id"]: [r[f] for f in FEATURES] for r in batch})
        kafka.produce_json(topic, batch)
        phases.setdefault(phase, []).extend(r["id"] for r in batch)
        total += n
        if wait:
            wait_for(lambda: count(pg_dsn, pg_table)[0] >= total, 90, what=f"phase {phase} stored")
        return [r["id"] for r in batch]

    v1, v2, v3, v4 = (f"{name}/{v}" for v in "1234")
    wait_for(lambda: serving("1"), 60, what="worker serving version 1")
    produce("a", 300)
    # b: promotion; the new version's download is held, so the switch stays open as long as the test likes.
    proxy.script("model.lgb", "hold")
    mlflow_server.set_alias(name, "prod", "2")
    wait_for(lambda: proxy.held == 1 and metric("scoring_mlflow_switch_waiting") == 1, 60,
             what="the worker waiting for version 2")
    assert metric(f'scoring_mlflow_alias_version{{alias="prod",model="{name}"}}') == 2
    code, text = readyz(port)
    assert code == 503 and "MLflow alias moved" in text and "version 2" in text, text
    produce("b", 300, wait=False)
    # Batches wait: nothing is scored (by version 1) while the load is held. Under the old rule the worker went
    # on with version 1 here.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert count(pg_dsn, pg_table)[0] == 300, "a batch began on version 1 after the alias moved"
        time.sleep(0.1)
    proxy.release()
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= total, 90, what="phase b stored")
    assert serving("2") and readyz(port)[0] == 200
    assert metric('scoring_mlflow_switches_total{result="ok"}') == 1
    assert metric("scoring_mlflow_switch_wait_seconds_total") >= 1.5
    # c: move to 4; its download fails once (transient), the retry is held: 2 keeps serving meanwhile.
    proxy.script("model.lgb", "fail", "hold")
    mlflow_server.set_alias(name, "prod", "4")
    wait_for(lambda: metric('scoring_mlflow_switches_total{result="failed"}') == 1 and proxy.held == 1, 60,
             what="first load of version 4 failed, its retry under way")
    assert metric('scoring_mlflow_loads_total{attempt="first",result="failed"}') == 1
    produce("c1", 300)
    proxy.release()
    wait_for(lambda: serving("4"), 60, what="version 4 loaded by the retry")
    assert metric('scoring_mlflow_loads_total{attempt="retry",result="ok"}') == 1
    produce("c2", 300)
    # d: a version that cannot be loaded (a pickle): refused, retried with backoff, 4 keeps serving.
    mlflow_server.set_alias(name, "prod", "3")
    wait_for(lambda: metric('scoring_mlflow_loads_total{attempt="retry",result="failed"}') >= 1, 60,
             what="the pickled version refused and retried")
    assert metric("scoring_routing_reload_ok") == 0 and metric('scoring_mlflow_switches_total{result="failed"}') == 2
    produce("d", 300)
    # e: the registry unreachable while following: nothing changes, 4 keeps serving.
    proxy.cut()
    before = metric('scoring_mlflow_resolves_total{result="failed"}')
    wait_for(lambda: metric('scoring_mlflow_resolves_total{result="failed"}') >= before + 2, 60,
             what="resolve failures")
    produce("e", 300)
    assert worker.poll() is None and serving("4")
    proxy.restore()
    mlflow_server.set_alias(name, "prod", "4")  # back to the loaded version: nothing to switch
    wait_for(lambda: metric(f'scoring_mlflow_alias_version{{alias="prod",model="{name}"}}') == 4, 60,
             what="alias back on 4")
    wait_for(lambda: metric("scoring_routing_reload_ok") == 1, 60, what="the routing healthy again")
    # f: rollback while records flow, produced a few at a time by a thread that notes when each was sent.
    sent: list[tuple[float, list[str]]] = []
    flowing = threading.Event()
    flowing.set()

    def flow() -> None:
        while flowing.is_set():
            at = time.monotonic()
            sent.append((at, produce("f", 6, wait=False)))
            time.sleep(0.02)

    f_start = total
    producer = threading.Thread(target=flow, daemon=True)
    producer.start()
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= f_start + 60, 60, what="phase f flowing")
    before_move = {r[0] for r in stored(pg_dsn, pg_table)}
    mlflow_server.set_alias(name, "prod", "1")
    wait_for(lambda: metric(f'scoring_mlflow_alias_version{{alias="prod",model="{name}"}}') == 1, 60,
             what="the worker resolved the rollback")
    seen_at = time.monotonic()
    wait_for(lambda: sum(at > seen_at for at, _ in sent) >= 20, 60, what="records sent after the rollback")
    flowing.clear()
    producer.join(30)
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= total, 90, what="phase f stored")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    proxy.close()

    rows = stored(pg_dsn, pg_table)
    assert len(rows) == total and len({r[0] for r in rows}) == total  # none lost, none doubled
    by_id = {r[0]: r for r in rows}

    def versions(phase: str) -> set[str]:
        return {by_id[i][1] for i in phases[phase]}

    assert versions("a") == {v1} and versions("b") == versions("c1") == {v2}
    assert versions("c2") == versions("d") == versions("e") == {v4}
    assert v3 not in {r[1] for r in rows}
    # f, against the rule: stored before the move -> 4; produced after the worker resolved it -> 1; and each
    # partition switched once, between batches (4 then 1 in offset order).
    f_ids = set(phases["f"])
    assert {by_id[i][1] for i in f_ids & before_move} == {v4} and f_ids & before_move
    after = [i for at, ids in sent if at > seen_at for i in ids]
    assert {by_id[i][1] for i in after} == {v1}
    for p in range(3):
        seq = [r[1] for r in sorted((by_id[i] for i in f_ids), key=lambda r: r[4]) if r[3] == p]
        assert seq == sorted(seq, key=lambda v: v != v4), f"partition {p}: not one switch from 4 to 1: {seq}"
    # Each record's score is its version's own.
    boosters = {v1: lgb.Booster(model_file=models["binary"]), v2: lgb.Booster(model_file=models["binary_v2"]),
                v4: lgb.Booster(model_file=models["binary_v2"])}
    for version, booster in boosters.items():
        ids = [r[0] for r in rows if r[1] == version]
        assert np.allclose([by_id[i][2] for i in ids], booster.predict(np.array([values[i] for i in ids])),
                           atol=1e-9)
    text = log.read_text()
    assert SECRET not in text
    assert "MLflow alias moved" in text and "routing reload failed" in text and "pickle" in text
    assert "did not load; the old version keeps serving" in text and "reload succeeded after failing" in text
    assert "cannot resolve the MLflow alias; the loaded version keeps serving" in text

"""Rollout in stream mode against the real broker and PostgreSQL: canary + shadow, a broken routing file,
rollback, SIGHUP, all while records keep flowing through one worker process."""

from __future__ import annotations

import signal
import urllib.request

import lightgbm as lgb
import numpy as np
import psycopg
import pytest

from tests.conftest import free_port
from tests.kafka_util import wait_for
from tests.test_rollout import write_routing
from tests.test_stream import FEATURES, count, records
from workers.scoring import sticky

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample(port: int, line_prefix: str) -> float | None:
    for line in metrics_text(port).splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def rows(dsn: str, table: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f'SELECT id, model_version, served, score FROM "{table}"').fetchall()


def test_canary_shadow_broken_file_and_rollback_mid_stream(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=3)
    routing = tmp_path / "routing.yaml"
    write_routing(routing, [{"name": "v1", "model": models["binary"]}])
    port = free_port()
    sink = f"{pg_dsn}?table={pg_table}"
    worker = kafka.worker("--routing", str(routing), "--routing-poll-s", "0.3", "--topic", topic,
                          "--group", f"g-{pg_table}", "--sink", sink, "--metrics-port", str(port),
                          log=str(tmp_path / "w.log"))

    def weight(version: str) -> float | None:
        return sample(port, f'scoring_routing_weight{{model_version="{version}",role="served"}}')

    # 1. One version.
    kafka.produce_json(topic, records(1000, 0))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 1000, 60, what="phase 1 stored")
    # 2. Canary 25% and a shadow: the file changes, the worker switches between batches.
    write_routing(routing, [{"name": "v1", "model": models["binary"], "weight": 75},
                            {"name": "v2", "model": models["binary_v2"], "weight": 25},
                            {"name": "s", "model": models["binary_v2"], "shadow": True}])
    wait_for(lambda: weight("v2") == 25, 30, what="canary routing in use")
    kafka.produce_json(topic, records(1000, 1000))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 1000 + 2000, 60, what="phase 2 stored")
    # 3. A broken file (a wrong pin): rejected, the canary routing keeps serving.
    write_routing(routing, [{"name": "v1", "model": models["binary"], "weight": 50},
                            {"name": "v2", "model": models["binary_v2"], "weight": 50, "sha256": "0" * 64}])
    wait_for(lambda: sample(port, "scoring_routing_reload_ok") == 0, 30, what="reload failure reported")
    kafka.produce_json(topic, records(500, 2000))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 3000 + 1000, 60, what="phase 3 stored")
    assert worker.poll() is None
    # 4. Roll back by editing the file.
    write_routing(routing, [{"name": "v1", "model": models["binary"]}])
    wait_for(lambda: weight("v2") is None and weight("v1") == 100, 30, what="rollback in use")
    kafka.produce_json(topic, records(500, 2500))
    wait_for(lambda: count(pg_dsn, pg_table)[0] >= 4000 + 500, 60, what="phase 4 stored")
    # 5. SIGHUP reloads on demand.
    reloads = sample(port, 'scoring_routing_reloads_total{result="ok"}')
    worker.send_signal(signal.SIGHUP)
    wait_for(lambda: sample(port, 'scoring_routing_reloads_total{result="ok"}') == reloads + 1, 20, what="SIGHUP")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0

    stored = rows(pg_dsn, pg_table)
    assert len(stored) == 4500 and len({(r[0], r[1]) for r in stored}) == 4500
    served = {r[0]: r[1] for r in stored if r[2]}
    shadow = {r[0]: r[1] for r in stored if not r[2]}
    assert len(served) == 3000  # every record served exactly once
    ids = [f"s{i}" for i in range(3000)]
    canary_ids = ids[1000:2500]
    expected = dict.fromkeys(ids, "v1")
    chosen = sticky.assign(canary_ids, ["v1", "v2"], [75, 25])
    expected.update(zip(canary_ids, np.array(["v1", "v2"])[chosen], strict=True))
    assert served == expected
    assert 0.2 < np.mean(chosen) < 0.3
    assert shadow == dict.fromkeys(canary_ids, "s")
    # Scores are each version's own.
    boosters = {"v1": lgb.Booster(model_file=models["binary"]), "v2": lgb.Booster(model_file=models["binary_v2"])}
    boosters["s"] = boosters["v2"]
    by_id = {r["id"]: r for start, n in ((0, 1000), (1000, 1000), (2000, 500), (2500, 500)) for r in records(n, start)}
    for rid, version, _, score in stored:
        x = np.array([[by_id[rid][f] for f in FEATURES]])
        assert abs(score - boosters[version].predict(x)[0]) <= 1e-9
    log = (tmp_path / "w.log").read_text()
    assert "routing reload failed; the previous routing keeps serving" in log and "not the pinned" in log


class ShadowRefusingSink:
    """Wraps the real PostgreSQL sink: refuses (``RowsRejected``, nothing stored) the *served* row of id
    ``s3`` and the *shadow* row of id ``s5``. In-process because the test chooses which rows a sink refuses
    (which values PostgreSQL refuses is the sink's own business, tested with it)."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_batch(self, scored):
        from workers.errors import RowsRejected

        t = scored.results
        refuse = {i: f"planted: {rid} {'served' if served else 'shadow'}" for i, (rid, served) in
                  enumerate(zip(t["id"].to_pylist(), t["served"].to_pylist(), strict=True))
                  if (rid, served) in (("s3", True), ("s5", False))}
        if refuse:
            raise RowsRejected(refuse)
        self.inner.write_batch(scored)


def test_refused_served_row_dead_letters_its_record_and_a_refused_shadow_row_alone_is_dropped(
        models, kafka, pg_dsn, pg_table, tmp_path):
    import threading

    import orjson

    from workers.runtime.stream.worker import StreamWorker
    from workers.settings import load_settings
    from workers.sinks.postgres import PostgresSink

    topic = kafka.topic(partitions=1)
    group = f"g-{pg_table}"
    routing = write_routing(tmp_path / "routing.yaml", [{"name": "v1", "model": models["binary"]},
                                                        {"name": "s", "model": models["binary_v2"], "shadow": True}])
    kafka.produce_json(topic, records(20))
    settings = load_settings({
        "routing": {"path": routing},
        "kafka": {"bootstrap_servers": kafka.bootstrap},
        "stream": {"topics": [topic], "group": group, "metrics_port": 0, "session_timeout_ms": 6000,
                   "heartbeat_interval_ms": 2000},
    })
    worker = StreamWorker(settings, sink=ShadowRefusingSink(PostgresSink(f"{pg_dsn}?table={pg_table}",
                                                                         "SCORING_STREAM__SINK")))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: count(pg_dsn, pg_table)[0] >= 37, 60, what="rows stored")
        dead = kafka.consume_all(f"{topic}.dlq", 1)
        from tests.test_stream_inputs import committed_sum

        wait_for(lambda: committed_sum(kafka, group, topic, 1) == 20, 20, what="committed")
    finally:
        worker.request_stop()
        thread.join(30)
    stored = {(r[0], r[1]) for r in rows(pg_dsn, pg_table)}
    expected = {(f"s{i}", v) for i in range(20) for v in ("v1", "s")} - {("s3", "v1"), ("s3", "s"), ("s5", "s")}
    assert stored == expected
    assert [(orjson.loads(m.value())["id"], dict(m.headers())["error.reason"].decode()) for m in dead] == [
        ("s3", "planted: s3 served")]
    errors = worker.metrics.version_errors.labels("s")._value.get()
    assert errors == 2  # the shadow rows dropped: s3's (with its record) and s5's

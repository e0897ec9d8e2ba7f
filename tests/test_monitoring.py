"""Dashboards and alerts: the rules pass promtool, and a real Prometheus scraping a running worker returns data for
every dashboard query and every metric the rules use, so no panel or alert names a metric that does not exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml

from tests.conftest import free_port, need, wait_port
from tests.kafka_util import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MON = os.path.join(ROOT, "deploy", "monitoring")


def promtool() -> str:
    return shutil.which("promtool") or need("promtool", "apt-get install prometheus") or ""


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(open(os.path.join(MON, "alerts.rules.yml")))
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.load(open(os.path.join(MON, "grafana-dashboard.json")))
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_rules_pass_promtool_and_a_planted_mistake_fails(tmp_path):
    ok = subprocess.run([promtool(), "check", "rules", os.path.join(MON, "alerts.rules.yml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load(open(os.path.join(MON, "alerts.rules.yml")))
    broken["groups"][0]["rules"][0]["expr"] = "sum by (topic (scoring_consumer_lag)"
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(broken))
    assert subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True).returncode != 0


def test_prometheusrule_wraps_the_same_rules():
    plain = yaml.safe_load(open(os.path.join(MON, "alerts.rules.yml")))
    wrapped = yaml.safe_load(open(os.path.join(MON, "prometheusrule.yaml")))
    assert wrapped["kind"] == "PrometheusRule" and wrapped["spec"] == plain


@pytest.mark.kafka
def test_a_real_prometheus_gets_data_for_every_query(models, kafka, tmp_path):
    if not shutil.which("prometheus"):
        need("prometheus", "apt-get install prometheus")
    from tests.test_stream import records
    from workers.scoring.drift import build_profile
    from workers.scoring.model import load_model
    from workers.settings import ModelSettings

    model = load_model(ModelSettings(path=models["binary"]))
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(build_profile(model, np.random.default_rng(1).normal(size=(5000, 8)))))
    topic = kafka.topic(partitions=2)
    kafka.produce_json(topic, records(2000))
    kafka.produce(topic, [(b"bad", b"not json")])
    port = free_port()
    # A routing file with a canary (guarded) and a shadow, so the per-version panels and rules have data.
    routing = tmp_path / "routing.yaml"
    routing.write_text(yaml.safe_dump({"versions": [
        {"name": "v1", "model": models["binary"], "weight": 80},
        {"name": "v2", "model": models["binary_v2"], "weight": 20, "guardrail": {"max_error_rate": 0.5}},
        {"name": "s", "model": models["binary_v2"], "shadow": True}]}))
    worker = kafka.worker("--routing", str(routing), "--topic", topic, "--group", f"g-{topic}", "--sink",
                          f"sqlite:///{tmp_path / 'm.db'}?table=scores", "--metrics-port", str(port),
                          env={"SCORING_SCORING__PROFILE": str(profile)})
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                      "scrape_configs": [{"job_name": "scoring",
                                                          "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]}))
    prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_port(prom_port, 30), "prometheus did not start"

        def prometheus_ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/-/ready", timeout=5).status == 200
            except OSError:  # 503 while it replays its write-ahead log
                return False

        wait_for(prometheus_ready, 60, what="prometheus ready")

        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        wait_for(lambda: query("sum(scoring_records_written_total)") and
                 float(query("sum(scoring_records_written_total)")[0]["value"][1]) >= 2000, 90, what="scraped data")
        time.sleep(4)  # a few more scrapes, so rate() and increase() have two samples in every window
        empty = [e for e in dashboard_exprs() if not query(e)]
        assert not empty, f"dashboard queries without data: {empty}"
        names = {n for e in rule_exprs() for n in re.findall(r"scoring_[a-z_]+", e)}
        missing = [n for n in sorted(names) if not query(f'count({{__name__="{n}"}})')]
        assert not missing, f"rules name metrics the worker does not export: {missing}"
        # Each rule's expression is valid against live data (it may rightly return nothing: not firing).
        for expr in rule_exprs():
            query(expr)
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.wait(30)
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)

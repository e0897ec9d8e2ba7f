"""The manifests under deploy/: rendered with kustomize, validated against Kubernetes and the upstream CRDs,
and checked for consistency with the worker's own settings."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tests import crdschema
from tests.conftest import need
from workers.settings import known_env_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRDS = os.path.join(ROOT, "..", "shared", "crds")
OVERLAYS = ("stream", "batch", "serve", "rollout")
CORE_GROUPS = {"v1", "apps/v1", "batch/v1"}


def is_core(doc: dict) -> bool:
    return doc["apiVersion"] in CORE_GROUPS
CRD_FILES = ["keda_scaledobjects.yaml", "keda_scaledjobs.yaml", "keda_triggerauthentications.yaml",
             "ksvc.yaml", "kafkasource.yaml"]
# Kinds no CRD file here describes: listed so nothing passes unvalidated by accident.
NO_SCHEMA = {("eventing.knative.dev/v1alpha1", "KafkaSink")}


def kubectl() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "kubectl")
    return exe if os.path.exists(exe) else (shutil.which("kubectl") or need("kubectl", "not installed") or "")


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", os.path.join(ROOT, "deploy", overlay)], capture_output=True,
                         text=True, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o: render(o) for o in OVERLAYS}


def kube_validate(docs: list[dict], tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    exe = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    return subprocess.run([exe, "-k", "1.30.0", "--strict", "--quiet", str(path)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    if not os.path.isdir(CRDS):
        need("upstream CRDs", f"{os.path.normpath(CRDS)} is absent (it is there in developer sessions and CI)")
    out = {}
    for name in CRD_FILES:
        out.update(crdschema.schemas(os.path.join(CRDS, name)))
    return out


def crd_errors(doc: dict, crd_schemas: dict) -> list[str]:
    schema = crd_schemas[(doc["apiVersion"], doc["kind"])]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def by_kind(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and (kind != "Service" or is_core(d)))


def test_every_overlay_renders_and_core_kinds_validate(rendered, tmp_path):
    for overlay, docs in rendered.items():
        core = [d for d in docs if is_core(d)]
        assert core, overlay
        proc = kube_validate(core, tmp_path)
        assert proc.returncode == 0, f"{overlay}: {proc.stdout}{proc.stderr}"


def test_kubernetes_validate_catches_a_planted_mistake(rendered, tmp_path):
    deployment = copy.deepcopy(by_kind(rendered["stream"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5  # misspelled
    proc = kube_validate([deployment], tmp_path)
    assert proc.returncode == 1 and "periodSecond" in proc.stdout + proc.stderr


def test_keda_and_knative_kinds_validate_against_the_upstream_crds(rendered, crd_schemas):
    checked = set()
    for overlay, docs in rendered.items():
        for doc in docs:
            key = (doc["apiVersion"], doc["kind"])
            if is_core(doc):
                continue
            if key in NO_SCHEMA:
                continue
            assert key in crd_schemas, f"{overlay}: no CRD schema for {key}"
            assert crd_errors(doc, crd_schemas) == [], (overlay, key)
            checked.add(doc["kind"])
    assert checked == {"ScaledObject", "ScaledJob", "TriggerAuthentication", "Service", "KafkaSource"}


def test_crd_validation_catches_planted_mistakes(rendered, crd_schemas):
    scaled = copy.deepcopy(by_kind(rendered["stream"], "ScaledObject"))
    scaled["spec"]["minReplicaCounts"] = 0  # misspelled field
    assert any("minReplicaCounts" in e for e in crd_errors(scaled, crd_schemas))
    scaled = copy.deepcopy(by_kind(rendered["stream"], "ScaledObject"))
    scaled["spec"]["maxReplicaCount"] = "twelve"  # wrong type
    assert crd_errors(scaled, crd_schemas)
    job = copy.deepcopy(by_kind(rendered["batch"], "ScaledJob"))
    del job["spec"]["triggers"]  # required
    assert any("triggers" in e for e in crd_errors(job, crd_schemas))
    source = copy.deepcopy(by_kind(rendered["serve"], "KafkaSource"))
    source["spec"]["topic"] = ["events"]  # should be "topics"
    assert any("topic" in e for e in crd_errors(source, crd_schemas))
    ksvc = copy.deepcopy(next(d for d in rendered["serve"] if d["kind"] == "Service"
                              and d["apiVersion"].startswith("serving.knative.dev")))
    ksvc["spec"]["template"]["spec"]["containerConcurency"] = 10  # misspelled
    assert crd_errors(ksvc, crd_schemas), "the Knative schema must reject a misspelled field"


def config(docs: list[dict]) -> dict[str, str]:
    return by_kind(docs, "ConfigMap")["data"]


def test_env_files_are_valid_worker_settings(rendered, monkeypatch):
    from workers.settings import load_settings

    known = known_env_names()
    for overlay, docs in rendered.items():
        data = config(docs)
        names = set(data)
        for doc in docs:
            for container in _containers(doc):
                names |= {e["name"] for e in container.get("env", [])}
        assert {n for n in names if n.startswith("SCORING_")} <= known, overlay
        for key, value in data.items():
            monkeypatch.setenv(key, value)
        load_settings()  # raises on any invalid value
        for key in data:
            monkeypatch.delenv(key)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    for path in (("template", "spec"), ("jobTemplate", "spec", "template", "spec"),
                 ("jobTargetRef", "template", "spec")):
        node = spec
        for p in path:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if node.get("containers"):
            return node["containers"]
    return []


def test_stream_trigger_matches_the_worker_settings(rendered):
    docs = rendered["stream"]
    data = config(docs)
    deployment, scaled = by_kind(docs, "Deployment"), by_kind(docs, "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    meta = trigger["metadata"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == by_kind(docs, "ConfigMap")["metadata"]["name"]
    assert meta["bootstrapServers"] == data["SCORING_KAFKA__BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == data["SCORING_STREAM__GROUP"]
    assert meta["topic"] == data["SCORING_STREAM__TOPICS"] and "," not in meta["topic"]
    assert meta["offsetResetPolicy"] == data["SCORING_STREAM__AUTO_OFFSET_RESET"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["maxReplicaCount"] <= int(scaled["metadata"]["annotations"]["scoring-workers/topic-partitions"])
    assert {"lagThreshold", "activationLagThreshold", "scaleToZeroOnInvalidOffset"} <= set(meta)
    auth = by_kind(docs, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret_names = {r["name"] for r in auth["spec"]["secretTargetRef"]}
    worker_secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secret_names == worker_secrets == {"scoring-kafka-credentials"}


def test_stream_probes_ports_and_grace_period_match_the_worker(rendered):
    docs = rendered["stream"]
    data = config(docs)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(data["SCORING_STREAM__METRICS_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert pod["terminationGracePeriodSeconds"] > float(data["SCORING_STREAM__SHUTDOWN_TIMEOUT_S"])
    service = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_batch_shards_and_queue_trigger_match(rendered):
    docs = rendered["batch"]
    data = config(docs)
    job = by_kind(docs, "CronJob")["spec"]["jobTemplate"]["spec"]
    env = {e["name"]: e.get("value") for e in job["template"]["spec"]["containers"][0]["env"]}
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == int(env["SCORING_BATCH__SHARD_COUNT"])
    scaled = by_kind(docs, "ScaledJob")
    meta = scaled["spec"]["triggers"][0]["metadata"]
    container = scaled["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]
    queue_env = {e["name"]: e.get("value") for e in container["env"]}
    assert meta["topic"] == data["SCORING_BATCH__QUEUE_TOPIC"] == queue_env["SCORING_BATCH__QUEUE_TOPIC"]
    assert meta["consumerGroup"] == data["SCORING_BATCH__QUEUE_GROUP"]
    assert meta["bootstrapServers"] == data["SCORING_KAFKA__BOOTSTRAP_SERVERS"]


def test_serve_knative_service_and_kafka_source(rendered):
    docs = rendered["serve"]
    data = config(docs)
    ksvc = next(d for d in docs if d["apiVersion"] == "serving.knative.dev/v1")
    template = ksvc["spec"]["template"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "0"
    assert template["spec"]["containerConcurrency"] > 0
    container = template["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == int(data["SCORING_SERVE__PORT"])
    source = by_kind(docs, "KafkaSource")
    assert source["spec"]["sink"]["ref"]["name"] == ksvc["metadata"]["name"]
    assert source["spec"]["bootstrapServers"] == [data["SCORING_KAFKA__BOOTSTRAP_SERVERS"]]
    dead = source["spec"]["delivery"]["deadLetterSink"]["ref"]
    sink = by_kind(docs, "KafkaSink")
    assert dead["name"] == sink["metadata"]["name"] and sink["spec"]["bootstrapServers"] == source["spec"]["bootstrapServers"]


def test_settings_env_output_round_trips_into_the_worker_settings(monkeypatch):
    from workers.settings import load_settings

    env = {**os.environ, "SCORING_KAFKA__SASL_PASSWORD": "never-printed"}
    out = subprocess.run([sys.executable, "-m", "workers", "settings", "--env", "--topic", "events", "--group", "g1",
                          "--bootstrap-servers", "kafka:9093", "--max-records", "500"],
                         capture_output=True, text=True, check=True, env=env).stdout
    assert "never-printed" not in out and "SASL_PASSWORD" not in out
    pairs = dict(line.split("=", 1) for line in out.splitlines())
    assert pairs["SCORING_STREAM__TOPICS"] == "events" and pairs["SCORING_STREAM__MAX_RECORDS"] == "500"
    for key, value in pairs.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.stream.topics == ["events"] and settings.kafka.bootstrap_servers == "kafka:9093"
    assert settings.stream.group == "g1" and settings.stream.max_records == 500


def test_rollout_overlay_mounts_a_valid_routing_file_where_the_setting_points(rendered):
    from workers.rollout.spec import parse_routing

    docs = rendered["rollout"]
    routing_cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "scoring-routing")
    spec = parse_routing(routing_cm["data"]["routing.yaml"], "deploy/rollout/routing.yaml")
    assert sum(v.weight for v in spec.served) == 100 and spec.shadows
    path = config(docs)["SCORING_ROUTING__PATH"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "scoring-routing")
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    # A directory mount (no subPath): only then does the kubelet update the file in running pods.
    assert "subPath" not in mount and path == f"{mount['mountPath']}/routing.yaml"

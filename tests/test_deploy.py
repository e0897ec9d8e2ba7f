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
# ../shared/crds beside the project; CRDS_DIR points elsewhere (a git worktree, another checkout).
CRDS = os.environ.get("CRDS_DIR") or os.path.join(ROOT, "..", "shared", "crds")
WORKLOAD_OVERLAYS = ("stream", "batch", "serve", "rollout")  # each renders core kinds too
OVERLAYS = (*WORKLOAD_OVERLAYS, "kserve", "monitoring")
CORE_GROUPS = {"v1", "apps/v1", "batch/v1"}


def is_core(doc: dict) -> bool:
    return doc["apiVersion"] in CORE_GROUPS
CRD_FILES = ["keda_scaledobjects.yaml", "keda_scaledjobs.yaml", "keda_triggerauthentications.yaml",
             "ksvc.yaml", "kafkasource.yaml", "kafkasink.yaml", "kserve_clusterservingruntimes.yaml",
             "kserve_inferenceservices.yaml", "monitoring_servicemonitors.yaml", "monitoring_podmonitors.yaml",
             "monitoring_prometheusrules.yaml"]
# Kinds no CRD file here describes: listed so nothing passes unvalidated by accident.
NO_SCHEMA: set[tuple[str, str]] = set()


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
        assert core or overlay not in WORKLOAD_OVERLAYS, overlay
        if not core:
            continue
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
    assert checked == {"ScaledObject", "ScaledJob", "TriggerAuthentication", "Service", "KafkaSource", "KafkaSink",
                       "ClusterServingRuntime", "InferenceService", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


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
    runtime = copy.deepcopy(by_kind(rendered["kserve"], "ClusterServingRuntime"))
    runtime["spec"]["supportedModelFormat"] = runtime["spec"].pop("supportedModelFormats")  # misspelled
    assert any("supportedModelFormat" in e for e in crd_errors(runtime, crd_schemas))
    runtime = copy.deepcopy(by_kind(rendered["kserve"], "ClusterServingRuntime"))
    del runtime["spec"]["containers"]  # required
    assert any("containers" in e for e in crd_errors(runtime, crd_schemas))
    runtime = copy.deepcopy(by_kind(rendered["kserve"], "ClusterServingRuntime"))
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"  # wrong type
    assert crd_errors(runtime, crd_schemas)
    isvc = copy.deepcopy(by_kind(rendered["kserve"], "InferenceService"))
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in e for e in crd_errors(isvc, crd_schemas))
    monitor = copy.deepcopy(by_kind(rendered["monitoring"], "ServiceMonitor"))
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")  # misspelled
    assert any("endpoint" in e for e in crd_errors(monitor, crd_schemas))
    pods = copy.deepcopy(by_kind(rendered["monitoring"], "PodMonitor"))
    del pods["spec"]["selector"]  # required
    assert any("selector" in e for e in crd_errors(pods, crd_schemas))
    pods = copy.deepcopy(by_kind(rendered["monitoring"], "PodMonitor"))
    pods["spec"]["podMetricsEndpoints"][0]["interval"] = 15  # a duration is text
    assert crd_errors(pods, crd_schemas)


def config(docs: list[dict], name: str = "scoring-config") -> dict[str, str]:
    """The data of the rendered ConfigMap generated as ``name`` (kustomize appends a hash to the name)."""
    return next(d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].rsplit("-", 1)[0] == name)["data"]


def settings_maps(docs: list[dict]) -> list[dict[str, str]]:
    return [d["data"] for d in docs if d["kind"] == "ConfigMap" and any(k.startswith("SCORING_") for k in d["data"])]


def test_env_files_are_valid_worker_settings(rendered, monkeypatch):
    from workers.settings import load_settings

    known = known_env_names()
    for overlay, docs in rendered.items():
        data = {k: v for m in settings_maps(docs) for k, v in m.items()}
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
    return _pod_spec(doc).get("containers", [])


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
    assert "SCORING_BATCH__QUEUE_TOPIC" not in data and "SCORING_BATCH__QUEUE_TOPIC" not in env
    scaled = by_kind(docs, "ScaledJob")
    meta = scaled["spec"]["triggers"][0]["metadata"]
    queue = config(docs, "scoring-batch-queue")
    assert meta["topic"] == queue["SCORING_BATCH__QUEUE_TOPIC"]
    assert meta["consumerGroup"] == queue["SCORING_BATCH__QUEUE_GROUP"]
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
    from workers.scoring.routing_spec import parse_routing

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


# -- Deploy semantics: what each workload actually runs ---------------------------------------------
# Every workload the overlays render, and the mode it is meant to run. A workload not listed here fails the
# test, so a new one cannot ship without saying what it is for.
INTENDED = {
    ("stream", "Deployment", "scoring-stream"): "stream",
    ("batch", "CronJob", "scoring-batch"): "batch-files",
    ("batch", "ScaledJob", "scoring-batch-queue"): "batch-queue",
    ("serve", "Service", "scoring-serve"): "serve",
    ("serve", "Service", "scoring-serve-grpc"): "serve",
    ("kserve", "ClusterServingRuntime", "scoring-workers"): "serve",
    ("kserve", "ClusterServingRuntime", "scoring-workers-grpc"): "serve",
    ("rollout", "Deployment", "scoring-stream"): "stream",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ScaledJob", "Pod",
                  "ClusterServingRuntime", "ServingRuntime"}
KSERVE_MODELS = "/mnt/models"  # where KServe's storage initializer puts the storageUri
IMAGE = "ghcr.io/scoring-workers/scoring-workers"
SECRET = "<from secret {}/{}>"  # secrets are not in the manifests; a placeholder stands for the value


def _pod_spec(doc: dict) -> dict:
    spec = doc.get("spec", {})
    for path in (("template", "spec"), ("jobTemplate", "spec", "template", "spec"),
                 ("jobTargetRef", "template", "spec"), ()):
        node = spec
        for p in path:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get("containers"):
            return node
    return {}


def workloads(docs: list[dict]) -> list[dict]:
    """Documents that run our container: core workloads, KEDA ScaledJobs and Knative Services."""
    return [d for d in docs if (d["kind"] in WORKLOAD_KINDS or d["kind"] == "Service" and not is_core(d))
            and _pod_spec(d)]


def effective_env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The environment Kubernetes gives the container: ``envFrom`` sources in order (a later source wins a
    duplicate key), then ``env`` (which wins over every ``envFrom``), ``valueFrom`` resolved against the
    rendered ConfigMaps and ``$(VAR)`` references expanded; a Secret's value is a placeholder naming it."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in maps or source["configMapRef"].get("optional"), f"envFrom names no ConfigMap {name!r} " \
                f"(rendered: {sorted(maps)})"
            env.update({prefix + k: v for k, v in maps.get(name, {}).items()})
        elif "secretRef" in source:
            raise AssertionError("envFrom a whole Secret: its keys cannot be checked here; use env secretKeyRef")
    for item in container.get("env", []):
        if "value" in item or "valueFrom" not in item:
            value = str(item.get("value", ""))
            for key, known in env.items():
                value = value.replace(f"$({key})", known)
            env[item["name"]] = value
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            assert ref["key"] in maps.get(ref["name"], {}), f"{item['name']}: no key {ref['key']} in {ref['name']}"
            env[item["name"]] = maps[ref["name"]][ref["key"]]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = SECRET.format(ref["name"], ref["key"])
        else:  # fieldRef / resourceFieldRef: set by the kubelet
            env[item["name"]] = "<from the pod>"
    return env


def parse_command(args: list[str], env: dict[str, str], monkeypatch):
    """(command name, Settings) exactly as ``scoring-worker ARGS`` would load them under ``env``."""
    from workers.cli import _overrides, cli
    from workers.settings import load_settings

    for key in list(os.environ):
        if key.upper().startswith("SCORING_") or key == "JOB_COMPLETION_INDEX":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = cli.make_context("scoring-worker", list(args), resilient_parsing=False)
    name, *rest = [*ctx._protected_args, *ctx.args]
    command = cli.get_command(ctx, name)
    assert command is not None, f"no command {name!r}"
    sub = command.make_context(name, rest, parent=ctx)
    return name, load_settings(_overrides(sub.params))


def _mode(command: str, settings) -> str:
    if command == "batch":
        return "batch-queue" if settings.batch.queue_topic else "batch-files"
    return command


def _kafka_problems(settings, env: dict[str, str], container: dict, pod: dict, trigger_meta: dict | None) -> list[str]:
    """What a container that talks to Kafka lacks: SASL credentials from the Secret, the CA file (and an mTLS
    certificate and key) mounted, a key password from the Secret."""
    k = settings.kafka
    out = []
    if k.security_protocol.startswith("SASL_"):
        if not k.sasl_mechanism:
            out.append("SASL protocol without SCORING_KAFKA__SASL_MECHANISM")
        for key in ("SCORING_KAFKA__SASL_USERNAME", "SCORING_KAFKA__SASL_PASSWORD"):
            if not env.get(key, "").startswith("<from secret"):
                out.append(f"{key} is not taken from a Secret")
        if trigger_meta is not None and k.sasl_mechanism:
            want = k.sasl_mechanism.lower().replace("-", "_").replace("scram_sha_", "scram_sha")
            if trigger_meta.get("sasl") != want:
                out.append(f"trigger sasl {trigger_meta.get('sasl')!r} but the worker uses {k.sasl_mechanism}")
    if k.security_protocol.endswith("SSL"):
        if trigger_meta is not None and trigger_meta.get("tls") != "enable":
            out.append("the worker uses TLS but the trigger does not")
        if not k.ssl_cafile:
            out.append("TLS without SCORING_KAFKA__SSL_CAFILE")
        else:
            out += _file_mounted(k.ssl_cafile, container, pod)
        for path in (k.ssl_certfile, k.ssl_keyfile):  # mTLS: the client certificate and key mounted too
            if path:
                out += _file_mounted(path, container, pod)
        if "SCORING_KAFKA__SSL_KEY_PASSWORD" in env and not env["SCORING_KAFKA__SSL_KEY_PASSWORD"].startswith(
                "<from secret"):
            out.append("SCORING_KAFKA__SSL_KEY_PASSWORD is not taken from a Secret")
    return out


def _file_mounted(path: str, container: dict, pod: dict) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        volume = volumes.get(mount["name"], {})
        inner = path[len(root):]
        source = volume.get("secret") or volume.get("configMap")
        if source is None:
            return [f"{path} is on volume {mount['name']}, which is neither a Secret nor a ConfigMap"]
        items = source.get("items")
        if items is not None and inner not in {i["path"] for i in items}:
            return [f"{path}: volume {mount['name']} does not project {inner}"]
        return []
    return [f"{path} is not on any mounted volume"]


def workload_problems(overlay: str, docs: list[dict], monkeypatch) -> list[str]:
    """Everything wrong with what the overlay's workloads would run (empty when each runs its intended mode
    with what that mode needs)."""
    problems = []
    for doc in workloads(docs):
        name = doc["metadata"]["name"]
        where = f"{overlay}/{doc['kind']}/{name}"
        intended = INTENDED.get((overlay, doc["kind"], name))
        if intended is None:
            problems.append(f"{where}: a workload with no intended mode (add it to INTENDED)")
            continue
        pod = _pod_spec(doc)
        container = pod["containers"][0]
        if not str(container.get("image", "")).startswith(f"{IMAGE}:"):
            problems.append(f"{where}: image {container.get('image')!r} is not {IMAGE}:<tag>")
        args = container.get("command", [])[1:] + container.get("args", []) if container.get("command") \
            else container.get("args", [])
        try:
            env = effective_env(container, docs)
        except AssertionError as exc:
            problems.append(f"{where}: {exc}")
            continue
        spec = doc["spec"].get("jobTemplate", {}).get("spec", doc["spec"])
        if spec.get("completionMode") == "Indexed":
            env["JOB_COMPLETION_INDEX"] = str(spec.get("completions", 1) - 1)  # the kubelet sets it
        try:
            command, s = parse_command(args, env, monkeypatch)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{where}: settings do not load: {exc}")
            continue
        mode = _mode(command, s)
        if mode != intended:
            problems.append(f"{where}: runs {mode}, meant to run {intended}")
            continue
        trigger = (doc["spec"].get("triggers") or [None])[0]
        triggers = [d for d in docs if d["kind"] in ("ScaledObject", "ScaledJob")]
        if doc["kind"] != "ScaledJob":
            scaler = next((d for d in triggers if d["kind"] == "ScaledObject"
                           and d["spec"]["scaleTargetRef"]["name"] == name), None)
            trigger = scaler["spec"]["triggers"][0] if scaler else None
        meta = trigger["metadata"] if trigger else None
        if mode == "batch-files":
            if not (s.batch.input and s.batch.output):
                problems.append(f"{where}: files mode without both input and output")
            if spec.get("completionMode") == "Indexed":
                if not spec["completions"] == spec["parallelism"] == s.batch.shard_count:
                    problems.append(f"{where}: completions/parallelism differ from shard count {s.batch.shard_count}")
            elif s.batch.shard_count != 1:
                problems.append(f"{where}: {s.batch.shard_count} shards but not an Indexed Job")
        elif mode == "batch-queue":
            if not s.batch.output:
                problems.append(f"{where}: queue mode without an output")
            if meta is None or meta.get("topic") != s.batch.queue_topic:
                problems.append(f"{where}: KEDA watches {meta and meta.get('topic')!r}, worker reads "
                                f"{s.batch.queue_topic!r}")
            elif meta.get("consumerGroup") != s.batch.queue_group:
                problems.append(f"{where}: KEDA group {meta.get('consumerGroup')!r} != {s.batch.queue_group!r}")
            elif meta.get("bootstrapServers") != s.kafka.bootstrap_servers:
                problems.append(f"{where}: KEDA and the worker use different brokers")
            problems += [f"{where}: {p}" for p in _kafka_problems(s, env, container, pod, meta)]
        elif mode == "stream":
            if meta is None:
                problems.append(f"{where}: no KEDA ScaledObject scales it")
            else:
                if meta.get("topic", "").split(",") != s.stream.topics:
                    problems.append(f"{where}: KEDA watches {meta.get('topic')!r}, worker reads {s.stream.topics}")
                if meta.get("consumerGroup") != s.stream.group:
                    problems.append(f"{where}: KEDA group {meta.get('consumerGroup')!r} != {s.stream.group!r}")
                if meta.get("bootstrapServers") != s.kafka.bootstrap_servers:
                    problems.append(f"{where}: KEDA and the worker use different brokers")
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            if s.stream.metrics_port is None or ports.get("metrics") != s.stream.metrics_port:
                problems.append(f"{where}: metrics port {s.stream.metrics_port} is not the container's {ports}")
            if s.routing.path:
                problems += [f"{where}: routing file: {p}" for p in _file_mounted(s.routing.path, container, pod)]
            problems += [f"{where}: {p}" for p in _kafka_problems(s, env, container, pod, meta)]
        elif mode == "serve":
            # Knative routes one port per container, named for its protocol: REST or gRPC, never both.
            ports = [(p.get("name"), p["containerPort"]) for p in container.get("ports", [])]
            if ports not in ([("http1", s.serve.port)], [("h2c", s.serve.grpc_port)]):
                problems.append(f"{where}: serves REST on {s.serve.port} and gRPC on {s.serve.grpc_port}, the "
                                f"container exposes {ports}")
            if doc["kind"].endswith("ServingRuntime"):
                if s.model.path or s.routing.path or s.model.dir != KSERVE_MODELS:
                    problems.append(f"{where}: a KServe runtime must read the model KServe downloads: --model-dir "
                                    f"{KSERVE_MODELS} and no model path or routing file (got dir {s.model.dir!r}, "
                                    f"path {s.model.path!r}, routing {s.routing.path!r})")
                if s.serve.model_name != "{{.Name}}":
                    problems.append(f"{where}: the model name is {s.serve.model_name!r}, not the InferenceService's "
                                    "({{.Name}})")
            if s.serve.sink and s.serve.sink.startswith("kafka://"):
                problems += [f"{where}: {p}" for p in _kafka_problems(s, env, container, pod, None)]
    return problems


def test_every_workload_runs_its_intended_mode_with_what_it_needs(rendered, monkeypatch):
    seen = set()
    for overlay, docs in rendered.items():
        problems = workload_problems(overlay, docs, monkeypatch)
        assert problems == [], "\n".join(problems)
        seen |= {(overlay, d["kind"], d["metadata"]["name"]) for d in workloads(docs)}
    assert seen == set(INTENDED), "every intended workload is rendered (and checked)"


def _mutated(docs: list[dict], kind: str, change) -> list[dict]:
    docs = copy.deepcopy(docs)
    change(next(d for d in docs if d["kind"] == kind and (kind != "Service" or not is_core(d))), docs)
    return docs


def test_deploy_semantics_catch_planted_mistakes(rendered, monkeypatch):
    batch, stream = rendered["batch"], rendered["stream"]

    def old_configmap(_, docs):  # the layout of issue 14 case 3: the queue topic in the shared ConfigMap
        next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("scoring-config-"))[
            "data"]["SCORING_BATCH__QUEUE_TOPIC"] = "files-arrived"

    def no_ca(job, _):
        c = _pod_spec(job)["containers"][0]
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "kafka-ca"]

    def no_password(job, _):
        c = _pod_spec(job)["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != "SCORING_KAFKA__SASL_PASSWORD"]

    def bare_configmap_name(job, _):  # what kustomize renders for a CRD it has no nameReference for
        _pod_spec(job)["containers"][0]["envFrom"][0]["configMapRef"]["name"] = "scoring-config"

    def bare_image(job, _):
        _pod_spec(job)["containers"][0]["image"] = "scoring-workers"

    def other_topic(scaled, _):
        scaled["spec"]["triggers"][0]["metadata"]["topic"] = "events-v2"

    def wrong_port(deployment, _):
        _pod_spec(deployment)["containers"][0]["env"].append({"name": "SCORING_STREAM__METRICS_PORT", "value": "9100"})

    def unknown_setting(deployment, _):
        _pod_spec(deployment)["containers"][0]["env"].append({"name": "SCORING_STREAM__TOPIC", "value": "events"})

    def no_model_dir(runtime, _):  # the runtime would ignore what KServe downloads
        c = _pod_spec(runtime)["containers"][0]
        c["args"] = [a for a in c["args"] if not a.startswith("--model-dir")] + ["--model=s3://models/m.txt"]

    def grpc_port_as_http1(ksvc, _):  # Knative would speak HTTP/1 to the gRPC server
        _pod_spec(ksvc)["containers"][0]["ports"][0]["name"] = "http1"

    def fixed_model_name(runtime, _):
        c = _pod_spec(runtime)["containers"][0]
        c["args"] = [a if not a.startswith("--model-name") else "--model-name=model" for a in c["args"]]

    serve_docs = copy.deepcopy(rendered["serve"])
    serve_docs = [d for d in serve_docs if d["apiVersion"] != "serving.knative.dev/v1" or d["metadata"][
        "name"].endswith("-grpc")] + [d for d in serve_docs if d["apiVersion"] == "serving.knative.dev/v1"
                                      and not d["metadata"]["name"].endswith("-grpc")]
    cases = [
        ("kserve", rendered["kserve"], "ClusterServingRuntime", no_model_dir, "must read the model KServe downloads"),
        ("kserve", rendered["kserve"], "ClusterServingRuntime", fixed_model_name, "not the InferenceService's"),
        ("serve", serve_docs, "Service", grpc_port_as_http1, "the container exposes [('http1', 8081)]"),
        ("batch", batch, "CronJob", old_configmap, "batch/CronJob/scoring-batch: runs batch-queue, meant to run "
                                                   "batch-files"),
        ("batch", batch, "ScaledJob", no_ca, "/etc/scoring/kafka/ca.crt is not on any mounted volume"),
        ("batch", batch, "ScaledJob", no_password, "SCORING_KAFKA__SASL_PASSWORD is not taken from a Secret"),
        ("batch", batch, "ScaledJob", bare_configmap_name, "envFrom names no ConfigMap 'scoring-config'"),
        ("batch", batch, "CronJob", bare_image, "image 'scoring-workers' is not"),
        ("stream", stream, "ScaledObject", other_topic, "KEDA watches 'events-v2'"),
        ("stream", stream, "Deployment", wrong_port, "metrics port 9100"),
        ("stream", stream, "Deployment", unknown_setting, "SCORING_STREAM__TOPIC: unknown setting"),
    ]
    for overlay, docs, kind, change, expected in cases:
        problems = workload_problems(overlay, _mutated(docs, kind, change), monkeypatch)
        assert any(expected in p for p in problems), (change.__name__, problems)


def test_the_grpc_knative_service_is_h2c_on_the_grpc_port_with_grpc_probes(rendered):
    docs = rendered["serve"]
    data = config(docs)
    ksvc = next(d for d in docs if d["apiVersion"] == "serving.knative.dev/v1" and d["metadata"]["name"].endswith(
        "-grpc"))
    container = ksvc["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"name": "h2c", "containerPort": int(data["SCORING_SERVE__GRPC_PORT"])}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe] == {**container[probe], "grpc": {"port": int(data["SCORING_SERVE__GRPC_PORT"])}}
    rest = next(d for d in docs if d["apiVersion"] == "serving.knative.dev/v1" and d is not ksvc)
    assert container["envFrom"] == rest["spec"]["template"]["spec"]["containers"][0]["envFrom"]


def test_kserve_runtimes_and_inference_services_fit_together(rendered):
    docs = rendered["kserve"]
    runtimes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterServingRuntime"}
    services = [d for d in docs if d["kind"] == "InferenceService"]
    assert {p for r in runtimes.values() for p in r["spec"]["protocolVersions"]} == {"v2", "grpc-v2"}
    assert len(services) == len(runtimes) == 2
    for isvc in services:
        model = isvc["spec"]["predictor"]["model"]
        runtime = runtimes[model["runtime"]]
        formats = runtime["spec"]["supportedModelFormats"]
        assert any(f["name"] == model["modelFormat"]["name"] == "lightgbm" for f in formats)
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert model["storageUri"].startswith("s3://")
        port = runtime["spec"]["containers"][0]["ports"][0]
        assert port["name"] == ("h2c" if model["protocolVersion"] == "grpc-v2" else "http1")
        assert runtime["spec"]["containers"][0]["name"] == "kserve-container"  # the name KServe merges into


def _pod_labels(doc: dict) -> dict:
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"].get("labels", {})
    return doc["spec"]["template"].get("metadata", {}).get("labels", {})


def test_monitors_select_the_stream_service_and_every_serve_pod(rendered):
    mon = rendered["monitoring"]
    service_monitor, pod_monitor = by_kind(mon, "ServiceMonitor"), by_kind(mon, "PodMonitor")
    stream = rendered["stream"]
    service = by_kind(stream, "Service")
    wanted = service_monitor["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service_monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    wanted = pod_monitor["spec"]["selector"]["matchLabels"]
    serve_pods = [d for d in rendered["serve"] if d["apiVersion"] == "serving.knative.dev/v1"] + [
        d for d in rendered["kserve"] if d["kind"] == "InferenceService"]
    assert len(serve_pods) == 4
    for doc in serve_pods:
        assert wanted.items() <= _pod_labels(doc).items(), doc["metadata"]["name"]
    stream_pods = _pod_labels(by_kind(stream, "Deployment"))
    assert not wanted.items() <= stream_pods.items(), "stream pods would be scraped twice"
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "user-port" and endpoint["path"] == "/metrics"
    rewrite = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "__address__")
    assert rewrite["replacement"] == f"$1:{config(rendered['serve'])['SCORING_SERVE__PORT']}"


# -- Restricted clusters: Pod Security "restricted" and OpenShift's restricted-v2 SCC ------------------
def security_problems(doc: dict) -> list[str]:
    """What keeps a workload from running under the restricted Pod Security Standard and OpenShift's
    restricted-v2 SCC, which assigns its own UID (so none may be named) with group 0."""
    pod = _pod_spec(doc)
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    out = []
    pod_sc = pod.get("securityContext", {})
    for name in ("runAsUser", "runAsGroup", "fsGroup"):
        if name in pod_sc:
            out.append(f"{where}: pod securityContext.{name} is set (OpenShift assigns it)")
    mounts_of = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        sc = container.get("securityContext", {})
        name = f"{where}/{container.get('name', 'container')}"
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            out.append(f"{name}: capabilities do not drop ALL")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem is not true")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp != "RuntimeDefault":
            out.append(f"{name}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        if "runAsUser" in sc or "runAsGroup" in sc:
            out.append(f"{name}: securityContext names a UID/GID (OpenShift assigns it)")
        if not any(m["mountPath"] == "/tmp" and m["name"] in mounts_of for m in container.get("volumeMounts", [])):
            out.append(f"{name}: no emptyDir at /tmp (HOME, caches and temp files go there)")
    return out


def test_every_workload_runs_restricted_and_a_removed_field_fails(rendered):
    seen = 0
    for overlay, docs in rendered.items():
        for doc in workloads(docs):
            assert security_problems(doc) == [], overlay
            seen += 1
    assert seen == len(INTENDED)
    stream, kserve = by_kind(rendered["stream"], "Deployment"), by_kind(rendered["kserve"], "ClusterServingRuntime")
    ksvc = next(d for d in rendered["serve"] if d["apiVersion"] == "serving.knative.dev/v1")
    planted = [
        (stream, lambda p, c: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
        (stream, lambda p, c: p["securityContext"].pop("seccompProfile"), "seccompProfile is None"),
        (stream, lambda p, c: p["securityContext"].update(runAsUser=10001), "pod securityContext.runAsUser"),
        (stream, lambda p, c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "drop ALL"),
        (ksvc, lambda p, c: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (ksvc, lambda p, c: c["securityContext"].update(seccompProfile={"type": "Unconfined"}), "'Unconfined'"),
        (kserve, lambda p, c: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
        (kserve, lambda p, c: c.update(volumeMounts=[]), "no emptyDir at /tmp"),
    ]
    for doc, change, expected in planted:
        broken = copy.deepcopy(doc)
        pod = _pod_spec(broken)
        change(pod, pod["containers"][0])
        assert any(expected in p for p in security_problems(broken)), (expected, security_problems(broken))

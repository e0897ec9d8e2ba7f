"""Metrics (Prometheus) and probes (/healthz, /readyz) on one small HTTP server in a thread.

- ``/healthz``: the main loop ticked recently (the process is not wedged).
- ``/readyz``: the model is loaded, the sink answered its last write or check, and no assigned
  partition is stalled (lag above zero and no record processed for ``stall_seconds``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)


def observe_many(histogram: Histogram, values) -> None:
    """Observe many values at once (one bucket count and one sum update, not one call per record).

    Uses prometheus-client's histogram internals (``_upper_bounds``, ``_buckets``, ``_sum``); falls back to
    one ``observe`` per value if they ever change.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return
    try:
        bounds = histogram._upper_bounds
        counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
        for bucket, n in zip(histogram._buckets, counts.tolist(), strict=True):
            if n:
                bucket.inc(n)
        histogram._sum.inc(float(values.sum()))
    except AttributeError:
        for v in values.tolist():
            histogram.observe(v)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.consumed = Counter("scoring_records_consumed", "Records read from Kafka", ["topic"], registry=r)
        self.scored = Counter("scoring_records_scored", "Records scored", ["topic", "model_version"], registry=r)
        self.written = Counter("scoring_records_written", "Results stored by the sink (committed)",
                               ["topic", "model_version"], registry=r)
        self.dead_lettered = Counter("scoring_records_dead_lettered", "Records sent to the dead-letter topic",
                                     ["topic", "model_version"], registry=r)
        self.sink_errors = Counter("scoring_sink_errors", "Failed sink writes (retried)", registry=r)
        self.registry_errors = Counter("scoring_schema_registry_errors",
                                       "Schema Registry requests that got no answer (retried)", registry=r)
        self.commit_failures = Counter("scoring_commit_failures", "Offset commits that failed (rebalance)",
                                       registry=r)
        self.rebalances = Counter("scoring_rebalances", "Partition assignments and revocations", ["kind"],
                                  registry=r)
        self.batch_size = Histogram("scoring_batch_size", "Records per micro-batch", buckets=SIZE_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("scoring_batch_seconds", "Time from poll to commit per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end = Histogram("scoring_produce_to_stored_seconds",
                                    "Record timestamp to result stored", buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge("scoring_consumer_lag", "High watermark minus next offset to process",
                         ["topic", "partition"], registry=r)
        self.lag_seconds = Gauge("scoring_consumer_lag_seconds",
                                 "Age of the oldest record not yet committed (0 when caught up)",
                                 ["topic", "partition"], registry=r)
        self.ready = Gauge("scoring_ready", "1 when /readyz answers 200", registry=r)
        self.stalled = Gauge("scoring_partition_stalled", "1 while a partition has lag and makes no progress",
                             ["topic", "partition"], registry=r)
        self.max_records = Gauge("scoring_batch_max_records", "Current (adaptive) batch size limit", registry=r)
        self.score = Histogram("scoring_score", "Scores by model version", ["model_version"],
                               buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)), registry=r)
        self.psi = Gauge("scoring_feature_psi", "Population stability index vs the reference profile", ["feature"],
                         registry=r)
        self.null_share = Gauge("scoring_feature_null_share", "Share of null values in the drift window",
                                ["feature"], registry=r)
        self.out_of_range = Gauge("scoring_feature_out_of_range_share",
                                  "Share of values outside the reference min/max", ["feature"], registry=r)

        # Model rollout: per-version comparison, shadow agreement, routing state (workers/rollout).
        self.version_rows = Counter("scoring_version_rows", "Rows scored per model version and role (served/shadow)",
                                    ["model_version", "role"], registry=r)
        self.version_errors = Counter("scoring_version_errors",
                                      "Rows a version could not score (predict failed, non-finite, undecodable)",
                                      ["model_version"], registry=r)
        self.version_seconds = Histogram("scoring_version_predict_seconds", "Predict time per call and version",
                                         ["model_version"], buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_pairs = Counter("scoring_shadow_pairs", "Records scored by a shadow and a served version",
                                    ["model_version", "baseline"], registry=r)
        self.shadow_agree = Counter("scoring_shadow_agree",
                                    "Shadow pairs on the same side of the threshold (multiclass: same label)",
                                    ["model_version", "baseline"], registry=r)
        self.shadow_abs_diff = Counter("scoring_shadow_abs_diff", "Sum of |shadow score - served score|",
                                       ["model_version", "baseline"], registry=r)
        self.routing_weight = Gauge("scoring_routing_weight", "Effective traffic weight per version (0 for shadows)",
                                    ["model_version", "role"], registry=r)
        self.routing_reloads = Counter("scoring_routing_reloads", "Routing reloads by result (ok/failed)",
                                       ["result"], registry=r)
        self.routing_reload_ok = Gauge("scoring_routing_reload_ok", "0 while the last routing reload failed",
                                       registry=r)
        self.routing_reload_ok.set(1)
        self.mlflow_resolves = Counter("scoring_mlflow_resolves", "Resolutions of followed MLflow aliases by result "
                                       "(ok/failed: registry unreachable or refused)", ["result"], registry=r)
        self.mlflow_alias_version = Gauge("scoring_mlflow_alias_version", "Registry version a followed "
                                          "models:/NAME@ALIAS names, as last resolved", ["model", "alias"],
                                          registry=r)
        self.mlflow_loads = Counter("scoring_mlflow_loads", "Loads of a routing that follows an MLflow alias, by "
                                    "result (ok/failed) and attempt (first: on a change; retry: a failed load "
                                    "retried with backoff)", ["result", "attempt"], registry=r)
        self.mlflow_switches = Counter("scoring_mlflow_switches", "Alias moves by outcome: ok (the version it "
                                       "names took over), failed (did not load), timeout (not loaded within "
                                       "switch_wait_s)", ["result"], registry=r)
        self.mlflow_switch_waiting = Gauge("scoring_mlflow_switch_waiting", "1 while batches wait for the version "
                                           "a moved alias names to load", registry=r)
        self.mlflow_switch_wait = Counter("scoring_mlflow_switch_wait_seconds", "Time batches spent waiting for "
                                          "a moved alias's version to load", registry=r)
        self.guardrail_tripped = Gauge("scoring_guardrail_tripped", "1 when a guardrail took the version out",
                                       ["model_version"], registry=r)

    def drift(self, report: dict[str, dict[str, float]]) -> None:
        for feature, values in report.items():
            self.psi.labels(feature).set(values["psi"])
            self.null_share.labels(feature).set(values["null_share"])
            self.out_of_range.labels(feature).set(values["out_of_range_share"])


@dataclass
class Health:
    liveness_timeout_s: float = 60.0
    stall_seconds: float = 60.0
    model_loaded: bool = False
    sink_ok: bool = False
    sink_error: str = ""
    last_tick: float = field(default_factory=time.monotonic)
    # (topic, partition) -> (lag, monotonic time of the last progress)
    partitions: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def progress(self, tp: tuple[str, int], lag: int, advanced: bool) -> None:
        with self.lock:
            _, since = self.partitions.get(tp, (0, time.monotonic()))
            self.partitions[tp] = (lag, time.monotonic() if advanced or lag == 0 else since)

    def forget(self, tps: list[tuple[str, int]] | None = None) -> None:
        with self.lock:
            for tp in list(self.partitions) if tps is None else tps:
                self.partitions.pop(tp, None)

    def alive(self) -> tuple[bool, str]:
        idle = time.monotonic() - self.last_tick
        return idle < self.liveness_timeout_s, f"loop ticked {idle:.1f}s ago"

    def _stalled(self, lag: int, since: float, now: float) -> bool:
        return lag > 0 and now - since > self.stall_seconds

    def is_stalled(self, tp: tuple[str, int]) -> bool:
        with self.lock:
            lag, since = self.partitions.get(tp, (0, time.monotonic()))
        return self._stalled(lag, since, time.monotonic())

    def stalled(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            return [f"{t}[{p}] lag {lag}, no progress for {now - since:.0f}s"
                    for (t, p), (lag, since) in self.partitions.items() if self._stalled(lag, since, now)]

    def readiness(self) -> tuple[bool, list[str]]:
        problems = []
        if not self.model_loaded:
            problems.append("model not loaded")
        if not self.sink_ok:
            problems.append(f"sink unavailable: {self.sink_error or 'not checked yet'}")
        problems += [f"stalled: {s}" for s in self.stalled()]
        return not problems, problems


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, text = self.server.health.alive()
            self._send(200 if ok else 503, ("ok: " if ok else "not alive: ") + text)
        elif path == "/readyz":
            ok, problems = self.server.health.readiness()
            self.server.metrics.ready.set(1 if ok else 0)
            self._send(200 if ok else 503, "ready" if ok else "not ready: " + "; ".join(problems))
        elif path == "/metrics":
            ok, _ = self.server.health.readiness()
            self.server.metrics.ready.set(1 if ok else 0)
            self._send(200, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, "not found")

    def _send(self, code: int, body: str | bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the scraper gave up (its timeout): not our error
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - probes are not worth a log line
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: Health
    metrics: Metrics


def serve_probes(port: int, health: Health, metrics: Metrics, host: str = "0.0.0.0",  # noqa: S104
                 setting: str = "SCORING_STREAM__METRICS_PORT") -> _Server:
    """Start the probe server in a daemon thread; ``server.server_address[1]`` is the bound port.

    Raises ConfigError naming ``setting`` when the port cannot be bound (in use, not allowed).
    """
    from workers.errors import ConfigError

    try:
        server = _Server((host, port), _Handler)
    except OSError as exc:
        raise ConfigError(setting, f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                                   f"(in use? pick another port, 0 for any, empty to disable)") from None
    server.health, server.metrics = health, metrics
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server

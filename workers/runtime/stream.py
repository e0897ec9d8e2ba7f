"""Stream mode: a Kafka consumer-group member that scores micro-batches and stores each result once.

One iteration, in this order (the order is the guarantee):
  1. poll up to ``max_records`` records or ``max_wait_ms``;
  2. decode and score them (bad records get a reason);
  3. send bad records to the dead-letter topic and flush;
  4. store the results in the sink (idempotent: upsert on (id, model_version), or files named by offset);
  5. commit, per partition, the offset after the last record of the batch.
A crash anywhere before 5 re-reads the batch from the last commit; steps 3 and 4 repeat harmlessly.
While the sink fails, step 4 is retried with backoff and partitions paused, polling so that the group
keeps us (no rebalance storm); readiness is false meanwhile and nothing is committed.
On SIGTERM/SIGINT: stop polling, finish the batch in hand if the sink allows within
``shutdown_timeout_s`` (else drop it uncommitted), close, exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from confluent_kafka import KafkaException

from workers.drift import monitor_for
from workers.errors import ConfigError, ScoringError, SinkError
from workers.model import Model
from workers.observability import Health, Metrics, observe_many, serve_probes
from workers.records import Decoded, RecordDecoder
from workers.rollout.router import Routed, Router
from workers.rollout.watch import RoutingSource
from workers.scoring import Scored
from workers.settings import Settings
from workers.sinks import Sink, open_result_sink
from workers.sinks.deadletter import DeadLetters
from workers.sinks.kafka import Producer
from workers.sources.kafka import TP, Batch, KafkaSource

log = logging.getLogger("workers.stream")


@dataclass
class InFlight:
    """A batch handed to the score and store threads, not yet committed."""

    records: Batch
    started: float
    future: Future | None = None  # of store_once: (scored, scoring seconds, stored, state)
    settled: threading.Event = field(default_factory=threading.Event)  # stored for good, or dropped
    stored: bool = False
    stored_at: float = 0.0  # wall clock when the store returned: the end of produce-to-stored latency
    exclude: set[TP] = field(default_factory=set)  # partitions an earlier dropped batch left uncommitted


class StreamWorker:
    def __init__(self, settings: Settings, model: Model | None = None, sink: Sink | None = None):
        s = settings.stream
        if not s.topics:
            raise ConfigError("SCORING_STREAM__TOPICS", "no topic given (set --topic or SCORING_STREAM__TOPICS)")
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health(stall_seconds=s.stall_seconds,
                             liveness_timeout_s=max(60.0, s.max_poll_interval_ms / 1000))
        given = Router.single(model, settings.scoring, self.metrics) if model is not None else None
        self.routing = RoutingSource(settings, self.metrics, given)
        self.router = self.routing.router
        self.health.model_loaded = True
        self.drift = monitor_for(settings, self.router.primary.model)
        self.drift_reported = 0.0
        self.sink = sink or open_result_sink(settings, s.sink, "SCORING_STREAM__SINK")
        self.stopping = False
        self.stop_deadline = float("inf")
        self.limit = s.max_records
        self.next_offsets: dict[TP, int] = {}
        self.exit_code = 0
        self.probes = None
        self.score_pool = ThreadPoolExecutor(1, thread_name_prefix="score")
        self.store_pool = ThreadPoolExecutor(1, thread_name_prefix="store")
        self.pending: deque[InFlight] = deque()
        self.source: KafkaSource | None = None
        self.dead: DeadLetters | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.settings.stream.shutdown_timeout_s
            log.info("stopping", extra={"signal": signum, "bound_s": self.settings.stream.shutdown_timeout_s})

    @property
    def model(self) -> Model:
        """The primary model (the served version with the largest weight)."""
        return self.router.primary.model

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.routing.reload_now)

    def calibrate(self) -> None:
        """Time one predict call before consuming, so even the first batch of a slow model fits the poll interval."""
        rows = 256
        started = time.perf_counter()
        for v in self.router.versions:  # a record costs a predict per version that scores it (shadows: all)
            v.model.predict(np.zeros((rows, len(v.model.feature_names))))
        # Decoding and storing cost about as much again as predicting for fast models: count it twice.
        self.adapt(rows, 2 * (time.perf_counter() - started))
        log.info("batch size calibrated", extra={"max_records": self.limit})

    def start(self) -> None:
        s = self.settings.stream
        self.calibrate()
        self.routing.start()
        if s.metrics_port is not None:
            self.probes = serve_probes(s.metrics_port, self.health, self.metrics)
        try:
            self.sink.check()
            self.health.sink_ok = True
        except SinkError as exc:
            self.health.sink_error = str(exc)
            log.warning("sink not reachable at start; will retry", extra={"reason": str(exc)})
        self.source = KafkaSource(self.settings, self.metrics)  # ScoringError when the broker does not answer
        try:
            self.dead = DeadLetters(Producer(self.settings.kafka), s.dlq_for)
        except KafkaException as exc:
            raise ScoringError(f"Kafka producer: {exc}") from None
        log.info("stream start", extra={"topics": s.topics, "group": s.group, "sink": self.sink.name,
                                        "model_version": self.model.version,
                                        "versions": self.router.describe(),
                                        "metrics_port": self.probes.server_address[1] if self.probes else None})

    def run(self) -> int:
        if self.stopping:  # stopped while loading: nothing consumed, nothing to commit
            self.sink.close()
            return self.exit_code
        self.start()
        try:
            while not self.stopping:
                self.step()
            self.drain()
        finally:
            self.close()
        return self.exit_code

    def close(self) -> None:
        self.routing.stop()
        for flight in self.pending:  # an exception left batches behind: release their store attempts
            flight.settled.set()
        self.score_pool.shutdown(wait=True)
        self.store_pool.shutdown(wait=True)
        if self.source is not None:
            self.source.close()
        if self.dead is not None:
            self.dead.close()
        self.sink.close()
        if self.probes is not None:
            self.probes.shutdown()
        log.info("stream stopped", extra={"exit_code": self.exit_code})

    # -- one micro-batch -------------------------------------------------------------------------
    # Three stages overlap: while the store thread writes batch N and the score thread predicts batch N+1
    # (LightGBM, lleaves, the database driver and librdkafka release the GIL), the main thread polls and
    # decodes batch N+2. Everything that touches the consumer (poll, commit, pause, retry) stays on the main
    # thread. Batches are stored in order, a batch's first store attempt waits until the one before it is
    # stored for good (or dropped), and each is committed only after its store returned, in order.
    def step(self) -> None:
        assert self.source is not None
        self.health.tick()
        router = self.routing.current()  # a reloaded routing starts with this batch
        if router is not self.router:
            self.switch(router)
        records = self.source.poll_batch(self.limit, self.settings.stream.max_wait_ms)
        routed, decoded = self.decode(records) if records else (None, None)
        if decoded is not None and self.drift is not None:
            self.drift.observe(router.primary.scorer.good_matrix(decoded.features))
            if time.monotonic() - self.drift_reported > 1.0:
                self.metrics.drift(self.drift.report())
                self.drift_reported = time.monotonic()
        self.drain(keep=1 if records else 0)  # at most one batch ahead of the one handed over now
        if records and decoded is not None and not self.stopping:
            if decoded.features.reasons and self.settings.stream.on_bad_record == "fail":
                self.fail_on_bad(records, decoded)
                return
            self.submit(records, routed, decoded, router)
        self.update_lag(records.partition_set())

    def switch(self, router: Router) -> None:
        """Start scoring with a reloaded routing (between batches)."""
        if router.primary.model.feature_names != self.router.primary.model.feature_names:
            self.drift = monitor_for(self.settings, router.primary.model)
        self.router = router
        self.calibrate()

    def decode(self, records: Batch) -> tuple[Routed, Decoded]:
        return self.router.decode(records.values(), records.keys(), self.settings.stream.key_as_id)

    def submit(self, records: Batch, routed: Routed, decoded: Decoded, router: Router) -> None:
        before = self.pending[-1] if self.pending else None
        scoring = self.score_pool.submit(self.score_timed, records, routed, decoded, router)
        flight = InFlight(records, time.monotonic())
        flight.future = self.store_pool.submit(self.store_once, flight, scoring, before)
        self.pending.append(flight)

    def score(self, records: Batch, routed: Routed, decoded: Decoded, router: Router) -> Scored:
        carry: dict[str, pa.Array] = {
            name: RecordDecoder.passthrough_array(values) for name, values in decoded.passthrough.items()
        }
        carry["topic"] = pa.array(records.topics(), pa.string())
        carry["partition"] = pa.array(records.partitions(), pa.int32())
        carry["offset"] = pa.array(records.offsets(), pa.int64())
        stamps = np.array(records.timestamps(), dtype=np.int64)
        carry["timestamp"] = pa.array(stamps, pa.timestamp("ms", tz="UTC"), mask=stamps < 0)
        return router.finish(routed, carry)

    def score_timed(self, records: Batch, routed: Routed, decoded: Decoded, router: Router) -> tuple[Scored, float]:
        """Score thread: predict with the routing the batch was decoded with."""
        started = time.monotonic()
        scored = self.score(records, routed, decoded, router)
        return scored, time.monotonic() - started

    def store_once(self, flight: InFlight, scoring: Future, before: InFlight | None
                   ) -> tuple[Scored, float, bool, dict]:
        """Store thread: one attempt to store, once the batch before is stored for good. Never touches the consumer."""
        records = flight.records
        scored, scoring_s = scoring.result()
        state = {"dead_done": not scored.rejected}
        if before is not None:
            before.settled.wait()
            if not before.stored:  # dropped uncommitted: the main thread decides about this one
                return scored, scoring_s, False, state
        try:
            self.attempt(records, scored, state)
        except SinkError as exc:
            self.sink_failed(exc, 0.2)
            return scored, scoring_s, False, state
        flight.stored, flight.stored_at = True, time.time()
        flight.settled.set()
        return scored, scoring_s, True, state

    def drain(self, keep: int = 0) -> None:
        """Main thread: for the oldest batches in flight, wait for the store, retry it if it failed, commit."""
        assert self.source is not None
        while len(self.pending) > keep:
            flight = self.pending.popleft()
            records, stored = flight.records, False
            try:
                assert flight.future is not None
                scored, scoring_s, stored, state = flight.future.result()
                if not stored:
                    stored = self.store(records, scored, state)
                    flight.stored_at = time.time()
            finally:
                flight.stored = stored
                flight.settled.set()  # lets the store thread go on with the next batch
            offsets = {tp: off for tp, off in records.next_offsets().items() if tp not in flight.exclude}
            if not stored:
                # Dropped uncommitted (stopping, or every partition of it revoked): redelivered later. A later
                # batch must not commit past it on a partition they share.
                for later in self.pending:
                    later.exclude |= set(offsets)
                continue
            self.source.commit(offsets)
            self.next_offsets.update(offsets)
            self.account(records, scored, flight.stored_at)
            self.metrics.batch_seconds.observe(time.monotonic() - flight.started)
            self.adapt(len(records), scoring_s)

    def account(self, records: Batch, scored: Scored, stored_at: float) -> None:
        # Counted per (topic, model_version) of the *served* rows (shadow rows: scoring_version_rows_total).
        results = scored.results
        if results.num_rows:
            served = results.filter(results["served"])
            for row in served.group_by(["topic", "model_version"]).aggregate([("id", "count")]).to_pylist():
                self.metrics.scored.labels(row["topic"], row["model_version"]).inc(row["id_count"])
                self.metrics.written.labels(row["topic"], row["model_version"]).inc(row["id_count"])
        if scored.rejected:
            for row in scored.errors.group_by(["topic", "model_version"]).aggregate([("reason", "count")]).to_pylist():
                self.metrics.dead_lettered.labels(row["topic"], row["model_version"]).inc(row["reason_count"])
        stamps = np.array(records.timestamps(), dtype=np.float64)
        observe_many(self.metrics.end_to_end, np.maximum(stored_at - stamps[stamps >= 0] / 1000, 0))
        self.metrics.batch_size.observe(len(records))

    def fail_on_bad(self, records: Batch, decoded: Decoded) -> None:
        i = min(decoded.features.reasons)
        first = records[i]
        log.error("bad record; stopping (on_bad_record=fail), nothing of this batch committed",
                  extra={"topic": first.topic, "partition": first.partition, "offset": first.offset,
                         "reason": decoded.features.reasons[i]})
        self.exit_code = 1
        self.request_stop()
        self.stop_deadline = time.monotonic()

    def attempt(self, records: Batch, scored: Scored, state: dict) -> None:
        """One try at dead letters then results; raises SinkError. ``state["dead_done"]`` records that the
        dead letters were flushed, so a retry after a sink failure does not send them again."""
        assert self.dead is not None
        if not state["dead_done"]:
            errors = scored.errors
            for i, reason, version in zip(scored.error_rows, errors["reason"].to_pylist(),
                                          errors["model_version"].to_pylist(), strict=True):
                self.dead.send(records[int(i)], reason, version)
            self.dead.flush()
            state["dead_done"] = True
        if scored.results.num_rows:
            to_sink = Scored(scored.results, scored.errors.slice(0, 0)) if scored.rejected else scored
            self.sink.write_stream(to_sink)
        if not self.health.sink_ok:
            log.info("sink recovered")
        self.health.sink_ok, self.health.sink_error = True, ""

    def sink_failed(self, exc: Exception, backoff: float) -> None:
        self.metrics.sink_errors.inc()
        self.health.sink_ok, self.health.sink_error = False, str(exc)[:300]
        log.warning("store failed; retrying without committing", extra={"reason": str(exc)[:300],
                                                                         "retry_in_s": backoff})

    def store(self, records: Batch, scored: Scored, state: dict) -> bool:
        """Main thread: retry the store with backoff, staying in the group; False when the batch was dropped.

        Dead letters already flushed by a failed attempt (the sink failed after them) are not sent again.
        """
        assert self.source is not None
        backoff = 0.2
        batch_tps = records.partition_set()
        while True:
            until = time.monotonic() + backoff
            while time.monotonic() < until:
                if self.stopping and time.monotonic() >= self.stop_deadline:
                    log.warning("shutdown bound reached with the batch unstored; dropped uncommitted")
                    return False
                self.health.tick()
                self.source.keep_alive(int(min(500, max(until - time.monotonic(), 0.01) * 1000)))
                # Lag keeps growing while we wait: keep it (and stall detection) current.
                self.update_lag(set())
            if not batch_tps & self.source.assignment():
                log.info("every partition of the unstored batch was revoked; dropped for the new owner")
                self.source.resume()
                return False
            backoff = min(backoff * 2, self.settings.stream.retry_backoff_max_s)
            try:
                self.attempt(records, scored, state)
                self.source.resume()
                return True
            except SinkError as exc:
                self.sink_failed(exc, backoff)

    def adapt(self, n: int, seconds: float) -> None:
        """Keep one batch's processing well inside max.poll.interval.ms (a slow model gets smaller batches)."""
        s = self.settings.stream
        budget = max(s.max_poll_interval_ms / 1000 * 0.4 - s.max_wait_ms / 1000, 0.05)
        per_record = seconds / max(n, 1)
        limit = int(budget / per_record) if per_record > 0 else s.max_records
        new = max(1, min(s.max_records, limit))
        # Shrink at once; grow only after a full batch proved the current size is cheap.
        if new != self.limit and (new < self.limit or n >= self.limit):
            if new < self.limit:
                log.info("batch size reduced to stay within the poll interval",
                         extra={"max_records": new, "seconds_per_record": round(per_record, 6)})
            self.limit = new
        self.metrics.max_records.set(self.limit)

    def update_lag(self, advanced: set[TP]) -> None:
        assert self.source is not None
        owned = self.source.assignment()
        for tp in owned:
            lag = self.source.lag(tp, self.next_offsets.get(tp))
            if lag is None:
                continue
            topic, partition = tp
            self.metrics.lag.labels(topic, str(partition)).set(lag)
            self.health.progress(tp, lag, tp in advanced)
            self.metrics.stalled.labels(topic, str(partition)).set(self.health.is_stalled(tp))
        for tp in [tp for tp in self.next_offsets if tp not in owned]:
            del self.next_offsets[tp]  # the next owner commits it; a reassignment starts from the commit
        for topic, partition in list(self.health.partitions):
            if (topic, partition) not in owned:
                self.health.forget([(topic, partition)])
                for gauge in (self.metrics.lag, self.metrics.stalled):
                    try:
                        gauge.remove(topic, str(partition))
                    except KeyError:
                        pass


def run_stream(settings: Settings) -> int:
    # Catch SIGTERM from the start: a pod deleted while the model loads must still exit 0, not die.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    worker = StreamWorker(settings)
    worker.install_signals()
    if early:
        worker.request_stop(early[0])
    return worker.run()

"""Stream mode: a Kafka consumer-group member that scores micro-batches and stores each result once.

One iteration, in this order (the order is the guarantee):
  1. poll up to ``max_records`` records or ``max_wait_ms``;
  2. decode and score them (bad records get a reason);
  3. send bad records to the dead-letter topic and flush;
  4. store the results in the sink (idempotent: upsert on (id, model_version), or files named by offset);
     rows the sink cannot hold as they are (``RowsRejected``) send their records to the dead-letter topic
     (step 3 again) and the rest is written again;
  5. commit, per partition, the offset after the last record of the batch.
A crash anywhere before 5 re-reads the batch from the last commit; steps 3 and 4 repeat harmlessly.
While the sink fails (``SinkError``: the store is down), step 4 is retried with backoff and partitions
paused, polling so that the group keeps us (no rebalance storm); readiness is false meanwhile and nothing
is committed. A problem of one record's values is never retried: whatever step raises for it (decoding,
scoring, the sink), the record is dead-lettered with the reason and the partition moves on.
Every sink call runs on a helper thread; the main thread never waits on one unbounded: while a store is in
flight it keeps the consumer in the group (partitions paused), ticks health and watches the shutdown bound.
On SIGTERM/SIGINT: stop polling, finish the batch in hand if the sink allows within
``shutdown_timeout_s``, else exit without committing it (it is redelivered; a write still hanging in the
store is abandoned, and its transaction dies with the connection), exit 0.
Subscribed topics missing on the broker make readiness false (named in ``/readyz``); the consumer refreshes
metadata every few seconds, so a topic created later is consumed within seconds.
The store side (lanes, one store attempt, rows a sink refuses) is in ``workers.runtime.stream.store``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import KafkaException

from workers.decode.records import Decoded, carry_columns
from workers.errors import ConfigError, ScoringError, SinkError
from workers.observability import Health, Metrics, observe_many, serve_probes
from workers.runtime.lane import Lane
from workers.runtime.stream.store import ABANDONED, BadRecordStop, StoreState, StoreSteps
from workers.runtime.watch import RoutingWatcher
from workers.scoring.build import build_router
from workers.scoring.model import Model
from workers.scoring.router import Routed, Router
from workers.scoring.scorer import Scored
from workers.settings import Settings
from workers.sinks import Sink, open_result_sink
from workers.sinks.deadletter import DeadLetters
from workers.sinks.kafka import Producer
from workers.sources.kafka import TP, Batch, KafkaSource, Record

log = logging.getLogger("workers.stream")

TOPIC_RECHECK_S = 5.0  # how often topics missing from the broker are looked for again (readiness names them)


@dataclass
class StreamHealth(Health):
    """Health plus the subscribed topics the broker does not have yet: not ready while any is missing (the
    worker waits for them and consumes them once created, but it is not doing its job meanwhile)."""

    missing_topics: list[str] = field(default_factory=list)

    def readiness(self) -> tuple[bool, list[str]]:
        ok, problems = super().readiness()
        missing = list(self.missing_topics)
        if missing:
            problems = [*problems, f"topics missing on the broker: {', '.join(missing)}"]
        return ok and not missing, problems


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


class StreamWorker(StoreSteps):
    def __init__(self, settings: Settings, model: Model | None = None, sink: Sink | None = None):
        s = settings.stream
        if not s.topics:
            raise ConfigError("SCORING_STREAM__TOPICS", "no topic given (set --topic or SCORING_STREAM__TOPICS)")
        self.settings = settings
        self.metrics = Metrics()
        self.health = StreamHealth(stall_seconds=s.stall_seconds,
                                   liveness_timeout_s=max(60.0, s.max_poll_interval_ms / 1000))
        self.topics_checked = 0.0
        given = build_router(settings, self.metrics, model=model) if model is not None else None
        self.routing = RoutingWatcher(settings, self.metrics, given)
        self.router = self.routing.router
        self.health.model_loaded = True
        self.sink = sink or open_result_sink(settings, s.sink, "SCORING_STREAM__SINK")
        self.stopping = False
        self.stop_deadline = float("inf")
        self.limit = s.max_records
        self.next_offsets: dict[TP, int] = {}
        self.exit_code = 0
        self.probes = None
        self.score_pool = Lane("score")
        self.store_pool = Lane("store")  # first attempt of each batch, in order
        self.retry_pool = Lane("store-retry")  # retries (the store lane may be waiting for the batch retried)
        self.abandoned = False  # a sink call still running was given up at the shutdown bound
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
            checked = self.await_call(self.store_pool.submit(self.sink.check))
            if checked is not ABANDONED:
                self.health.sink_ok = True
        except SinkError as exc:
            self.health.sink_error = str(exc)
            log.warning("sink not reachable at start; will retry", extra={"reason": str(exc)})
        self.source = KafkaSource(self.settings, self.metrics)  # ScoringError when the broker does not answer
        self.health.missing_topics, self.topics_checked = list(self.source.missing), time.monotonic()
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
        # After an abandoned sink call, waiting for the lanes or closing the sink under the call still running
        # there would hang (or free a connection in use): the process exit ends them. A lane still busy when
        # the bound passes (an exception stopped the loop during a hung write) counts as abandoned too.
        until = self.stop_deadline if self.stopping else time.monotonic() + self.settings.stream.shutdown_timeout_s
        for lane in (self.score_pool, self.store_pool, self.retry_pool):
            wait = 0.0 if self.abandoned else max(until - time.monotonic(), 0.1)
            if not lane.shutdown(wait) and not self.abandoned:
                self.abandoned = True
        if self.source is not None:
            self.source.close()
        if self.dead is not None:
            self.dead.close(min(5.0, max(until - time.monotonic(), 0.5)))
        if self.abandoned:
            log.warning("sink call still running at exit; not closing the sink under it")
        else:
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
        self.check_topics()
        router = self.routing.current()  # a reloaded routing starts with this batch
        if router is not self.router:
            self.switch(router)
        records = self.source.poll_batch(self.limit, self.settings.stream.max_wait_ms)
        routed, decoded = None, None
        if records:
            try:
                routed, decoded = self.decode(records)
            except Exception as exc:  # noqa: BLE001 - some record breaks the decoder: the score thread isolates it
                log.warning("decoding a batch failed; isolating the records that fail",
                            extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "records": len(records)})
                self.submit(records, None, None, router)
                self.update_lag(records.partition_set())
                return
        self.drain(keep=1 if records else 0)  # at most one batch ahead of the one handed over now
        if records and decoded is not None and not self.stopping:
            if decoded.features.reasons and self.settings.stream.on_bad_record == "fail":
                self.fail_on_bad(records, decoded)
                return
            self.submit(records, routed, decoded, router)
        self.update_lag(records.partition_set())

    def check_topics(self) -> None:
        """Look again for subscribed topics the broker lacks (often while some are missing, rarely after)."""
        assert self.source is not None
        every = TOPIC_RECHECK_S if self.source.missing else 12 * TOPIC_RECHECK_S
        if time.monotonic() - self.topics_checked >= every:
            self.topics_checked = time.monotonic()
            self.health.missing_topics = self.source.find_missing()

    def switch(self, router: Router) -> None:
        """Start scoring with a reloaded routing (between batches)."""
        self.router = router
        self.calibrate()

    def decode(self, records: Batch) -> tuple[Routed, Decoded]:
        return self.router.decode(records.values(), records.keys(), self.settings.stream.key_as_id)

    def submit(self, records: Batch, routed: Routed | None, decoded: Decoded | None, router: Router) -> None:
        self.drain(keep=1)
        if self.stopping:
            return
        before = self.pending[-1] if self.pending else None
        scoring = self.score_pool.submit(self.score_timed, records, routed, decoded, router)
        flight = InFlight(records, time.monotonic())
        flight.future = self.store_pool.submit(self.store_once, flight, scoring, before)
        self.pending.append(flight)

    def score(self, records: Batch, routed: Routed, decoded: Decoded, router: Router) -> Scored:
        carry = carry_columns(decoded.passthrough, records.topics(), records.partitions(), records.offsets(),
                              np.array(records.timestamps(), dtype=np.int64))
        return router.finish(routed, carry)

    def score_timed(self, records: Batch, routed: Routed | None, decoded: Decoded | None, router: Router
                    ) -> tuple[Scored | None, float, StoreState]:
        """Score thread: predict with the routing the batch was decoded with.

        When decoding or scoring the batch raises, the records responsible are found by splitting the batch
        (a record that fails alone is dead-lettered with the exception as its reason) and the others are
        scored in the parts that succeed: one record's values never stop or wedge a partition."""
        started = time.monotonic()
        try:
            if routed is None or decoded is None:
                raise ScoringError("the batch could not be decoded")
            scored = self.score(records, routed, decoded, router)
            parts = [(records, scored)]
            culprits: list[tuple[Record, str]] = []
        except Exception as exc:  # noqa: BLE001 - isolate the records that cause it (below)
            log.warning("scoring a batch failed; isolating the records that fail",
                        extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "records": len(records)})
            parts, culprits = [], []
            self.isolate(records.messages, router, parts, culprits)
            scored = parts[0][1] if parts else None
        version = router.primary.model.version
        letters = [(record, reason, version) for record, reason in culprits]
        for part, part_scored in parts:
            if part_scored.rejected:
                for i, reason, v in zip(part_scored.error_rows, part_scored.errors["reason"].to_pylist(),
                                        part_scored.errors["model_version"].to_pylist(), strict=True):
                    letters.append((part[int(i)], reason, v))
        # Every record failed alone: nothing to write, so no errors table to hand the sink either.
        no_errors = scored.errors.slice(0, 0) if scored is not None else pa.table({})
        state = StoreState([s.results for _, s in parts if s.results.num_rows], letters, no_errors)
        if culprits and self.settings.stream.on_bad_record == "fail":
            state.failed = culprits[0]
        return scored, time.monotonic() - started, state

    def isolate(self, messages: list, router: Router, parts: list[tuple[Batch, Scored]],
                culprits: list[tuple[Record, str]]) -> None:
        """Split ``messages`` until each part scores or is one record that fails (appended, in order).

        The parts are decoded and scored again (their rows count again in the per-version metrics and the drift
        window: a rare path)."""
        if not messages:
            return
        part = Batch(messages)
        try:
            routed, decoded = router.decode(part.values(), part.keys(), self.settings.stream.key_as_id)
            parts.append((part, self.score(part, routed, decoded, router)))
            return
        except Exception as exc:  # noqa: BLE001 - a record whose values break decoding or scoring
            if len(messages) == 1:
                record = part[0]
                reason = f"cannot be scored: {type(exc).__name__}: {exc}"[:500]
                log.error("record cannot be scored; dead-lettered", extra={
                    "topic": record.topic, "partition": record.partition, "offset": record.offset,
                    "reason": reason})
                culprits.append((record, reason))
                return
        mid = len(messages) // 2
        self.isolate(messages[:mid], router, parts, culprits)
        self.isolate(messages[mid:], router, parts, culprits)

    def store_once(self, flight: InFlight, scoring: Future, before: InFlight | None
                   ) -> tuple[Scored | None, float, bool, StoreState]:
        """Store thread: one attempt to store, once the batch before is stored for good. Never touches the consumer."""
        records = flight.records
        scored, scoring_s, state = scoring.result()
        if state.failed is not None:  # on_bad_record=fail: the main thread stops, nothing stored
            return scored, scoring_s, False, state
        if before is not None:
            before.settled.wait()
            if not before.stored:  # dropped uncommitted: the main thread decides about this one
                return scored, scoring_s, False, state
        try:
            self.attempt(records, state)
        except SinkError as exc:
            self.sink_failed(exc, 0.2)
            return scored, scoring_s, False, state
        except BadRecordStop:
            return scored, scoring_s, False, state
        flight.stored, flight.stored_at = True, time.time()
        flight.settled.set()
        return scored, scoring_s, True, state

    def await_call(self, future: Future) -> Any:
        """Main thread: the result of a call running on a lane, never waiting on it unbounded.

        While the call runs (a slow or hanging store), the consumer stays in the group with its partitions
        paused, health ticks and lag stays current. Returns ``ABANDONED`` when the shutdown bound passes
        first: the call is left running and its batch is not committed (it is redelivered)."""
        try:
            return future.result(timeout=max(0.0, min(0.5, self.stop_deadline - time.monotonic())))
        except FutureTimeout:
            pass
        held = False
        try:
            while True:
                now = time.monotonic()
                if self.stopping and now >= self.stop_deadline:
                    self.abandoned = True
                    log.warning("shutdown bound reached with a sink call in flight; exiting without committing "
                                "its batch (it is redelivered)",
                                extra={"bound_s": self.settings.stream.shutdown_timeout_s})
                    return ABANDONED
                self.health.tick()
                wait = max(min(0.2, self.stop_deadline - now), 0.01)
                if self.source is not None:
                    held = True
                    self.source.keep_alive(int(wait * 1000))
                    self.update_lag(set())
                try:
                    return future.result(timeout=0 if self.source is not None else wait)
                except FutureTimeout:
                    continue
        finally:
            if held and self.source is not None:
                self.source.resume()

    def drain(self, keep: int = 0) -> None:
        """Main thread: for the oldest batches in flight, wait for the store, retry it if it failed, commit."""
        assert self.source is not None
        while len(self.pending) > keep:
            flight = self.pending.popleft()
            records, stored = flight.records, False
            try:
                assert flight.future is not None
                outcome = self.await_call(flight.future)
                if outcome is not ABANDONED:
                    scored, scoring_s, stored, state = outcome
                    if not stored and state.failed is None:
                        stored = self.store(records, state)
                        flight.stored_at = time.time()
                    if state.failed is not None:
                        self.stop_on_bad(*state.failed)
                        stored = False
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
            self.account(records, state, flight.stored_at)
            self.metrics.batch_seconds.observe(time.monotonic() - flight.started)
            self.adapt(len(records), scoring_s)

    def account(self, records: Batch, state: StoreState, stored_at: float) -> None:
        # Counted per (topic, model_version) of the *served* rows (shadow rows: scoring_version_rows_total).
        for results in state.written:
            served = results.filter(results["served"])
            for row in served.group_by(["topic", "model_version"]).aggregate([("id", "count")]).to_pylist():
                self.metrics.scored.labels(row["topic"], row["model_version"]).inc(row["id_count"])
                self.metrics.written.labels(row["topic"], row["model_version"]).inc(row["id_count"])
        for (topic, version), n in Counter(state.dead).items():
            self.metrics.dead_lettered.labels(topic, version).inc(n)
        stamps = np.array(records.timestamps(), dtype=np.float64)
        observe_many(self.metrics.end_to_end, np.maximum(stored_at - stamps[stamps >= 0] / 1000, 0))
        self.metrics.batch_size.observe(len(records))

    def fail_on_bad(self, records: Batch, decoded: Decoded) -> None:
        i = min(decoded.features.reasons)
        self.stop_on_bad(records[i], decoded.features.reasons[i])

    def stop_on_bad(self, first: Record, reason: str) -> None:
        log.error("bad record; stopping (on_bad_record=fail), nothing of this batch committed",
                  extra={"topic": first.topic, "partition": first.partition, "offset": first.offset,
                         "reason": reason})
        self.exit_code = 1
        self.request_stop()
        self.stop_deadline = time.monotonic()

    def sink_failed(self, exc: Exception, backoff: float) -> None:
        self.metrics.sink_errors.inc()
        self.health.sink_ok, self.health.sink_error = False, str(exc)[:300]
        log.warning("store failed; retrying without committing", extra={"reason": str(exc)[:300],
                                                                         "retry_in_s": backoff})

    def store(self, records: Batch, state: StoreState) -> bool:
        """Main thread: retry the store with backoff, staying in the group; False when the batch was dropped.

        Each attempt runs on the retry lane and is awaited with ``await_call`` (bounded by the shutdown).
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
                if self.await_call(self.retry_pool.submit(self.attempt, records, state)) is ABANDONED:
                    return False
                self.source.resume()
                return True
            except SinkError as exc:
                self.sink_failed(exc, backoff)
            except BadRecordStop:
                self.source.resume()
                return False

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

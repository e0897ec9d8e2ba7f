"""Stream mode's pipeline: the ordered stages of a micro-batch, and the rule that makes them safe.

The order is the guarantee (each step is marked ``# Step N`` where it is done):
  1. poll up to ``max_records`` records or ``max_wait_ms`` (main thread; records of partitions revoked during
     the poll are not in the batch);
  2. decode (main thread) and score (score lane); bad records get a reason;
  3. send bad records to the dead-letter topic and flush (store lane);
  4. store the results in the sink (store lane; idempotent: upsert on (id, model_version), or files named by
     offset); rows the sink cannot hold (``RowsRejected``) go back to step 3 and the rest is written again;
  5. commit, per partition, the offset after the last record of the batch (main thread), only after its
     store returned, in batch order.
A crash anywhere before 5 re-reads the batch from the last commit; steps 3 and 4 repeat harmlessly.

Rules kept here (each has an in-process test in tests/test_stream_ordering.py):
- nothing is committed before it is stored;
- batches are stored in order: a batch's first store attempt waits until the one before it is stored for
  good or dropped; a dropped batch (stopping, or every partition of it revoked while its store was retried)
  is not committed, and no later batch commits past it on a partition they share (also the batch polled in the
  step whose drain drops it, handed to the lanes only after that drain);
- while the sink fails (``SinkError``), the store is retried with backoff, partitions paused, the member kept
  in the group (``Source.keep_alive``); readiness is false meanwhile and nothing is committed;
- while the schema registry does not answer (a wire format's schemas for a batch), the batch waits before
  decoding the same way, readiness naming the registry; nothing polled after it exists meanwhile;
- the main thread never waits on a lane unbounded: past the shutdown bound a call still running is abandoned
  and its batch left uncommitted (redelivered).
Three stages overlap: while the store lane writes batch N and the score lane predicts batch N+1 (LightGBM, the
database driver and librdkafka release the GIL), the main thread polls and decodes batch N+2. Everything that
touches the consumer (poll, commit, pause, resume) stays on the main thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np

from workers.decode.records import Decoded
from workers.decode.registry import RegistryUnavailable
from workers.decode.wire import from_settings as wire_from_settings
from workers.errors import SinkError
from workers.observability import Metrics, observe_many
from workers.runtime.lane import Lane
from workers.runtime.stream import trace
from workers.runtime.stream.health import LagWatch, StreamHealth
from workers.runtime.stream.score import ScoreOutcome, ScoreStage
from workers.runtime.stream.sizing import BatchSizer
from workers.runtime.stream.store import ABANDONED, BadRecordStop, StoreState, StoreSteps
from workers.runtime.watch import RoutingWatcher
from workers.scoring.router import Routed, Router
from workers.settings import Settings
from workers.sinks import Sink
from workers.sinks.deadletter import DeadLetters
from workers.sources.base import TP, Batch, Record, Source

log = logging.getLogger("workers.stream")


@dataclass
class Stop:
    """The worker's stop request, read by the pipeline (set from a signal handler or on a fatal record)."""

    bound_s: float  # shutdown_timeout_s: how long a stop may wait for the batch in hand
    requested: bool = False
    deadline: float = float("inf")
    exit_code: int = 0

    def request(self) -> bool:
        """Ask to stop within the bound; False when a stop was already asked."""
        if self.requested:
            return False
        self.requested, self.deadline = True, time.monotonic() + self.bound_s
        return True

    def passed(self) -> bool:
        return self.requested and time.monotonic() >= self.deadline

    def until(self) -> float:
        """When what is still running must be given up (the bound from now when no stop was asked)."""
        return self.deadline if self.requested else time.monotonic() + self.bound_s


@dataclass
class InFlight:
    """A batch handed to the score and store lanes, not yet committed."""

    records: Batch
    started: float
    future: Future | None = None  # of first_store: a StoreOutcome
    settled: threading.Event = field(default_factory=threading.Event)  # stored for good, or dropped
    stored: bool = False
    stored_at: float = 0.0  # wall clock when the store returned: the end of produce-to-stored latency
    exclude: set[TP] = field(default_factory=set)  # partitions an earlier dropped batch left uncommitted


@dataclass
class StoreOutcome:
    """What the first store attempt of a batch hands the main thread."""

    scoring: ScoreOutcome
    stored: bool  # False: failed (retry on the main thread), waited on a dropped batch, or stopped


class Pipeline(StoreSteps):
    """Polls, scores, stores and commits micro-batches (``step``, ``drain``); the worker owns its parts.

    Methods beyond ~12 (with ``StoreSteps``'s four): each is one step or the bounded wait between steps, kept
    apart because each has its own threads and its own failure rule."""

    health: StreamHealth

    def __init__(self, settings: Settings, routing: RoutingWatcher, source: Source, sink: Sink,
                 metrics: Metrics, health: StreamHealth, stop: Stop):
        self.settings = settings
        self.routing = routing
        self.router = routing.router
        self.source = source
        self.sink = sink
        self.dead: DeadLetters | None = None  # set when the worker starts (the producer is built then)
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.sizer = BatchSizer(settings.stream, metrics)
        self.lag = LagWatch(source, health, metrics)
        self.wire = wire_from_settings(settings)  # None for JSON values; else its schemas come from the registry
        self.scorer = ScoreStage(settings.stream, self.wire)
        self.registry_checked = 0.0
        self.score_lane = Lane("score")
        self.store_lane = Lane("store")  # first attempt of each batch, in order
        self.retry_lane = Lane("store-retry")  # retries (the store lane may be waiting for the batch retried)
        self.abandoned = False  # a sink call still running was given up at the shutdown bound
        self.pending: deque[InFlight] = deque()
        #: partitions of batches dropped since the last poll: the batch that poll took (not submitted yet when the
        #: drop happens in its step's drain) must not commit past them either
        self.dropped_since_poll: set[TP] = set()
        #: the source is open (before that, a call awaited at start-up has no group to keep: it just waits)
        self.source_open = False

    def step(self) -> int:
        """One poll, handed to the lanes; commits the batches whose store is done (at most one stays ahead).
        Returns how many records the poll took."""
        self.health.tick()
        self.lag.check_topics()
        # A reloaded routing starts with this batch; after an alias move it waits for the new version (bounded).
        router = self.routing.current(self._waiting_for_switch)
        if router is not self.router:
            self.router = router
            self.sizer.calibrate(router)
        # Step 1: poll.
        polled = trace.now_ns()
        records = self.source.poll_batch(self.sizer.limit, self.settings.stream.max_wait_ms)
        self.dropped_since_poll = set()
        if records and self.routing.changed:
            # The batch begins when its poll returns: a switch opened (or a router loaded) while the poll
            # waited applies to these records too (they may have been produced after the alias moved).
            router = self.routing.current(self._waiting_for_switch)
            if router is not self.router:
                self.router = router
                self.sizer.calibrate(router)
        self.lag.handed(records)
        routed, decoded = None, None
        if records and self.wire is not None and not self.fetch_schemas(records):
            return len(records)  # dropped uncommitted (stopping, or its partitions revoked): redelivered
        if not records and self.health.registry_error and self.wire is not None:
            self._registry_recheck()
        if records:
            trace.begin(records, polled, self.settings.stream.group, router.primary.model.version, self.sink.name)
            # Step 2a: decode on this thread (the score lane predicts the batch before).
            try:
                with trace.step(records, "decode"):
                    routed, decoded = self.scorer.decode(records, router)
            except Exception as exc:  # noqa: BLE001 - some record breaks the decoder: the score lane isolates it
                log.warning("decoding a batch failed; isolating the records that fail",
                            extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "records": len(records)})
                self.submit(records, None, None, router)
                self.lag.update(records.partition_set())
                return len(records)
        self.drain(keep=1 if records else 0)  # at most one batch ahead of the one handed over now
        if records and decoded is not None and not self.stop.requested:
            if decoded.features.reasons and self.settings.stream.on_bad_record == "fail":
                i = min(decoded.features.reasons)
                self.stop_on_bad(records[i], decoded.features.reasons[i])
                self.end_trace(records, False, reason="bad record; stopping (on_bad_record=fail)")
                return len(records)
            self.submit(records, routed, decoded, router)
        elif records:
            self.end_trace(records, False, reason="stopping: not scored, redelivered")
        self.lag.update(records.partition_set())
        return len(records)

    def _waiting_for_switch(self) -> bool:
        """While the next batch waits for a moved alias's version: alive (readiness says why); a stop ends it."""
        self.health.tick()
        return self.stop.requested

    def submit(self, records: Batch, routed: Routed | None, decoded: Decoded | None, router: Router) -> None:
        self.drain(keep=1)
        if self.stop.requested:
            self.end_trace(records, False, reason="stopping: not scored, redelivered")
            return
        before = self.pending[-1] if self.pending else None
        # Step 2b: score on the score lane, then steps 3-4 on the store lane, after the batch before.
        scoring = self.score_lane.submit(self.score, records, routed, decoded, router)
        flight = InFlight(records, time.monotonic())
        # A batch dropped after this one was polled (in this step's drain) fences its partitions for it too.
        flight.exclude |= self.dropped_since_poll
        flight.future = self.store_lane.submit(self.first_store, flight, scoring, before)
        self.pending.append(flight)

    def score(self, records: Batch, routed: Routed | None, decoded: Decoded | None, router: Router) -> ScoreOutcome:
        """Score lane: step 2b, in its span when tracing is on."""
        with trace.step(records, "score", **{"scoring.model_version": router.primary.model.version}) as span:
            outcome = self.scorer.run(records, routed, decoded, router)
            if span is not None:
                span.set_attributes({"scoring.rows": sum(t.num_rows for t in outcome.state.parts),
                                     "scoring.rejected": len(outcome.state.letters)})
            return outcome

    def first_store(self, flight: InFlight, scoring: Future, before: InFlight | None) -> StoreOutcome:
        """Store lane: one attempt at steps 3-4 once the batch before is stored for good. Never touches the
        consumer."""
        outcome: ScoreOutcome = scoring.result()
        if outcome.state.failed is not None:  # on_bad_record=fail: the main thread stops, nothing stored
            return StoreOutcome(outcome, False)
        if before is not None:
            before.settled.wait()
            if not before.stored:  # dropped uncommitted: the main thread decides about this one
                return StoreOutcome(outcome, False)
        try:
            self.attempt(flight.records, outcome.state)  # Steps 3 and 4
        except SinkError as exc:
            self.sink_failed(exc, min(0.2, self.settings.stream.retry_backoff_max_s))
            return StoreOutcome(outcome, False)
        except BadRecordStop:
            return StoreOutcome(outcome, False)
        flight.stored, flight.stored_at = True, time.time()
        flight.settled.set()
        return StoreOutcome(outcome, True)

    def drain(self, keep: int = 0) -> None:
        """Main thread: for the oldest batches in flight, wait for the store, retry it if it failed, commit."""
        while len(self.pending) > keep:
            flight = self.pending.popleft()
            records, stored, outcome = flight.records, False, None
            try:
                assert flight.future is not None
                outcome = self.await_call(flight.future)
                if isinstance(outcome, StoreOutcome):
                    stored = outcome.stored
                    state = outcome.scoring.state
                    if not stored and state.failed is None:
                        stored = self.retry_store(records, state)
                        flight.stored_at = time.time()
                    if state.failed is not None:
                        self.stop_on_bad(*state.failed)
                        stored = False
            finally:
                flight.stored = stored
                flight.settled.set()  # lets the store lane go on with the next batch
            offsets = {tp: off for tp, off in records.next_offsets().items() if tp not in flight.exclude}
            if not stored:
                self.end_trace(records, False, outcome)
                # Dropped uncommitted (stopping, or every partition of it revoked): redelivered later. A later
                # batch must not commit past it on a partition they share.
                for later in self.pending:
                    later.exclude |= set(offsets)
                self.dropped_since_poll |= set(offsets)  # and the batch polled in this step, not yet pending
                continue
            # Step 5: commit, only now that the batch is stored.
            with trace.step(records, "commit", **{"messaging.kafka.partitions": len(offsets)}) as span:
                committed = self.source.commit(offsets)
                if span is not None:
                    span.set_attribute("scoring.commit_accepted", bool(committed))
            self.lag.committed(offsets)
            assert isinstance(outcome, StoreOutcome)  # stored implies the store attempt returned
            self.end_trace(records, True, outcome)
            self.account(records, outcome.scoring.state, flight.stored_at)
            self.metrics.batch_seconds.observe(time.monotonic() - flight.started)
            self.sizer.adapt(len(records), outcome.scoring.seconds)

    def await_call(self, future: Future):
        """Main thread: the result of a call running on a lane, never waiting on it unbounded.

        While the call runs (a slow or hanging store), the consumer stays in the group with its partitions
        paused, health ticks and lag stays current. Returns ``ABANDONED`` when the shutdown bound passes
        first: the call is left running and its batch is not committed (it is redelivered)."""
        try:
            return future.result(timeout=max(0.0, min(0.5, self.stop.deadline - time.monotonic())))
        except FutureTimeout:
            pass
        held = False
        try:
            while True:
                now = time.monotonic()
                if self.stop.passed():
                    self.abandoned = True
                    log.warning("shutdown bound reached with a sink call in flight; exiting without committing "
                                "its batch (it is redelivered)",
                                extra={"bound_s": self.settings.stream.shutdown_timeout_s})
                    return ABANDONED
                self.health.tick()
                wait = max(min(0.2, self.stop.deadline - now), 0.01)
                if self.source_open:
                    held = True
                    self.source.keep_alive(int(wait * 1000))
                    self.lag.update(set())
                try:
                    return future.result(timeout=0 if self.source_open else wait)
                except FutureTimeout:
                    continue
        finally:
            if held:
                self.source.resume()

    def paused_retry(self, records: Batch, what: str, attempt: Callable[[float], bool | None]) -> bool:
        """Main thread: the one "paused wait and retry" loop of a batch that cannot go on yet (the sink fails, the
        registry does not answer). Between attempts, with a backoff doubling up to ``retry_backoff_max_s``:
        partitions paused, the member kept in the group (``Source.keep_alive``), health ticking, lag current;
        readiness names the cause (set by the caller's ``attempt`` when it fails). ``attempt(next_backoff)``
        returns True (done), False (give the batch up) or None (failed: wait and try again). False when the
        shutdown bound passed or every partition of the batch was revoked meanwhile: dropped uncommitted."""
        backoff = min(0.2, self.settings.stream.retry_backoff_max_s)  # the first wait, never over the max
        batch_tps = records.partition_set()
        try:
            while True:
                until = time.monotonic() + backoff
                while time.monotonic() < until:
                    if self.stop.passed():
                        log.warning(f"shutdown bound reached with {what}; dropped uncommitted")
                        return False
                    self.health.tick()
                    self.source.keep_alive(int(min(500, max(until - time.monotonic(), 0.01) * 1000)))
                    # Lag keeps growing while we wait: keep it (and stall detection) current.
                    self.lag.update(set())
                if not batch_tps & self.source.assignment():
                    log.info(f"every partition of the batch waiting ({what}) was revoked; dropped for the new owner")
                    return False
                backoff = min(backoff * 2, self.settings.stream.retry_backoff_max_s)
                done = attempt(backoff)
                if done is not None:
                    return done
        finally:
            self.source.resume()

    def retry_store(self, records: Batch, state: StoreState) -> bool:
        """Main thread: retry steps 3-4 (``paused_retry``); False when the batch was dropped. Each attempt runs on
        the retry lane and is awaited with ``await_call`` (bounded by the shutdown)."""

        def attempt(backoff: float) -> bool | None:
            try:
                return self.await_call(self.retry_lane.submit(self.attempt, records, state)) is not ABANDONED
            except SinkError as exc:
                self.sink_failed(exc, backoff)
                return None
            except BadRecordStop:
                return False

        return self.paused_retry(records, "the batch unstored", attempt)

    def fetch_schemas(self, records: Batch) -> bool:
        """Main thread, before decoding: the schemas the batch names. While the registry does not answer, the
        batch waits like a sink outage (``paused_retry``), the batches before it committed, nothing after it
        polled. False when the batch was dropped (the shutdown bound passed, or every partition of it was
        revoked)."""
        assert self.wire is not None
        wire = self.wire

        def attempt(backoff: float) -> bool | None:
            try:
                wire.prepare(records.values())
            except RegistryUnavailable as exc:
                self._registry_failed(exc, backoff)
                return None
            return self._registry_back()

        if attempt(0.2):
            return True
        self.drain()  # what was polled before this batch stores and commits meanwhile
        return self.paused_retry(records, "the batch's schemas not fetched", attempt)

    def _registry_failed(self, exc: Exception, backoff: float) -> None:
        self.metrics.registry_errors.inc()
        self.health.registry_error = str(exc)[:300]
        log.warning("schema registry unavailable; the batch waits, nothing committed past it",
                    extra={"reason": str(exc)[:300], "retry_in_s": backoff})

    def _registry_recheck(self) -> None:
        """Idle with the registry marked down (at start-up, or since the last batch): ask it again every few
        seconds, so readiness turns true when it answers, not only when the next record arrives."""
        if time.monotonic() - self.registry_checked >= 5.0:
            assert self.wire is not None
            self.registry_checked = time.monotonic()
            self.health.registry_error = self.wire.registry.probe() or ""

    def _registry_back(self) -> bool:
        if self.health.registry_error:
            log.info("schema registry answers again")
        self.health.registry_error = ""
        return True

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

    @staticmethod
    def end_trace(records: Batch, committed: bool, outcome: StoreOutcome | None = None, reason: str = "") -> None:
        """End the batch's span (tracing on): committed, or dropped uncommitted with the reason."""
        span: trace.BatchSpan | None = records.trace
        if span is None:
            return
        records.trace = None
        state = outcome.scoring.state if isinstance(outcome, StoreOutcome) else None
        if state is not None and state.failed is not None:
            reason = reason or f"bad record; stopping (on_bad_record=fail): {state.failed[1]}"
        span.end(committed, sum(t.num_rows for t in state.written) if state else 0,
                 len(state.dead) if state else 0, reason)

    def stop_on_bad(self, first: Record, reason: str) -> None:
        log.error("bad record; stopping (on_bad_record=fail), nothing of this batch committed",
                  extra={"topic": first.topic, "partition": first.partition, "offset": first.offset,
                         "reason": reason})
        self.stop.exit_code = 1
        self.stop.request()
        self.stop.deadline = time.monotonic()

    def sink_failed(self, exc: Exception, backoff: float) -> None:
        self.metrics.sink_errors.inc()
        self.health.sink_ok, self.health.sink_error = False, str(exc)[:300]
        log.warning("store failed; retrying without committing", extra={"reason": str(exc)[:300],
                                                                         "retry_in_s": backoff})

    def shutdown(self) -> None:
        """Release the batches left in flight and end the lanes within what is left of the shutdown bound."""
        for flight in self.pending:  # an exception left batches behind: release their store attempts
            flight.settled.set()
            self.end_trace(flight.records, False, reason="left in flight at shutdown: redelivered")
        # After an abandoned sink call, waiting for the lanes (or, later, closing the sink under the call still
        # running there) would hang or free a connection in use: the process exit ends them. A lane still busy
        # when the bound passes (an exception stopped the loop during a hung write) counts as abandoned too.
        until = self.stop.until()
        for lane in (self.score_lane, self.store_lane, self.retry_lane):
            wait = 0.0 if self.abandoned else max(until - time.monotonic(), 0.1)
            if not lane.shutdown(wait) and not self.abandoned:
                self.abandoned = True

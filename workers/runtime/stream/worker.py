"""Stream mode: a Kafka consumer-group member that scores micro-batches and stores each result once.

The worker is the lifecycle: it builds the parts (routing, sink, source, dead letters, probes), starts them,
runs the pipeline until asked to stop, and closes what it owns (one ``ExitStack``, in the order below). What
a micro-batch goes through, and the ordering rules that make at-least-once true, are in
``workers.runtime.stream.pipeline``; one store attempt in ``workers.runtime.stream.store``; batch sizing in
``sizing``; lag, stalls and missing topics in ``health``.

Specification:
- Building a worker does no network I/O. The source, sink and dead letters can be injected (tests use
  ``workers.testing``); by default they come from the settings (Kafka, the ``--sink`` URI, the dead-letter
  topic of each input topic).
- ``run()``: calibrate the batch size, start the routing watcher and the probes, check the sink (not reachable:
  readiness false, retried), open the source, then poll-score-store-commit until stopped; returns the exit
  code (0, or 1 after ``on_bad_record=fail`` met a bad record).
- On SIGTERM/SIGINT (``request_stop``): stop polling, finish the batch in hand if the sink allows within
  ``shutdown_timeout_s``, else exit without committing it (it is redelivered; a write still hanging in the
  store is abandoned, and its transaction dies with the connection). SIGHUP reloads the routing.
- ``burst=True`` (tests, one-off drains): stop once a poll returns nothing and every batch is committed.
- Subscribed topics missing on the broker make readiness false (named in ``/readyz``); a topic created later
  is consumed within seconds.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import ExitStack

from confluent_kafka import KafkaException

from workers.errors import ConfigError, ScoringError, SinkError
from workers.observability import Metrics, _Server, serve_probes
from workers.runtime.stream.health import StreamHealth
from workers.runtime.stream.pipeline import Pipeline, Stop
from workers.runtime.stream.store import ABANDONED
from workers.runtime.watch import RoutingWatcher
from workers.scoring.build import build_router
from workers.scoring.model import Model
from workers.scoring.router import Router
from workers.settings import Settings
from workers.sinks import Sink, open_result_sink
from workers.sinks.deadletter import DeadLetters
from workers.sinks.kafka import Producer
from workers.sources.base import Source
from workers.sources.kafka import KafkaSource

log = logging.getLogger("workers.stream")


class StreamWorker:
    def __init__(self, settings: Settings, model: Model | None = None, sink: Sink | None = None,
                 source: Source | None = None, dead_letters: DeadLetters | None = None, burst: bool = False):
        s = settings.stream
        if not s.topics:
            raise ConfigError("SCORING_STREAM__TOPICS", "no topic given (set --topic or SCORING_STREAM__TOPICS)")
        self.settings = settings
        self.metrics = Metrics()
        self.health = StreamHealth(stall_seconds=s.stall_seconds,
                                   liveness_timeout_s=max(60.0, s.max_poll_interval_ms / 1000))
        given = build_router(settings, self.metrics, model=model) if model is not None else None
        self.routing = RoutingWatcher(settings, self.metrics, given)
        self.health.switching = lambda: self.routing.waiting
        self.health.model_loaded = True
        self.stop = Stop(s.shutdown_timeout_s)
        self.burst = burst
        self.pipeline = Pipeline(settings, self.routing,
                                 source or KafkaSource(settings, self.metrics),  # connects in open()
                                 sink or open_result_sink(settings, s.sink, "SCORING_STREAM__SINK"),
                                 self.metrics, self.health, self.stop)
        self.given_dead = dead_letters
        self.probes: _Server | None = None

    @property
    def router(self) -> Router:
        return self.pipeline.router

    @property
    def sink(self) -> Sink:
        return self.pipeline.sink

    @property
    def exit_code(self) -> int:
        return self.stop.exit_code

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if self.stop.request():
            log.info("stopping", extra={"signal": signum, "bound_s": self.stop.bound_s})

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.routing.reload_now)

    def run(self) -> int:
        p = self.pipeline
        with ExitStack() as owned:
            # Closed in reverse: lanes first (what is left of the shutdown bound), then the routing watcher, the
            # source, the dead letters, the probes, and the sink last (not at all under a call still running).
            owned.callback(lambda: log.info("stream stopped", extra={"exit_code": self.stop.exit_code}))
            owned.callback(self._close_sink)
            if self.stop.requested:  # stopped while loading: nothing consumed, nothing to commit
                return self.stop.exit_code
            self._start(owned)
            while not self.stop.requested:
                if p.step() == 0 and self.burst and self._drained():
                    break
            p.drain()
        return self.stop.exit_code

    def _drained(self) -> bool:
        """burst: nothing in flight and no owned partition behind what we committed."""
        p = self.pipeline
        return not p.pending and all(p.source.lag(tp, p.lag.next_offsets.get(tp)) == 0 for tp in p.source.assignment())

    def _start(self, owned: ExitStack) -> None:
        p, s = self.pipeline, self.settings.stream
        p.sizer.calibrate(p.router)
        owned.callback(self._close_probes)
        if s.metrics_port is not None:
            self.probes = serve_probes(s.metrics_port, self.health, self.metrics)
        owned.callback(self._close_dead)
        owned.callback(p.source.close)
        owned.callback(self.routing.stop)
        owned.callback(p.shutdown)
        self.routing.start()
        try:
            checked = p.await_call(p.store_lane.submit(p.sink.check))
            if checked is not ABANDONED:
                self.health.sink_ok = True
        except SinkError as exc:
            self.health.sink_error = str(exc)
            log.warning("sink not reachable at start; will retry", extra={"reason": str(exc)})
        if p.wire is not None:
            # Credentials refused or a certificate the CA file does not verify: ConfigError (exit 2) now.
            down = p.wire.registry.check()
            if down:
                self.health.registry_error = down
                log.warning("schema registry not reachable at start; will retry", extra={"reason": down})
        p.source.open()  # ScoringError when the broker does not answer
        p.source_open = True
        p.lag.opened()
        try:
            p.dead = self.given_dead or DeadLetters(Producer(self.settings.kafka), s.dlq_for)
        except KafkaException as exc:
            raise ScoringError(f"Kafka producer: {exc}") from None
        log.info("stream start", extra={"topics": s.topics, "group": s.group, "sink": p.sink.name,
                                        "model_version": p.router.primary.model.version,
                                        "versions": p.router.describe(),
                                        "metrics_port": self.probes.server_address[1] if self.probes else None})

    def _close_dead(self) -> None:
        if self.pipeline.dead is not None:
            self.pipeline.dead.close(min(5.0, max(self.stop.until() - time.monotonic(), 0.5)))

    def _close_probes(self) -> None:
        if self.probes is not None:
            self.probes.shutdown()

    def _close_sink(self) -> None:
        if self.pipeline.abandoned:
            log.warning("sink call still running at exit; not closing the sink under it")
        else:
            self.pipeline.sink.close()


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

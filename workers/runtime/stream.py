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
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError

from workers.errors import ConfigError, ScoringError, SinkError
from workers.model import Model, load_model
from workers.observability import Health, Metrics, serve_probes
from workers.records import RecordDecoder
from workers.scoring import Scored, Scorer
from workers.settings import Settings
from workers.sinks import Sink, open_sink
from workers.sinks.deadletter import DeadLetters
from workers.sinks.kafka import producer
from workers.sources.kafka import KafkaSource

log = logging.getLogger("workers.stream")
EMPTY = pa.table({})


class StreamWorker:
    def __init__(self, settings: Settings, model: Model | None = None, sink: Sink | None = None):
        s = settings.stream
        if not s.topics:
            raise ConfigError("SCORING_STREAM__TOPICS", "no topic given (set --topic or SCORING_STREAM__TOPICS)")
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health(stall_seconds=s.stall_seconds,
                             liveness_timeout_s=max(60.0, s.max_poll_interval_ms / 1000))
        self.model = model or load_model(settings.model, settings.s3)
        self.health.model_loaded = True
        self.scorer = Scorer(self.model, settings.scoring.id_column, settings.scoring.passthrough)
        self.decoder = RecordDecoder(self.model, settings.scoring.id_column, s.key_as_id,
                                     settings.scoring.passthrough)
        self.sink = sink or open_sink(s.sink, settings.s3, setting="SCORING_STREAM__SINK", kafka=settings.kafka)
        self.stopping = False
        self.stop_deadline = float("inf")
        self.limit = s.max_records
        self.next_offsets: dict[TopicPartition, int] = {}
        self.exit_code = 0
        self.probes = None
        self.source: KafkaSource | None = None
        self.dead: DeadLetters | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.settings.stream.shutdown_timeout_s
            log.info("stopping", extra={"signal": signum, "bound_s": self.settings.stream.shutdown_timeout_s})

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def calibrate(self) -> None:
        """Time one predict call before consuming, so even the first batch of a slow model fits the poll interval."""
        rows = 256
        probe = np.zeros((rows, len(self.model.feature_names)))
        started = time.perf_counter()
        self.model.predict(probe)
        # Decoding and storing cost about as much again as predicting for fast models: count it twice.
        self.adapt(rows, 2 * (time.perf_counter() - started))
        log.info("batch size calibrated", extra={"max_records": self.limit})

    def start(self) -> None:
        s = self.settings.stream
        self.calibrate()
        if s.metrics_port is not None:
            self.probes = serve_probes(s.metrics_port, self.health, self.metrics)
        try:
            self.sink.check()
            self.health.sink_ok = True
        except SinkError as exc:
            self.health.sink_error = str(exc)
            log.warning("sink not reachable at start; will retry", extra={"reason": str(exc)})
        try:
            self.source = KafkaSource(self.settings, self.metrics)
            self.dead = DeadLetters(producer(self.settings.kafka), s.dlq_for)
        except KafkaError as exc:
            raise ScoringError(f"cannot reach Kafka at {self.settings.kafka.bootstrap_servers}: {exc}") from None
        log.info("stream start", extra={"topics": s.topics, "group": s.group, "sink": self.sink.name,
                                        "model_version": self.model.version,
                                        "metrics_port": self.probes.server_address[1] if self.probes else None})

    def run(self) -> int:
        if self.stopping:  # stopped while loading: nothing consumed, nothing to commit
            self.sink.close()
            return self.exit_code
        self.start()
        try:
            while not self.stopping:
                self.step()
        finally:
            self.close()
        return self.exit_code

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self.dead is not None:
            self.dead.close()
        self.sink.close()
        if self.probes is not None:
            self.probes.shutdown()
        log.info("stream stopped", extra={"exit_code": self.exit_code})

    # -- one micro-batch -------------------------------------------------------------------------
    def step(self) -> None:
        assert self.source is not None
        self.health.tick()
        records = self.source.poll_batch(self.limit, self.settings.stream.max_wait_ms)
        if records:
            started = time.monotonic()
            self.process(records)
            self.metrics.batch_seconds.observe(time.monotonic() - started)
        self.update_lag({TopicPartition(r.topic, r.partition) for r in records})

    def score(self, records: list[ConsumerRecord]) -> Scored:
        decoded = self.decoder.decode([r.value for r in records], [r.key for r in records])
        carry: dict[str, pa.Array] = {
            name: self.decoder.passthrough_array(values) for name, values in decoded.passthrough.items()
        }
        carry["topic"] = pa.array([r.topic for r in records], pa.string())
        carry["partition"] = pa.array([r.partition for r in records], pa.int32())
        carry["offset"] = pa.array([r.offset for r in records], pa.int64())
        carry["timestamp"] = pa.array([r.timestamp if r.timestamp >= 0 else None for r in records],
                                      pa.timestamp("ms", tz="UTC"))
        return self.scorer.finish(pa.array(decoded.ids, pa.string()), decoded.features, carry, decoded.raw)

    def process(self, records: list[ConsumerRecord]) -> None:
        assert self.source is not None and self.dead is not None
        started = time.monotonic()
        scored = self.score(records)
        version = self.model.version
        if scored.rejected and self.settings.stream.on_bad_record == "fail":
            first = records[int(scored.error_rows[0])]
            log.error("bad record; stopping (on_bad_record=fail), nothing of this batch committed",
                      extra={"topic": first.topic, "partition": first.partition, "offset": first.offset,
                             "reason": scored.errors["reason"][0].as_py()})
            self.exit_code = 1
            self.request_stop()
            self.stop_deadline = time.monotonic()
            return
        scoring_s = time.monotonic() - started
        if not self.store(records, scored):
            return  # dropped uncommitted (stopping, or every partition of it revoked): redelivered later
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        self.source.commit(offsets)
        self.next_offsets.update(offsets)
        now = time.time()
        per_topic = defaultdict(int)
        for r in records:
            per_topic[r.topic] += 1
            if r.timestamp >= 0:
                self.metrics.end_to_end.observe(max(now - r.timestamp / 1000, 0))
        bad_topics = defaultdict(int)
        for i in scored.error_rows:
            bad_topics[records[int(i)].topic] += 1
        for topic, n in per_topic.items():
            self.metrics.scored.labels(topic, version).inc(n - bad_topics[topic])
            self.metrics.written.labels(topic, version).inc(n - bad_topics[topic])
            if bad_topics[topic]:
                self.metrics.dead_lettered.labels(topic, version).inc(bad_topics[topic])
        self.metrics.batch_size.observe(len(records))
        self.adapt(len(records), scoring_s)

    def store(self, records: list[ConsumerRecord], scored: Scored) -> bool:
        """Dead letters then results, retried until stored; False when the batch was dropped."""
        assert self.source is not None and self.dead is not None
        reasons = scored.errors["reason"].to_pylist() if scored.rejected else []
        to_sink = Scored(scored.results, scored.errors.slice(0, 0)) if scored.rejected else scored
        dead_done = not reasons
        backoff = 0.2
        batch_tps = {TopicPartition(r.topic, r.partition) for r in records}
        while True:
            try:
                if not dead_done:
                    for i, reason in zip(scored.error_rows, reasons, strict=True):
                        self.dead.send(records[int(i)], reason, self.model.version)
                    self.dead.flush()
                    dead_done = True
                if to_sink.results.num_rows:
                    self.sink.write_stream(to_sink)
                if not self.health.sink_ok:
                    log.info("sink recovered")
                self.health.sink_ok, self.health.sink_error = True, ""
                self.source.resume()
                return True
            except SinkError as exc:
                self.metrics.sink_errors.inc()
                self.health.sink_ok, self.health.sink_error = False, str(exc)[:300]
                log.warning("store failed; retrying without committing", extra={"reason": str(exc)[:300],
                                                                                 "retry_in_s": backoff})
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

    def update_lag(self, advanced: set[TopicPartition]) -> None:
        assert self.source is not None
        owned = self.source.assignment()
        for tp in owned:
            lag = self.source.lag(tp, self.next_offsets.get(tp))
            if lag is None:
                continue
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
            self.health.progress((tp.topic, tp.partition), lag, tp in advanced)
        for tp in [tp for tp in self.next_offsets if tp not in owned]:
            del self.next_offsets[tp]  # the next owner commits it; a reassignment starts from the commit
        for topic, partition in list(self.health.partitions):
            if TopicPartition(topic, partition) not in owned:
                self.health.forget([(topic, partition)])
                try:
                    self.metrics.lag.remove(topic, str(partition))
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

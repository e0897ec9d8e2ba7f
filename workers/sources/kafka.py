"""The Kafka source: a consumer-group member (librdkafka, through confluent-kafka) that yields micro-batches
and commits exact offsets.

Rules that keep at-least-once true (with idempotent sinks, exactly once in the store):
- Auto-commit is off. ``commit(offsets)`` is called only after the sink has stored the batch, and only
  for partitions still assigned. A failed commit (the group rebalanced meanwhile, a broker hiccup) is
  counted and ignored: the records were stored, the new owner re-reads them from the last commit, and
  the sink's upsert makes the second write a no-op.
- Records of partitions revoked while a batch was being gathered are dropped from it, uncommitted (also
  when the same partition comes back in the same rebalance: it restarts from the commit).
- Rebalancing (``stream.assignment_strategy``): with ``cooperative-sticky`` (the default) a rebalance revokes
  only the partitions that change owner; the callbacks then get the *increments* (``incremental_assign`` /
  ``incremental_unassign``) and every other partition keeps consuming. With ``range``/``roundrobin`` (eager)
  each rebalance revokes everything and assigns the full new set. The rules above hold for both: what is
  revoked is dropped from the batch in hand and never committed by us.
- Static membership (``group.instance.id``: ``stream.instance_id``, else ``HOSTNAME``, the pod name): a member
  that restarts within ``session.timeout.ms`` rejoins with its partitions and no rebalance of the others. A
  static member does not leave the group on close (its partitions wait for it, or for the session timeout).
- ``keep_alive`` serves the group (librdkafka evicts a member that does not call consume within
  ``max.poll.interval.ms``) with every partition paused, so a worker waiting for its sink stays in the
  group without taking records. Pausing drops librdkafka's prefetched records; ``resume`` fetches again
  from the last record handed to us. A partition assigned meanwhile is paused as it arrives.

Start-up (``open``): the first metadata comes through ``workers.kafka_tls.reach``, so a TLS or protocol mistake
(wrong CA, a certificate not valid for the host, a client certificate demanded, TLS to a plaintext listener)
stops the worker within seconds with one line naming the setting, where librdkafka alone would say "transport
failure" after the wait, or retry an advertised broker's connection forever. A broker that does not answer is
ScoringError (exit 1) after 10 s.

Why librdkafka and not kafka-python: kafka-python parses fetch responses in Python on the thread that
decodes records (10 us per record measured, a quarter of the stream worker's time); librdkafka fetches
and parses in its own threads (2 us per record to hand over).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from workers.errors import ScoringError
from workers.kafka_tls import reach
from workers.observability import Metrics
from workers.settings import Settings
from workers.sources.base import TP, Batch, Source

log = logging.getLogger("workers.stream")

METADATA_REFRESH_MS = 3000


def _text(exc: KafkaException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)


def instance_id(settings: Settings) -> str | None:
    """The static member id: ``stream.instance_id``, else the pod name (``HOSTNAME``); None when static
    membership is off or no name is known (then the member is dynamic, as before)."""
    s = settings.stream
    if not s.static_membership:
        return None
    return s.instance_id or (os.environ.get("HOSTNAME") or "").strip() or None


def consumer_config(settings: Settings) -> dict[str, Any]:
    s = settings.stream
    static = instance_id(settings)
    return {
        **settings.kafka.librdkafka_config(),
        "group.id": s.group,
        **({"group.instance.id": static} if static else {}),
        "partition.assignment.strategy": s.assignment_strategy,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": s.auto_offset_reset,
        "max.poll.interval.ms": s.max_poll_interval_ms,
        "session.timeout.ms": s.session_timeout_ms,
        "heartbeat.interval.ms": s.heartbeat_interval_ms,
        "fetch.max.bytes": s.fetch_max_bytes,
        "max.partition.fetch.bytes": s.max_partition_fetch_bytes,
        # The prefetch queue is what a backlog costs in memory: cap it by the fetch size, and keep only a few
        # batches' worth of records in it (librdkafka's default is 100,000 per partition).
        "queued.max.messages.kbytes": max(s.fetch_max_bytes // 1024, 1024),
        "queued.min.messages": max(4 * s.max_records, 10_000),
        # When the queue is full librdkafka waits this long before fetching again (default 1 s): with the
        # caps above that stalled a fast worker (13k records/s instead of 47k in a consume loop, measured).
        "fetch.queue.backoff.ms": 10,
        # A fetch need not wait longer than a batch does (librdkafka's default is 500 ms): against Tansu, which
        # holds a fetch that long, produce-to-stored p50 at 14k records/s went from 235 ms to 113 ms with 20 ms.
        "fetch.wait.max.ms": min(s.max_wait_ms, 500),
        # A subscribed topic created after start-up is seen at the next metadata refresh: librdkafka's default
        # (300 s) left a new topic unconsumed for five minutes (brokers like Tansu do not auto-create topics).
        "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
    }


class KafkaSource(Source):
    """The ``Source`` of stream mode (contract: ``workers.sources.base``). Building it does no I/O: the
    consumer is created, and the topics listed, by ``open()``. Its methods are the contract's nine plus the
    consumer's rebalance callbacks, which must see the same state (revoked, holding): one class on purpose."""

    consumer: Consumer

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.revoked: set[TP] = set()
        self.holding = False  # keep_alive in progress: partitions assigned meanwhile are paused at once
        self.missing: list[str] = []
        self._assigned: set[TP] = set()
        self._warned: dict[str, float] = {}
        self._start: dict[TP, int] = {}  # committed offset at assignment, for lag before the first record
        self._handed: dict[TP, int] = {}  # offset after the last record poll_batch handed out, per partition
        self._opened = False
        # confluent-kafka's Python binding has no rebalance_protocol(): the strategy decides it (librdkafka does
        # not allow a cooperative strategy mixed with eager ones, and the setting takes one).
        self.cooperative = settings.stream.assignment_strategy == "cooperative-sticky"

    def open(self) -> None:
        settings = self.settings
        try:
            self.consumer = Consumer(consumer_config(settings), logger=logging.getLogger("workers.kafka"))
        except KafkaException as exc:  # a property librdkafka refuses
            raise ScoringError(f"Kafka client: {_text(exc)}") from None
        try:
            # A TLS or protocol mistake is named (the setting to fix), also for an advertised broker whose
            # certificate does not fit, which librdkafka would retry forever (workers.kafka_tls).
            metadata = reach(self.consumer, settings.kafka)
        except ScoringError:
            self.consumer.close()
            raise
        known = metadata.topics
        self._opened = True
        self.missing = [t for t in settings.stream.topics if t not in known]
        if self.missing:
            log.warning("topics not on the broker yet; waiting for them", extra={"topics": self.missing})
        self.consumer.subscribe(settings.stream.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        log.info("joining the group", extra={"group": settings.stream.group,
                                             "assignment_strategy": settings.stream.assignment_strategy,
                                             "instance_id": instance_id(settings)})

    def find_missing(self) -> list[str]:
        """The subscribed topics the broker does not have (asked again; the last answer if it does not reply)."""
        try:
            known = self.consumer.list_topics(timeout=2).topics
        except KafkaException:
            return list(self.missing)
        now = [t for t in self.settings.stream.topics if t not in known or known[t].error is not None]
        if now != self.missing:
            if now:
                log.warning("topics not on the broker; waiting for them", extra={"topics": now})
            else:
                log.info("every subscribed topic is on the broker", extra={"topics": self.settings.stream.topics})
        self.missing = now
        return list(now)

    # -- rebalance callbacks (run inside consume, on the calling thread) ---------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Eager: ``partitions`` is the whole new assignment. Cooperative: only what is added (often nothing: each
        rebalance ends with an assign callback, also for a member that only gave partitions up)."""
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        got = {(p.topic, p.partition) for p in partitions}
        self._assigned |= got
        if self.holding and partitions:
            consumer.pause(partitions)
        if got:
            self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions assigned", extra={"partitions": sorted(f"{t}[{p}]" for t, p in got),
                                               "owned": len(self._assigned)})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Revoked or lost (also the ``on_lost`` callback). Cooperative: only the partitions moving away."""
        gone = {(p.topic, p.partition) for p in partitions}
        self.revoked |= gone
        self._assigned -= gone
        if self.cooperative:
            if partitions:
                consumer.incremental_unassign(partitions)
        # eager: confluent-kafka unassigns everything after this returns
        for tp in gone:
            self._start.pop(tp, None)
            self._handed.pop(tp, None)
        if gone:
            self.metrics.rebalances.labels("revoked").inc()
        log.info("partitions revoked", extra={"partitions": sorted(f"{t}[{p}]" for t, p in gone),
                                              "owned": len(self._assigned)})

    # -- consuming ---------------------------------------------------------------------------------------
    def assignment(self) -> set[TP]:
        return set(self._assigned)

    def poll_batch(self, max_records: int, max_wait_ms: int) -> Batch:
        """Up to ``max_records`` records, waiting at most ``max_wait_ms`` for them to arrive."""
        deadline = time.monotonic() + max_wait_ms / 1000
        batch: list[Message] = []
        self.revoked.clear()
        while len(batch) < max_records:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = self.consumer.consume(num_messages=max_records - len(batch), timeout=left)
            if self.revoked:
                # A rebalance happened inside consume: drop what we hold of partitions revoked (even if
                # assigned back: they restart from the commit, and a record must not appear twice).
                batch = [m for m in batch if (m.topic(), m.partition()) not in self.revoked]
                self.revoked.clear()
            for m in got:
                err = m.error()
                if err is None:
                    batch.append(m)
                else:
                    self._consume_error(err)
        out = Batch(batch)
        self._handed.update(out.next_offsets())
        for topic, n in Counter(out.topics()).items():
            self.metrics.consumed.labels(topic).inc(n)
        return out

    def _consume_error(self, err: KafkaError) -> None:
        if err.fatal():
            if err.code() == KafkaError.FENCED_INSTANCE_ID:
                raise ScoringError(
                    f"Kafka consumer failed: another member of group {self.settings.stream.group!r} joined with this "
                    f"instance id ({instance_id(self.settings)!r}); give each worker its own "
                    "SCORING_STREAM__INSTANCE_ID (or HOSTNAME), or set SCORING_STREAM__STATIC_MEMBERSHIP=false")
            raise ScoringError(f"Kafka consumer failed: {err.str()}")
        now = time.monotonic()
        if now - self._warned.get(err.str(), -60.0) >= 60.0:  # e.g. a topic not created yet: once a minute
            self._warned[err.str()] = now
            log.warning("consume error", extra={"reason": err.str()})

    def commit(self, offsets: dict[TP, int]) -> bool:
        """Commit next-offsets for partitions still assigned; False when the group moved on."""
        mine = [TopicPartition(t, p, off) for (t, p), off in offsets.items() if (t, p) in self._assigned]
        if not mine:
            return not offsets
        try:
            done = self.consumer.commit(offsets=mine, asynchronous=False)
            failed = [tp for tp in done or [] if tp.error is not None]
            if failed:
                raise KafkaException(failed[0].error)
            return len(mine) == len(offsets)
        except KafkaException as exc:
            # Stored but not committed: after a rebalance or a broker hiccup the records are read again
            # from the last commit and the sink's upsert keeps one copy. Never fatal.
            self.metrics.commit_failures.inc()
            err = exc.args[0] if exc.args else exc
            log.warning("commit failed; records will be redelivered and upserted",
                        extra={"reason": (err.str() if isinstance(err, KafkaError) else str(err))[:200]})
            return False

    def keep_alive(self, timeout_ms: int) -> None:
        """Stay in the group without taking new records (used while the sink is retried)."""
        self.holding = True
        owned = [TopicPartition(t, p) for t, p in self._assigned]
        if owned:
            self.consumer.pause(owned)
        for m in self.consumer.consume(num_messages=1, timeout=timeout_ms / 1000):
            if m.error() is None:
                # Not ours to skip (a partition that arrived unpaused): read it again after resume.
                part = TopicPartition(m.topic() or "", m.partition() or 0, m.offset() or 0)
                try:
                    self.consumer.seek(part)
                    self.consumer.pause([part])
                except KafkaException as exc:
                    # Cannot rewind: give the partition up rather than skip the record. Leaving the group
                    # is not possible here, so fail loudly; the restart re-reads from the last commit.
                    raise ScoringError(f"cannot rewind {m.topic()}[{m.partition()}] to {m.offset()} while "
                                       f"the sink is retried: {exc}") from None

    def resume(self) -> None:
        self.holding = False
        owned = [TopicPartition(t, p) for t, p in self._assigned]
        if owned:
            self.consumer.resume(owned)

    def lag(self, tp: TP, next_offset: int | None) -> int | None:
        """High watermark (from fetch responses: right even where ListOffsets is not) minus next offset.

        Without a next offset of ours (nothing stored from the partition since it was assigned), the position
        of the last record handed to us, else the group's committed offset (asked once per assignment).
        """
        part = TopicPartition(*tp)
        try:
            low, high = self.consumer.get_watermark_offsets(part, cached=True)
            if high < 0:
                return None
            if next_offset is None:
                next_offset = self.consumer.position([part])[0].offset
            if next_offset < 0:
                next_offset = self._committed(tp, low, high)
            elif next_offset < high and next_offset == self._handed.get(tp) \
                    and self.consumer.position([part])[0].offset >= high:
                # Everything handed to us is stored, and the consumer has read up to the high watermark: the
                # offsets in between hold no records for us (a transactional producer's commit markers, aborted
                # records), so we are caught up; counted, a transactional topic would show lag 1 for good.
                return 0
        except KafkaException:
            return None
        return None if next_offset is None else max(high - next_offset, 0)

    def _committed(self, tp: TP, low: int, high: int) -> int | None:
        if tp not in self._start:
            got = self.consumer.committed([TopicPartition(*tp)], timeout=5)[0]
            if got.error is not None:
                return None
            # Nothing committed: the group starts where auto.offset.reset says.
            self._start[tp] = got.offset if got.offset >= 0 else (
                low if self.settings.stream.auto_offset_reset == "earliest" else high)
        return self._start[tp]

    def close(self) -> None:
        # enable.auto.commit is off: offsets are committed only by commit() after the sink stored the batch.
        if not self._opened:
            return
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed", extra={"reason": str(exc)})

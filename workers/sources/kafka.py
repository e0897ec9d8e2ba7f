"""The Kafka source: a consumer-group member that yields micro-batches and commits exact offsets.

Rules that keep at-least-once true (with idempotent sinks, exactly once in the store):
- Auto-commit is off. ``commit(offsets)`` is called only after the sink has stored the batch, and only
  for partitions still assigned. A ``CommitFailedError`` (the group rebalanced meanwhile) is counted
  and ignored: the records were stored, the new owner re-reads them from the last commit, and the
  sink's upsert makes the second write a no-op.
- Records of partitions revoked while a batch was being gathered are dropped from it, uncommitted.
- ``keep_alive`` polls with every partition paused, so a worker waiting for its sink stays in the
  group (kafka-python evicts a member that does not poll within ``max_poll_interval_ms``). If that
  poll returns records anyway (a partition newly assigned, not yet paused), it seeks back to them so
  none is skipped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from workers.observability import Metrics
from workers.settings import Settings

log = logging.getLogger("workers.stream")


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource):
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.source.revoked.update(revoked)
        if revoked:
            self.source.metrics.rebalances.labels("revoked").inc()
        log.info("partitions revoked", extra={"partitions": sorted(f"{t.topic}[{t.partition}]" for t in revoked)})

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.source.metrics.rebalances.labels("assigned").inc()
        log.info("partitions assigned", extra={"partitions": sorted(f"{t.topic}[{t.partition}]" for t in assigned)})


def consumer_config(settings: Settings) -> dict[str, Any]:
    s = settings.stream
    return {
        **settings.kafka.client_config(),
        "group_id": s.group,
        "enable_auto_commit": False,
        "auto_offset_reset": s.auto_offset_reset,
        "max_poll_records": s.max_records,
        "max_poll_interval_ms": s.max_poll_interval_ms,
        "session_timeout_ms": s.session_timeout_ms,
        "heartbeat_interval_ms": s.heartbeat_interval_ms,
        "fetch_max_bytes": s.fetch_max_bytes,
        "max_partition_fetch_bytes": s.max_partition_fetch_bytes,
    }


class KafkaSource:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.revoked: set[TopicPartition] = set()
        self.consumer = KafkaConsumer(**consumer_config(settings))
        self.consumer.subscribe(settings.stream.topics, listener=_Listener(self))

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def poll_batch(self, max_records: int, max_wait_ms: int) -> list[ConsumerRecord]:
        """Up to ``max_records`` records, waiting at most ``max_wait_ms`` for them to arrive."""
        deadline = time.monotonic() + max_wait_ms / 1000
        batch: list[ConsumerRecord] = []
        self.revoked.clear()
        while len(batch) < max_records:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            got = self.consumer.poll(timeout_ms=left, max_records=max_records - len(batch))
            for records in got.values():
                batch.extend(records)
            if self.revoked:
                # A rebalance happened inside poll: drop what we hold of partitions no longer ours.
                owned = self.assignment()
                batch = [r for r in batch if TopicPartition(r.topic, r.partition) in owned]
                self.revoked.clear()
        for r in batch:
            self.metrics.consumed.labels(r.topic).inc()
        return batch

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit next-offsets for partitions still assigned; False when the group moved on."""
        owned = self.assignment()
        mine = {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items() if tp in owned}
        if not mine:
            return not offsets
        try:
            self.consumer.commit(offsets=mine)
            return len(mine) == len(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Stored but not committed: after a rebalance or a broker hiccup the records are read again
            # from the last commit and the sink's upsert keeps one copy. Never fatal.
            self.metrics.commit_failures.inc()
            log.warning("commit failed; records will be redelivered and upserted",
                        extra={"reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
            return False

    def keep_alive(self, timeout_ms: int) -> None:
        """Stay in the group without taking new records (used while the sink is retried)."""
        self.consumer.pause(*self.assignment())
        got = self.consumer.poll(timeout_ms=timeout_ms, max_records=1)
        for tp, records in got.items():
            self.consumer.seek(tp, records[0].offset)  # not ours to skip: read it again later
        self.consumer.pause(*self.assignment())

    def resume(self) -> None:
        self.consumer.resume(*self.consumer.paused())

    def lag(self, tp: TopicPartition, next_offset: int | None) -> int | None:
        """High watermark (from fetch responses: right even where ListOffsets is not) minus next offset."""
        high = self.consumer.highwater(tp)
        if high is None:
            return None
        if next_offset is None:
            try:
                next_offset = self.consumer.position(tp, timeout_ms=100)
            except (KafkaError, AssertionError, TypeError):
                return None
            if next_offset is None:
                return None
        return max(high - next_offset, 0)

    def topics_exist(self) -> list[str]:
        """The configured topics the broker does not know."""
        known = self.consumer.topics()
        return [t for t in self.settings.stream.topics if t not in known]

    def close(self) -> None:
        # autocommit=False: offsets are committed only by commit() after the sink stored the batch.
        try:
            self.consumer.close(autocommit=False, timeout_ms=5000)
        except KafkaError as exc:
            log.warning("consumer close failed", extra={"reason": str(exc)})

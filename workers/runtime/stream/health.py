"""Stream health: per-partition lag and stalls, the subscribed topics the broker lacks, the schema registry.

``/healthz`` (liveness) is the loop ticking; ``/readyz`` (readiness) is false while the sink is down, a
partition is stalled (lag > 0 with no progress for ``stall_seconds``), a subscribed topic is missing, the
schema registry a wire format needs does not answer, or the next batch waits for the version a moved MLflow
alias names to load (at most ``SCORING_MLFLOW__SWITCH_WAIT_S``).
Lag is kept current also while the pipeline waits for its sink, so a stall shows while it lasts.

Lag in seconds (``scoring_consumer_lag_seconds``): how old the oldest record of the partition not yet committed
is, i.e. now minus the timestamp (CreateTime or LogAppendTime, as the topic says) of the record at the
committed offset; 0 when the partition is caught up (record-count lag 0). Where that timestamp comes from:
- the record has been handed to the pipeline (in a batch being scored, stored or retried): its own timestamp;
  a record the broker gave no timestamp counts from the moment the worker received it;
- it has not been fetched yet (records arrived since the last poll): the time since the partition was first
  seen behind without it, a lower bound (it never alarms on a quiet topic's one new record) that keeps growing
  if nothing is fetched. In a busy pipeline the next batch is already in hand, so this case is short.
Clocks: producer and worker clocks differ; an age below 0 is shown as 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.observability import Health, Metrics
from workers.sources.base import TP, Batch, Source

TOPIC_RECHECK_S = 5.0  # how often topics missing from the broker are looked for again (readiness names them)


@dataclass
class StreamHealth(Health):
    """Health plus the subscribed topics the broker does not have yet: not ready while any is missing (the
    worker waits for them and consumes them once created, but it is not doing its job meanwhile)."""

    missing_topics: list[str] = field(default_factory=list)
    #: why the schema registry cannot be used now ("" when it answers): records wait, partitions paused
    registry_error: str = ""
    #: what the next batch waits for ("" when nothing): the version a moved MLflow alias names, loading
    #: (the routing watcher's ``waiting``; a callable, so readiness sees the switch from the moment it opens)
    switching: Callable[[], str] = lambda: ""

    def readiness(self) -> tuple[bool, list[str]]:
        ok, problems = super().readiness()
        missing = list(self.missing_topics)
        if missing:
            problems = [*problems, f"topics missing on the broker: {', '.join(missing)}"]
        registry = self.registry_error
        if registry:
            problems = [*problems, f"schema registry unavailable: {registry}"]
        switching = self.switching()
        if switching:
            problems = [*problems, f"MLflow alias moved: {switching}"]
        return ok and not missing and not registry and not switching, problems


class LagWatch:
    """Lag (records, seconds) and stall gauges of the partitions owned, from the offsets the pipeline committed
    and the records it was handed (main thread)."""

    def __init__(self, source: Source, health: StreamHealth, metrics: Metrics):
        self.source = source
        self.health = health
        self.metrics = metrics
        #: per owned partition, the offset after the last record stored and committed by us
        self.next_offsets: dict[TP, int] = {}
        #: per owned partition, (offset, timestamp in s) of the first record of each batch handed over and not
        #: committed yet, in offset order: the first one at or after the commit is the oldest record not committed
        self.handed_at: dict[TP, list[tuple[int, float]]] = {}
        #: per partition behind with no uncommitted record in hand: wall time it was first seen so
        self.behind_since: dict[TP, float] = {}
        self.topics_checked = 0.0

    def opened(self) -> None:
        """The source is open: take its first answer about missing topics."""
        self.health.missing_topics, self.topics_checked = list(self.source.missing), time.monotonic()

    def committed(self, offsets: dict[TP, int]) -> None:
        self.next_offsets.update(offsets)
        for tp, off in offsets.items():
            firsts = self.handed_at.get(tp)
            if firsts:
                firsts[:] = [f for f in firsts if f[0] >= off]

    def handed(self, records: Batch) -> None:
        """A poll's records: keep the first offset and timestamp of each partition in it (for lag seconds)."""
        if not records:
            return
        now = time.time()
        for tp, (offset, ts) in records.firsts().items():
            firsts = self.handed_at.setdefault(tp, [])
            if firsts and firsts[-1][0] >= offset:  # re-read from the commit (a batch of it was dropped)
                firsts[:] = [f for f in firsts if f[0] < offset]
            firsts.append((offset, ts / 1000 if ts >= 0 else now))

    def age(self, tp: TP, lag: int, now: float) -> float:
        """Seconds since the oldest uncommitted record of ``tp`` was written (see the module docstring)."""
        if lag <= 0:
            self.behind_since.pop(tp, None)
            return 0.0
        firsts = self.handed_at.get(tp)
        if firsts:
            self.behind_since.pop(tp, None)
            return max(now - firsts[0][1], 0.0)
        return now - self.behind_since.setdefault(tp, now)

    def check_topics(self) -> None:
        """Look again for subscribed topics the broker lacks (often while some are missing, rarely after)."""
        every = TOPIC_RECHECK_S if self.source.missing else 12 * TOPIC_RECHECK_S
        if time.monotonic() - self.topics_checked >= every:
            self.topics_checked = time.monotonic()
            self.health.missing_topics = self.source.find_missing()

    def update(self, advanced: set[TP]) -> None:
        """Refresh lag of every owned partition (``advanced``: those that just got records); forget the rest."""
        owned = self.source.assignment()
        now = time.time()
        for tp in owned:
            lag = self.source.lag(tp, self.next_offsets.get(tp))
            if lag is None:
                continue
            topic, partition = tp
            self.metrics.lag.labels(topic, str(partition)).set(lag)
            self.metrics.lag_seconds.labels(topic, str(partition)).set(round(self.age(tp, lag, now), 3))
            self.health.progress(tp, lag, tp in advanced)
            self.metrics.stalled.labels(topic, str(partition)).set(self.health.is_stalled(tp))
        for tp in [tp for tp in self.next_offsets if tp not in owned]:
            del self.next_offsets[tp]  # the next owner commits it; a reassignment starts from the commit
        for kept in (self.handed_at, self.behind_since):
            for tp in [tp for tp in kept if tp not in owned]:
                del kept[tp]
        for topic, partition in list(self.health.partitions):
            if (topic, partition) not in owned:
                self.health.forget([(topic, partition)])
                for gauge in (self.metrics.lag, self.metrics.lag_seconds, self.metrics.stalled):
                    try:
                        gauge.remove(topic, str(partition))
                    except KeyError:
                        pass

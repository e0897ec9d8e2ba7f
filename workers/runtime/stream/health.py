"""Stream health: per-partition lag and stalls, the subscribed topics the broker lacks, the schema registry.

``/healthz`` (liveness) is the loop ticking; ``/readyz`` (readiness) is false while the sink is down, a
partition is stalled (lag > 0 with no progress for ``stall_seconds``), a subscribed topic is missing or the
schema registry a wire format needs does not answer.
Lag is kept current also while the pipeline waits for its sink, so a stall shows while it lasts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workers.observability import Health, Metrics
from workers.sources.base import TP, Source

TOPIC_RECHECK_S = 5.0  # how often topics missing from the broker are looked for again (readiness names them)


@dataclass
class StreamHealth(Health):
    """Health plus the subscribed topics the broker does not have yet: not ready while any is missing (the
    worker waits for them and consumes them once created, but it is not doing its job meanwhile)."""

    missing_topics: list[str] = field(default_factory=list)
    #: why the schema registry cannot be used now ("" when it answers): records wait, partitions paused
    registry_error: str = ""

    def readiness(self) -> tuple[bool, list[str]]:
        ok, problems = super().readiness()
        missing = list(self.missing_topics)
        if missing:
            problems = [*problems, f"topics missing on the broker: {', '.join(missing)}"]
        registry = self.registry_error
        if registry:
            problems = [*problems, f"schema registry unavailable: {registry}"]
        return ok and not missing and not registry, problems


class LagWatch:
    """Lag and stall gauges of the partitions owned, from the offsets the pipeline committed (main thread)."""

    def __init__(self, source: Source, health: StreamHealth, metrics: Metrics):
        self.source = source
        self.health = health
        self.metrics = metrics
        #: per owned partition, the offset after the last record stored and committed by us
        self.next_offsets: dict[TP, int] = {}
        self.topics_checked = 0.0

    def opened(self) -> None:
        """The source is open: take its first answer about missing topics."""
        self.health.missing_topics, self.topics_checked = list(self.source.missing), time.monotonic()

    def committed(self, offsets: dict[TP, int]) -> None:
        self.next_offsets.update(offsets)

    def check_topics(self) -> None:
        """Look again for subscribed topics the broker lacks (often while some are missing, rarely after)."""
        every = TOPIC_RECHECK_S if self.source.missing else 12 * TOPIC_RECHECK_S
        if time.monotonic() - self.topics_checked >= every:
            self.topics_checked = time.monotonic()
            self.health.missing_topics = self.source.find_missing()

    def update(self, advanced: set[TP]) -> None:
        """Refresh lag of every owned partition (``advanced``: those that just got records); forget the rest."""
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

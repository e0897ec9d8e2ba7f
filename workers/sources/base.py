"""The stream source contract: what stream mode's pipeline asks of a consumer-group member.

Implemented by ``workers.sources.kafka.KafkaSource`` (librdkafka) and ``workers.testing.TestingSource`` (in
memory, for tests of the ordering rules without a broker). The pipeline's guarantees rest on these rules:

- Building a source does no network I/O; ``open()`` connects (``ScoringError`` when the broker does not answer)
  and subscribes. Everything else is called after ``open()``, on one thread (the pipeline's main thread).
- ``poll_batch`` returns records in offset order within each partition. Records of a partition revoked while
  the batch was being gathered are *not* in it (also when the partition comes back in the same rebalance: it
  restarts from the commit, and a record must never reach the pipeline twice from one assignment).
- ``commit(offsets)`` commits next-offsets (the offset after the last record stored) only for partitions still
  assigned; a failed commit is not an error (the records were stored; the next owner re-reads and the sink's
  upsert keeps one copy): it returns False.
- ``keep_alive(ms)`` keeps the member in the group without handing over records (the sink is being waited
  for or retried); ``resume()`` ends that. A record the source fetched meanwhile is delivered later, not lost.
- ``lag(tp, next_offset)`` is the records behind ``next_offset`` (None when unknown); ``missing`` and
  ``find_missing()`` name subscribed topics the broker lacks (readiness reports them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

TP = tuple[str, int]  # (topic, partition): the source's partition key everywhere outside the source


class Message(Protocol):
    """What a source hands over per record: confluent-kafka's ``Message`` has these methods."""

    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...
    def timestamp(self) -> tuple[int, int]: ...
    def error(self) -> Any: ...


@dataclass(frozen=True)
class Record:
    """One consumed record, for the places that need its fields one by one (dead letters, error logs)."""

    topic: str
    partition: int
    offset: int
    timestamp: int  # ms since the epoch; -1 when the broker gave none
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None

    @classmethod
    def of(cls, m: Message) -> Record:
        return cls(m.topic(), m.partition(), m.offset(), _timestamp(m), m.key(), m.value(), m.headers())


def _timestamp(m: Message) -> int:
    kind, ts = m.timestamp()
    return ts if kind != 0 and ts >= 0 else -1


class Batch:
    """The records of one micro-batch, in the order consumed (offset order within each partition).

    Each message's topic, partition and offset are read once (``_columns``, on first use: a method call each on
    confluent-kafka's Message) and what is derived from them per partition is built from those lists in C
    (dict/zip), not with a Python step per record: the stream loop asks for them several times a batch."""

    def __init__(self, messages: list[Any]):
        self.messages = messages
        self._stamps: list[int] | None = None
        self._tpo: tuple[list[str], list[int], list[int]] | None = None
        self._tps: list[TP] | None = None
        self.trace: Any = None  # the batch's span while tracing is on (workers/runtime/stream/trace.py)

    def __len__(self) -> int:
        return len(self.messages)

    def __bool__(self) -> bool:
        return bool(self.messages)

    def __getitem__(self, i: int) -> Record:
        return Record.of(self.messages[i])

    def values(self) -> list[bytes | None]:
        return [m.value() for m in self.messages]

    def keys(self) -> list[bytes | None]:
        return [m.key() for m in self.messages]

    def _columns(self) -> tuple[list[str], list[int], list[int]]:
        if self._tpo is None:
            ms = self.messages
            self._tpo = ([m.topic() for m in ms], [m.partition() for m in ms], [m.offset() for m in ms])
        return self._tpo

    def topics(self) -> list[str]:
        """Each record's topic (the batch's own list: read it, do not change it); likewise the two below."""
        return self._columns()[0]

    def partitions(self) -> list[int]:
        return self._columns()[1]

    def offsets(self) -> list[int]:
        return self._columns()[2]

    def timestamps(self) -> list[int]:
        if self._stamps is None:  # wanted twice per batch (the result column, then the latency metric)
            self._stamps = [_timestamp(m) for m in self.messages]
        return self._stamps

    def _partitions_of(self) -> list[TP]:
        if self._tps is None:
            topics, partitions, _ = self._columns()
            self._tps = list(zip(topics, partitions, strict=True))
        return self._tps

    def next_offsets(self) -> dict[TP, int]:
        """Per partition, the offset after its last record: what to commit once the batch is stored."""
        last = dict(zip(self._partitions_of(), self.offsets(), strict=True))  # the last record of each wins
        return {tp: off + 1 for tp, off in last.items()}

    def partition_set(self) -> set[TP]:
        return set(self._partitions_of())

    def firsts(self) -> dict[TP, tuple[int, int]]:
        """Per partition, the offset and timestamp of its first record in the batch."""
        tps = self._partitions_of()
        return dict(zip(reversed(tps), reversed(list(zip(self.offsets(), self.timestamps(), strict=True))),
                        strict=True))


class Source(ABC):
    """A consumer-group member (see the module docstring for the rules every method keeps)."""

    #: subscribed topics the broker did not have at the last look
    missing: list[str]

    @abstractmethod
    def open(self) -> None:
        """Connect and subscribe. ``ScoringError`` when the broker does not answer."""

    @abstractmethod
    def assignment(self) -> set[TP]:
        """The partitions this member owns now."""

    @abstractmethod
    def poll_batch(self, max_records: int, max_wait_ms: int) -> Batch:
        """Up to ``max_records`` records, waiting at most ``max_wait_ms``; none of a partition revoked meanwhile."""

    @abstractmethod
    def commit(self, offsets: dict[TP, int]) -> bool:
        """Commit next-offsets of partitions still assigned; False when some could not be (never raises)."""

    @abstractmethod
    def keep_alive(self, timeout_ms: int) -> None:
        """Serve the group for up to ``timeout_ms`` with every partition paused (no record handed over)."""

    @abstractmethod
    def resume(self) -> None:
        """Undo ``keep_alive``'s pause: records flow again from the last one handed over."""

    @abstractmethod
    def lag(self, tp: TP, next_offset: int | None) -> int | None:
        """Records of ``tp`` behind ``next_offset`` (ours, else the last handed over or the group's commit)."""

    @abstractmethod
    def find_missing(self) -> list[str]:
        """Ask again which subscribed topics the broker lacks (the last answer if it does not reply)."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group. Commits nothing (offsets are committed only by ``commit``)."""

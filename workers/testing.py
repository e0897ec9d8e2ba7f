"""In-process testing for stream mode: a scripted source, sink and dead-letter producer (no broker, no store).

Like ``bytewax.testing``: a test writes a *script*, a list of records with markers between them, and runs a real
``StreamWorker`` (real decoding, scoring, pipeline, lanes and commit rules) on it in milliseconds::

    script = Script([
        rec("t", 0, {"id": "a", "x0": 1.0}),
        SinkFails(times=2),            # writes holding the next record fail twice (SinkError), then succeed
        rec("t", 1, {"id": "b", "x0": 2.0}),
        Rebalance(revoke=[("t", 0)]),  # partition t[0] goes to another member when delivery gets here
        rec("t", 0, {"id": "c", "x0": 3.0}),
        Crash(),                       # the process dies when delivery gets here
    ], partitions={"t": 2})
    StreamWorker(settings, source=script.source(), sink=script.sink, dead_letters=script.dead_letters(),
                 burst=True).run()

The script is the broker and the store: the committed offsets (``script.committed``), the rows stored
(``script.sink.rows``, keyed on (id, model_version) like a table sink's upsert) and the dead letters
(``script.letters``) outlive a worker, so a test crashes one, builds another on ``script.source()``, and
asserts the exact output. Every commit is checked as it happens: committing an offset whose records are
neither stored nor dead-lettered raises ``OrderViolation`` (the rule "nothing committed before it is stored").

Delivery: the assigned partitions' records are handed over in script order (a record waits for the ones
before it in the script, on any assigned partition), from each partition's committed offset. A marker takes
effect once per script, when delivery first gets past the records before it (re-reading them after a
rebalance does not bring it back): ``Crash`` raises ``Crashed`` (a ``BaseException``: nothing
of ours catches it, as nothing survives a real crash) out of ``poll_batch``; ``Rebalance`` revokes and assigns
partitions (records of revoked partitions gathered in that poll are dropped, as the Kafka source does; with
``in_keep_alive=True`` it takes effect during the next ``keep_alive`` instead, i.e. while the pipeline waits
for its sink). Sink markers belong to the next record: ``SinkFails`` fails writes holding it, ``SinkHangs``
makes the first write holding it block, ``SinkRefuses`` rejects its row (``RowsRejected``), ``CrashInStore``
crashes the process inside the write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Message

from workers.errors import RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.sinks.base import DirectUnit, Sink, UnitWriter
from workers.sinks.deadletter import DeadLetters
from workers.sources.base import TP, Batch, Source


class Crashed(BaseException):  # noqa: N818 - a process death, not an error anyone should handle
    """A scripted crash: the worker dies here (nothing of the pipeline catches a ``BaseException``)."""


class OrderViolation(AssertionError):
    """An offset was committed before its records were stored or dead-lettered."""


@dataclass
class Rec:
    topic: str
    partition: int
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] | None = None
    timestamp: int | None = None  # ms since the epoch (None: the time the script was built)


def rec(topic: str, partition: int, value: Any, key: bytes | str | None = None,
        headers: list[tuple[str, bytes]] | None = None, timestamp: int | None = None) -> Rec:
    """A record; a dict or list value is JSON-encoded, a str is UTF-8, bytes/None are taken as they are."""
    if isinstance(value, dict | list):
        value = orjson.dumps(value)
    elif isinstance(value, str):
        value = value.encode()
    return Rec(topic, partition, value, key.encode() if isinstance(key, str) else key, headers, timestamp)


@dataclass
class Crash:
    """The process dies when delivery reaches this point."""


@dataclass
class Rebalance:
    revoke: list[TP] = field(default_factory=list)
    assign: list[TP] = field(default_factory=list)
    in_keep_alive: bool = False  # take effect during the next keep_alive (the pipeline is waiting on its sink)


@dataclass
class SinkFails:
    """The next ``times`` writes holding the next record raise ``SinkError`` (the store is down)."""

    times: int = 1


@dataclass
class SinkHangs:
    """The first write holding the next record blocks for ``seconds`` (a locked table)."""

    seconds: float


@dataclass
class SinkRefuses:
    """Every write holding the next record rejects its row (``RowsRejected``: the store cannot hold it)."""

    reason: str = "refused by the script"


@dataclass
class CrashInStore:
    """The process dies inside the first write holding the next record (before anything of it is stored)."""


_SINK_MARKERS = (SinkFails, SinkHangs, SinkRefuses, CrashInStore)


class Script:
    """Records and markers; the broker (partitions, committed offsets) and the store that outlive a worker."""

    def __init__(self, items: list, partitions: dict[str, int] | None = None, timestamp_ms: int | None = None):
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self.logs: dict[TP, list[Message]] = {}
        self.order: dict[tuple[TP, int], int] = {}  # (tp, offset) -> position in the script
        self.markers: list[tuple[int, Any]] = []  # (position of the next record, marker)
        self.sink_marks: dict[tuple[TP, int], list[Any]] = {}
        position = 0
        waiting: list[Any] = []
        for item in items:
            if isinstance(item, Rec):
                tp = (item.topic, item.partition)
                log = self.logs.setdefault(tp, [])
                offset = len(log)
                log.append(Message(topic=item.topic, partition=item.partition, offset=offset, key=item.key,
                                   value=item.value, headers=item.headers,  # type: ignore[arg-type]
                                   timestamp=(1, now if item.timestamp is None else item.timestamp)))
                self.order[(tp, offset)] = position
                if waiting:
                    self.sink_marks[(tp, offset)] = waiting
                    waiting = []
                position += 1
            elif isinstance(item, _SINK_MARKERS):
                waiting.append(item)
            elif isinstance(item, Crash | Rebalance):
                self.markers.append((position, item))
            else:
                raise TypeError(f"not a record or marker: {item!r}")
        for topic, n in (partitions or {}).items():
            for p in range(n):
                self.logs.setdefault((topic, p), [])
        self.fired: set[int] = set()  # indexes into self.markers
        self.committed: dict[TP, int] = {}
        self.commits: list[dict[TP, int]] = []  # every commit call, in order (only partitions committed)
        self.letters: list[tuple[Any, str, str]] = []  # (record, reason, model_version) acknowledged
        self.sink = TestingSink(self)
        self.members = 0

    def source(self) -> TestingSource:
        """A new group member (the only one: it is assigned every partition, unless a Rebalance says else)."""
        self.members += 1
        return TestingSource(self)

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(TestingProducer(self), lambda topic: f"{topic}.dlq")  # type: ignore[arg-type]

    # -- what tests assert on ------------------------------------------------------------------------
    def stored_ids(self) -> list[str]:
        """Ids of the served rows stored (one per record stored: the sink keeps one row per key)."""
        return [row["id"] for row in self.sink.rows.values() if row["served"]]

    def dead_offsets(self) -> set[tuple[str, int, int]]:
        return {(r.topic, r.partition, r.offset) for r, _, _ in self.letters}

    def check_commit(self, tp: TP, offset: int) -> None:
        settled = self.sink.offsets | self.dead_offsets()
        start = self.committed.get(tp, 0)
        missing = [o for o in range(start, offset) if (tp[0], tp[1], o) not in settled]
        if missing:
            raise OrderViolation(f"{tp[0]}[{tp[1]}] committed up to {offset} with offsets {missing[:5]} neither "
                                 "stored nor dead-lettered")


class TestingSource(Source):
    """The scripted ``Source``: the contract's methods plus the script's delivery and markers (see the module
    docstring); one class because each contract method must see the same assignment and positions."""

    def __init__(self, script: Script):
        self.script = script
        self.missing: list[str] = []
        self.assigned: set[TP] = set()
        self.position: dict[TP, int] = {}
        self.paused = False
        self.opened = False
        self.closed = False
        self.keep_alives = 0
        self.rebalances = 0
        self.reached = 0  # script position delivery has got to (re-reading after a rebalance does not lower it)
        self.batches: list[list[tuple]] = []  # what each poll handed over

    def open(self) -> None:
        self.opened = True
        self._assign(list(self.script.logs))

    def _assign(self, tps: list[TP]) -> None:
        for tp in tps:
            self.assigned.add(tp)
            self.position[tp] = self.script.committed.get(tp, 0)

    def _revoke(self, tps: list[TP]) -> None:
        for tp in tps:
            self.assigned.discard(tp)
            self.position.pop(tp, None)

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    def _next(self) -> tuple[TP, int] | None:
        """The assigned partition whose next record comes first in the script, with that position."""
        best = None
        for tp in self.assigned:
            off = self.position[tp]
            if off < len(self.script.logs[tp]):
                at = self.script.order[(tp, off)]
                if best is None or at < best[1]:
                    best = (tp, at)
        return best

    def _due(self, keep_alive: bool) -> list[tuple[int, Any]]:
        """Markers not fired yet that delivery has reached: in a poll, crashes and rebalances; in a keep_alive,
        the first ``in_keep_alive`` rebalance only (one per call, so two of them take two waits)."""
        nxt = self._next()
        reached = float("inf") if nxt is None else max(self.reached, nxt[1])
        due = [(i, m) for i, (at, m) in enumerate(self.script.markers)
               if i not in self.script.fired and at <= reached
               and (isinstance(m, Rebalance) and m.in_keep_alive) == keep_alive]
        return due[:1] if keep_alive else due

    def _fire(self, keep_alive: bool, batch: list[Message]) -> list[Message]:
        for i, marker in self._due(keep_alive):
            self.script.fired.add(i)
            if isinstance(marker, Crash):
                raise Crashed(f"scripted crash (marker {i})")
            self._revoke(marker.revoke)
            # Records of revoked partitions in hand are dropped (also when assigned back: from the commit).
            gone = set(marker.revoke)
            batch = [m for m in batch if (m.topic(), m.partition()) not in gone]
            self._assign(marker.assign)
            self.rebalances += 1
        return batch

    def poll_batch(self, max_records: int, max_wait_ms: int) -> Batch:
        batch: list[Message] = []
        while len(batch) < max_records:
            batch = self._fire(False, batch)
            nxt = self._next()
            if nxt is None:
                break
            tp = nxt[0]
            batch.append(self.script.logs[tp][self.position[tp]])
            self.position[tp] += 1
            self.reached = max(self.reached, nxt[1] + 1)
        batch = self._fire(False, batch)
        if batch:
            self.batches.append([(m.topic(), m.partition(), m.offset()) for m in batch])
        if not batch and max_wait_ms:
            time.sleep(min(max_wait_ms, 5) / 1000)  # an idle poll takes a little time, as a real one does
        return Batch(batch)

    def commit(self, offsets: dict[TP, int]) -> bool:
        mine = {tp: off for tp, off in offsets.items() if tp in self.assigned}
        for tp, off in mine.items():
            self.script.check_commit(tp, off)
        for tp, off in mine.items():
            self.script.committed[tp] = off
        if mine:
            self.script.commits.append(mine)
        return len(mine) == len(offsets)

    def keep_alive(self, timeout_ms: int) -> None:
        self.paused = True
        self.keep_alives += 1
        self._fire(True, [])
        time.sleep(min(timeout_ms, 5) / 1000)

    def resume(self) -> None:
        self.paused = False

    def lag(self, tp: TP, next_offset: int | None) -> int | None:
        if tp not in self.script.logs:
            return None
        at = next_offset if next_offset is not None else self.position.get(tp, self.script.committed.get(tp, 0))
        return max(len(self.script.logs[tp]) - at, 0)

    def find_missing(self) -> list[str]:
        return []

    def close(self) -> None:
        self.closed = True


class TestingSink(Sink):
    """A keyed store: one row per (id, model_version), the later write winning (like the table sinks' upsert)."""

    name = "testing"

    def __init__(self, script: Script):
        self.script = script
        self.rows: dict[tuple[str, str], dict] = {}
        self.offsets: set[tuple[str, int, int]] = set()  # (topic, partition, offset) of every row stored
        self.writes = 0  # write_batch calls that stored something
        self.failures = 0  # write_batch calls that raised
        self.lock = threading.Lock()
        self.spent: dict[int, int] = {}  # id(marker) -> times it acted

    def begin(self, unit: str) -> UnitWriter:
        return DirectUnit(self.write_batch)

    def write_batch(self, scored: Scored) -> None:
        t = scored.results
        keys: list[tuple[str, int, int]] = list(zip(t["topic"].to_pylist(), t["partition"].to_pylist(),
                                                    t["offset"].to_pylist(), strict=True))
        refused: dict[int, str] = {}
        for i, (topic, partition, offset) in enumerate(keys):
            for marker in self.script.sink_marks.get(((topic, partition), offset), []):
                n = self.spent.get(id(marker), 0)
                if isinstance(marker, SinkRefuses):
                    refused[i] = marker.reason
                elif isinstance(marker, SinkFails) and n < marker.times:
                    self.spent[id(marker)] = n + 1
                    self.failures += 1
                    raise SinkError(f"scripted store failure {n + 1} of {marker.times}")
                elif isinstance(marker, SinkHangs) and n == 0:
                    self.spent[id(marker)] = 1
                    time.sleep(marker.seconds)
                elif isinstance(marker, CrashInStore) and n == 0:
                    self.spent[id(marker)] = 1
                    raise Crashed("scripted crash inside the store")
        if refused:
            self.failures += 1
            raise RowsRejected(refused)
        with self.lock:
            for row, key in zip(t.to_pylist(), keys, strict=True):
                self.rows[(row["id"], row["model_version"])] = row
                self.offsets.add(key)
            self.writes += 1


class TestingProducer:
    """The dead-letter producer: letters are acknowledged (kept in ``script.letters``) when flushed."""

    def __init__(self, script: Script):
        self.script = script
        self.queued: list[tuple[str, bytes | None, bytes | None, list]] = []
        self.closed = False

    def send(self, topic: str, value: bytes | None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        self.queued.append((topic, value, key, headers or []))

    def flush(self, timeout: float = 30.0) -> None:
        for _topic, _value, _key, headers in self.queued:
            h = {k: v.decode() for k, v in headers if k.startswith("error.")}
            source = _Letter(h["error.source.topic"], int(h["error.source.partition"]),
                             int(h["error.source.offset"]))
            self.script.letters.append((source, h["error.reason"], h["error.model_version"]))
        self.queued = []

    def close(self, timeout_s: float = 5.0) -> None:
        self.closed = True


@dataclass(frozen=True)
class _Letter:
    topic: str
    partition: int
    offset: int

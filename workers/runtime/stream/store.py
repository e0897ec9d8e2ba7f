"""Stream mode's store side: one store attempt of a micro-batch.

- Sink calls run on ``workers.runtime.lane.Lane`` threads (daemon: a write hung in the store cannot keep a stopped
  worker alive; the batch is redelivered: at least once).
- ``StoreSteps.attempt``: dead letters first (flushed), then the results. Rows the sink refuses
  (``RowsRejected``) are taken out and their records dead-lettered with the reason, and the rest is written
  again; a sink refusing a write for its data without naming rows gets it in halves until the row is alone.
  ``SinkError`` (the store is down) propagates: the caller retries with backoff and commits nothing meanwhile.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from workers.errors import InputError, RowsRejected, ScoringError
from workers.observability import Health, Metrics
from workers.runtime.stream import trace
from workers.scoring.scorer import Scored
from workers.settings import Settings
from workers.sinks import Sink
from workers.sinks.deadletter import DeadLetters
from workers.sources.base import Batch, Record

log = logging.getLogger("workers.stream")

ABANDONED = object()  # await_call: the shutdown bound passed with the call still running


@dataclass
class StoreState:
    """What the store attempts of one batch still have to do; a retry goes on from here.

    ``parts`` are result tables written one after the other (one, unless scoring had to isolate records);
    rows the sink rejected are taken out of them and their records join ``letters``.
    """

    parts: list[pa.Table]
    letters: list[tuple[Record, str, str]]  # dead letters not flushed yet: (record, reason, model_version)
    no_errors: pa.Table  # an empty errors table (what write_batch is handed beside the results)
    written: list[pa.Table] = field(default_factory=list)  # parts stored (metrics count their served rows)
    dead: list[tuple[str, str]] = field(default_factory=list)  # (topic, version) of records dead-lettered
    failed: tuple[Record, str] | None = None  # on_bad_record=fail met a record the sink rejected


# What a sink raises for the data of a write without naming the rows (not retryable: retrying the same rows
# fails the same way). Stream mode writes the batch in halves until each such row is alone and dead-lettered.
UNNAMED_DATA_ERRORS: tuple[type[BaseException], ...] = (InputError, ValueError, TypeError, OverflowError,
                                                    pa.ArrowNotImplementedError)
REFUSED: tuple[type[BaseException], ...] = (RowsRejected, *UNNAMED_DATA_ERRORS)  # what a write refuses for its data


class BadRecordStop(ScoringError):
    """on_bad_record=fail and the sink rejected a record: stop without committing the batch."""


class StoreSteps:
    """The store attempt of ``StreamWorker`` (a mixin: it uses the worker's sink, dead letters, settings,
    metrics and health). Runs on a lane, never touches the consumer."""

    settings: Settings
    sink: Sink
    dead: DeadLetters | None
    metrics: Metrics
    health: Health

    def attempt(self, records: Batch, state: StoreState) -> None:
        """One try at dead letters then results; raises SinkError (state keeps what is done: a retry after a
        sink failure sends no dead letter twice and rewrites only the parts not stored yet)."""
        self.flush_letters(state, records)
        while state.parts:
            part = state.parts[0]
            try:
                with trace.step(records, "store", **{"scoring.sink": self.sink.name, "scoring.rows": part.num_rows}):
                    self.sink.write_batch(Scored(part, state.no_errors))
            except REFUSED as exc:
                rejected = exc if isinstance(exc, RowsRejected) else self.split(state, exc)
                if rejected is None:
                    continue
                self.reject(records, state, rejected)
                if self.settings.stream.on_bad_record == "fail" and state.letters:
                    state.failed = (state.letters[0][0], state.letters[0][1])
                    raise BadRecordStop(state.failed[1]) from None
                self.flush_letters(state, records)
                continue
            state.written.append(state.parts.pop(0))
        if not self.health.sink_ok:
            log.info("sink recovered")
        self.health.sink_ok, self.health.sink_error = True, ""

    def split(self, state: StoreState, exc: BaseException) -> RowsRejected | None:
        """The sink refused the part being written for its data without naming rows: write it in halves, so
        the row responsible ends up alone; a row alone that fails is rejected with the error as its reason."""
        part = state.parts[0]
        if part.num_rows > 1:
            log.warning("the sink refused a batch for its data without naming rows; writing it in halves",
                        extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "rows": part.num_rows})
            mid = part.num_rows // 2
            state.parts[0:1] = [part.slice(0, mid), part.slice(mid)]
            return None
        return RowsRejected({0: f"cannot be stored: {exc}"[:500]})

    def flush_letters(self, state: StoreState, records: Batch) -> None:
        if not state.letters:
            return
        assert self.dead is not None
        with trace.step(records, "dead letters", **{"scoring.rejected": len(state.letters)}):
            for record, reason, version in state.letters:
                self.dead.send(record, reason, version)
            self.dead.flush()  # SinkError: the letters stay pending and are sent again with the retry
        state.dead += [(record.topic, version) for record, _, version in state.letters]
        state.letters = []

    def reject(self, records: Batch, state: StoreState, exc: RowsRejected) -> None:
        """Take the rows the sink rejected out of the part being written; their records become dead letters.

        A record whose *served* row is rejected is dead-lettered, and its shadow rows are dropped with it; a
        rejected shadow row alone is dropped and the record stored. Dropped shadow rows count as errors of
        their version (``scoring_version_errors_total``)."""
        part = state.parts[0]
        n = part.num_rows
        named = {int(i): reason for i, reason in exc.rows.items() if 0 <= int(i) < n}
        if not named:  # a sink breaking the contract: loud, never a silent retry loop
            raise ScoringError(f"{self.sink.name} rejected rows without naming any of the {n} written: {exc}")
        where = {(m.topic(), m.partition(), m.offset()): i for i, m in enumerate(records.messages)}
        keys = list(zip(part["topic"].to_pylist(), part["partition"].to_pylist(), part["offset"].to_pylist(),
                        strict=True))
        served = part["served"].to_pylist()
        versions = part["model_version"].to_pylist()
        dead: dict[tuple, tuple[str, str]] = {}
        drop = set()
        for i, reason in sorted(named.items()):
            if served[i]:
                dead.setdefault(keys[i], (reason, versions[i]))
            drop.add(i)
        drop |= {i for i in range(n) if keys[i] in dead}
        shadow = Counter(versions[i] for i in drop if not served[i])
        for version, count in shadow.items():
            self.metrics.version_errors.labels(version).inc(count)
        if shadow:
            log.warning("shadow rows the sink cannot hold dropped", extra={"rows": dict(shadow)})
        for key, (reason, version) in dead.items():
            state.letters.append((records[where[key]], reason, version))
        keep = np.ones(n, dtype=bool)
        keep[list(drop)] = False
        state.parts[0] = part.filter(pa.array(keep))
        if state.parts[0].num_rows == 0:
            state.parts.pop(0)

"""What the table-format sinks (Delta Lake, Iceberg) share: results, errors and the ledger as three tables, each
write one optimistic commit per table (the format's own ``merge``), a batch unit buffered and committed whole.

A subclass gives ``merge`` (one commit: upsert ``data`` on ``key``; with ``unit``, also delete that unit's stored
rows the new ones do not replace; with ``guard``, keep a stored row newer in its topic-partition),
``_delete_resolved``, ``_entries`` (the ledger's rows) and its value mapping ``lake``.
"""

from __future__ import annotations

import logging
import random
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa

from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.sinks.base import Ledger, Sink, UnitWriter
from workers.sinks.deltatypes import DELTA, Lake, delta_table
from workers.sinks.tables import ERROR_KEY, RESULT_KEY, keyed_rows

log = logging.getLogger("workers.sinks.lake")
T = TypeVar("T")
ATTEMPTS = 40  # commits tried per write before SinkError (conflicts with other shards' commits)
BACKOFF = (0.05, 2.0)  # first and largest pause between attempts, seconds (jittered)


def retry_commits(step: Callable[[], T], name: str, what: str, transient: Callable[[BaseException], bool],
                  shown: Callable[[BaseException], str], log: logging.Logger) -> T:
    """``step()``, tried again from scratch while it fails with a lost optimistic commit (``transient``: another
    writer committed first, or created the same table), with jittered doubling pauses, up to ``ATTEMPTS`` times.

    Our own errors (InputError, ConfigError, SinkError) pass through; any other exception, or still conflicting
    after the last attempt, is a ``SinkError`` naming ``what`` and the table ``name``, the exception text as
    ``shown`` renders it (a secret scrubbed)."""
    pause = BACKOFF[0]
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return step()
        except (InputError, ConfigError, SinkError):
            raise
        except Exception as exc:  # noqa: BLE001 - the table libraries raise their own kinds, conflicts too
            if not transient(exc):
                raise SinkError(f"{what} {name}: {type(exc).__name__}: {shown(exc)[:300]}") from None
            if attempt == ATTEMPTS:
                raise SinkError(f"{what} {name}: still conflicting with other writers after {ATTEMPTS} attempts: "
                                f"{shown(exc)[:200]}") from None
            log.info("commit to %s lost to another writer (attempt %d of %d): retrying", name, attempt, ATTEMPTS)
            time.sleep(pause * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            pause = min(pause * 2, BACKOFF[1])
    raise AssertionError("unreachable")


class LakeSink(Sink):
    """Three tables: results at ``location``, rejected rows at ``location + "_errors"``, the ledger at
    ``location + "_inputs"`` (how a subclass names a table from these is its own)."""

    lake: Lake = DELTA
    setting: str
    location: str

    def __init__(self) -> None:
        self._ledger = LakeLedger(self)

    @abstractmethod
    def merge(self, path: str, data: pa.Table, key: tuple[str, ...], unit: str | None = None,
              guard: bool = False) -> None:
        """One commit into the table at ``path`` (see the module docstring); creates it on first use."""

    @abstractmethod
    def _delete_resolved(self, resolved: list[tuple[str, str]]) -> None:
        """Delete the error rows of records these results settle (``Scored.resolved``)."""

    @abstractmethod
    def _entries(self, path: str) -> list[dict]:
        """The ``unit`` and ``fingerprint`` of every ledger row at ``path`` ([] when there is no table)."""

    @abstractmethod
    def _exists(self, path: str) -> bool:
        """Whether the table at ``path`` exists."""

    def rows_bad(self, results: pa.Table) -> dict[int, str]:
        """Rows of ``results`` this store cannot hold, with the reason (beyond the value mapping: none here)."""
        return {}

    def _store(self, scored: Scored, unit: str | None) -> int:
        """Write one write's results and errors (two commits: errors first, then results); returns the
        duplicates collapsed. RowsRejected (nothing stored) for rows the table cannot hold."""
        results, keep, errors = keyed_rows(scored, unit, self.setting)
        try:
            data, bad = delta_table(results, RESULT_KEY, self.lake)
            err, err_bad = delta_table(errors, (), self.lake) if errors.num_rows else (errors, {})
        except InputError as exc:
            if unit is not None:
                raise InputError(f"{self.name}: {exc}") from None
            raise RowsRejected({i: str(exc) for i in range(scored.results.num_rows)}) from None
        for i, reason in self.rows_bad(data).items():
            bad.setdefault(i, reason)
        if bad:
            raise RowsRejected({(keep[i] if keep is not None else i): r for i, r in bad.items()})
        if err_bad:
            raise InputError(f"the errors table of {self.name} cannot store rejected row(s): "
                             f"{next(iter(err_bad.values()))}")
        if scored.resolved:
            self._delete_resolved(scored.resolved)
        if err.num_rows or unit is not None:
            self.merge(self.location + "_errors", err, ERROR_KEY, unit)
        if data.num_rows or unit is not None:
            self.merge(self.location, data, RESULT_KEY, unit, guard=unit is None)
        return scored.results.num_rows - results.num_rows

    def write_batch(self, scored: Scored) -> None:
        self.duplicates_collapsed += self._store(scored, None)

    def begin(self, unit: str) -> UnitWriter:
        return LakeUnit(self, unit)

    def ledger(self) -> Ledger:
        return self._ledger


class LakeUnit(UnitWriter):
    """One batch unit: writes buffered, one commit per table at ``commit`` (the unit's earlier rows go in the
    same commit). The unit's results are held in memory until then (ids, scores and passthrough columns)."""

    def __init__(self, sink: LakeSink, unit: str):
        self.sink, self.unit = sink, unit
        self.parts: list[Scored] = []

    def write(self, scored: Scored) -> None:
        """Checks the rows now, as they come (rows without a key, values the table cannot hold: RowsRejected
        with their indices; a type it cannot hold at all: InputError), and keeps them for ``commit``."""
        try:
            keyed_rows(scored, self.unit, self.sink.setting)
            data, bad = delta_table(scored.results, RESULT_KEY, self.sink.lake)
        except (InputError, ConfigError) as exc:  # this input fails alone
            raise InputError(f"{self.sink.name}: {exc}") from None
        for i, reason in self.sink.rows_bad(data).items():
            bad.setdefault(i, reason)
        if bad:
            raise RowsRejected(bad)
        self.parts.append(scored)

    def commit(self) -> None:
        try:
            self._commit()
        except RowsRejected as exc:  # found only now, across the unit's batches: this input fails alone
            raise InputError(f"{self.sink.name} cannot store row(s) of {self.unit}: "
                             f"{next(iter(exc.rows.values()))}") from None

    def _commit(self) -> None:
        if self.parts:
            results = pa.concat_tables([p.results for p in self.parts], promote_options="permissive")
            errs = [p.errors for p in self.parts if p.errors.num_rows]
            errors = pa.concat_tables(errs, promote_options="permissive") if errs else pa.table({})
            scored = Scored(results, errors)
        else:  # an emptied input: its old rows still go
            scored = Scored(pa.table({}), pa.table({}))
        self.sink.duplicates_collapsed += self.sink._store(scored, self.unit)
        self.parts = []

    def abort(self) -> None:
        self.parts = []


class LakeLedger(Ledger):
    """The batch ledger of a ``LakeSink``: table ``<location>_inputs``, merged on ``unit``. Read once per run (a
    unit belongs to one shard, so other shards' entries written meanwhile are never asked for) and once more by
    the end-of-run check (``refresh``)."""

    def __init__(self, sink: LakeSink):
        self.sink = sink
        self.path = sink.location + "_inputs"
        self._seen: dict[str, str] | None = None

    def done(self, unit: str) -> str | None:
        if self._seen is None:
            entries = self.sink._entries(self.path)
            if entries and not self.sink._exists(self.sink.location):
                # The results table was removed (to start over) and its sibling ledger left behind: the entries
                # describe results that are gone, so every input is scored again (idempotent).
                log.warning("the ledger %s has entries but the results table is missing: scoring every input again",
                            self.path)
                entries = []
            self._seen = {r["unit"]: r["fingerprint"] for r in entries}
        return self._seen.get(unit)

    def refresh(self) -> None:
        self._seen = None

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        entry = pa.table({"unit": [unit], "fingerprint": [fingerprint], "rows": pa.array([rows], pa.int64()),
                          "rejected": pa.array([rejected], pa.int64()),
                          "finished_at": pa.array([time.time_ns() // 1000], pa.int64()).cast(
                              pa.timestamp("us", tz="UTC"))})
        self.sink.merge(self.path, entry, ("unit",), None)
        if self._seen is not None:
            self._seen[unit] = fingerprint

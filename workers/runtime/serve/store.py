"""Serve mode's sink side (``--sink``): CloudEvent results and rejected rows stored before the reply.

- Rejected rows are keyed by their event's ``source#id`` (the errors table's ``source`` key column), so a
  redelivered batch replaces them instead of failing on a key column serve rows lacked.
- Rows the sink cannot hold (``RowsRejected``) take their event out, answered with the reason; the rest is
  written again. A refused shadow row alone is dropped and counted as an error of its version.
- A write the sink refuses without naming rows (``InputError``/``ConfigError``: e.g. the errors table cannot
  hold a rejected record's raw value) is the events' fault too, not the store's: the batch is halved by event
  and written again until the events it cannot hold are found alone; those are answered with the reason (a
  single event: 400, so Knative dead-letters it instead of retrying), the others are stored and answered.
- Every sink call is bounded: a write that does not return within ``timeout_s`` (a locked table, a hung
  connection) is answered 503 (Knative retries; writes are idempotent upserts), and so is one in flight when
  the server is told to stop. Calls run on one *daemon* thread, so a hung call never keeps the process alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.runtime.lane import Lane
from workers.scoring.scorer import Scored

log = logging.getLogger("workers.serve")

DEFAULT_TIMEOUT_S = 30.0


class StoreUnavailable(Exception):
    """The sink failed, did not answer in time, or the server is stopping: a 503 with this message."""


class EventStore:
    def __init__(self, sink, metrics, row_column: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.sink, self.metrics, self.row_column, self.timeout_s = sink, metrics, row_column, timeout_s
        self.lane = Lane("sink")
        self.stopping: asyncio.Event | None = None  # set by the server on SIGTERM (created in its loop)

    async def write(self, scored: Scored, locators: list[str]) -> dict[int, str]:
        """Store results and rejected rows (both carrying ``row_column``, the event index); returns the events
        whose rows the sink cannot hold (event index -> reason). Raises StoreUnavailable."""
        results = scored.results
        sources = pa.array([locators[i] for i in scored.error_rows.tolist()], pa.string())
        errors = scored.errors.append_column("source", sources)
        # One event twice in a batch (same source#id) is one error row; the later copy is kept.
        last = {src: k for k, src in enumerate(sources.to_pylist())}
        if len(last) < errors.num_rows:
            errors = errors.take(pa.array(sorted(last.values()), pa.int64()))
        refused: dict[int, str] = {}
        await self._write(results, errors, refused, locators)
        return refused

    async def _write(self, results: pa.Table, errors: pa.Table, refused: dict[int, str], locators: list[str]) -> None:
        row = self.row_column
        while results.num_rows or errors.num_rows:
            # A redelivered event that scores now settles the error row an earlier delivery left.
            resolved = list(zip([locators[i] for i in results[row].to_pylist()],
                                results["model_version"].to_pylist(), strict=True))
            try:
                await self.call(self.sink.write_batch, Scored(results.drop_columns([row]),
                                                               errors.drop_columns([row]), resolved=resolved))
                return
            except SinkError as exc:
                raise StoreUnavailable(f"sink unavailable: {exc}") from None
            except RowsRejected as exc:
                results = self._without_rejected(results, exc, refused)
            except (InputError, ConfigError) as exc:  # nothing of the call stored, no row named: find the events
                events = sorted(set(results[row].to_pylist()) | set(errors[row].to_pylist()))
                if len(events) == 1:
                    refused.setdefault(events[0], f"cannot be stored: {exc}")
                    log.warning("an event the sink cannot hold answered with the reason",
                                extra={"reason": str(exc)})
                    return
                for part in (events[:len(events) // 2], events[len(events) // 2:]):
                    keep = pa.array(part, pa.int64())
                    await self._write(results.filter(pc.is_in(results[row], keep)),
                                      errors.filter(pc.is_in(errors[row], keep)), refused, locators)
                return

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the sink's lane, waited for at most ``timeout_s`` and never past a stop."""
        work = asyncio.ensure_future(asyncio.wrap_future(self.lane.submit(fn, *args)))
        waits = {work}
        if self.stopping is not None:
            waits.add(asyncio.ensure_future(self.stopping.wait()))
        done, _ = await asyncio.wait(waits, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        for w in waits - {work}:
            w.cancel()
        if work in done:
            return work.result()
        work.cancel()  # a call still queued will not start; one running finishes on its own (idempotent)
        why = "the server is stopping" if self.stopping is not None and self.stopping.is_set() else \
            f"no answer within {self.timeout_s:g} s (a locked table or a hung connection?)"
        log.warning("sink call abandoned", extra={"sink": self.sink.name, "reason": why})
        raise StoreUnavailable(f"sink unavailable: {why}; nothing is lost, retry the delivery")

    def _without_rejected(self, results: pa.Table, exc: RowsRejected, refused: dict[int, str]) -> pa.Table:
        n = results.num_rows
        named = {int(i): reason for i, reason in exc.rows.items() if 0 <= int(i) < n}
        if not named:  # a sink breaking the contract: loud, never a silent retry loop
            raise RuntimeError(f"{self.sink.name} rejected rows without naming any of the {n} written: {exc}")
        rows = results[self.row_column].to_pylist()
        served = results["served"].to_pylist()
        versions = results["model_version"].to_pylist()
        for i, reason in sorted(named.items()):
            if served[i]:
                refused.setdefault(rows[i], f"cannot be stored: {reason}")
            else:
                self.metrics.version_errors.labels(versions[i]).inc()
        keep = [i not in named and rows[i] not in refused for i in range(n)]
        log.warning("rows the sink cannot hold answered with the reason",
                    extra={"events": len(refused), "rows": n - sum(keep), "reason": next(iter(named.values()))})
        return results.filter(pa.array(keep, pa.bool_()))

    def close(self) -> None:
        """Close the sink, unless a call is still running on it (closing under it could hang: leave it)."""
        if self.lane.busy:
            log.warning("sink call still running at shutdown; exiting without waiting for it",
                        extra={"sink": self.sink.name})
            return
        self.sink.close()

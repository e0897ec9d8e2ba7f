"""``WriteBehind``: a unit's sink writes on a thread of their own, one at a time, while batch mode scores the
next batch; so the Parquet encoding and compression of the results (pyarrow releases the GIL for them) runs
beside predict instead of between predicts.

What stays as it was without it (the sink's rules in ``workers.sinks.base``):
- batches reach ``UnitWriter.write`` in input order, one call at a time, never two at once;
- at most one scored batch waits on the thread: memory grows by one results batch, not with the file;
- a write's error is raised to the caller at its next ``write``, or at ``wait`` before the unit commits, as
  the same exception (``RowsRejected`` already turned into the caller's ``InputError`` by ``rejected``, with
  the ids of the batch that failed), so the unit fails and is aborted and nothing of it is recorded done;
- ``settle`` lets a write still running end before the caller aborts the unit (never a file removed under its
  writer).

Only sinks whose ``concurrent_writes`` is True get the thread (their writer may be called from another thread
than the one that began the unit); others are written inline, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future

from workers.errors import InputError, RowsRejected
from workers.runtime.lane import Lane
from workers.scoring.scorer import Scored
from workers.sinks.base import UnitWriter


class WriteBehind:
    def __init__(self, writer: UnitWriter, rejected: Callable[[Scored, RowsRejected], str], threaded: bool):
        self.writer = writer
        self.rejected = rejected  # the reason of an InputError for rows of ``scored`` the store refused
        self.lane = Lane("batch-write") if threaded else None
        self.pending: Future | None = None

    def _write(self, scored: Scored) -> None:
        try:
            self.writer.write(scored)
        except RowsRejected as exc:
            # The store cannot hold some rows as they are: retrying cannot help, so the unit fails alone.
            raise InputError(self.rejected(scored, exc)) from None

    def write(self, scored: Scored) -> None:
        """Hand ``scored`` to the writer; first raises the error of the write before it, if it failed."""
        self.wait()
        if self.lane is None:
            self._write(scored)
        else:
            self.pending = self.lane.submit(self._write, scored)

    def wait(self) -> None:
        """Until every write handed over has returned; raises the error of one that failed."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def settle(self) -> None:
        """Wait for a write still running, its error ignored (the caller is failing the unit already)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            futures.wait([pending])

    def close(self) -> None:
        if self.lane is not None:
            self.lane.shutdown(5)

"""The sink contract: where results and rejected rows are stored; and the batch ledger, which some sinks keep.

A *unit* is what the runtime writes and then treats as done: one input file in batch mode, one
partition's slice of a micro-batch in stream mode. The runtime's promises rest on these rules:

- ``begin(unit)`` returns a writer; ``write(scored)`` may be called many times; ``commit()`` makes
  everything written durable and visible, and only after it returns does the runtime record the unit
  as finished (batch ledger) or commit Kafka offsets (stream). If the process dies before ``commit``
  returns, the unit is written again later.
- Writing the same unit again must not duplicate: keyed stores upsert on ``(id, model_version)``;
  file stores name the output after the unit so a rewrite replaces it.
- Failures raise ``SinkError`` (retryable). Rows the store cannot hold as they are raise
  ``RowsRejected`` (not retryable; nothing of that call stored), see ``workers.errors``. A writer that
  failed is ``abort()``-ed and nothing of it
  is recorded as done.
- The batch ledger (which inputs are finished, with their fingerprint) is a separate contract, ``Ledger``.
  A sink that can keep one in the same store as its results returns it from ``ledger()``, so results and
  ledger cannot disagree about another store; one that cannot (a Kafka topic) returns None, and batch mode
  refuses it at start-up (``runtime.batch.batch_ledger``) rather than failing mid-run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from workers.scoring.scorer import Scored
from workers.settings import redact  # noqa: F401 - one redaction for every printed URI; sinks import it from here


class UnitWriter(ABC):
    @abstractmethod
    def write(self, scored: Scored) -> None:
        """Add results and errors of one batch to the unit."""

    @abstractmethod
    def commit(self) -> None:
        """Make the unit durable and visible. Raises SinkError on failure."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Discard what was written but not committed (best effort; idempotency covers the rest)."""


class DirectUnit(UnitWriter):
    """For stores where each ``write`` is its own durable, idempotent transaction (tables, topics): a unit
    rewritten after a crash upserts the same keys, so ``commit`` has nothing left to do."""

    def __init__(self, store: Callable[[Scored], None]):
        self.store = store

    def write(self, scored: Scored) -> None:
        self.store(scored)

    def commit(self) -> None:
        pass


class Sink(ABC):
    #: a redacted description for logs and summaries (never a password: build it with ``redact``)
    name: str = "sink"
    #: rows dropped because another row of the same write had the same (id, model_version) key: the later
    #: row (input order; in stream mode the higher offset) is kept. Keyed sinks count them; the batch summary
    #: reports the total.
    duplicates_collapsed: int = 0
    #: its unit writers may be called from a thread other than the one that began the unit (one call at a time,
    #: in order): batch mode then writes a batch while it scores the next (``runtime.write_behind``). Off unless
    #: a sink says so: a connection bound to its thread (SQLite's) must not be handed to another.
    concurrent_writes: bool = False

    @abstractmethod
    def begin(self, unit: str) -> UnitWriter:
        """A writer for one unit (batch: one input file). Table sinks write the whole unit in one transaction
        that first deletes every result and error an earlier run stored for ``unit``, so a rewritten input
        leaves nothing stale (an emptied input leaves nothing at all); ``abort`` keeps the old ones."""

    def write_unit(self, unit: str, scored: Scored) -> None:
        """Write one batch as a whole unit (stream mode)."""
        writer = self.begin(unit)
        try:
            writer.write(scored)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def write_batch(self, scored: Scored) -> None:
        """Store one micro-batch's results (stream mode): durable and idempotent when it returns.

        Results carry ``topic``, ``partition`` and ``offset`` columns. Table sinks write the whole batch
        in one transaction; file sinks override this to write one file per partition slice.
        """
        self.write_unit("stream", scored)

    def ledger(self) -> Ledger | None:
        """The batch ledger kept beside these results, or None when this store cannot keep one (batch mode
        then refuses the sink at start-up). Stream and serve modes never ask."""
        return None

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise SinkError when the store cannot be reached (used by ``check`` and readiness)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class Ledger(ABC):
    """Which batch inputs are finished, and with what fingerprint (size, mtime, model version): resume.

    The runtime's order per unit is ``done`` (skip when the fingerprint is the same), write the unit,
    ``commit()`` its writer, then ``mark_done``. The traps:

    - ``mark_done`` is called only after the unit's results are durable and visible (``commit`` returned),
      and is itself durable on return. A crash between the two leaves results without a ledger entry: the
      next run writes the unit again, and the sink's idempotency (same file name, upsert on the key) keeps
      one copy. The reverse, an entry without its results, never happens through the runtime.
    - The ledger lives in the store of the results it describes, so deleting the results by hand and not the
      ledger makes a rerun skip those inputs: forget both (``_state/``, table ``NAME_inputs``).
    - ``mark_done`` of a unit already recorded replaces its entry (a changed input or model scored again).
    - ``done`` creates nothing that a run has not written yet (a probe or an empty run leaves no database).
    - Failures raise ``SinkError`` (retryable: the run stops, a rerun resumes). ``done`` may raise
      ``InputError`` when the unit's output name already holds another unit's results: that input fails
      alone (Parquet: ``/b/k`` and ``s3://b/k``).
    """

    @abstractmethod
    def done(self, unit: str) -> str | None:
        """The fingerprint recorded when ``unit`` was finished, or None."""

    def refresh(self) -> None:
        """Forget entries read ahead, so the next ``done`` reads the store (the end-of-run check asks again what
        other runs may have changed meanwhile). A ledger that reads per ``done`` has nothing to forget."""
        return

    @abstractmethod
    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        """Record ``unit`` as finished with ``fingerprint`` (``rows`` scored, ``rejected`` rows to the errors
        output). Call it only after the unit's writer committed; durable on return."""

"""Served rows to one sink, shadow rows to another (``SCORING_ROUTING__SHADOW_SINK``).

Both writes complete before the unit counts as stored (offsets committed / input marked done), so the
shadow store is as complete as the main one. The batch ledger and rejected rows stay in the main sink.
``RowsRejected`` from either sink names rows of the caller's table (each sink sees only its part). When the
main sink rejects rows after the shadow part was stored, the caller writes the rest again: the shadow rows
are upserted once more (keyed stores), so nothing is duplicated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.compute as pc

from workers.errors import RowsRejected
from workers.scoring.scorer import Scored
from workers.sinks.base import Ledger, Sink, UnitWriter


def split(scored: Scored) -> tuple[Scored, Scored | None, np.ndarray, np.ndarray]:
    """(served part, shadow part or None, the caller's row index of each served row, of each shadow row)."""
    results = scored.results
    n = results.num_rows
    served = results["served"] if n else None
    if served is None or (served.null_count == 0 and pc.all(served).as_py()):
        return scored, None, np.arange(n), np.empty(0, np.int64)
    mask = pc.fill_null(served, False).to_numpy(zero_copy_only=False).astype(bool)
    main = Scored(results.filter(mask), scored.errors, scored.error_rows, scored.resolved)  # errors live in main
    shadow = Scored(results.filter(~mask), scored.errors.slice(0, 0))
    return main, shadow, np.flatnonzero(mask), np.flatnonzero(~mask)


def _mapped(call: Callable[[Scored], None], part: Scored, rows: np.ndarray) -> None:
    """``call(part)``, with rejected row indices turned back into the caller's."""
    try:
        call(part)
    except RowsRejected as exc:
        raise RowsRejected({int(rows[i]): reason for i, reason in exc.rows.items() if 0 <= int(i) < len(rows)}) \
            from None


class _SplitUnit(UnitWriter):
    def __init__(self, main: UnitWriter, shadow: UnitWriter):
        self.main, self.shadow = main, shadow

    def write(self, scored: Scored) -> None:
        main, shadow, at_main, at_shadow = split(scored)
        _mapped(self.main.write, main, at_main)
        if shadow is not None:
            _mapped(self.shadow.write, shadow, at_shadow)

    def commit(self) -> None:
        self.shadow.commit()
        self.main.commit()

    def abort(self) -> None:
        self.shadow.abort()
        self.main.abort()


class SplitSink(Sink):
    def __init__(self, main: Sink, shadow: Sink):
        self.main, self.shadow = main, shadow
        self.name = f"{main.name} (shadow rows: {shadow.name})"

    @property
    def duplicates_collapsed(self) -> int:  # type: ignore[override]
        return self.main.duplicates_collapsed + self.shadow.duplicates_collapsed

    def begin(self, unit: str) -> UnitWriter:
        return _SplitUnit(self.main.begin(unit), self.shadow.begin(unit))

    def write_batch(self, scored: Scored) -> None:
        main, shadow, at_main, at_shadow = split(scored)
        if shadow is not None and shadow.num_results:
            _mapped(self.shadow.write_batch, shadow, at_shadow)
        if main.num_results or main.num_errors:
            _mapped(self.main.write_batch, main, at_main)

    def ledger(self) -> Ledger | None:
        """The main sink's: the ledger records a unit once both parts are committed (shadow first)."""
        return self.main.ledger()

    def check(self) -> None:
        self.main.check()
        self.shadow.check()

    def close(self) -> None:
        try:
            self.shadow.close()
        finally:
            self.main.close()

"""Served rows to one sink, shadow rows to another (``SCORING_ROUTING__SHADOW_SINK``).

Both writes complete before the unit counts as stored (offsets committed / input marked done), so the
shadow store is as complete as the main one. The batch ledger and rejected rows stay in the main sink.
"""

from __future__ import annotations

import pyarrow.compute as pc

from workers.scoring import Scored
from workers.sinks.base import Sink, UnitWriter


def split(scored: Scored) -> tuple[Scored, Scored | None]:
    results = scored.results
    if results.num_rows == 0:
        return scored, None
    served = results["served"]
    if served.null_count == 0 and pc.all(served).as_py():
        return scored, None
    main = Scored(results.filter(served), scored.errors, scored.error_rows)
    shadow = Scored(results.filter(pc.invert(served)), scored.errors.slice(0, 0))
    return main, shadow


class _SplitUnit(UnitWriter):
    def __init__(self, main: UnitWriter, shadow: UnitWriter):
        self.main, self.shadow = main, shadow

    def write(self, scored: Scored) -> None:
        main, shadow = split(scored)
        self.main.write(main)
        if shadow is not None:
            self.shadow.write(shadow)

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

    def begin(self, unit: str) -> UnitWriter:
        return _SplitUnit(self.main.begin(unit), self.shadow.begin(unit))

    def write_stream(self, scored: Scored) -> None:
        main, shadow = split(scored)
        if shadow is not None and shadow.ok:
            self.shadow.write_stream(shadow)
        if main.ok or main.rejected:
            self.main.write_stream(main)

    def done(self, unit: str) -> str | None:
        return self.main.done(unit)

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        self.main.mark_done(unit, fingerprint, rows, rejected)

    def check(self) -> None:
        self.main.check()
        self.shadow.check()

    def close(self) -> None:
        try:
            self.shadow.close()
        finally:
            self.main.close()

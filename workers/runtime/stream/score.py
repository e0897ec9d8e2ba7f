"""Stream mode's score stage (runs on the score lane): predict a decoded micro-batch with the routing it was
decoded with, and find the records responsible when decoding or scoring the batch raises.

A record whose values break decoding or scoring is found by splitting the batch in halves until it fails
alone; it becomes a dead letter with the exception as its reason, and the other records are scored in the
parts that succeed: one record's values never stop or wedge a partition.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from workers.decode.records import Decoded, carry_columns
from workers.decode.wire import WireFormat
from workers.errors import ScoringError
from workers.runtime.stream.store import StoreState
from workers.scoring.router import Routed, Router
from workers.scoring.scorer import Scored
from workers.settings import StreamSettings
from workers.sources.base import Batch, Record

log = logging.getLogger("workers.stream")


@dataclass
class ScoreOutcome:
    """What the score stage hands the store stage."""

    scored: Scored | None  # the first part's results (None when every record failed alone)
    seconds: float  # time spent scoring (batch sizing learns from it)
    state: StoreState  # what the store attempts have to write and dead-letter


class ScoreStage:
    def __init__(self, settings: StreamSettings, wire: WireFormat | None = None):
        self.settings = settings
        self.wire = wire  # a registry format (its schemas fetched by the pipeline before decoding), or JSON

    def decode(self, records: Batch, router: Router) -> tuple[Routed, Decoded]:
        if self.wire is None:
            return router.decode(records.values(), records.keys(), self.settings.key_as_id)
        self.wire.want(router.input_columns())
        return router.decode(records.values(), records.keys(), self.settings.key_as_id, self.wire.parse,
                             self.wire.rows)

    def score(self, records: Batch, routed: Routed, decoded: Decoded, router: Router) -> Scored:
        carry = carry_columns(decoded.passthrough, records.topics(), records.partitions(), records.offsets(),
                              np.array(records.timestamps(), dtype=np.int64))
        return router.finish(routed, carry)

    def run(self, records: Batch, routed: Routed | None, decoded: Decoded | None, router: Router
            ) -> ScoreOutcome:
        """Score the batch (``routed``/``decoded`` None: decoding it raised; isolate at once)."""
        started = time.monotonic()
        scored: Scored | None
        try:
            if routed is None or decoded is None:
                raise ScoringError("the batch could not be decoded")
            first = self.score(records, routed, decoded, router)
            parts = [(records, first)]
            culprits: list[tuple[Record, str]] = []
            scored = first
        except Exception as exc:  # noqa: BLE001 - isolate the records that cause it (below)
            log.warning("scoring a batch failed; isolating the records that fail",
                        extra={"reason": f"{type(exc).__name__}: {exc}"[:300], "records": len(records)})
            parts, culprits = [], []
            self.isolate(records.messages, router, parts, culprits)
            scored = parts[0][1] if parts else None
        version = router.primary.model.version
        letters = [(record, reason, version) for record, reason in culprits]
        for part, part_scored in parts:
            if part_scored.num_errors:
                for i, reason, v in zip(part_scored.error_rows, part_scored.errors["reason"].to_pylist(),
                                        part_scored.errors["model_version"].to_pylist(), strict=True):
                    letters.append((part[int(i)], reason, v))
        # Every record failed alone: nothing to write, so no errors table to hand the sink either.
        no_errors = scored.errors.slice(0, 0) if scored is not None else pa.table({})
        state = StoreState([s.results for _, s in parts if s.results.num_rows], letters, no_errors)
        if culprits and self.settings.on_bad_record == "fail":
            state.failed = culprits[0]
        return ScoreOutcome(scored, time.monotonic() - started, state)

    def isolate(self, messages: list, router: Router, parts: list[tuple[Batch, Scored]],
                culprits: list[tuple[Record, str]]) -> None:
        """Split ``messages`` until each part scores or is one record that fails (appended, in order).

        The parts are decoded and scored again (their rows count again in the per-version metrics and the drift
        window: a rare path)."""
        if not messages:
            return
        part = Batch(messages)
        try:
            routed, decoded = self.decode(part, router)
            parts.append((part, self.score(part, routed, decoded, router)))
            return
        except Exception as exc:  # noqa: BLE001 - a record whose values break decoding or scoring
            if len(messages) == 1:
                record = part[0]
                reason = f"cannot be scored: {type(exc).__name__}: {exc}"[:500]
                log.error("record cannot be scored; dead-lettered", extra={
                    "topic": record.topic, "partition": record.partition, "offset": record.offset,
                    "reason": reason})
                culprits.append((record, reason))
                return
        mid = len(messages) // 2
        self.isolate(messages[:mid], router, parts, culprits)
        self.isolate(messages[mid:], router, parts, culprits)

"""Batch sizing: keep one micro-batch's processing well inside ``max.poll.interval.ms``.

A consumer that does not poll within ``max.poll.interval.ms`` is evicted from the group (a rebalance, its
batch redelivered to another member). The batch size starts from one timed predict per version (so even the
first batch of a slow model fits) and follows the measured cost per record: it shrinks at once and grows only
after a full batch proved the current size cheap.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from workers.observability import Metrics
from workers.scoring.router import Router
from workers.settings import StreamSettings

log = logging.getLogger("workers.stream")


class BatchSizer:
    def __init__(self, settings: StreamSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        #: records asked of the next poll
        self.limit = settings.max_records

    def calibrate(self, router: Router) -> None:
        """Time one predict call per version before consuming (and after each routing reload)."""
        rows = 256
        started = time.perf_counter()
        for v in router.versions:  # a record costs a predict per version that scores it (shadows: all)
            v.model.predict(np.zeros((rows, len(v.model.feature_names))))
        # Decoding and storing cost about as much again as predicting for fast models: count it twice.
        self.adapt(rows, 2 * (time.perf_counter() - started))
        log.info("batch size calibrated", extra={"max_records": self.limit})

    def adapt(self, n: int, seconds: float) -> None:
        """Fold in that ``n`` records took ``seconds`` to score (a slow model gets smaller batches)."""
        s = self.settings
        budget = max(s.max_poll_interval_ms / 1000 * 0.4 - s.max_wait_ms / 1000, 0.05)
        per_record = seconds / max(n, 1)
        limit = int(budget / per_record) if per_record > 0 else s.max_records
        new = max(1, min(s.max_records, limit))
        # Shrink at once; grow only after a full batch proved the current size is cheap.
        if new != self.limit and (new < self.limit or n >= self.limit):
            if new < self.limit:
                log.info("batch size reduced to stay within the poll interval",
                         extra={"max_records": new, "seconds_per_record": round(per_record, 6)})
            self.limit = new
        self.metrics.max_records.set(self.limit)

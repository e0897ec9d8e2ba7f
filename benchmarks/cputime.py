"""What the stage microbenchmarks (stream_stages.py, sink_rows.py) share: CPU time per item of a call."""

from __future__ import annotations

import time
from collections.abc import Callable


def cpu_us(fn: Callable[[], object], n: int, repeats: int) -> float:
    """The least process CPU time of ``repeats`` calls of ``fn``, in microseconds per item of ``n``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best / n * 1e6

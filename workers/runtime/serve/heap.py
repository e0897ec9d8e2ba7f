"""Keep the garbage collector's full collections off serve mode's request path.

A loaded model, the ASGI and gRPC stacks and the imported modules are hundreds of thousands of long-lived
objects. CPython's generation-2 collection walks all of them: under load at 32 connections it ran about once a
second and took 60-100 ms, which was our p99 (#19). ``gc.freeze()`` moves every object alive at that moment into
the permanent generation, which collections no longer walk. So it is called once everything long-lived exists:
after the model loaded and answered a first predict (its first call allocates too), and again after a hot reload
swapped the models in. Frozen objects are still freed by reference counting when nothing refers to them.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np

from workers.scoring.router import Router

log = logging.getLogger("workers.serve")


def warm_and_freeze(router: Router) -> None:
    """One predict per version (on one row of zeros), a full collection, then ``gc.freeze()``."""
    started = time.perf_counter()
    for version in router.versions:
        version.model.predict(np.zeros((1, len(version.model.feature_names))))
    gc.collect()
    gc.freeze()
    log.info("heap frozen", extra={"objects": gc.get_freeze_count(),
                                    "seconds": round(time.perf_counter() - started, 3)})

"""Serve freezes the heap (gc.freeze) once the model is loaded and warm, and again after a hot reload swapped
models in, so full collections no longer walk the models and the server's long-lived objects (heap.py).

Real model files, a real DataPlane and RoutingWatcher; no HTTP (the freeze is the dataplane's)."""

from __future__ import annotations

import asyncio
import gc
import shutil

import pytest

from workers.runtime.serve.dataplane import DataPlane
from workers.settings import load_settings


@pytest.fixture(autouse=True)
def unfreeze():
    yield
    gc.unfreeze()  # the rest of the test process collects as usual


def tracked(obj: object) -> bool:
    """Whether a collection would still walk ``obj`` (it is in generation 0, 1 or 2, not the permanent one)."""
    return any(o is obj for o in gc.get_objects())


def test_start_freezes_the_loaded_model_and_a_reload_freezes_the_new_one(models, tmp_path):
    path = str(tmp_path / "model.txt")
    shutil.copy(models["binary"], path)
    plane = DataPlane(load_settings({"model": {"path": path}, "routing": {"poll_s": 0}}))
    first = plane.routing.router
    gc.collect()
    assert tracked(first), "before start the router is an ordinary object"

    async def main():
        await plane.start()
        try:
            assert not tracked(first), "start froze the loaded router"
            frozen = gc.get_freeze_count()
            shutil.copy(models["binary_v2"], path)
            assert plane.routing.check(forced=True)
            new = plane.routing.current()
            assert new is not first
            assert not tracked(new), "the swap froze the reloaded router"
            assert gc.get_freeze_count() > frozen
        finally:
            await plane.stop()

    asyncio.run(main())

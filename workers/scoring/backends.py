"""Predict backends. ``lightgbm`` (the default) calls ``Booster.predict``; ``lleaves`` compiles the model to
native code with LLVM (about 5x faster on one core here) and is used only after it gives the same scores.

The compiled object is cached under ``cache_dir`` by the model's SHA-256, the lleaves/llvmlite versions and
the host CPU, so workers (and restarts) reuse it: compiling a 500-tree model takes over a minute, so
precompile it (``scoring-worker compile``) into a shared volume or the image. Any failure (lleaves not
installed, compile error, scores that differ by more than 1e-9 on a probe) falls back to LightGBM with a
warning; it never stops the worker.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("workers.model")
TOLERANCE = 1e-9

Predict = Callable[[np.ndarray], np.ndarray]


def _cache_key(sha256: str) -> str:
    from importlib.metadata import version

    import llvmlite.binding as llvm

    cpu = llvm.get_host_cpu_name()
    return f"{sha256[:32]}-lleaves{version('lleaves')}-llvmlite{version('llvmlite')}-{platform.machine()}-{cpu}"


def compile_lleaves(text: str, sha256: str, cache_dir: str) -> Any:
    """A compiled lleaves model for this model text, from the cache or compiled now (then cached)."""
    import lleaves

    os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(sha256)
    cached = os.path.join(cache_dir, f"{key}.so")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        model_file = os.path.join(tmp, "model.txt")
        with open(model_file, "w") as f:
            f.write(text)
        model = lleaves.Model(model_file=model_file)
        if os.path.exists(cached):
            model.compile(cache=cached)
            log.info("compiled model loaded from cache", extra={"cache": cached})
            return model
        scratch = os.path.join(tmp, "compiled.so")
        model.compile(cache=scratch)
        # Publish atomically: several workers may compile the same model at once.
        os.replace(scratch, cached)
        log.info("model compiled with lleaves", extra={"cache": cached})
        return model


def lleaves_predictor(booster, text: str, sha256: str, cache_dir: str, threads: int, n_features: int,
                      categorical: dict | None = None) -> Predict | None:
    """The lleaves predict function, or None (with a warning) when it cannot be used."""
    try:
        model = compile_lleaves(text, sha256, cache_dir)
    except Exception as exc:  # noqa: BLE001 - ImportError, LLVM or I/O errors all mean: use LightGBM
        log.warning("lleaves backend unavailable; using LightGBM", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return None

    def predict(matrix: np.ndarray) -> np.ndarray:
        return model.predict(matrix, n_jobs=threads)

    # Same scores or nothing: compare on a probe with missing values and every categorical code.
    rng = np.random.default_rng(0)
    probe = rng.normal(size=(512, n_features)) * 2
    probe[rng.random(probe.shape) < 0.05] = np.nan
    for j, cats in (categorical or {}).items():
        probe[:, j] = rng.integers(-1, len(cats) + 1 if cats else 5, size=512)
    expected = booster.predict(probe, num_threads=threads)
    try:
        got = predict(probe)
    except Exception as exc:  # noqa: BLE001
        log.warning("lleaves predict failed; using LightGBM", extra={"reason": f"{type(exc).__name__}: {exc}"})
        return None
    got = np.asarray(got).reshape(expected.shape)
    diff = float(np.nanmax(np.abs(got - expected))) if expected.size else 0.0
    if not diff <= TOLERANCE:
        log.warning("lleaves scores differ from LightGBM; using LightGBM", extra={"max_abs_diff": diff})
        return None
    return predict

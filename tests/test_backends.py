"""The compiled (lleaves) backend: same scores as LightGBM, cached by SHA-256, falls back when it cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import frame
from tests.scoring_util import TableScorer
from workers.scoring.model import load_model
from workers.settings import ModelSettings


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("compiled"))


@pytest.mark.parametrize("kind", ["binary", "regression", "multiclass", "categorical"])
def test_lleaves_scores_equal_lightgbm(models, cache, kind):
    model = load_model(ModelSettings(path=models[kind], backend="lleaves", cache_dir=cache))
    assert model.backend == "lleaves"
    df = frame(3000, seed=11, categorical=kind == "categorical")
    df.loc[[1, 7], "x0"] = np.nan
    booster = lgb.Booster(model_file=models[kind])
    expected = booster.predict(df[booster.feature_name()])
    out = TableScorer(model).score(pa.Table.from_pandas(df, preserve_index=False)).results
    got = np.array(out["scores"].to_pylist()) if kind == "multiclass" else out["score"].to_numpy()
    assert np.max(np.abs(got - expected)) <= 1e-9


def test_compiled_object_is_cached_by_sha256_and_reused(models, tmp_path):
    cache = str(tmp_path / "cache")
    started = time.monotonic()
    first = load_model(ModelSettings(path=models["binary"], backend="lleaves", cache_dir=cache))
    cold = time.monotonic() - started
    files = os.listdir(cache)
    assert [f for f in files if f.endswith(".so")] and first.sha256[:32] in files[0]
    started = time.monotonic()
    second = load_model(ModelSettings(path=models["binary"], backend="lleaves", cache_dir=cache))
    warm = time.monotonic() - started
    assert second.backend == "lleaves" and os.listdir(cache) == files
    print(f"\nlleaves load: {cold:.2f}s compiling, {warm:.3f}s from the cache")
    assert warm < cold


def test_falls_back_to_lightgbm_with_a_warning(models, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    model = load_model(ModelSettings(path=models["binary"], backend="lleaves", cache_dir=str(blocker)))
    assert model.backend == "lightgbm" and model.compiled is None
    assert "lleaves backend unavailable; using LightGBM" in caplog.text


def test_compile_command_fills_the_cache(models, tmp_path):
    cache = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-m", "workers", "compile", "--model", models["regression"],
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compiled" in proc.stdout and any(f.endswith(".so") for f in os.listdir(cache))

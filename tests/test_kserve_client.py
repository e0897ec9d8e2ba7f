"""KServe's own gRPC client (``kserve.InferenceGRPCClient``, kserve 0.21) against ``scoring-worker serve``
started the way deploy/kserve's ClusterServingRuntime starts it: the model in a folder laid out as KServe's
storage initializer leaves ``/mnt/models`` (a ``storageUri`` naming one file: ``<folder>/<file name>``), KServe's
argument spellings (``--model_dir``, ``--model_name``, ``--grpc_port``). Scores are compared with
``Booster.predict`` on the same file.

kserve pins old cloudevents/pandas/numpy, so it lives in its own venv, made here once under
``$XDG_CACHE_HOME/scoring-workers`` (``~/.cache`` by default; ``SCORING_TEST_CACHE`` overrides) with pip from the
package index. When that cannot be made (no index) the test skips loudly, and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import lightgbm as lgb
import numpy as np
import pytest

from tests.conftest import free_port, need, wait_port
from tests.helpers import FEATURES

HERE = pathlib.Path(__file__).resolve().parent
KSERVE = "kserve==0.21.0"


def cache_dir() -> pathlib.Path:
    base = os.environ.get("SCORING_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "scoring-workers")
    return pathlib.Path(base)


@pytest.fixture(scope="module")
def kserve_python() -> str:
    venv = cache_dir() / "kserve-0.21"
    python = venv / "bin" / "python"
    done = venv / ".installed"  # written last: a half-made venv is made again
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", KSERVE],
                           check=True, capture_output=True, text=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            tail = (getattr(exc, "stderr", "") or "")[-300:]
            need("kserve client venv", f"pip install {KSERVE} into {venv} failed: {tail}")
        done.write_text(KSERVE)
    return str(python)


def test_kserve_grpc_client_infers_fp32_and_fp64_reads_metadata_and_readiness(models, kserve_python, tmp_path):
    mnt = tmp_path / "mnt" / "models"
    mnt.mkdir(parents=True)
    shutil.copy(models["binary"], mnt / "model.bst")  # lgbserver's file name, from storageUri .../model.bst
    http, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", f"--model_dir={mnt}",
                             "--model_name=fraud-scorer", f"--http_port={http}", f"--grpc_port={grpc_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_port(http, 30) and wait_port(grpc_port, 30), "server did not start"
        x = np.random.default_rng(5).normal(size=(41, len(FEATURES)))
        np.save(tmp_path / "x.npy", x)
        peer = subprocess.run([kserve_python, str(HERE / "kserve_peer.py"), f"127.0.0.1:{grpc_port}",
                               "fraud-scorer", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
        assert peer.returncode == 0, peer.stderr[-3000:]
        got = json.loads(peer.stdout.splitlines()[-1])
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    booster = lgb.Booster(model_file=models["binary"])
    assert got["live"] and got["ready"] and got["model_ready"]
    meta = got["metadata"]
    assert meta["name"] == "fraud-scorer" and meta["platform"] == "lightgbm" and meta["versions"]
    assert [i[0] for i in meta["inputs"]] == FEATURES and meta["outputs"][0][0] == "score"
    fp32 = got["fp32_raw"]
    assert fp32["id"] == "fp32-raw" and fp32["model"] == "fraud-scorer" and fp32["version"] == meta["versions"][0]
    expected32 = booster.predict(x.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(fp32["outputs"]["score"], expected32, rtol=0, atol=1e-12)
    assert got["fp64_contents"]["id"] == "fp64-contents"
    np.testing.assert_allclose(got["fp64_contents"]["outputs"]["score"], booster.predict(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["fp64_columns"]["score"], booster.predict(x), rtol=0, atol=1e-12)
    assert got["unknown_model"][0] == "NOT_FOUND" and "no-such-model" in got["unknown_model"][1]


def test_model_dir_finds_the_one_model_file_in_the_layouts_kserve_leaves(tmp_path):
    from workers.errors import ModelError
    from workers.scoring.model_dir import find_model_file

    def folder(name: str, files: list[str]) -> str:
        root = tmp_path / name
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_text("tree\n")
        root.mkdir(exist_ok=True)
        return str(root)

    # storageUri naming one file; a prefix with a model and its notes; an unpacked archive (a sub-folder);
    # a file of another name as the folder's only file; a projected volume's hidden entries skipped.
    assert find_model_file(folder("one", ["model.bst"])) == str(tmp_path / "one" / "model.bst")
    assert find_model_file(folder("notes", ["README.md", "metrics.json", "model.txt"])).endswith("/model.txt")
    assert find_model_file(folder("tar", ["export/1/booster.lgb"])).endswith("/export/1/booster.lgb")
    assert find_model_file(folder("odd", ["booster"])).endswith("/odd/booster")
    assert find_model_file(folder("hidden", ["..2026_12_03/model.txt", ".keep", "model.txt"])).endswith(
        "/hidden/model.txt")
    for name, files, words in [("two", ["a.txt", "b/c.bst"], "2 candidate model files (a.txt, b/c.bst)"),
                               ("others", ["a.json", "b.json"], "2 candidate model files"),
                               ("empty", [], "holds no file")]:
        with pytest.raises(ModelError) as err:
            find_model_file(folder(name, files))
        assert err.value.setting == "SCORING_MODEL__DIR" and words in err.value.reason, err.value.reason
    with pytest.raises(ModelError, match="does not exist"):
        find_model_file(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="local folder"):
        find_model_file("s3://bucket/models")

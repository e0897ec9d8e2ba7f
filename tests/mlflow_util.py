"""A real MLflow tracking server for the registry tests, and a client that logs models into it.

mlflow 3.x would downgrade pyarrow in the test venv, so the server and the logging client run from their own
venv (``.venv-mlflow``, made by ``make .venv-mlflow/bin/.installed`` from tests/mlflow-requirements.txt, or any
Python with mlflow named by ``SCORING_TEST_MLFLOW_PYTHON``). The worker under test never imports mlflow: it talks
to the server's REST API, which is the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the mlflow venv: each op logs, registers or moves something; prints one JSON list of results.
_CLIENT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import lightgbm as lgb, mlflow, numpy as np
client = mlflow.MlflowClient()
out = []
for op in json.loads(sys.argv[1]):
    kind = op["op"]
    if kind == "booster":  # log a Booster (text model.lgb) and register it as a new version of op["name"]
        with mlflow.start_run() as run:
            info = mlflow.lightgbm.log_model(lgb.Booster(model_file=op["file"]), name="model",
                                             registered_model_name=op["name"])
        out.append({"run_id": run.info.run_id, "version": str(info.registered_model_version)})
    elif kind == "sklearn":  # an LGBMClassifier logged as is: pickled (or skops) by the flavor
        from lightgbm import LGBMClassifier
        x = np.random.default_rng(0).normal(size=(200, 8)); y = (x[:, 0] > 0).astype(int)
        clf = LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y)
        with mlflow.start_run():
            info = mlflow.lightgbm.log_model(clf, name="model", registered_model_name=op["name"],
                                             serialization_format=op.get("format", "pickle"))
        out.append({"version": str(info.registered_model_version)})
    elif kind == "alias":
        client.set_registered_model_alias(op["name"], op["alias"], op["version"])
        out.append({})
print("RESULT " + json.dumps(out))
"""


def mlflow_python() -> str | None:
    given = os.environ.get("SCORING_TEST_MLFLOW_PYTHON")
    for candidate in ([given] if given else []) + [str(ROOT / ".venv-mlflow" / "bin" / "python")]:
        if candidate and os.path.exists(candidate):
            return candidate
    return None


class MlflowServer:
    def __init__(self, python: str, folder: Path, port: int):
        self.python, self.port = python, port
        self.url = f"http://127.0.0.1:{port}"
        log = open(folder / "server.log", "w")
        # `mlflow server` is a console script beside the venv's python
        mlflow_bin = str(Path(python).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 90.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return True
            except OSError:
                time.sleep(0.3)
        return False

    def client(self, *ops: dict) -> list[dict]:
        """Run ``ops`` with the real mlflow client (one process for all of them: importing mlflow takes seconds)."""
        proc = subprocess.run([self.python, "-c", _CLIENT, json.dumps(list(ops))], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": self.url})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise AssertionError(f"mlflow client failed (exit {proc.returncode})")
        return json.loads(lines[-1].removeprefix("RESULT "))

    def log_booster(self, name: str, file: str) -> str:
        return self.client({"op": "booster", "name": name, "file": file})[0]["version"]

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client({"op": "alias", "name": name, "alias": alias, "version": version})

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()

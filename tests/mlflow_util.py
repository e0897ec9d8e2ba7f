"""A real MLflow tracking server for the registry tests, and a client that logs models into it.

mlflow 3.x would downgrade pyarrow in the test venv, so the server and the logging client run from their own
venv (``.venv-mlflow``, made by ``make .venv-mlflow/bin/.installed`` from tests/mlflow-requirements.txt, or any
Python with mlflow named by ``SCORING_TEST_MLFLOW_PYTHON``). The worker under test never imports mlflow: it talks
to the server's REST API, which is the point.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in the mlflow venv, started with the server (importing mlflow takes seconds: it overlaps the server's
# start-up and is paid once a session): reads one JSON list of ops a line; each op logs, registers or moves
# something; answers one line, RESULT and the JSON list of results (or ERROR and the traceback's last line).
_CLIENT = r"""
import json, sys, traceback, warnings
warnings.filterwarnings("ignore")
import lightgbm as lgb, mlflow, numpy as np
client = mlflow.MlflowClient()
print("READY", flush=True)
for line in sys.stdin:
    try:
        out = []
        for op in json.loads(line):
            kind = op["op"]
            if kind == "booster":  # log a Booster (text model.lgb) and register it as a new version of op["name"]
                with mlflow.start_run() as run:
                    # explicit requirements: inferring them loads the model in a subprocess (seconds per model)
                    info = mlflow.lightgbm.log_model(lgb.Booster(model_file=op["file"]), name="model",
                                                     registered_model_name=op["name"], pip_requirements=["lightgbm"])
                out.append({"run_id": run.info.run_id, "version": str(info.registered_model_version)})
            elif kind == "sklearn":  # an LGBMClassifier logged as is: pickled (or skops) by the flavor
                from lightgbm import LGBMClassifier
                x = np.random.default_rng(0).normal(size=(200, 8)); y = (x[:, 0] > 0).astype(int)
                clf = LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y)
                with mlflow.start_run():
                    info = mlflow.lightgbm.log_model(clf, name="model", registered_model_name=op["name"],
                                                     serialization_format=op.get("format", "pickle"),
                                                     pip_requirements=["lightgbm", "scikit-learn"])
                out.append({"version": str(info.registered_model_version)})
            elif kind == "alias":
                client.set_registered_model_alias(op["name"], op["alias"], op["version"])
                out.append({})
        print("RESULT " + json.dumps(out), flush=True)
    except Exception:
        traceback.print_exc()
        print("ERROR " + traceback.format_exc().strip().splitlines()[-1], flush=True)
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
        self.client_log = folder / "client.log"
        self.client_lock = threading.Lock()
        self.client_proc = subprocess.Popen([python, "-c", _CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=open(self.client_log, "w"), text=True,
                                            env={**os.environ, "MLFLOW_TRACKING_URI": self.url})

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
        """Run ``ops`` with the real mlflow client (the session's client process; calls are serialised)."""
        with self.client_lock:
            if self.client_proc.poll() is not None:
                raise AssertionError(f"mlflow client exited ({self.client_proc.returncode}): see {self.client_log}")
            assert self.client_proc.stdin is not None and self.client_proc.stdout is not None
            self.client_proc.stdin.write(json.dumps(list(ops)) + "\n")
            self.client_proc.stdin.flush()
            for line in self.client_proc.stdout:
                if line.startswith("RESULT "):
                    return json.loads(line.removeprefix("RESULT "))
                if line.startswith("ERROR "):
                    raise AssertionError(f"mlflow client failed: {line[6:].strip()} (see {self.client_log})")
            raise AssertionError(f"mlflow client exited: see {self.client_log}")

    def log_booster(self, name: str, file: str) -> str:
        return self.client({"op": "booster", "name": name, "file": file})[0]["version"]

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Move an alias with the registry's REST call (what MlflowClient.set_registered_model_alias sends), so a
        test does not pay a client process (importing mlflow takes seconds)."""
        body = json.dumps({"name": name, "alias": alias, "version": version}).encode()
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/registered-models/alias", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200, reply.status

    def stop(self) -> None:
        if self.client_proc.poll() is None:
            self.client_proc.kill()
            self.client_proc.wait()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(3)  # nothing to keep: the folder is thrown away
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


class RegistryProxy:
    """An HTTP proxy in front of the MLflow server for one worker, that the test steers: ``script(suffix,
    actions)`` makes the next requests whose path ends with ``suffix`` answer 503 ("fail") or wait until
    ``release()`` ("hold") before going through; ``cut()`` drops every request unanswered until ``restore()``.
    ``seen`` counts the requests per suffix scripted. Real traffic otherwise: every byte comes from the server."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.rules: dict[str, deque[str]] = {}
        self.seen: dict[str, int] = {}
        self.held = 0  # requests waiting for release() now
        self.released = threading.Event()
        self.up = True
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def script(self, suffix: str, *actions: str) -> None:
        with self.lock:
            self.rules.setdefault(suffix, deque()).extend(actions)
            self.seen.setdefault(suffix, 0)
            if "hold" in actions:
                self.released.clear()

    def release(self) -> None:
        self.released.set()

    def cut(self) -> None:
        self.up = False

    def restore(self) -> None:
        self.up = True

    def _action(self, path: str) -> str:
        with self.lock:
            for suffix, actions in self.rules.items():
                if path.split("?", 1)[0].endswith(suffix):
                    self.seen[suffix] += 1
                    return actions.popleft() if actions else "pass"
        return "pass"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if not self.up:
            h.close_connection = True  # no answer at all: the client sees the connection dropped
            return
        action = self._action(h.path)
        if action == "fail":
            body = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected by the test proxy"}'
            h.send_response(503)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if action == "hold":
            with self.lock:
                self.held += 1
            self.released.wait(120)
            with self.lock:
                self.held -= 1
        length = int(h.headers.get("Content-Length") or 0)
        data = h.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(h.command, h.path, body=data, headers=headers)
        reply = conn.getresponse()
        payload = reply.read()
        h.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                h.send_header(key, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
        conn.close()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

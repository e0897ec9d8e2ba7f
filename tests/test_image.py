"""The container image is built and run: batch on a mounted folder, stream against the host's broker and
PostgreSQL, serve (REST and gRPC) with the model where KServe puts it, all as OpenShift runs containers: an
arbitrary UID with group 0 (``--user 123456:0``, no passwd entry) on a read-only root filesystem with a tmpfs at
/tmp (``--read-only --tmpfs /tmp``, as the manifests' emptyDir; podman would add that tmpfs by itself, Docker not).

Engine: Docker when one answers; else podman + buildah (no registry is reachable here, so the Debian base
image is made locally with debootstrap, as ../shared/ENVIRONMENT.md describes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import psycopg
import pytest

from tests.conftest import _docker_answers, need
from tests.helpers import write_inputs
from tests.kafka_util import wait_for
from tests.test_stream import count, records

pytestmark = [pytest.mark.image, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "localhost/scoring-workers:test"
BASE = "docker.io/library/debian:bookworm-slim"
CA = "/etc/ssl/certs/ca-certificates.crt"


class Engine:
    def __init__(self, tmp: str):
        self.docker = _docker_answers()
        self.env = dict(os.environ)
        if not self.docker:
            missing = [t for t in ("podman", "buildah") if not shutil.which(t)]
            if missing:
                need("container engine", f"no Docker engine and no {', '.join(missing)} "
                                         "(apt-get install podman buildah debootstrap runc fuse-overlayfs uidmap)")
            conf = os.path.join(tmp, "containers.conf")
            with open(conf, "w") as f:
                f.write('[containers]\ndefault_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]\n'
                        '[engine]\nruntime = "runc"\n')
            self.env["CONTAINERS_CONF"] = conf
        self.cli = "docker" if self.docker else "podman"

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args[:4])}... failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                                 f"\n{proc.stderr[-3000:]}")
        return proc

    def ensure_base(self, tmp: str) -> None:
        if self.docker or self.run("podman", "image", "exists", BASE, check=False).returncode == 0:
            return
        if not shutil.which("debootstrap"):
            need("debootstrap", "needed to make the Debian base image locally")
        rootfs = os.path.join(tmp, "rootfs")
        self.run("debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian", timeout=900)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", "import", "-", "localhost/debian:bookworm-slim"], stdin=tar.stdout,
                             capture_output=True, env=self.env)
        tar.wait()
        assert imp.returncode == 0, imp.stderr
        self.run("podman", "tag", "localhost/debian:bookworm-slim", BASE)
        shutil.rmtree(rootfs, ignore_errors=True)

    def build(self) -> None:
        if self.docker:
            self.run("docker", "build", "-t", TAG, ROOT, timeout=1800)
            return
        self.run("buildah", "bud", "--isolation", "chroot", "--pull=never", "--layers",
                 "-v", f"{CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt",
                 "-t", TAG, ROOT, timeout=1800)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("image"))
    eng = Engine(tmp)
    eng.ensure_base(tmp)
    started = time.monotonic()
    eng.build()
    size = json.loads(eng.run(eng.cli, "image", "inspect", TAG).stdout)[0]["Size"]
    print(f"\nimage {TAG}: built in {time.monotonic() - started:.0f}s, {size / 2**20:.0f} MiB")
    return eng


OPENSHIFT_USER = "123456:0"  # restricted-v2 SCC: a UID of the namespace's range, group 0, no passwd entry


def run_args(eng: Engine, *extra: str) -> list[str]:
    # --read-only: the root filesystem is read-only; /tmp is a tmpfs (as an emptyDir would be).
    return [eng.cli, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", OPENSHIFT_USER, "--network", "host",
            *extra]


def test_image_is_small_non_root_and_has_no_build_tools(engine):
    info = json.loads(engine.run(engine.cli, "image", "inspect", TAG).stdout)[0]
    config = info.get("Config", {})
    assert config.get("User") == "10001:0"
    assert config.get("Entrypoint") == ["scoring-worker"]
    assert {"8080/tcp", "8081/tcp", "9000/tcp"} <= set(config.get("ExposedPorts") or {})
    probe = engine.run(engine.cli, "run", "--rm", "--entrypoint", "sh", TAG, "-c",
                       "id -u; command -v gcc cc pip pip3 || true; ls /root/.cache 2>/dev/null | wc -l")
    lines = probe.stdout.split()
    assert lines[0] == "10001" and lines[1:] == ["0"], probe.stdout


def test_batch_in_the_container_on_a_mounted_folder(engine, models, tmp_path):
    data = tmp_path / "data"
    write_inputs(str(data / "in"), files=3, rows=2000)
    shutil.copy(models["binary"], data / "model.txt")
    os.chmod(data, 0o777)
    for dirpath, dirnames, filenames in os.walk(data):
        for name in dirnames + filenames:
            os.chmod(os.path.join(dirpath, name), 0o777)
    proc = engine.run(*run_args(engine, "-v", f"{data}:/data"), TAG, "batch", "--model", "/data/model.txt",
                      "--input", "/data/in", "--output", "/data/out")
    summary = json.loads(proc.stdout)
    assert summary["rows_scored"] == 6000 and summary["files_scored"] == 3
    import pyarrow.dataset as ds

    ids = ds.dataset(str(data / "out"), format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == 6000 == len(set(ids))
    # Written by UID 123456 in group 0, group-writable: another UID of group 0 (the next pod) can resume.
    written = [os.path.join(d, f) for d, _, fs in os.walk(data / "out") for f in fs]
    assert written and all(os.stat(f).st_uid == 123456 and os.stat(f).st_gid == 0 for f in written)
    assert all(os.stat(f).st_mode & 0o020 for f in written), [oct(os.stat(f).st_mode) for f in written]
    # The root filesystem really is read-only for the worker.
    denied = engine.run(*run_args(engine), "--entrypoint", "sh", TAG, "-c", "touch /opt/x", check=False)
    assert denied.returncode != 0


def test_stream_in_the_container_against_host_broker_and_postgres(engine, models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=3)
    kafka.produce_json(topic, records(3000))
    data = tmp_path / "m"
    data.mkdir()
    shutil.copy(models["binary"], data / "model.txt")
    os.chmod(data, 0o755)
    os.chmod(data / "model.txt", 0o644)
    name = f"scoring-test-{pg_table}"
    engine.run(*[a for a in run_args(engine, "-d", "--name", name, "-v", f"{data}:/m:ro") if a != "--rm"], TAG,
               "stream", "--model", "/m/model.txt", "--bootstrap-servers", kafka.bootstrap, "--topic", topic,
               "--group", f"g-{pg_table}", "--sink", f"{pg_dsn}?table={pg_table}", "--session-timeout-ms", "6000",
               "--heartbeat-interval-ms", "2000", "--metrics-port", "0")
    try:
        wait_for(lambda: count(pg_dsn, pg_table)[0] >= 3000, 90, what="rows stored by the containerised worker")
        engine.run(engine.cli, "stop", "-t", "30", name)
        state = json.loads(engine.run(engine.cli, "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, engine.run(engine.cli, "logs", name, check=False).stderr[-2000:]
    finally:
        engine.run(engine.cli, "rm", "-f", name, check=False)
    assert count(pg_dsn, pg_table) == (3000, 3000)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f'SELECT count(DISTINCT "partition") FROM "{pg_table}"').fetchone()[0] == 3


def test_serve_in_the_container_finds_the_model_where_kserve_puts_it(engine, models, tmp_path):
    """As deploy/kserve's runtime starts it: --model-dir /mnt/models (mounted read-only, as KServe mounts the
    storage initializer's emptyDir), KServe's --model_name spelling; REST infer and gRPC infer answer."""
    import urllib.request

    import lightgbm as lgb
    import numpy as np
    import tritonclient.grpc as triton

    from tests.conftest import free_port, wait_port
    from tests.helpers import FEATURES

    mnt = tmp_path / "models"
    mnt.mkdir()
    shutil.copy(models["binary"], mnt / "model.txt")
    os.chmod(mnt, 0o755)
    os.chmod(mnt / "model.txt", 0o644)
    http, grpc_port = free_port(), free_port()
    name = f"scoring-serve-test-{http}"
    engine.run(*[a for a in run_args(engine, "-d", "--name", name, "-v", f"{mnt}:/mnt/models:ro") if a != "--rm"],
               TAG, "serve", "--model-dir=/mnt/models", "--model_name=churn", f"--port={http}",
               f"--grpc-port={grpc_port}")
    try:
        ready = wait_port(http, 60) and wait_port(grpc_port, 30)
        assert ready, engine.run(engine.cli, "logs", name, check=False).stderr[-2000:]
        x = np.random.default_rng(3).normal(size=(7, len(FEATURES)))
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP64",
                                       "data": x.ravel().tolist()}]}).encode()
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/churn/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "model never ready"
            time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/churn/infer", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            rest = json.loads(reply.read())
        booster = lgb.Booster(model_file=models["binary"])
        np.testing.assert_allclose(rest["outputs"][0]["data"], booster.predict(x), atol=1e-12)
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        tensor = triton.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("churn", [tensor]).as_numpy("score"), booster.predict(x),
                                   atol=1e-12)
        engine.run(engine.cli, "stop", "-t", "30", name)
        state = json.loads(engine.run(engine.cli, "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, engine.run(engine.cli, "logs", name, check=False).stderr[-2000:]
    finally:
        engine.run(engine.cli, "rm", "-f", name, check=False)

"""The container image is built and run: batch on a mounted folder, stream against the host's broker and
PostgreSQL, as a non-root user on a read-only root filesystem.

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


def run_args(eng: Engine, *extra: str) -> list[str]:
    # --read-only: the root filesystem is read-only; /tmp is a tmpfs (as an emptyDir would be).
    return [eng.cli, "run", "--rm", "--read-only", "--user", "10001:10001", "--network", "host", *extra]


def test_image_is_small_non_root_and_has_no_build_tools(engine):
    info = json.loads(engine.run(engine.cli, "image", "inspect", TAG).stdout)[0]
    config = info.get("Config", {})
    assert config.get("User") == "10001:10001"
    assert config.get("Entrypoint") == ["scoring-worker"]
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

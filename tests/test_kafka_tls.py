"""Stream mode over TLS against a real broker: Tansu behind a TLS-terminating front (tests/tls_util.py) that
every connection goes through, with a private CA, server verification (CA and hostname), mTLS, and each way
TLS can fail at start-up (one line naming the setting, the right exit code, well within 30 s).

The worker runs as a real process (``scoring-worker stream``); the tests' own clients are plain confluent-kafka
over the same TLS. SASL is not tested: Tansu cannot create users.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import orjson
import pytest

from tests.kafka_util import FAST_GROUP, KafkaHelper, wait_for
from tests.test_stream import BAD, records
from tests.test_stream_sinks import expected, sqlite_count

pytestmark = pytest.mark.kafka


@pytest.fixture
def tls(tls_broker):
    """The TLS broker with the front in its default mode (server certificate, no client certificate asked),
    and a helper whose clients talk TLS to it."""
    tls_broker.front.serve(tls_broker.pki.server)
    helper = KafkaHelper(tls_broker.bootstrap, tls_broker.client_config())
    yield tls_broker, helper
    helper.close()


def test_stream_over_tls_verifies_the_broker_and_scores_into_sqlite(models, tls, tmp_path):
    broker, kafka = tls
    topic = kafka.topic(partitions=2)
    good = records(300)
    kafka.produce_json(topic, good)
    kafka.produce(topic, BAD[:2])
    db = tmp_path / "scores.db"
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{topic}", "--sink",
                          f"sqlite:///{db}?table=scores", "--metrics-port", "0", env=broker.env(),
                          log=str(tmp_path / "w.log"))
    wait_for(lambda: sqlite_count(db) >= 300 or worker.poll() is not None, 60, what="300 rows in sqlite")
    assert worker.poll() is None, (tmp_path / "w.log").read_text()[-3000:]
    # The dead-letter producer talks TLS with the same settings: the bad records are on <topic>.dlq.
    dead = kafka.consume_all(f"{topic}.dlq", 2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert sorted(m.key() for m in dead) == sorted(k for k, _ in BAD[:2])
    rows = dict(sqlite3.connect(db).execute("select id, score from scores").fetchall())
    want = expected(models, good)
    assert rows.keys() == want.keys()
    assert max(abs(rows[k] - want[k]) for k in want) <= 1e-9


def test_mtls_worker_presents_its_certificate_to_consumer_kafka_sink_and_dead_letters(models, tls, tmp_path):
    broker, kafka = tls
    broker.front.serve(broker.pki.server, require_client=True)  # from here on, no certificate: no connection
    src, out = kafka.topic(partitions=2), kafka.topic(partitions=1, prefix="out")
    good = records(200, start=1000)
    kafka.produce_json(src, good)
    kafka.produce(src, BAD[:1])
    worker = kafka.worker("--model", models["binary"], "--topic", src, "--group", f"g-{src}", "--sink",
                          f"kafka://{out}", "--metrics-port", "0", env=broker.env(client=True),
                          log=str(tmp_path / "w.log"))
    got = kafka.consume_all(out, 200, timeout=60)
    dead = kafka.consume_all(f"{src}.dlq", 1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, (tmp_path / "w.log").read_text()[-3000:]
    scores = {m.key().decode(): orjson.loads(m.value())["score"] for m in got}
    want = expected(models, good)
    assert scores.keys() == want.keys() and len(got) == 200
    assert max(abs(scores[k] - want[k]) for k in want) <= 1e-9
    assert [m.key() for m in dead] == [BAD[0][0]] and dead[0].value() == BAD[0][1]


def _fails(broker, models, tmp_path, env: dict[str, str], topic: str = "tls-none") -> tuple[int, list[str], float]:
    cmd = [sys.executable, "-m", "workers", "stream", "--bootstrap-servers", broker.bootstrap, *FAST_GROUP,
           "--model", models["binary"], "--topic", topic, "--sink", f"sqlite:///{tmp_path}/s.db?table=scores",
           "--metrics-port", "0"]
    started = time.monotonic()
    proc = subprocess.run(cmd, env={**_clean_env(), **env}, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, [line for line in proc.stderr.splitlines() if line.startswith("error:")], took


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.upper().startswith("SCORING_")}


# (case, the front's certificate, does it demand a client certificate, worker env changes, exit code, named, says)
CASES = [
    ("wrong-ca", "server", False, {"SCORING_KAFKA__SSL_CAFILE": "other_ca"}, 2, "SCORING_KAFKA__SSL_CAFILE",
     "cannot verify"),
    ("expired", "expired", False, {}, 1, "SCORING_KAFKA__SSL_CAFILE", "expired"),
    ("wrong-host", "wrong_host", False, {}, 2, "SCORING_KAFKA__SSL_CHECK_HOSTNAME", "not valid for '127.0.0.1'"),
    # The bootstrap address (127.0.0.1) verifies, the advertised one (localhost) does not: librdkafka alone would
    # get the metadata and then retry the broker connection forever.
    ("advertised-wrong-host", "ip_only", False, {}, 2, "SCORING_KAFKA__SSL_CHECK_HOSTNAME",
     "not valid for 'localhost'"),
    ("no-client-cert", "server", True, {}, 2, "SCORING_KAFKA__SSL_CERTFILE", "demands a client certificate"),
    ("plaintext-to-tls", "server", False, {"SCORING_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT"}, 2,
     "SCORING_KAFKA__SECURITY_PROTOCOL", "speaks TLS"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_tls_failure_at_start_up_is_one_line_naming_the_setting(models, tls, tmp_path, case):
    broker, _ = tls
    _id, cert, require_client, change, code, named, says = case
    broker.front.serve(getattr(broker.pki, cert), require_client=require_client)
    env = broker.env()
    env |= {k: getattr(broker.pki, v) if v == "other_ca" else v for k, v in change.items()}
    rc, lines, took = _fails(broker, models, tmp_path, env)
    assert rc == code and len(lines) == 1, (rc, lines)
    assert named in lines[0] and says in lines[0], lines[0]
    assert took < 30, took  # measured: about 4 s each (2 s of them loading the worker)


def test_the_probe_reads_the_advertised_brokers_and_names_one_whose_certificate_lacks_its_name(tls):
    """librdkafka may take the metadata before ``list_topics`` asks and then try only the advertised brokers, so
    the probe asks for them itself (a Metadata v1 request over TLS); here they advertise localhost:<port>."""
    from workers.kafka_tls import advertised, probe_bootstrap
    from workers.settings import KafkaSettings

    broker, _ = tls
    broker.front.serve(broker.pki.ip_only)  # valid for 127.0.0.1 (the bootstrap), not for localhost
    host, port = broker.bootstrap.split(":")
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, security_protocol="SSL", ssl_cafile=broker.pki.ca)
    assert advertised(kafka, host, int(port)) == [("localhost", broker.front.port)]
    problem = probe_bootstrap(kafka)
    assert problem is not None and problem.setting == "SCORING_KAFKA__SSL_CHECK_HOSTNAME"
    assert "localhost" in str(problem)
    broker.front.serve(broker.pki.server)  # valid for both: nothing to name
    assert probe_bootstrap(kafka) is None


def test_wrong_host_passes_with_the_hostname_check_off(tls):
    """ssl_check_hostname=false: librdkafka's endpoint identification off, and the probe agrees."""
    from workers.kafka_tls import probe
    from workers.settings import KafkaSettings

    broker, _ = tls
    broker.front.serve(broker.pki.wrong_host)
    host, port = broker.bootstrap.split(":")
    on = KafkaSettings(bootstrap_servers=broker.bootstrap, security_protocol="SSL", ssl_cafile=broker.pki.ca)
    off = on.model_copy(update={"ssl_check_hostname": False})
    assert on.librdkafka_config()["ssl.endpoint.identification.algorithm"] == "https"
    assert off.librdkafka_config()["ssl.endpoint.identification.algorithm"] == "none"
    problem = probe(on, host, int(port))
    assert problem is not None and problem.setting == "SCORING_KAFKA__SSL_CHECK_HOSTNAME"
    assert probe(off, host, int(port)) is None
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(off.librdkafka_config())
    assert admin.list_topics(timeout=10).brokers  # librdkafka too accepts it with the check off


@pytest.mark.parametrize("case", ["missing-ca", "missing-cert", "cert-without-key", "wrong-key-password",
                                  "key-not-of-cert", "encrypted-key-no-password"])
def test_a_bad_tls_file_is_refused_before_any_connection(tls_broker, case, tmp_path):
    from workers.errors import ConfigError
    from workers.settings import KafkaSettings

    pki = tls_broker.pki
    base = {"security_protocol": "SSL", "ssl_cafile": pki.ca, "ssl_certfile": pki.client[0],
            "ssl_keyfile": pki.client[1], "ssl_key_password": "client-key-pass"}
    change, named = {
        "missing-ca": ({"ssl_cafile": str(tmp_path / "nope.pem")}, "SCORING_KAFKA__SSL_CAFILE"),
        "missing-cert": ({"ssl_certfile": str(tmp_path / "nope.pem")}, "SCORING_KAFKA__SSL_CERTFILE"),
        "cert-without-key": ({"ssl_keyfile": None}, "SCORING_KAFKA__SSL_KEYFILE"),
        "wrong-key-password": ({"ssl_key_password": "p4ss-Zq"}, "SCORING_KAFKA__SSL_KEY_PASSWORD"),
        "key-not-of-cert": ({"ssl_keyfile": pki.server[1]}, "SCORING_KAFKA__SSL_KEYFILE"),
        "encrypted-key-no-password": ({"ssl_key_password": None}, "SCORING_KAFKA__SSL_KEY_PASSWORD"),
    }[case]
    with pytest.raises(ConfigError) as err:
        KafkaSettings(**{**base, **change}).librdkafka_config()
    assert err.value.setting == named
    assert "p4ss-Zq" not in str(err.value) and "client-key-pass" not in str(err.value)  # no password shown


def test_check_names_the_tls_setting_and_passes_with_the_right_one(models, tls, tmp_path):
    broker, kafka = tls
    topic = kafka.topic(partitions=1)
    base = [sys.executable, "-m", "workers", "check", "--model", models["binary"], "--bootstrap-servers",
            broker.bootstrap, "--topic", topic, "--sink", f"sqlite:///{tmp_path}/s.db?table=scores"]
    ok = subprocess.run(base, env={**_clean_env(), **broker.env()}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok   broker: " in ok.stdout and "ok   topics: " in ok.stdout
    bad = subprocess.run(base, env={**_clean_env(), **broker.env(ca=broker.pki.other_ca)}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stdout + bad.stderr
    fail = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and fail[0].startswith("FAIL broker: SCORING_KAFKA__SSL_CAFILE: "), bad.stdout


def test_produce_tool_talks_tls_from_the_env_and_names_a_wrong_ca(tls, tmp_path):
    from tests.helpers import write_inputs

    broker, kafka = tls
    write_inputs(str(tmp_path / "in"), files=1, rows=40)
    topic = f"produce-tls-{time.time_ns()}"
    cmd = [sys.executable, "-m", "workers", "produce", "--bootstrap-servers", broker.bootstrap, "--topic", topic,
           "--input", str(tmp_path / "in"), "--partitions", "1"]
    bad = subprocess.run(cmd, env={**_clean_env(), **broker.env(ca=broker.pki.other_ca)}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.splitlines()[0].startswith("error: SCORING_KAFKA__SSL_CAFILE"), \
        bad.stderr
    assert len(bad.stderr.splitlines()) == 1, bad.stderr
    ok = subprocess.run(cmd, env={**_clean_env(), **broker.env()}, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith(f"produced 40 records and 0 malformed ones to {topic}"), \
        ok.stdout + ok.stderr
    assert len(kafka.consume_all(topic, 40)) == 40


def test_batch_queue_consumer_names_a_wrong_ca(models, tls, tmp_path):
    """The batch queue's consumer reaches the broker the same way (workers.kafka_tls.reach)."""
    broker, _ = tls
    cmd = [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--queue-topic", "files",
           "--output", str(tmp_path / "out"), "--bootstrap-servers", broker.bootstrap]
    started = time.monotonic()
    proc = subprocess.run(cmd, env={**_clean_env(), **broker.env(ca=broker.pki.other_ca)}, capture_output=True,
                          text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: SCORING_KAFKA__SSL_CAFILE") and "cannot verify" in lines[0], lines[0]
    assert time.monotonic() - started < 30


def test_a_client_certificate_the_broker_refuses_is_named(tls):
    """The front demands a client certificate for client authentication; the server's certificate (same CA,
    made for serverAuth only) is refused: the probe names SCORING_KAFKA__SSL_CERTFILE, and the right one passes."""
    from workers.kafka_tls import probe
    from workers.settings import KafkaSettings

    broker, _ = tls
    broker.front.serve(broker.pki.server, require_client=True)
    host, port = broker.bootstrap.split(":")
    wrong = KafkaSettings(bootstrap_servers=broker.bootstrap, security_protocol="SSL", ssl_cafile=broker.pki.ca,
                          ssl_certfile=broker.pki.server[0], ssl_keyfile=broker.pki.server[1])
    problem = probe(wrong, host, int(port))
    assert problem is not None and problem.setting == "SCORING_KAFKA__SSL_CERTFILE", problem
    assert "refused the client certificate" in str(problem)
    right = wrong.model_copy(update={"ssl_certfile": broker.pki.client[0], "ssl_keyfile": broker.pki.client_plain_key})
    assert probe(right, host, int(port)) is None

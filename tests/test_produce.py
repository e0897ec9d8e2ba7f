"""``scoring-worker produce``: rows become records on a real broker; an unreachable broker is one line, exit 1."""

from __future__ import annotations

import subprocess
import sys
import uuid

import orjson
import pytest

from tests.helpers import write_inputs


def produce(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers", "produce", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_an_unreachable_broker_is_one_line_naming_why_and_exit_1(tmp_path):
    """It once raised concurrent.futures.TimeoutError from the topic-creation future (a traceback), and
    librdkafka printed a line per reconnect attempt."""
    write_inputs(str(tmp_path / "in"), files=1, rows=10)
    proc = produce("--bootstrap-servers", "127.0.0.1:1", "--topic", "t", "--input", str(tmp_path / "in"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: Kafka at 127.0.0.1:1: ") and "Connection refused" in lines[0], lines[0]


@pytest.mark.kafka
def test_rows_and_malformed_records_reach_the_topic(kafka, tmp_path):
    write_inputs(str(tmp_path / "in"), files=2, rows=300)
    topic = f"produce-{uuid.uuid4().hex[:10]}"
    proc = produce("--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--input", str(tmp_path / "in"),
                   "--partitions", "3", "--limit", "500", "--bad", "7")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"produced 500 records and 7 malformed ones to {topic} ("), proc.stdout
    assert len(kafka.admin.list_topics(topic, timeout=10).topics[topic].partitions) == 3
    messages = kafka.consume_all(topic, expect=507)
    assert len(messages) == 507
    good = [m for m in messages if not m.key().startswith(b"bad-")]
    assert len(good) == 500 and len({m.key() for m in good}) == 500
    assert all(orjson.loads(m.value())["id"] == m.key().decode() for m in good)
    # Producing again to the topic that now exists is not an error (TOPIC_ALREADY_EXISTS is expected).
    again = produce("--bootstrap-servers", kafka.bootstrap, "--topic", topic, "--input", str(tmp_path / "in"),
                    "--limit", "5")
    assert again.returncode == 0, again.stderr
    assert len(kafka.consume_all(topic, expect=512)) == 512

"""1% poison of every kind the decoder can meet, plus a 10 MB record: all dead-lettered, the rest stored."""

from __future__ import annotations

import signal

import orjson
import pytest

from tests.faults.common import POISON, check, produce, stored_count
from tests.kafka_util import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def test_poison_records_are_dead_lettered_and_the_rest_stored(models, kafka, pg_dsn, pg_table, tmp_path):
    topic = kafka.topic(partitions=3)
    produced = produce(kafka, topic, 3 * 100 * len(POISON), bad_every=100)  # every poison kind 3 times
    # A 10 MB record (valid JSON, but the id field is missing): it must not block the partition.
    from confluent_kafka import Producer

    big = orjson.dumps({"blob": "x" * (10 * 1024 * 1024)})
    p = Producer({"bootstrap.servers": kafka.bootstrap, "message.max.bytes": 20 * 1024 * 1024})
    p.produce(topic, key=b"bad-huge", value=big)
    assert p.flush(30) == 0
    produced.bad[b"bad-huge"] = big
    produce(kafka, topic, 500, start=10_000_000, produced=produced, bad_every=0)  # valid records after it
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{pg_table}", "--sink",
                          f"{pg_dsn}?table={pg_table}", "--metrics-port", "0", log=str(tmp_path / "w.log"))
    wait_for(lambda: stored_count(pg_dsn, pg_table) >= len(produced.valid), 90, what="valid records stored")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    report = check("poison", produced, pg_dsn, pg_table, kafka, topic, models["binary"], kinds=len(POISON) + 1)
    report.assert_exact()
    dead = {m.key(): m for m in kafka.consume_all(f"{topic}.dlq", len(produced.bad), timeout=30)}
    huge = dict(dead[b"bad-huge"].headers())
    assert huge["error.value.truncated"] == str(len(big)).encode()
    assert huge["error.reason"] == b"missing id field 'id'"

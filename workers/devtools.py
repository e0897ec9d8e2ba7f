"""``scoring-worker produce``: publish Parquet rows as JSON records (for trying stream mode and benchmarks)."""

from __future__ import annotations

import datetime as dt
import time

import click
import orjson
import pyarrow.dataset as ds
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError


def _default(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def ensure_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, source: str, partitions: int, bad: int, limit: int | None,
            id_column: str) -> None:
    ensure_topic(bootstrap, topic, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024,
                             enable_idempotence=True, acks="all")
    sent = 0
    started = time.monotonic()
    # File by file: a dataset over the folder would unify schemas (one text column makes it text everywhere).
    files = ds.dataset(source, format="parquet").files
    for batch in (b for f in files for b in ds.dataset(f, format="parquet").to_batches()):
        for row in batch.to_pylist():
            producer.send(topic, key=str(row[id_column]).encode(), value=orjson.dumps(row, default=_default))
            sent += 1
            if limit and sent >= limit:
                break
        if limit and sent >= limit:
            break
    bad_values = [b"not json at all", b"[1, 2, 3]", orjson.dumps({"no_id": True}), b"\xff\xfe",
                  orjson.dumps({id_column: "bad-type", "f0": "abc"})]
    for i in range(bad):
        producer.send(topic, key=f"bad-{i}".encode(), value=bad_values[i % len(bad_values)])
    producer.flush()
    producer.close()
    click.echo(f"produced {sent:,} records and {bad} malformed ones to {topic} "
               f"({sent / max(time.monotonic() - started, 1e-9):,.0f}/s)")

"""``scoring-worker produce``: publish Parquet rows as JSON records (for trying stream mode and benchmarks)."""

from __future__ import annotations

import datetime as dt
import glob
import time

import click
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from workers.errors import ConfigError, ScoringError


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
    """Publish the rows of Parquet ``source``. ConfigError for a bad --input (checked before connecting),
    ScoringError when the broker cannot be reached."""
    if "://" not in source and not glob.glob(source):
        raise ConfigError("--input", f"{source} does not exist")
    try:
        # File by file: a dataset over the folder would unify schemas (one text column makes it text everywhere).
        files = ds.dataset(source, format="parquet").files
    except (OSError, ValueError, pa.ArrowInvalid) as exc:
        raise ConfigError("--input", f"cannot read {source} as Parquet: {' '.join(str(exc).split())}") from None
    if not files:
        raise ConfigError("--input", f"no Parquet files in {source}")
    for f in files:
        if id_column not in ds.dataset(f, format="parquet").schema.names:
            raise ConfigError("--id-column", f"{f} has no column {id_column!r}")
    try:
        _produce(bootstrap, topic, files, partitions, bad, limit, id_column)
    except KafkaError as exc:
        raise ScoringError(f"Kafka at {bootstrap}: {' '.join(str(exc).split())}") from None


def _produce(bootstrap: str, topic: str, files: list[str], partitions: int, bad: int, limit: int | None,
             id_column: str) -> None:
    ensure_topic(bootstrap, topic, partitions)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024,
                             enable_idempotence=True, acks="all")
    sent = 0
    started = time.monotonic()
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

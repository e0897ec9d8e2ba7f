"""``scoring-worker produce``: publish Parquet rows as JSON records (for trying stream mode and benchmarks).

Through librdkafka (confluent-kafka), configured by ``KafkaSettings.librdkafka_config`` like every other Kafka
client of the worker: ``--bootstrap-servers`` from the flag, TLS and SASL from the ``SCORING_KAFKA__*`` env vars.

A broker that cannot be reached is one line and exit 1 (ScoringError), after ``TIMEOUT_S``: librdkafka's own log
lines are silenced here (it would print one per reconnect attempt), and the last error it reported (say
"Connection refused") is named in that line instead. Trap: a future's ``result(timeout)`` raises
``concurrent.futures.TimeoutError``, not KafkaException, when it expires before librdkafka's own request
timeout does; both become the same ScoringError.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import glob
import time

import click
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from workers.errors import ConfigError, ScoringError
from workers.kafka_tls import probe_bootstrap
from workers.settings import KafkaSettings

# How long to wait for the broker: to create the topic, and for the last records to be acknowledged.
TIMEOUT_S = 30.0


def _default(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def ensure_topic(config: dict, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` unless it exists; KafkaException when the broker refuses or is away
    (a wait that outlasts ``TIMEOUT_S`` too, whichever timeout fires first)."""
    admin = AdminClient(config)  # kept in a name until the future resolves: a temporary fails with _DESTROY
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)],
                                  request_timeout=TIMEOUT_S)
    future = futures[topic]
    deadline = time.monotonic() + TIMEOUT_S + 5
    while not future.done() and time.monotonic() < deadline:
        admin.poll(0.2)  # serves the error callback, which names why the broker is away
    try:
        # The request's own timeout normally resolves the future first; this bound is the backstop.
        future.result(max(deadline - time.monotonic(), 0))
    except concurrent.futures.TimeoutError:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"topic {topic} not created in {TIMEOUT_S:.0f} s",
                                        fatal=False)) from None
    except KafkaException as exc:
        if not (exc.args and isinstance(exc.args[0], KafkaError)
                and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise


def produce(kafka: KafkaSettings, topic: str, source: str, partitions: int, bad: int, limit: int | None,
            id_column: str) -> None:
    """Publish the rows of Parquet ``source`` to the broker of ``kafka`` (TLS and SASL as the worker's).
    ConfigError for a bad --input (checked before connecting) or a TLS mistake (``workers.kafka_tls``),
    ScoringError when the broker cannot be reached."""
    bootstrap = kafka.bootstrap_servers
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
    last = _LastError()
    # log_level 0: librdkafka prints nothing itself (a line per failed reconnect); its errors reach `last`.
    config = {**kafka.librdkafka_config(), "log_level": 0, "error_cb": last}
    if kafka.security_protocol.endswith("SSL"):
        # Before the topic is created: librdkafka would wait out TIMEOUT_S and say only "transport failure".
        problem = probe_bootstrap(kafka)
        if problem is not None:
            raise problem
    try:
        _produce(config, topic, files, partitions, bad, limit, id_column)
    except KafkaException as exc:
        problem = probe_bootstrap(kafka)  # a TLS or protocol mistake: name its setting
        if problem is not None:
            raise problem from None
        err = exc.args[0] if exc.args else exc
        text = err.str() if isinstance(err, KafkaError) else str(err)
        if last.error is not None and last.error.str() not in text:
            text += f" (last error: {last.error.str()})"
        raise ScoringError(f"Kafka at {bootstrap}: {' '.join(text.split())}") from None


class _LastError:
    """librdkafka's error callback: keeps the most recent client error (what a timeout alone would hide)."""

    def __init__(self) -> None:
        self.error: KafkaError | None = None

    def __call__(self, err: KafkaError) -> None:
        # "1/1 brokers are down" says less than the connect failure before it: keep the more specific one.
        if err.code() != KafkaError._ALL_BROKERS_DOWN or self.error is None:
            self.error = err


class _Delivery:
    """Counts the records the broker refused (delivery reports arrive in poll/flush)."""

    def __init__(self) -> None:
        self.failed = 0
        self.first: KafkaError | None = None

    def __call__(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed += 1
            self.first = self.first or err


def _produce(config: dict[str, object], topic: str, files: list[str], partitions: int, bad: int,
             limit: int | None, id_column: str) -> None:
    ensure_topic(config, topic, partitions)
    producer = Producer({**config, "linger.ms": 20, "batch.size": 256 * 1024, "enable.idempotence": True,
                         "acks": "all"})
    delivery = _Delivery()

    def send(key: bytes, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=delivery)
                producer.poll(0)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)

    sent = 0
    started = time.monotonic()
    for batch in (b for f in files for b in ds.dataset(f, format="parquet").to_batches()):
        for row in batch.to_pylist():
            send(str(row[id_column]).encode(), orjson.dumps(row, default=_default))
            sent += 1
            if limit and sent >= limit:
                break
        if limit and sent >= limit:
            break
    bad_values = [b"not json at all", b"[1, 2, 3]", orjson.dumps({"no_id": True}), b"\xff\xfe",
                  orjson.dumps({id_column: "bad-type", "f0": "abc"})]
    for i in range(bad):
        send(f"bad-{i}".encode(), bad_values[i % len(bad_values)])
    left = producer.flush(TIMEOUT_S)
    if left or delivery.failed:
        reason = delivery.first.str() if delivery.first else f"{left} records not acknowledged in {TIMEOUT_S:.0f} s"
        raise ScoringError(f"{delivery.failed + left} of {sent + bad} records not delivered to {topic}: {reason}")
    click.echo(f"produced {sent:,} records and {bad} malformed ones to {topic} "
               f"({sent / max(time.monotonic() - started, 1e-9):,.0f}/s)")

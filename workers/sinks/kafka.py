"""Kafka sink (``kafka://topic``): one JSON message per result, keyed by id; at least once (a retry after a
broker failure may repeat a message, see ``producer``).

``write`` returns only after the producer has flushed and every send was acknowledged (acks=all), so
the stream runtime commits input offsets after the results are durable in the output topic. A crash
between the flush and the commit re-sends those results: consumers of the output topic see each
result at least once, keyed by id (compact the topic, or upsert downstream, for exactly once).

No batch ledger (``ledger()`` is None): a topic cannot answer "is this input finished", so batch mode refuses
a ``kafka://`` output at start-up.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka import Producer as _RdProducer

from workers.decode.registry import RegistryClient, RegistryUnavailable, SchemaRefused
from workers.errors import ConfigError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.settings import KafkaSettings, SchemaRegistrySettings
from workers.sinks.base import DirectUnit, Sink, UnitWriter, redact
from workers.sinks.regformat import FORMATS, REGISTRY_TYPE, STRATEGIES, columns, encoder, header, schema_text, subject
from workers.sinks.rowjson import json_rows, plain_columns


class Producer:
    """A librdkafka producer that knows whether everything sent so far was acknowledged.

    acks=all with retries until ``message.timeout.ms`` (5 min): a record the broker acknowledged is on every
    in-sync replica. Not the idempotent producer: against Tansu, a broker killed and restarted while a batch
    was in flight then acknowledged the retried batch without keeping it (dead letters missing in 2 of ~13
    runs of the broker-restart fault test; 0 of 12 without idempotence). Both outputs are at least once and
    keyed, so a retried duplicate is harmless where a lost record is not. Only failed deliveries call back.
    """

    def __init__(self, kafka: KafkaSettings, **extra: object):
        self.failed: list[KafkaError] = []
        self.producer = _RdProducer({**kafka.librdkafka_config(), "acks": "all", "enable.idempotence": False,
                                     "linger.ms": 5, "delivery.report.only.error": True,
                                     "on_delivery": self._delivered, **extra},
                                    logger=logging.getLogger("workers.kafka"))

    def _delivered(self, err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            self.failed.append(err)

    def send(self, topic: str, value: bytes | None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        sent: list[tuple[str, str | bytes | None]] | None = list(headers) if headers is not None else None
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=sent)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.05)
            except KafkaException as exc:
                raise SinkError(f"producing to {topic}: {exc.args[0].str() if exc.args else exc}") from None

    def send_all(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        """Send (key, value) messages in order with one ``produce_batch`` call (a Python ``produce`` call per
        message cost ~0.9 us more of CPU each, #19). When the local queue is full, the rest (from the first
        refused message on) goes one message at a time, each waiting for deliveries to make room, as ``send``
        does: at least once (a message after the first refused one that was queued anyway would go twice),
        never reordered, so the last result for a key stays the last. Sending the whole rest again on each pass
        cost CPU quadratic in the batch, a core spun while a paused broker let nothing drain (review)."""
        batch: list[dict[str, Any]] = [{"value": v, "key": k} for k, v in messages]
        try:
            queued = self.producer.produce_batch(topic, batch)
        except BufferError:  # the whole batch refused for a full queue
            first = 0
        except KafkaException as exc:
            raise SinkError(f"producing to {topic}: {exc.args[0].str() if exc.args else exc}") from None
        else:
            if queued == len(batch):
                return
            first = next(i for i, m in enumerate(batch) if m.get("_error") is not None)
            error = batch[first]["_error"]
            if error.code() != KafkaError._QUEUE_FULL:
                raise SinkError(f"producing to {topic}: {error.str()}")
        for m in batch[first:]:
            self.send(topic, m["value"], m["key"])

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every record sent so far is acknowledged; raise SinkError otherwise."""
        left = self.producer.flush(timeout)
        failed, self.failed = self.failed, []
        if failed:
            raise SinkError(f"{len(failed)} record(s) not delivered: {failed[0].str()}")
        if left:
            raise SinkError(f"{left} record(s) not acknowledged within {timeout:g} s")

    def check(self, timeout: float = 10.0) -> None:
        """Raise SinkError unless the broker answers a metadata request."""
        try:
            self.producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise SinkError(f"{exc.args[0].str() if exc.args else exc}") from None

    def close(self, timeout: float = 5.0) -> None:
        self.producer.flush(timeout)


def _key(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode()


#: librdkafka's default message.max.bytes; a larger record is refused by the producer, never delivered
MAX_MESSAGE = 1_000_000
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def message_keys(col: pa.ChunkedArray) -> list[bytes | None]:
    """Each id as a message key: text as its UTF-8 bytes (one Arrow cast for the column), bytes as they are, other
    values as their text, null as no key."""
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.cast(col, pa.large_binary()).to_pylist()
    return [_key(v) for v in col.to_pylist()]


def result_messages(scored: Scored) -> list[tuple[bytes | None, bytes]]:
    """(key, value) per result: the id as key, the result row as a JSON object (``rowjson.json_rows``: built
    column by column, the same bytes as one ``orjson.dumps`` of each row's mapping)."""
    table = scored.results
    return list(zip(message_keys(table.column("id")), json_rows(table), strict=True))


class KafkaSink(Sink):
    """``kafka://topic`` (JSON rows), or ``?format=avro|protobuf|jsonschema`` in the Confluent wire format with the
    result schema registered (``&subject=topic_name|record_name|topic_record_name``) on the first batch whose
    columns it has not seen (``workers.sinks.regformat``)."""

    def __init__(self, uri: str, kafka: KafkaSettings, setting: str, registry: object = None):
        rest, _, query = uri[len("kafka://"):].partition("?")
        self.topic = rest.strip("/")
        self.name = redact(uri)
        params = dict(parse_qsl(query, keep_blank_values=True))
        self.format = params.pop("format", "json").lower()
        self.strategy = params.pop("subject", "topic_name").lower()
        if params:
            raise ConfigError(setting, f"{self.name}: unknown parameter(s) {', '.join(sorted(params))}; "
                                       "use format= and subject=")
        if self.format not in FORMATS:
            raise ConfigError(setting, f"{self.name}: format={self.format!r}; use one of {', '.join(FORMATS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(setting, f"{self.name}: subject={self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.registry: RegistryClient | None = None
        if self.format != "json":
            if not isinstance(registry, SchemaRegistrySettings) or not registry.url:
                raise ConfigError("SCORING_SCHEMA_REGISTRY__URL", f"{self.name} writes format={self.format}: "
                                  "set the schema registry URL")
            self.registry = RegistryClient(registry)
        self.registered: dict[pa.Schema, tuple[bytes, Callable[[pa.Table], list[bytes]]]] = {}
        if not self.topic:
            raise ConfigError(setting, f"{self.name}: name the output topic, e.g. kafka://scores")
        if not _TOPIC.fullmatch(self.topic) or self.topic in (".", ".."):
            # e.g. kafka://user:password@host/topic: brokers come from the Kafka settings, not the URI
            raise ConfigError(setting, f"{self.name}: what follows kafka:// is not a topic name (letters, digits, "
                                       "'.', '_', '-'; at most 249); brokers and credentials come from the "
                                       "SCORING_KAFKA__* settings")
        self.max_message = int(kafka.librdkafka_config().get("message.max.bytes", MAX_MESSAGE))
        self.kafka = kafka
        self._producer: Producer | None = None

    @property
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self.kafka)
        return self._producer

    def write_batch(self, scored: Scored) -> None:
        """Send one message per result; rows too large for a message are rejected before any is sent."""
        messages = (result_messages(plain_columns(scored)) if self.registry is None
                    else self._wire_messages(scored.results))
        limit = self.max_message - 512  # room for the record's framing and headers
        big = {i: f"the result is {len(k or b'') + len(v)} bytes, more than a Kafka message holds ({limit})"
               for i, (k, v) in enumerate(messages) if len(k or b"") + len(v) > limit}
        if big:
            raise RowsRejected(big)
        self.producer.send_all(self.topic, messages)
        try:
            self.producer.flush(30)
        except SinkError as exc:
            raise SinkError(f"producing to {self.name}: {exc}") from None

    store = write_batch

    def _wire_messages(self, table: pa.Table) -> list[tuple[bytes | None, bytes]]:
        """(key, value) per result in the registry format; the schema of new columns registered first.
        ConfigError when the registry refuses the schema (incompatible), SinkError when it cannot answer."""
        known = self.registered.get(table.schema)
        if known is None:
            assert self.registry is not None
            cols = columns(table.schema)
            name = subject(self.topic, self.strategy)
            try:
                sid = self.registry.register(name, schema_text(self.format, cols), REGISTRY_TYPE[self.format])
            except SchemaRefused as exc:
                raise ConfigError("SCORING_STREAM__SINK", str(exc)) from None
            except RegistryUnavailable as exc:
                raise SinkError(f"{self.name}: {exc}") from None
            known = self.registered[table.schema] = (header(self.format, sid), encoder(self.format, cols))
        head, encode = known
        keys = message_keys(table.column("id"))
        return [(k, head + v) for k, v in zip(keys, encode(table), strict=True)]

    def begin(self, unit: str) -> UnitWriter:
        return DirectUnit(self.store)

    def check(self) -> None:
        """The broker answers; in a registry format, the registry too. Credentials it refuses or a certificate the
        CA file does not verify are ConfigError (start-up stops); a registry not answering yet is a SinkError
        (readiness false, the first batch waits like a sink outage)."""
        try:
            self.producer.check()
        except SinkError as exc:
            raise SinkError(f"cannot reach {self.name}: {exc}") from None
        if self.registry is not None:
            down = self.registry.check()
            if down:
                raise SinkError(f"{self.name}: {down}")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(5)

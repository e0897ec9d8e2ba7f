"""Kafka sink (``kafka://topic``): one JSON message per result, keyed by id; at least once (a retry after a
broker failure may repeat a message, see ``producer``).

``write`` returns only after the producer has flushed and every send was acknowledged (acks=all), so
the stream runtime commits input offsets after the results are durable in the output topic. A crash
between the flush and the commit re-sends those results: consumers of the output topic see each
result at least once, keyed by id (compact the topic, or upsert downstream, for exactly once).
"""

from __future__ import annotations

import datetime as dt

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from workers.errors import ConfigError, SinkError
from workers.scoring import Scored
from workers.settings import KafkaSettings
from workers.sinks.base import DirectUnit, Sink, UnitWriter


def producer(kafka: KafkaSettings, **extra: object) -> KafkaProducer:
    # acks=all with unbounded retries: a record the broker acknowledged is on every in-sync replica. Not the
    # idempotent producer: against Tansu, a broker killed and restarted while a batch was in flight then
    # acknowledged the retried batch without keeping it (dead letters missing in 2 of ~13 runs of the
    # broker-restart fault test; 0 of 12 without idempotence). Both outputs are at least once and keyed, so
    # a retried duplicate is harmless where a lost record is not.
    return KafkaProducer(**kafka.client_config(), enable_idempotence=False, acks="all", linger_ms=5,
                         retries=2**31 - 1, **extra)


def _default(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def result_messages(scored: Scored) -> list[tuple[bytes, bytes]]:
    """(key, value) per result: the id as key, the result row as a JSON object."""
    rows = scored.results.to_pylist()
    return [(str(row["id"]).encode(), orjson.dumps(row, default=_default)) for row in rows]


class KafkaSink(Sink):
    def __init__(self, uri: str, kafka: KafkaSettings, setting: str):
        self.topic = uri[len("kafka://"):].strip("/")
        if not self.topic:
            raise ConfigError(setting, f"{uri}: name the output topic, e.g. kafka://scores")
        self.name = uri
        self.kafka = kafka
        self._producer: KafkaProducer | None = None

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            try:
                self._producer = producer(self.kafka)
            except KafkaError as exc:
                raise SinkError(f"cannot connect to Kafka for {self.name}: {exc}") from exc
        return self._producer

    def store(self, scored: Scored) -> None:
        try:
            futures = [self.producer.send(self.topic, key=k, value=v) for k, v in result_messages(scored)]
            self.producer.flush(timeout=30)
            for f in futures:
                f.get(timeout=0)  # raises the send's error, if any
        except KafkaError as exc:
            raise SinkError(f"producing to {self.name}: {exc}") from exc

    def begin(self, unit: str) -> UnitWriter:
        return DirectUnit(self.store)

    def done(self, unit: str) -> str | None:
        raise ConfigError("SCORING_BATCH__OUTPUT", "kafka:// is a stream-mode sink; batch mode needs a ledger")

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        raise ConfigError("SCORING_BATCH__OUTPUT", "kafka:// is a stream-mode sink")

    def check(self) -> None:
        try:
            self.producer.partitions_for(self.topic)
        except KafkaError as exc:
            raise SinkError(f"cannot reach {self.name}: {exc}") from exc

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


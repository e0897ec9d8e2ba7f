"""The dead-letter topic: bad records with their original key, value and headers, plus why.

Headers added (all UTF-8 text): ``error.reason``, ``error.source.topic``, ``error.source.partition``,
``error.source.offset``, ``error.source.timestamp`` (ms), ``error.model_version``, ``error.time`` (ISO UTC).
A record with neither key nor value is sent with an empty value and ``error.value.null: true``; a
value over ``MAX_VALUE_BYTES`` is cut to that size with ``error.value.truncated: <original size>`` (a
dead letter the broker refuses would otherwise block the partition forever).
Flushed before the input offsets are committed, so a bad record is never lost; a crash between the
flush and the commit dead-letters it again (consumers can dedupe on source topic/partition/offset).
"""

from __future__ import annotations

import datetime as dt

from workers.errors import SinkError
from workers.sinks.kafka import Producer
from workers.sources.kafka import Record

MAX_VALUE_BYTES = 512 * 1024


def headers_for(record: Record, reason: str, model_version: str) -> list[tuple[str, bytes]]:
    ours = [
        ("error.reason", reason.encode()),
        ("error.source.topic", record.topic.encode()),
        ("error.source.partition", str(record.partition).encode()),
        ("error.source.offset", str(record.offset).encode()),
        ("error.source.timestamp", str(record.timestamp).encode()),
        ("error.model_version", model_version.encode()),
        ("error.time", dt.datetime.now(dt.UTC).isoformat().encode()),
    ]
    return [*(record.headers or []), *ours]


class DeadLetters:
    def __init__(self, producer: Producer, topic_for):
        self.producer = producer
        self.topic_for = topic_for

    def send(self, record: Record, reason: str, model_version: str) -> None:
        headers = headers_for(record, reason, model_version)
        value = record.value
        if value is None and record.key is None:
            value = b""
            headers.append(("error.value.null", b"true"))
        elif value is not None and len(value) > MAX_VALUE_BYTES:
            headers.append(("error.value.truncated", str(len(value)).encode()))
            value = value[:MAX_VALUE_BYTES]
        self.producer.send(self.topic_for(record.topic), value, record.key, headers)

    def flush(self) -> None:
        """Block until every dead letter sent so far is acknowledged; raise SinkError otherwise."""
        try:
            self.producer.flush(30)
        except SinkError as exc:
            raise SinkError(f"dead-letter produce failed: {exc}") from None

    def close(self) -> None:
        self.producer.close(5)

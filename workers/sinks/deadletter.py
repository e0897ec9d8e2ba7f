"""The dead-letter topic: bad records with their original key, value and headers, plus why.

Headers added (all UTF-8 text): ``error.reason``, ``error.source.topic``, ``error.source.partition``,
``error.source.offset``, ``error.source.timestamp`` (ms), ``error.model_version``, ``error.time`` (ISO UTC).
A record with neither key nor value is sent with an empty value and ``error.value.null: true``; a
value over ``MAX_VALUE_BYTES`` is cut to that size with ``error.value.truncated: <original size>`` (a
dead letter the broker refuses would otherwise block the partition forever). The whole dead letter is kept
under ``MAX_DEAD_LETTER_BYTES`` (below the producer's 1,000,000-byte ``message.max.bytes``: a larger one is
refused on every retry): the value is cut further when key and headers are large, and only when key and
headers alone do not fit, the record's own headers are left out (``error.headers.dropped: <count>``; its W3C
``traceparent`` and ``tracestate`` are kept, so the dead letter stays in the producer's trace) and then the key is
cut to ``MAX_KEY_BYTES`` (``error.key.truncated: <original size>``).
Flushed before the input offsets are committed, so a bad record is never lost; a crash between the
flush and the commit dead-letters it again (consumers can dedupe on source topic/partition/offset).
"""

from __future__ import annotations

import datetime as dt

from workers.errors import SinkError
from workers.sinks.kafka import Producer
from workers.sources.base import Record

MAX_VALUE_BYTES = 512 * 1024
MAX_DEAD_LETTER_BYTES = 900_000  # key + value + headers, with room for the record's framing
MAX_KEY_BYTES = 64 * 1024
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C Trace Context: kept even when the other headers must go


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


def _size(key: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    """Bytes of a dead letter besides its value (header names and values, the key)."""
    return len(key or b"") + sum(len(k) + len(v or b"") + 8 for k, v in headers)


class DeadLetters:
    def __init__(self, producer: Producer, topic_for):
        self.producer = producer
        self.topic_for = topic_for

    def send(self, record: Record, reason: str, model_version: str) -> None:
        headers = headers_for(record, reason, model_version)
        value, key = record.value, record.key
        if value is None and key is None:
            value = b""
            headers.append(("error.value.null", b"true"))
        if _size(key, headers) + 64 > MAX_DEAD_LETTER_BYTES:  # pathological key or headers: fit them first
            own = len(record.headers or [])
            if own:
                kept = [(k, v) for k, v in headers[:own] if k in TRACE_HEADERS and len(v or b"") <= 512]
                headers = [*kept, *headers[own:], ("error.headers.dropped", str(own - len(kept)).encode())]
            if key is not None and _size(key, headers) + 64 > MAX_DEAD_LETTER_BYTES:
                headers.append(("error.key.truncated", str(len(key)).encode()))
                key = key[:MAX_KEY_BYTES]
        room = min(MAX_VALUE_BYTES, MAX_DEAD_LETTER_BYTES - _size(key, headers) - 64)
        if value is not None and len(value) > room:
            headers.append(("error.value.truncated", str(len(value)).encode()))
            value = value[:room]
        self.producer.send(self.topic_for(record.topic), value, key, headers)

    def flush(self) -> None:
        """Block until every dead letter sent so far is acknowledged; raise SinkError otherwise."""
        try:
            self.producer.flush(30)
        except SinkError as exc:
            raise SinkError(f"dead-letter produce failed: {exc}") from None

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is still queued for up to ``timeout_s`` (shutdown passes what is left of its bound)."""
        self.producer.close(timeout_s)

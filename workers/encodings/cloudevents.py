"""CloudEvents over HTTP (binary, structured and batch modes), as Knative's KafkaSource sends them.

KafkaSource events: ``type=dev.knative.kafka.event``, ``source=/apis/v1/namespaces/NS/kafkasources/NAME#TOPIC``,
``id=partition:P/offset:O``, the record key in the ``key`` extension, Kafka headers as ``kafkaheader<name>``.
The data is the same JSON record stream mode reads.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from workers.encodings.oip import BadRequest

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")
_KAFKA_ID = re.compile(r"^partition:(\d+)/offset:(\d+)$")


@dataclass
class Event:
    attributes: dict[str, Any]
    data: bytes | None
    extensions: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> bytes | None:
        key = self.attributes.get("key")
        return key.encode() if isinstance(key, str) else None

    def kafka_position(self) -> tuple[str | None, int | None, int | None]:
        """(topic, partition, offset) when the event came from a KafkaSource, else (source, None, None)."""
        source = str(self.attributes.get("source", ""))
        m = _KAFKA_ID.match(str(self.attributes.get("id", "")))
        topic = source.rsplit("#", 1)[1] if "#" in source else source
        if m:
            return topic, int(m.group(1)), int(m.group(2))
        return topic, None, None


def _check(attrs: dict[str, Any]) -> None:
    missing = [a for a in REQUIRED if not attrs.get(a)]
    if missing:
        raise BadRequest(f"CloudEvent without required attribute(s) {missing}")
    if str(attrs["specversion"]) not in ("1.0", "0.3"):
        raise BadRequest(f"CloudEvents specversion {attrs['specversion']!r} is not supported (use 1.0)")


def _structured(obj: Any) -> Event:
    if not isinstance(obj, dict):
        raise BadRequest("a structured CloudEvent must be a JSON object")
    attrs = {k: v for k, v in obj.items() if k not in ("data", "data_base64")}
    _check(attrs)
    if "data_base64" in obj:
        try:
            data = base64.b64decode(obj["data_base64"], validate=True)
        except (ValueError, TypeError):
            raise BadRequest("data_base64 is not base64") from None
    elif "data" in obj:
        raw = obj["data"]
        data = raw.encode() if isinstance(raw, str) and not raw.lstrip().startswith("{") else (
            raw.encode() if isinstance(raw, str) else orjson.dumps(raw))
    else:
        data = None
    return Event(attrs, data)


def parse(headers: dict[str, str], body: bytes) -> tuple[list[Event], bool]:
    """(events, is_batch). ``headers`` must have lower-case names."""
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == BATCH:
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"batch body is not valid JSON: {exc}") from None
        if not isinstance(items, list):
            raise BadRequest("a CloudEvents batch must be a JSON array")
        return [_structured(i) for i in items], True
    if ctype == STRUCTURED:
        try:
            return [_structured(orjson.loads(body))], False
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"structured event is not valid JSON: {exc}") from None
    attrs = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    if not attrs:
        raise BadRequest("not a CloudEvent: no ce-* headers and no CloudEvents content type")
    _check(attrs)
    if ctype:
        attrs["datacontenttype"] = ctype
    return [Event(attrs, body)], False


def reply_attributes(event: Event, reply_type: str, source: str, subject: str | None) -> dict[str, str]:
    attrs = {"specversion": "1.0", "id": f"{event.attributes['id']}/result", "type": reply_type,
             "source": source, "datacontenttype": "application/json"}
    if subject is not None:
        attrs["subject"] = subject
    return attrs


def binary_headers(attrs: dict[str, str]) -> dict[str, str]:
    headers = {f"ce-{k}": v for k, v in attrs.items() if k != "datacontenttype"}
    headers["content-type"] = attrs.get("datacontenttype", "application/json")
    return headers


def structured(attrs: dict[str, str], data: Any) -> dict[str, Any]:
    return {**attrs, "data": data}

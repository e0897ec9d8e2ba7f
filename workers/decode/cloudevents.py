"""CloudEvents over HTTP (binary, structured and batch modes), as Knative's KafkaSource sends them.

KafkaSource events: ``type=dev.knative.kafka.event``, ``source=/apis/v1/namespaces/NS/kafkasources/NAME#TOPIC``,
``id=partition:P/offset:O``, the record key in the ``key`` extension, Kafka headers as ``kafkaheader<name>``.
The data is the same JSON record stream mode reads.

A malformed request (not JSON, not a CloudEvent) raises ``BadRequest``. Inside a batch, one malformed item
does not spoil the others: it comes back as an ``Event`` with ``error`` set, to be answered with that reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from workers.errors import BadRequest

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")
# ASCII digits only (``\d`` takes any Unicode digit), and only numbers Kafka can have: a partition is an int32,
# an offset an int64. Anything else is an id from some other source (no partition/offset), never an overflow.
_KAFKA_ID = re.compile(r"partition:([0-9]{1,10})/offset:([0-9]{1,19})")
MAX_PARTITION = 2**31 - 1
MAX_OFFSET = 2**63 - 1


# orjson reads integers beyond 64 bits as floats (18446744073709551621 -> 1.8446744073709552e+19) and cannot write
# them. A passthrough value is copied unchanged, so a JSON text holding a run of 19+ digits (the only way to spell
# such an integer) is read again by the standard library, which keeps every integer exact.
LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(text: bytes) -> Any:
    """JSON text -> value, as strictly as orjson (its errors: ``orjson.JSONDecodeError``), integers exact."""
    value = orjson.loads(text)
    if LONG_DIGITS.search(text):
        value = json.loads(text, parse_constant=_no_constant)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if hasattr(value, "item"):  # a numpy scalar
        return value.item()
    return str(value)


def dumps(value: Any) -> bytes:
    """orjson's JSON text of ``value``; one holding an integer beyond 64 bits (which orjson cannot write) is
    written by the standard library instead, in the same form."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, default=_plain, ensure_ascii=False, separators=(",", ":")).encode()


# Media types whose data can be a JSON record. text/plain and application/octet-stream are what senders put on
# records that carry no type of their own (a Kafka record without a content-type header); their bytes are
# parsed all the same (a record that is not JSON gets that reason). Any other type is refused.
_JSON_TYPES = ("application/json", "text/json", "text/plain", "application/octet-stream")


@dataclass
class Event:
    attributes: dict[str, Any]
    data: bytes | None
    extensions: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # a batch item that is not a usable CloudEvent: answered with this reason

    @property
    def locator(self) -> str:
        """``source#id``: what identifies an event (CloudEvents: unique per distinct event), so a redelivery
        keys the same stored error row."""
        return f"{self.attributes.get('source', '')}#{self.attributes.get('id', '')}"

    @property
    def key(self) -> bytes | None:
        key = self.attributes.get("key")
        return key.encode() if isinstance(key, str) else None

    @property
    def traceparent(self) -> tuple[Any, Any]:
        """(traceparent, tracestate) of the distributed-tracing extension, else of the Kafka record's headers as a
        KafkaSource forwards them (``kafkaheadertraceparent``); (None, None) without either."""
        a = self.attributes
        if a.get("traceparent"):
            return a["traceparent"], a.get("tracestate")
        return a.get("kafkaheadertraceparent"), a.get("kafkaheadertracestate")

    def kafka_position(self) -> tuple[str | None, int | None, int | None]:
        """(topic, partition, offset) when the event came from a KafkaSource, else (source, None, None)."""
        source = str(self.attributes.get("source", ""))
        m = _KAFKA_ID.fullmatch(str(self.attributes.get("id", "")))
        topic = source.rsplit("#", 1)[1] if "#" in source else source
        if m and int(m.group(1)) <= MAX_PARTITION and int(m.group(2)) <= MAX_OFFSET:
            return topic, int(m.group(1)), int(m.group(2))
        return topic, None, None


def _check(attrs: dict[str, Any]) -> None:
    """CloudEvents 1.0: id, source, type and specversion are required non-empty strings (an integer id is not
    an id: JSON's 7 and "7" would be one event), and specversion is "1.0" (0.3 spells its attributes otherwise)."""
    missing = [a for a in REQUIRED if a not in attrs or attrs[a] is None or attrs[a] == ""]
    if missing:
        raise BadRequest(f"CloudEvent without required attribute(s) {missing}")
    wrong = [a for a in REQUIRED if not isinstance(attrs[a], str)]
    if wrong:
        raise BadRequest(f"CloudEvent attribute(s) {wrong} must be strings, got "
                         f"{', '.join(dumps(attrs[a]).decode()[:40] for a in wrong)}")
    if attrs["specversion"] != "1.0":
        raise BadRequest(f"CloudEvents specversion {attrs['specversion'][:40]!r} is not supported (use 1.0)")


def _check_type(attrs: dict[str, Any]) -> None:
    ctype = attrs.get("datacontenttype")
    if ctype is None:
        return
    media = str(ctype).split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES and not media.endswith("+json"):
        raise BadRequest(f"datacontenttype {str(ctype)[:80]!r} is not JSON; the data must be a JSON record")


def _structured(obj: Any) -> Event:
    if not isinstance(obj, dict):
        raise BadRequest(f"a structured CloudEvent must be a JSON object, got JSON {type(obj).__name__}")
    attrs = {k: v for k, v in obj.items() if k not in ("data", "data_base64")}
    _check(attrs)
    _check_type(attrs)
    if "data_base64" in obj:
        try:
            data = base64.b64decode(obj["data_base64"], validate=True)
        except (ValueError, TypeError):
            raise BadRequest("data_base64 is not base64") from None
    elif "data" in obj:
        raw = obj["data"]
        # A string is the record's JSON text (some senders embed it so); anything else is the record itself.
        data = raw.encode() if isinstance(raw, str) else dumps(raw)
    else:
        raise BadRequest("CloudEvent without data (the data must be a JSON record)")
    return Event(attrs, data)


def _batch_item(i: int, obj: Any) -> Event:
    try:
        return _structured(obj)
    except BadRequest as exc:
        attrs = obj if isinstance(obj, dict) else {}
        eid, source = attrs.get("id"), attrs.get("source")
        # Every event has an id and a source, even this one: its own, else its position / "unknown".
        ident = eid if isinstance(eid, str) and eid else f"batch-item-{i}"
        source = source if isinstance(source, str) and source else "unknown"
        return Event({"id": ident, "source": source}, None, error=str(exc))


def parse(headers: dict[str, str], body: bytes) -> tuple[list[Event], bool]:
    """(events, is_batch). ``headers`` must have lower-case names."""
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == BATCH:
        try:
            items = loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"batch body is not valid JSON: {exc}") from None
        if not isinstance(items, list):
            raise BadRequest("a CloudEvents batch must be a JSON array")
        return [_batch_item(i, item) for i, item in enumerate(items)], True
    if ctype == STRUCTURED:
        try:
            return [_structured(loads(body))], False
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"structured event is not valid JSON: {exc}") from None
    attrs = {k[3:]: _from_header(v) for k, v in headers.items() if k.startswith("ce-")}
    if not attrs:
        raise BadRequest("not a CloudEvent: no ce-* headers and no CloudEvents content type")
    _check(attrs)
    if ctype:
        attrs["datacontenttype"] = ctype
    _check_type(attrs)
    return [Event(attrs, body)], False


def reply_attributes(event: Event, reply_type: str, source: str, subject: str | None) -> dict[str, str]:
    attrs = {"specversion": "1.0", "id": f"{event.attributes['id']}/result", "type": reply_type,
             "source": source, "datacontenttype": "application/json"}
    if subject is not None:
        attrs["subject"] = subject
    return attrs


def _to_header(value: str) -> str:
    """An attribute value as an HTTP header value: the CloudEvents HTTP binding percent-encodes (UTF-8) space,
    '"', '%' and everything outside printable ASCII (a header cannot carry a record id like 'é' or '\u0100')."""
    if all("!" <= c <= "~" and c not in '"%' for c in value):
        return value
    return "".join(c if "!" <= c <= "~" and c not in '"%' else
                   "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")) for c in value)


def _from_header(value: str) -> str:
    """A binary-mode attribute header -> its value: percent-decoded (UTF-8) as the binding says. The server hands
    header bytes over as latin-1 text; raw UTF-8 bytes (a sender skipping the encoding) are read as UTF-8 too."""
    if "%" not in value and value.isascii():
        return value
    raw = unquote_to_bytes(value.encode("latin-1", "replace"))
    return raw.decode("utf-8", "replace")


def binary_headers(attrs: dict[str, str]) -> dict[str, str]:
    headers = {f"ce-{k}": _to_header(str(v)) for k, v in attrs.items() if k != "datacontenttype"}
    headers["content-type"] = attrs.get("datacontenttype", "application/json")
    return headers


def structured(attrs: dict[str, str], data: Any) -> dict[str, Any]:
    return {**attrs, "data": data}

"""Structured logs: one JSON object per line on stderr. Extra fields go in ``extra={...}``."""

from __future__ import annotations

import datetime as dt
import logging
import sys

import orjson

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect at INFO/WARNING; keep ours readable.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # librdkafka (confluent-kafka) logs connection churn at INFO/NOTICE; its warnings and errors stay.
    logging.getLogger("workers.kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # kafka-python's event loop warns about its own slow tasks; not actionable for an operator.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)

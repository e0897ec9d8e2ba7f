"""Stream mode's spans (tracing on, ``workers.tracing``): one span per micro-batch, from its poll to its commit.

The batch span (``stream batch``, kind CONSUMER, Messaging conventions: ``messaging.system`` kafka,
``messaging.operation.type`` process, ``messaging.batch.message_count``, ``messaging.consumer.group.name``) links
to the trace of each record carrying a W3C ``traceparent`` header, the first ``OTEL_SPAN_LINK_COUNT_LIMIT``
(default 128) of them; ``scoring.trace_links`` counts the links made. Its children are the steps of the pipeline,
on whatever thread runs them: ``decode`` (main thread), ``score`` (score lane), ``dead letters`` and ``store``
(store lanes, one per attempt: a failed attempt is an error span and its retry a new one), ``commit`` (main).
It ends when the batch is committed, or, dropped uncommitted (stopping, revoked), with status ERROR saying so.

With tracing off, ``begin`` returns None and ``step`` a shared no-op context manager: nothing per record.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from workers import tracing
from workers.sources.base import Batch

_NOTHING = contextlib.nullcontext()


class BatchSpan:
    """The span of one micro-batch and the context its steps' spans are children of."""

    def __init__(self, tracer: Any, records: Batch, started_ns: int, group: str, model_version: str, sink: str):
        from opentelemetry.trace import SpanKind, set_span_in_context

        topics = sorted({m.topic() for m in records.messages})
        links = tracing.header_links((m.headers() for m in records.messages), tracing.max_links())
        attrs: dict[str, Any] = {
            "messaging.system": "kafka", "messaging.operation.type": "process", "messaging.operation.name": "process",
            "messaging.batch.message_count": len(records), "messaging.consumer.group.name": group,
            "messaging.destination.name": ",".join(topics), "scoring.model_version": model_version,
            "scoring.sink": sink, "scoring.trace_links": len(links),
        }
        self.tracer = tracer
        self.span = tracer.start_span("stream batch", kind=SpanKind.CONSUMER, links=links, attributes=attrs,
                                      start_time=started_ns)
        self.context = set_span_in_context(self.span)

    @contextlib.contextmanager
    def step(self, name: str, **attributes: Any) -> Iterator[Any]:
        """A child span of the batch for one step (exceptions recorded, status ERROR)."""
        with self.tracer.start_as_current_span(name, context=self.context, attributes=attributes) as span:
            yield span

    def end(self, committed: bool, stored_rows: int = 0, dead_lettered: int = 0, reason: str = "") -> None:
        self.span.set_attributes({"scoring.committed": committed, "scoring.rows_stored": stored_rows,
                                  "scoring.records_dead_lettered": dead_lettered})
        if not committed:
            tracing.set_error(self.span, reason or "dropped uncommitted: redelivered")
        self.span.end()


def begin(records: Batch, started_ns: int, group: str, model_version: str, sink: str) -> None:
    """Start the batch span of ``records`` (kept on ``records.trace``) when tracing is on."""
    tracer = tracing.tracer()
    if tracer is not None and records:
        records.trace = BatchSpan(tracer, records, started_ns, group, model_version, sink)


def step(records: Batch, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """The span of one step of ``records`` (a no-op context manager when the batch has no span)."""
    span: BatchSpan | None = records.trace
    return _NOTHING if span is None else span.step(name, **attributes)


def now_ns() -> int:
    return time.time_ns()

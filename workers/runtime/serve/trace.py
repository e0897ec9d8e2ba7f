"""Serve mode's spans (tracing on, ``workers.tracing``).

- One SERVER span per OIP infer or CloudEvents request, REST or gRPC, continuing the caller's W3C
  ``traceparent``: the HTTP header, gRPC metadata, or (a binary-mode CloudEvent sent without an HTTP
  ``traceparent``) the event's distributed-tracing extension ``ce-traceparent``. Events carrying a
  ``traceparent`` of another trace (structured and batch mode; KafkaSource's ``kafkaheadertraceparent``) are
  linked. Attributes: HTTP/RPC semantic conventions, ``scoring.model_version``, ``scoring.rows``,
  ``scoring.rejected``, ``scoring.sink``. An error answered to the caller is recorded on the span as an
  exception event with ``error.type``; status ERROR for 5xx / gRPC INTERNAL and UNAVAILABLE (a 4xx is the caller's
  mistake: the server span's status stays unset, as the conventions say).
- The batcher's predict call (``predict``, a root span) links to the span of every request it served and
  counts rows and requests.
Probes and metadata routes are not traced (Kubernetes calls them every few seconds).
With tracing off every function here returns at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from workers import tracing

_NOTHING = contextlib.nullcontext()


def _parent(carrier: Mapping[str, str], ce_binary: bool) -> Any:
    ctx = tracing.extract(carrier.get("traceparent"), carrier.get("tracestate"))
    if ctx is None and ce_binary:
        ctx = tracing.extract(carrier.get("ce-traceparent"), carrier.get("ce-tracestate"))
    return ctx


@contextlib.contextmanager
def _server_span(tracer: Any, name: str, parent: Any, attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                                      record_exception=False, set_status_on_exception=False) as span:
        yield span


def http_span(method: str, route: str, path: str, headers: Mapping[str, str]
              ) -> contextlib.AbstractContextManager[Any]:
    """The server span of one HTTP request (``headers``: Starlette's, case-insensitive)."""
    tracer = tracing.tracer()
    if tracer is None:
        return _NOTHING
    attrs = {"http.request.method": method, "http.route": route, "url.path": path, "url.scheme": "http"}
    return _server_span(tracer, f"{method} {route}", _parent(headers, route == "/"), attrs)


def grpc_span(method: str, metadata: Any) -> contextlib.AbstractContextManager[Any]:
    """The server span of one gRPC call of ``inference.GRPCInferenceService`` (``metadata``: invocation metadata)."""
    tracer = tracing.tracer()
    if tracer is None:
        return _NOTHING
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    attrs = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": method}
    return _server_span(tracer, f"inference.GRPCInferenceService/{method}", _parent(carrier, False), attrs)


def _current() -> Any:
    from opentelemetry.trace import get_current_span

    span = get_current_span()
    return span if span.is_recording() else None


def annotate(**attributes: Any) -> None:
    """Set ``scoring.<name>`` attributes on the current request's span."""
    if tracing.tracer() is None:
        return
    span = _current()
    if span is not None:
        span.set_attributes({f"scoring.{k}": v for k, v in attributes.items()})


def failed(exc: BaseException, server_fault: bool) -> None:
    """The error answered to the caller, on the current request's span."""
    if tracing.tracer() is None:
        return
    span = _current()
    if span is not None:
        tracing.record_error(span, exc, server_fault)


def status(span: Any, **attributes: Any) -> None:
    """The response's status attributes (``http.response.status_code`` or ``rpc.grpc.status_code``)."""
    if span is not None:
        span.set_attributes(attributes)


def link_events(traceparents: list[tuple[Any, Any]]) -> None:
    """Link the current request's span to the traces its CloudEvents carry (the parent's own trace excepted)."""
    if tracing.tracer() is None:
        return
    span = _current()
    if span is None:
        return
    own = span.get_span_context()
    seen = {(own.trace_id, own.span_id)}
    parent = getattr(span, "parent", None)
    if parent is not None:
        seen.add((parent.trace_id, parent.span_id))
    for tp, ts in traceparents[:tracing.max_links()]:
        sc = tracing.span_context(tp, ts)
        if sc is not None and (sc.trace_id, sc.span_id) not in seen:
            seen.add((sc.trace_id, sc.span_id))
            span.add_link(sc)


def requester() -> Any:
    """The span context of the current request (for the batcher's link), None when tracing is off."""
    if tracing.tracer() is None:
        return None
    span = _current()
    return span.get_span_context() if span is not None else None


@contextlib.contextmanager
def predict_span(requests: list[Any], rows: int, model_version: str) -> Iterator[Any]:
    """The span of one shared predict call, linked to each request it served (``requests``: span contexts)."""
    tracer = tracing.tracer()
    if tracer is None:
        yield None
        return
    from opentelemetry import context as otel_context
    from opentelemetry.trace import Link

    links = [Link(sc) for sc in requests if sc is not None][:tracing.max_links()]
    attrs = {"scoring.rows": rows, "scoring.requests": len(requests), "scoring.model_version": model_version}
    # A root span: it serves several traces at once, each linked (the batcher task's context is none of theirs).
    with tracer.start_as_current_span("predict", context=otel_context.Context(), links=links,
                                      attributes=attrs) as span:
        yield span

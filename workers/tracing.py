"""OpenTelemetry traces for every mode: off by default, on with the standard ``OTEL_*`` variables.

Switch: tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, or ``console`` to print spans
on stdout) and ``OTEL_SDK_DISABLED`` is not ``true``. Unset (the default) or ``none``: off, and free: the
OpenTelemetry packages are not even imported, and the hot paths only test ``tracer() is None``. (The SDK's own
default exporter is ``otlp``; a worker with no collector beside it would log export failures forever, so here
tracing is asked for explicitly.)

Everything else is the SDK's, read from the environment as every OpenTelemetry program reads it:
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL`` /
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``), ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_SERVICE_NAME`` (default ``scoring-workers``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*`` (the batch span processor), ``OTEL_SPAN_LINK_COUNT_LIMIT``.
A value this module checks and refuses (an unknown exporter, protocol or sampler, or tracing asked for without
the ``tracing`` extra installed) stops start-up with one line naming the variable (``ConfigError``, exit 2).

Propagation is W3C Trace Context (``traceparent``, ``tracestate``): read from Kafka record headers (stream
links), HTTP headers and gRPC metadata (serve parents), the CloudEvents distributed-tracing extension (serve
links); dead letters keep the record's headers, ``traceparent`` included.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

from workers.errors import ConfigError

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf", "grpc")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")
DEFAULT_LINKS = 128  # the SDK's default OTEL_SPAN_LINK_COUNT_LIMIT
INSTALL_HINT = "pip install 'scoring-workers[tracing]' (the image has it), or unset it"

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_max_links = DEFAULT_LINKS


def tracer() -> Any:
    """The tracer while tracing is on, else None: every instrumented path starts with this test."""
    return _tracer


def max_links() -> int:
    """At most this many links per span (``OTEL_SPAN_LINK_COUNT_LIMIT``, default 128): a stream batch links the
    first records of the batch that carry a ``traceparent``, up to this many, and counts them."""
    return _max_links


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces (see the module docstring); ConfigError for a value we refuse."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return False
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigError("OTEL_TRACES_EXPORTER", f"unknown exporter {unknown[0]!r}; use one of {', '.join(EXPORTERS)}")
    return any(n != "none" for n in names)


def _protocol(environ: Mapping[str, str]) -> tuple[str, str]:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip().lower()
        if value:
            if value not in PROTOCOLS:
                hint = " (http/json is not supported by the Python exporter)" if value == "http/json" else ""
                raise ConfigError(name, f"unknown protocol {value!r}; use http/protobuf or grpc{hint}")
            return name, value
    return "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"


def _check_sampler(environ: Mapping[str, str]) -> None:
    value = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if value and value not in SAMPLERS:
        raise ConfigError("OTEL_TRACES_SAMPLER", f"unknown sampler {value!r}; use one of {', '.join(SAMPLERS)}")
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg and value.endswith("traceidratio"):
        try:
            ok = 0.0 <= float(arg) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"must be a ratio from 0 to 1 (got {arg!r})")


def setup(mode: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on for ``mode`` (stream, serve, batch) when the environment asks for it; True when on.

    Raises ConfigError (exit 2) naming the variable when a value is refused or the packages are missing."""
    global _max_links
    if not requested(environ):
        return False
    _check_sampler(environ)
    exporters = [n.strip() for n in environ["OTEL_TRACES_EXPORTER"].lower().split(",") if n.strip() not in ("", "none")]
    protocol_var, protocol = _protocol(environ)
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    except ImportError:
        raise ConfigError("OTEL_TRACES_EXPORTER", "asks for traces but the OpenTelemetry packages are not "
                                                  f"installed: {INSTALL_HINT}") from None
    processors: list[Any] = []
    for name in exporters:
        if name == "console":
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
            continue
        try:
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore
        except ImportError:
            raise ConfigError(protocol_var, f"{protocol}: its OTLP exporter is not installed: {INSTALL_HINT}") from None
        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    limit = environ.get("OTEL_SPAN_LINK_COUNT_LIMIT", "").strip()
    try:
        _max_links = int(limit) if limit else DEFAULT_LINKS
    except ValueError:
        raise ConfigError("OTEL_SPAN_LINK_COUNT_LIMIT", f"must be a whole number (got {limit!r})") from None
    provider = TracerProvider(resource=resource(mode, Resource))
    for processor in processors:
        provider.add_span_processor(processor)
    install(provider)
    return True


def resource(mode: str, resource_cls: Any) -> Any:
    """The resource: ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` first, ``scoring-workers`` when they
    name no service, plus ``service.version`` and ``scoring.mode``."""
    from workers import __version__

    res = resource_cls.create({"service.version": __version__, "scoring.mode": mode})
    if str(res.attributes.get("service.name", "")).startswith("unknown_service"):
        res = res.merge(resource_cls({"service.name": "scoring-workers"}))
    return res


def install(provider: Any) -> None:
    """Trace through ``provider`` (``setup`` does this; unit tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    from workers import __version__

    _provider, _tracer = provider, provider.get_tracer("scoring-workers", __version__)


def shutdown() -> None:
    """Export what is still buffered and turn tracing off (also done at interpreter exit by the SDK)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


# -- propagation --------------------------------------------------------------------------------------------
def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def extract(traceparent: Any, tracestate: Any = None) -> Any:
    """The OpenTelemetry context a W3C ``traceparent`` (str or bytes) continues, None when absent or invalid."""
    parent = _text(traceparent)
    if not parent:
        return None
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": parent.strip()}
    state = _text(tracestate)
    if state:
        carrier["tracestate"] = state
    ctx = TraceContextTextMapPropagator().extract(carrier)
    return ctx if get_current_span(ctx).get_span_context().is_valid else None


def span_context(traceparent: Any, tracestate: Any = None) -> Any:
    """The remote span context of a ``traceparent``, None when absent or invalid."""
    ctx = extract(traceparent, tracestate)
    if ctx is None:
        return None
    from opentelemetry.trace import get_current_span

    return get_current_span(ctx).get_span_context()


def header_links(headers_of: Iterable[list[tuple[str, bytes]] | None], limit: int) -> list[Any]:
    """Links to the traces of the first ``limit`` records whose Kafka headers carry a valid ``traceparent``."""
    from opentelemetry.trace import Link

    links: list[Any] = []
    for headers in headers_of:
        if len(links) >= limit:
            break
        if not headers:
            continue
        # Kafka allows a header twice (a producer and an interceptor each adding one): the first valid one counts.
        parents = [value for name, value in headers if name == "traceparent"]
        state = next((value for name, value in headers if name == "tracestate"), None)
        sc = next((c for c in (span_context(p, state) for p in parents) if c is not None), None)
        if sc is not None:
            links.append(Link(sc))
    return links


def record_error(span: Any, exc: BaseException, error: bool = True) -> None:
    """The exception as an event on ``span``, and (``error``) the span's status ERROR with its message."""
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__name__)
    if error:
        span.set_status(Status(StatusCode.ERROR, str(exc)[:300]))


def set_error(span: Any, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, message[:300]))


_NOTHING = contextlib.nullcontext()


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name``, child of the current one (an exception leaving it is recorded, status ERROR);
    ``attributes`` become ``scoring.<name>``. A shared no-op context manager (yielding None) when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes={f"scoring.{k}": v for k, v in attributes.items()})

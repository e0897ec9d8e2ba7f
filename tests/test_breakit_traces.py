"""Break-it review of traces (workers/tracing.py): OTEL_* spellings users write, and malformed ``traceparent``
values as they arrive in HTTP headers, gRPC metadata, CloudEvents and Kafka record headers. Real SDK objects
(TracerProvider, the W3C propagator), no mocks."""

from __future__ import annotations

import pytest

from workers import tracing

TID, SID = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
GOOD = f"00-{TID:032x}-{SID:016x}-01"

MALFORMED = [
    f"ff-{TID:032x}-{SID:016x}-01",                # version ff is forbidden
    f"00-{0:032x}-{SID:016x}-01",                  # all-zero trace id
    f"00-{TID:032x}-{0:016x}-01",                  # all-zero span id
    GOOD.upper(),                                  # uppercase hex is invalid
    GOOD + "-extra",                               # version 00 has exactly four fields
    "00-" + "a" * 100_000 + f"-{SID:016x}-01",     # huge
    "x" * 1_000_000,
    "",
    "  ",
    "00--" + "-" * 50,
    "\u00e9\u00e9-" + GOOD[3:],                    # non-ASCII
    b"\xff\xfe\x00" + GOOD.encode()[3:],           # non-UTF-8 bytes (a Kafka header)
    123,
]


@pytest.mark.parametrize("value", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_traceparent_is_ignored_never_raised(value):
    assert tracing.extract(value) is None
    assert tracing.span_context(value, b"\xff\xfe") is None


def test_good_traceparent_with_bad_tracestate_still_continues():
    sc = tracing.span_context(GOOD.encode(), b"\xff\xfe not=state=," * 1000)
    assert sc is not None and sc.trace_id == TID and sc.span_id == SID


def test_future_version_with_extra_fields_is_accepted():
    """W3C: a version above 00 may carry more fields; a reader takes the first four."""
    sc = tracing.span_context(f"01-{TID:032x}-{SID:016x}-01-what-ever")
    assert sc is not None and sc.trace_id == TID


def test_kafka_headers_duplicated_and_undecodable_do_not_raise():
    headers = [("traceparent", b"\xff\xfe"), ("traceparent", GOOD.encode()), ("tracestate", b"\x80")]
    links = tracing.header_links([headers, [("traceparent", b"\xff")], None, []], 10)
    assert len(links) == 1 and links[0].context.trace_id == TID


def test_duplicated_kafka_traceparent_a_bad_last_one_does_not_hide_a_good_first():
    """Two traceparent headers (a producer and an interceptor each adding one): the valid one is linked."""
    headers = [("traceparent", GOOD.encode()), ("traceparent", b"garbage")]
    assert len(tracing.header_links([headers], 10)) == 1


@pytest.mark.parametrize("env, on", [
    ({"OTEL_TRACES_EXPORTER": "OTLP"}, True),
    ({"OTEL_TRACES_EXPORTER": " otlp , console "}, True),
    ({"OTEL_TRACES_EXPORTER": "Console"}, True),
    ({"OTEL_TRACES_EXPORTER": "None"}, False),
    ({"OTEL_TRACES_EXPORTER": "none,none"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
])
def test_exporter_spellings(env, on):
    try:
        assert tracing.setup("serve", env) is on
    finally:
        tracing.shutdown()


@pytest.mark.parametrize("sampler", ["parentbased_traceidratio", "PARENTBASED_TRACEIDRATIO", "TraceIdRatio"])
def test_sampler_spelled_in_any_case_is_the_one_asked_for(monkeypatch, sampler):
    """The check accepts any case; the SDK must then use that sampler, not silently fall back to always_on."""
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        assert tracing.setup("serve", env) is True
        described = tracing._provider.sampler.get_description()
        assert "TraceIdRatioBased{0.25}" in described, described
    finally:
        tracing.shutdown()

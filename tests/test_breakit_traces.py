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


# -- a real traced server whose collector is unreachable ---------------------------------------------------
BAD_HEADERS = [f"ff-{TID:032x}-{SID:016x}-01", f"00-{0:032x}-{0:016x}-00", GOOD.upper(), GOOD + "-x-y",
               "00-" + "f" * 4000 + "-01", "garbage"]


@pytest.fixture(scope="module")
def unreachable_collector_server(models):
    """``serve`` in its own process, traces on over OTLP/HTTP to a port where nothing listens."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port, wait_port

    http, grpc_port = free_port(), free_port()
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "OTLP,none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "SCORING_SERVE__GRPC_PORT": str(grpc_port)}
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--model", models["binary"], "--port",
                             str(http)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert wait_port(http, 30) and wait_port(grpc_port, 30), "server did not start"
    from pathlib import PurePosixPath
    yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", PurePosixPath(models["binary"]).stem
    proc.terminate()
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("serve did not stop within 20 s of SIGTERM with an unreachable collector")
    assert code == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""


def _infer_body(n: int) -> bytes:
    import numpy as np
    import orjson

    from tests.helpers import FEATURES

    x = np.random.default_rng(n).normal(size=(n, len(FEATURES)))
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP64", "data": x.tolist()}]})


@pytest.mark.slow
def test_rest_and_grpc_bad_traceparent_same_scores_never_blocked(unreachable_collector_server):
    import time

    import httpx
    import numpy as np
    import tritonclient.grpc as triton

    from tests.helpers import FEATURES

    base, grpc_addr, name = unreachable_collector_server
    url = f"{base}/v2/models/{name}/infer"
    want = httpx.post(url, content=_infer_body(3)).json()["outputs"]
    for header in BAD_HEADERS:
        t0 = time.monotonic()
        r = httpx.post(url, content=_infer_body(3), headers={"traceparent": header, "tracestate": b"\xc3\xa9=\xff"},
                       timeout=10)
        assert r.status_code == 200, (header[:40], r.text)
        assert r.json()["outputs"] == want and time.monotonic() - t0 < 5
    client = triton.InferenceServerClient(grpc_addr)
    x = np.random.default_rng(5).normal(size=(4, len(FEATURES)))
    inp = triton.InferInput("x", list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    ref = client.infer(name, [inp]).as_numpy("score")
    for header in BAD_HEADERS:
        out = client.infer(name, [inp], headers={"traceparent": header})
        assert (out.as_numpy("score") == ref).all()


@pytest.mark.slow
def test_cloudevents_bad_traceparents_binary_structured_batch(unreachable_collector_server):
    import httpx
    import orjson

    base, _, _ = unreachable_collector_server
    from tests.test_tracing_e2e import record

    value = record(1)
    binary = {"ce-specversion": "1.0", "ce-id": "p:0/o:1", "ce-type": "t", "ce-source": "s",
              "content-type": "application/json"}
    want = httpx.post(f"{base}/", content=value, headers=binary)
    assert want.status_code == 200, want.text
    for header in BAD_HEADERS:
        r = httpx.post(f"{base}/", content=value, headers={**binary, "ce-traceparent": header, "traceparent": header})
        assert r.status_code == 200 and r.json()["score"] == want.json()["score"], r.text  # scored_at differs
    odd_values = [*BAD_HEADERS, 12, None, {"a": 1}, ["x"], True]
    for tp in odd_values:
        event = {"specversion": "1.0", "id": "e", "type": "t", "source": "s", "traceparent": tp,
                 "tracestate": tp, "kafkaheadertraceparent": tp, "data": orjson.loads(value)}
        r = httpx.post(f"{base}/", content=orjson.dumps(event),
                       headers={"content-type": "application/cloudevents+json"})
        assert r.status_code == 200, (tp, r.text)
    batch = [{"specversion": "1.0", "id": f"e{i}", "type": "t", "source": "s", "traceparent": tp,
              "data": orjson.loads(value)} for i, tp in enumerate(odd_values)]
    r = httpx.post(f"{base}/", content=orjson.dumps(batch), headers={"content-type": "application/cloudevents-batch+json"})
    assert r.status_code == 200, r.text

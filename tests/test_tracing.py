"""Traces, in process: the switch and its refusals (workers/tracing.py), and stream mode's span tree on the
scripted source and sink of ``workers.testing`` with the SDK's in-memory exporter (a real StreamWorker, real
decoding, scoring, lanes and commits; only the broker and the store are the scripted ones, see that module).
The same spans against a real OTLP receiver and a real broker: tests/test_tracing_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from workers import tracing
from workers.errors import ConfigError
from workers.runtime.stream.worker import StreamWorker
from workers.settings import load_settings
from workers.sinks.deadletter import MAX_DEAD_LETTER_BYTES, DeadLetters
from workers.sources.base import Record
from workers.testing import Script, SinkRefuses, rec


def parent_header(trace_id: int, span_id: int) -> bytes:
    return f"00-{trace_id:032x}-{span_id:016x}-01".encode()


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.shutdown()


def test_off_unless_an_exporter_is_named():
    assert tracing.setup("stream", {}) is False and tracing.tracer() is None
    assert tracing.setup("stream", {"OTEL_TRACES_EXPORTER": "none"}) is False
    assert tracing.setup("stream", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is False
    # The endpoint alone does not switch it on (documented: OTEL_TRACES_EXPORTER does).
    assert tracing.setup("stream", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}) is False
    assert tracing.tracer() is None


def test_on_with_otlp_and_the_service_name_defaults():
    try:
        assert tracing.setup("serve", {"OTEL_TRACES_EXPORTER": "otlp",
                                       "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) is True
        assert tracing.tracer() is not None
        from opentelemetry.sdk.resources import Resource

        res = tracing.resource("batch", Resource)
        assert res.attributes["scoring.mode"] == "batch"
        if not os.environ.get("OTEL_SERVICE_NAME"):
            assert res.attributes["service.name"] == "scoring-workers"
    finally:
        tracing.shutdown()
    assert tracing.tracer() is None


@pytest.mark.parametrize(("env", "variable"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "udp"},
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
     "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SPAN_LINK_COUNT_LIMIT": "many"}, "OTEL_SPAN_LINK_COUNT_LIMIT"),
])
def test_a_refused_value_names_its_variable(env, variable):
    with pytest.raises(ConfigError) as err:
        tracing.setup("stream", env)
    assert err.value.setting == variable
    assert tracing.tracer() is None


def test_packages_missing_and_traces_asked_for_is_one_line_and_exit_2(tmp_path, models):
    """The OpenTelemetry packages are hidden from the worker by a package of the same name that fails to import
    (first on PYTHONPATH): what an image without the ``tracing`` extra sees."""
    fake = tmp_path / "hide" / "opentelemetry"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hide'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OTEL_TRACES_EXPORTER": "otlp"}
    out = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                          str(tmp_path / "in"), "--output", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: OTEL_TRACES_EXPORTER: "), out.stderr
    assert "scoring-workers[tracing]" in lines[0]


def test_stream_batch_span_children_links_and_attributes(models, spans):
    traced = {f"r{i}": (0xA000 + i, 0xB000 + i) for i in range(0, 12, 3)}  # every third record has a traceparent
    items = []
    for i in range(12):
        headers = [("traceparent", parent_header(*traced[f"r{i}"]))] if f"r{i}" in traced else None
        items.append(rec("t", i % 2, {"id": f"r{i}", **{f"x{k}": float(i + k) for k in range(8)}},
                         headers=headers))
    items.append(rec("t", 0, b"not json", key=b"bad", headers=[("traceparent", parent_header(0xC0DE, 0xD0))]))
    items.append(SinkRefuses())
    items.append(rec("t", 1, {"id": "refused", **{f"x{k}": 1.0 for k in range(8)}}))
    script = Script(items, partitions={"t": 2})
    settings = load_settings({"model": {"path": models["binary"]}, "stream": {
        "topics": ["t"], "metrics_port": None, "max_records": 100, "max_wait_ms": 5, "shutdown_timeout_s": 2.0}})
    worker = StreamWorker(settings, source=script.source(), sink=script.sink, dead_letters=script.dead_letters(),
                          burst=True)
    assert worker.run() == 0
    finished = spans.get_finished_spans()
    batches = [s for s in finished if s.name == "stream batch"]
    assert batches, [s.name for s in finished]
    assert sum(s.attributes["messaging.batch.message_count"] for s in batches) == 14
    assert sum(s.attributes["scoring.rows_stored"] for s in batches) == 12
    assert sum(s.attributes["scoring.records_dead_lettered"] for s in batches) == 2
    assert all(s.attributes["scoring.committed"] and s.parent is None for s in batches)
    assert {s.attributes["scoring.model_version"] for s in batches} == {worker.router.primary.model.version}
    assert {s.attributes["scoring.sink"] for s in batches} == {script.sink.name}
    linked = {(link.context.trace_id, link.context.span_id) for s in batches for link in s.links}
    assert linked == {*traced.values(), (0xC0DE, 0xD0)}
    ids = {s.context.span_id: s for s in batches}
    children = [s for s in finished if s.parent is not None and s.parent.span_id in ids]
    names = {s.name for s in children}
    assert {"decode", "score", "store", "dead letters", "commit"} <= names, names
    for child in children:
        assert child.context.trace_id == ids[child.parent.span_id].context.trace_id
        parent = ids[child.parent.span_id]
        assert parent.start_time <= child.start_time and child.end_time <= parent.end_time
    scored = [s for s in children if s.name == "score"]
    assert sum(s.attributes["scoring.rows"] for s in scored) == 13  # the refused row is scored, then refused
    assert sum(s.attributes["scoring.rejected"] for s in scored) == 1  # not JSON
    stores = [s for s in children if s.name == "store"]
    assert any(s.status.status_code.name == "ERROR" and s.events for s in stores)  # the refused write
    assert len(script.letters) == 2  # (the dead letters' headers: tests/test_tracing_e2e.py, on a real broker)


def test_dead_letter_keeps_traceparent_when_its_other_headers_must_go():
    """A record whose headers alone overflow the dead letter: they are dropped, its trace headers kept."""
    sent = []

    class Producer:
        """Captures what DeadLetters hands the Kafka producer (the size rule under test is ours, not Kafka's)."""

        def send(self, topic, value, key, headers):
            sent.append(headers)

    big = [("blob", b"x" * (MAX_DEAD_LETTER_BYTES // 2)), ("blob2", b"y" * (MAX_DEAD_LETTER_BYTES // 2)),
           ("traceparent", parent_header(1, 2)), ("tracestate", b"k=v")]
    DeadLetters(Producer(), lambda t: t + ".dlq").send(Record("t", 0, 5, -1, b"k", b"v", big), "why", "v1")
    headers = dict(sent[0])
    assert headers["traceparent"] == parent_header(1, 2) and headers["tracestate"] == b"k=v"
    assert "blob" not in headers and headers["error.headers.dropped"] == b"2"


def test_header_links_stop_at_the_limit_and_skip_invalid():
    good = [[("traceparent", parent_header(i + 1, i + 1))] for i in range(10)]
    bad = [[("traceparent", b"00-zz-yy-01")], None, [("other", b"x")],
           [("traceparent", f"00-{0:032x}-{1:016x}-01".encode())]]  # an all-zero trace id is invalid
    links = tracing.header_links([*bad, *good], limit=4)
    assert [link.context.trace_id for link in links] == [1, 2, 3, 4]


def test_batch_failed_file_is_an_error_span_and_the_run_says_so(models, spans, tmp_path):
    from tests.helpers import write_inputs
    from workers.runtime.batch import batch_command

    write_inputs(str(tmp_path / "in"), files=1, rows=120, row_group=50)
    (tmp_path / "in" / "broken.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    settings = load_settings({"model": {"path": models["binary"]}, "batch": {
        "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "batch_rows": 50}})
    assert batch_command(settings) == 1
    finished = spans.get_finished_spans()
    run = next(s for s in finished if s.name == "batch run")
    files = {s.attributes["scoring.input"].rsplit("/", 1)[-1]: s for s in finished if s.name == "batch file"}
    assert set(files) == {"broken.parquet", "part-000.parquet"}
    broken, good = files["broken.parquet"], files["part-000.parquet"]
    assert broken.status.status_code.name == "ERROR" and broken.events[0].name == "exception"
    assert broken.events[0].attributes["exception.type"].endswith("InputError")
    assert good.status.status_code.name == "UNSET" and good.attributes["scoring.rows"] == 120
    assert all(s.parent.span_id == run.context.span_id for s in files.values())
    groups = [s for s in finished if s.name == "row group batch" and s.parent.span_id == good.context.span_id]
    assert [g.attributes["scoring.first_row"] for g in groups] == [0, 50, 100]
    assert run.status.status_code.name == "ERROR" and "broken.parquet" in run.status.description
    assert run.attributes["scoring.files_failed"] == 1 and run.attributes["scoring.rows_scored"] == 120

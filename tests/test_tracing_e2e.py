"""Traces end to end: real workers in their own processes export over OTLP to a real receiver in this one
(tests/otlp_util.py: oteltap for OTLP/HTTP-protobuf, a grpcio TraceService for OTLP/gRPC). Checked: parent/child
relations, links to the producers' trace ids, attributes, errors; stream on the Tansu broker, serve over HTTP
and gRPC, CloudEvents, batch."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import PurePosixPath

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import free_port, wait_port
from tests.helpers import FEATURES, write_inputs
from tests.kafka_util import wait_for
from tests.otlp_util import GrpcCollector, HttpReceiver, attrs, by_id

pytestmark = pytest.mark.slow


@pytest.fixture
def otlp():
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


def new_parent() -> tuple[bytes, bytes, str]:
    """A caller's (trace id, span id, traceparent)."""
    trace_id, span_id = os.urandom(16), os.urandom(8)
    return trace_id, span_id, f"00-{trace_id.hex()}-{span_id.hex()}-01"


def record(i: int) -> bytes:
    return orjson.dumps({"id": f"r{i}", **{f: float(i % 7) + k for k, f in enumerate(FEATURES)}})


def test_stream_batches_link_producer_traces_and_dead_letters_keep_traceparent(models, kafka, otlp, tmp_path):
    topic = kafka.topic(partitions=2)
    parents = {}
    for i in range(40):
        headers = None
        if i % 4 == 0:
            trace_id, span_id, header = new_parent()
            parents[f"r{i}"] = (trace_id, span_id)
            headers = [("traceparent", header.encode())]
        kafka.producer.produce(topic, key=f"r{i}".encode(), value=record(i), headers=headers)
    bad_trace, bad_span, bad_header = new_parent()
    kafka.producer.produce(topic, key=b"bad", value=b"{not json", headers=[("traceparent", bad_header.encode())])
    assert kafka.producer.flush(30) == 0
    group = f"g-{uuid.uuid4().hex[:8]}"
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", group, "--sink",
                          str(tmp_path / "out"), env=otlp.env(OTEL_SERVICE_NAME="stream-under-test"),
                          log=str(tmp_path / "w.log"))
    try:
        spans = otlp.wait(lambda s: sum(attrs(b).get("messaging.batch.message_count", 0)
                                        for b in s if b.name == "stream batch") >= 41
                          and sum(1 for b in s if b.name == "commit") >= sum(1 for b in s if b.name == "stream batch"),
                          60, "stream batch spans of all 41 records")
        dead = kafka.consume_all(f"{topic}.dlq", 1)
    finally:
        worker.terminate()
        worker.wait(30)
    batches = [s for s in spans if s.name == "stream batch"]
    assert all(s.parent_span_id == b"" for s in batches)
    linked = {(link.trace_id, link.span_id) for b in batches for link in b.links}
    assert linked == {*parents.values(), (bad_trace, bad_span)}
    assert sum(attrs(b)["scoring.trace_links"] for b in batches) == len(parents) + 1
    a = [attrs(b) for b in batches]
    assert sum(x["scoring.rows_stored"] for x in a) == 40 and sum(x["scoring.records_dead_lettered"] for x in a) == 1
    assert {x["messaging.consumer.group.name"] for x in a} == {group}
    assert {x["messaging.destination.name"] for x in a} == {topic}
    assert all(x["scoring.model_version"] and x["scoring.sink"] and x["scoring.committed"] for x in a)
    ids = by_id(batches)
    children = [s for s in spans if s.parent_span_id in ids]
    assert {"decode", "score", "dead letters", "store", "commit"} <= {s.name for s in children}
    for child in children:
        parent = ids[child.parent_span_id]
        assert child.trace_id == parent.trace_id
        assert parent.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano \
            <= parent.end_time_unix_nano
    assert sum(attrs(s)["scoring.rejected"] for s in children if s.name == "dead letters") == 1
    assert len(dead) == 1 and dict(dead[0].headers())["traceparent"] == bad_header.encode()


@pytest.fixture(scope="module")
def traced_server(models):
    receiver = HttpReceiver()
    http, grpc_port = free_port(), free_port()
    env = {**os.environ, **receiver.env(), "SCORING_SERVE__GRPC_PORT": str(grpc_port)}
    proc = subprocess.Popen([sys.executable, "-m", "workers", "serve", "--model", models["binary"], "--port",
                             str(http)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert wait_port(http, 30) and wait_port(grpc_port, 30), "server did not start"
    yield receiver, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", PurePosixPath(models["binary"]).stem
    proc.terminate()
    assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    receiver.close()


def infer_body(n: int) -> bytes:
    x = np.random.default_rng(n).normal(size=(n, len(FEATURES)))
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP64", "data": x.tolist()}]})


def server_span(receiver: HttpReceiver, trace_id: bytes, what: str):
    spans = receiver.wait(lambda s: any(x.trace_id == trace_id and x.kind == 2 for x in s), 20, what)
    return next(x for x in spans if x.trace_id == trace_id and x.kind == 2), spans  # 2: SPAN_KIND_SERVER


def test_rest_infer_continues_the_callers_trace_and_predict_links_to_it(traced_server):
    receiver, base, _, name = traced_server
    trace_id, span_id, header = new_parent()
    r = httpx.post(f"{base}/v2/models/{name}/infer", content=infer_body(3), headers={"traceparent": header})
    assert r.status_code == 200, r.text
    span, _ = server_span(receiver, trace_id, "the REST server span")
    assert span.parent_span_id == span_id and span.name == "POST /v2/models/{name}/infer"
    a = attrs(span)
    assert a["http.response.status_code"] == 200 and a["scoring.rows"] == 3 and a["scoring.model_version"]
    spans = receiver.wait(lambda s: any(p.name == "predict" and any(link.span_id == span.span_id for link in p.links)
                                        for p in s), 20, "the predict span linked to the request")
    predict = next(p for p in spans if p.name == "predict" and any(lk.span_id == span.span_id for lk in p.links))
    assert predict.parent_span_id == b"" and attrs(predict)["scoring.rows"] >= 3


def test_rest_bad_request_is_recorded_on_its_span(traced_server):
    receiver, base, _, name = traced_server
    trace_id, _, header = new_parent()
    r = httpx.post(f"{base}/v2/models/{name}/infer", content=b'{"inputs": []}', headers={"traceparent": header})
    assert r.status_code == 400
    span, _ = server_span(receiver, trace_id, "the 400's server span")
    assert attrs(span)["http.response.status_code"] == 400 and attrs(span)["error.type"] == "BadRequest"
    assert [e.name for e in span.events] == ["exception"]
    assert span.status.code != 2  # a 4xx is the caller's: status not ERROR (semantic conventions)


def test_grpc_infer_continues_the_traceparent_in_its_metadata(traced_server):
    import tritonclient.grpc as triton

    receiver, _, grpc_addr, name = traced_server
    trace_id, span_id, header = new_parent()
    client = triton.InferenceServerClient(grpc_addr)
    x = np.random.default_rng(5).normal(size=(4, len(FEATURES)))
    inp = triton.InferInput("x", list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    out = client.infer(name, [inp], headers={"traceparent": header})
    assert out.as_numpy("score").shape[0] == 4
    span, _ = server_span(receiver, trace_id, "the gRPC server span")
    assert span.parent_span_id == span_id and span.name == "inference.GRPCInferenceService/ModelInfer"
    a = attrs(span)
    assert a["rpc.system"] == "grpc" and a["rpc.grpc.status_code"] == 0 and a["scoring.rows"] == 4


def test_cloudevents_binary_continues_ce_traceparent_and_batch_links_every_event(traced_server):
    receiver, base, _, _ = traced_server
    trace_id, span_id, header = new_parent()
    value = record(1)
    r = httpx.post(f"{base}/", content=value, headers={
        "ce-specversion": "1.0", "ce-id": "partition:0/offset:1", "ce-type": "dev.knative.kafka.event",
        "ce-source": "/apis/v1/namespaces/ns/kafkasources/ks#topic", "ce-traceparent": header,
        "content-type": "application/json"})
    assert r.status_code == 200, r.text
    span, _ = server_span(receiver, trace_id, "the CloudEvent's server span")
    assert span.parent_span_id == span_id and attrs(span)["scoring.events"] == 1

    caller, caller_span, caller_header = new_parent()
    events, linked = [], set()
    for i in range(3):
        t, s, h = new_parent()
        linked.add((t, s))
        ext = {"traceparent": h} if i < 2 else {"kafkaheadertraceparent": h}  # as KafkaSource forwards headers
        events.append({"specversion": "1.0", "id": f"e{i}", "type": "t", "source": "s", **ext,
                       "data": orjson.loads(record(i))})
    events.append({"specversion": "1.0", "id": "bad", "type": "t", "source": "s", "data": "{not json"})
    r = httpx.post(f"{base}/", content=orjson.dumps(events), headers={
        "content-type": "application/cloudevents-batch+json", "traceparent": caller_header})
    assert r.status_code == 200, r.text
    span, _ = server_span(receiver, caller, "the batch's server span")
    assert span.parent_span_id == caller_span
    assert {(link.trace_id, link.span_id) for link in span.links} == linked
    a = attrs(span)
    assert a["scoring.events"] == 4 and a["scoring.rejected"] == 1


def test_batch_run_file_and_row_group_spans(models, otlp, tmp_path):
    write_inputs(str(tmp_path / "in"), files=2, rows=300, row_group=100)
    out = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                          str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--batch-rows", "100"],
                         env={**os.environ, **otlp.env()}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    spans = otlp.wait(lambda s: any(x.name == "batch run" for x in s), 20, "the batch run span")
    run = next(x for x in spans if x.name == "batch run")
    files = [x for x in spans if x.name == "batch file"]
    assert run.parent_span_id == b"" and len(files) == 2
    assert all(f.parent_span_id == run.span_id and f.trace_id == run.trace_id for f in files)
    assert {attrs(f)["scoring.rows"] for f in files} == {300}
    groups = [x for x in spans if x.name == "row group batch"]
    assert len(groups) == 6 and {g.parent_span_id for g in groups} == {f.span_id for f in files}
    assert sum(attrs(g)["scoring.rows"] for g in groups) == 600
    assert attrs(run)["scoring.rows_scored"] == 600 and attrs(run)["scoring.files_scored"] == 2
    assert all(attrs(f)["scoring.sink"] and attrs(f)["scoring.model_version"] for f in files)


def test_otlp_grpc_export_with_service_name(models, tmp_path):
    collector = GrpcCollector()
    try:
        write_inputs(str(tmp_path / "in"), files=1, rows=50)
        out = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                              str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                             env={**os.environ, **collector.env(OTEL_SERVICE_NAME="batch-under-test")},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        got = wait_for(lambda: collector.resource_spans(), 20, what="an OTLP/gRPC export")
    finally:
        collector.close()
    resource = {kv.key: kv.value.string_value for kv in got[0].resource.attributes}
    assert resource["service.name"] == "batch-under-test" and resource["scoring.mode"] == "batch"
    names = {s.name for rs in got for ss in rs.scope_spans for s in ss.spans}
    assert {"batch run", "batch file", "row group batch"} <= names

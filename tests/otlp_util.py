"""OTLP receivers for the trace tests, in the test process (the worker under test is another process).

- ``HttpReceiver``: oteltap (an OTLP/HTTP-protobuf receiver from PyPI, native code we did not write) on its own
  event loop in a thread; every span it decodes is kept.
- ``GrpcCollector``: the OTLP/gRPC ``TraceService`` from opentelemetry-proto's generated stubs on a grpcio server:
  a minimal collector keeping each export request whole (resource included), since no collector installs here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

from tests.conftest import free_port


class HttpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.spans: list = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="oteltap", daemon=True)
        self.thread.start()
        if not self.ready.wait(15) or self.error is not None:
            raise RuntimeError(f"oteltap did not start: {self.error}")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

        self.stopping = asyncio.Event()
        try:
            receiver = await OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(self.port)).start()
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self.error = exc
            self.ready.set()
            return

        async def collect() -> None:
            async for span in receiver.stream_traces():
                with self.lock:
                    self.spans.append(span)

        task = asyncio.create_task(collect())
        await asyncio.sleep(0)  # subscribed before anyone is told to send
        self.ready.set()
        await self.stopping.wait()
        task.cancel()
        await receiver.stop()

    def env(self, **extra: str) -> dict[str, str]:
        """The worker's environment for traces to this receiver (exported every 100 ms)."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100", **extra}

    def snapshot(self) -> list:
        with self.lock:
            return list(self.spans)

    def wait(self, predicate, timeout: float = 30.0, what: str = "spans") -> list:
        """All spans received, once ``predicate(spans)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            time.sleep(0.1)
        names = sorted({s.name for s in self.snapshot()})
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; received span names: {names}")

    def close(self) -> None:
        if self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(10)


class GrpcCollector:
    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests: list = []
        self.lock = threading.Lock()
        outer = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the protocol's name
                with outer.lock:
                    outer.requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "100", **extra}

    def resource_spans(self) -> list:
        with self.lock:
            return [rs for req in self.requests for rs in req.resource_spans]

    def close(self) -> None:
        self.server.stop(2)


def by_id(spans: list) -> dict[bytes, object]:
    return {s.span_id: s for s in spans}


def attrs(span) -> dict:
    """A proto span's attributes as a plain dict."""
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out

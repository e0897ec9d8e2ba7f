"""Serve mode's gRPC front end: the Open Inference Protocol's ``inference.GRPCInferenceService`` and the standard
``grpc.health.v1.Health`` service, on ``SCORING_SERVE__GRPC_PORT`` (default 8081, KServe's), beside REST.

Like ``app.py`` it only translates: each RPC calls the same ``DataPlane`` methods as REST (versioned models by
``model_version`` exactly as REST routes them, the same sticky choice by request ``id``, the same adaptive
batcher), and a ``RequestError`` becomes its gRPC status: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 413
RESOURCE_EXHAUSTED, 503 UNAVAILABLE (not ready yet, or stopping), anything unexpected INTERNAL without details.
Messages are held to ``SCORING_SERVE__MAX_BODY_BYTES`` both ways (gRPC answers RESOURCE_EXHAUSTED itself).
The server runs on the event loop of the HTTP server (``grpc.aio``), so both share one batcher; it starts
after the dataplane and stops, with a grace period, before it. Health answers SERVING while the dataplane is
ready, NOT_SERVING otherwise, for the overall server ("") and for ``inference.GRPCInferenceService``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram

from workers import tracing
from workers.decode import oip_grpc
from workers.decode.oip_proto import open_inference_grpc_pb2 as pb
from workers.decode.oip_proto import open_inference_grpc_pb2_grpc as pb_grpc
from workers.errors import RequestError, Unavailable
from workers.observability import LATENCY_BUCKETS
from workers.runtime.serve import trace
from workers.runtime.serve.dataplane import DataPlane

log = logging.getLogger("workers.serve")

SERVICE = "inference.GRPCInferenceService"
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def status_code(status: int) -> grpc.StatusCode:
    """The gRPC status of an HTTP status a ``RequestError`` carries."""
    return _CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """Each RPC is one dataplane call; see the module docstring."""

    def __init__(self, plane: DataPlane, requests: Counter, latency: Histogram):
        self.plane, self.requests, self.latency = plane, requests, latency

    async def _call(self, name: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[Any]],
                    traced: str | None = None) -> Any:
        """``fn``'s answer, its error as a gRPC status; ``traced`` (the RPC's name): a server span per call while
        tracing is on, continuing a ``traceparent`` in the call's metadata (serve/trace.py)."""
        if traced is None or tracing.tracer() is None:
            return await self._answer(name, context, fn)
        with trace.grpc_span(traced, context.invocation_metadata()) as span:
            return await self._answer(name, context, fn, span)

    async def _answer(self, name: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[Any]],
                      span: Any = None) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await fn()
        except RequestError as exc:
            code = status_code(exc.status)
            trace.failed(exc, exc.status >= 500)
            await context.abort(code, exc.message)
        except Exception as exc:
            log.exception("unexpected error", extra={"route": f"grpc.{name}"})
            code = grpc.StatusCode.INTERNAL
            trace.failed(exc, True)
            await context.abort(code, "internal error")
        finally:
            if span is not None:
                trace.status(span, **{"rpc.grpc.status_code": code.value[0]})
            self.requests.labels(f"grpc.{name}", code.name).inc()
            self.latency.labels(f"grpc.{name}").observe(time.perf_counter() - started)

    def _ready(self) -> None:
        if not self.plane.ready:
            raise Unavailable("the server is not ready")

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ServerMetadata(self, request, context):  # noqa: N802
        async def go():
            m = self.plane.server_metadata()
            return pb.ServerMetadataResponse(name=m["name"], version=m["version"], extensions=m["extensions"])
        return await self._call("server_metadata", context, go)

    async def ModelReady(self, request, context):  # noqa: N802
        async def go():
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
        return await self._call("model_ready", context, go)

    async def ModelMetadata(self, request, context):  # noqa: N802
        async def go():
            return oip_grpc.metadata(self.plane.model_metadata(request.name, request.version or None))
        return await self._call("model_metadata", context, go)

    async def ModelInfer(self, request, context):  # noqa: N802
        async def go():
            self._ready()
            done = await self.plane.infer(request.model_name, request.model_version or None,
                                          lambda model: oip_grpc.parse(request, model))
            return oip_grpc.response(done.predictions, done.model, self.plane.name, done.request)
        return await self._call("infer", context, go, "ModelInfer")


class GrpcFront:
    """The gRPC server of one dataplane: ``start`` after the dataplane started, ``stop`` before it stops."""

    def __init__(self, plane: DataPlane, host: str, port: int, max_message_bytes: int):
        self.plane, self.host, self.port = plane, host, port
        self.max_message_bytes = max_message_bytes
        r = plane.metrics.registry
        self.requests = Counter("scoring_grpc_requests", "gRPC requests", ["route", "code"], registry=r)
        self.latency = Histogram("scoring_grpc_request_seconds", "gRPC request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.bound = 0  # the port actually bound (tests pass 0)

    async def start(self) -> None:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self.plane, self.requests, self.latency), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.bound = self.server.add_insecure_port(address)
        await self.server.start()
        await self.set_serving(self.plane.ready)
        log.info("grpc start", extra={"address": f"{self.host}:{self.bound}"})

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.server is None:
            return
        await self.set_serving(False)
        await self.server.stop(grace_s)
        self.server = None

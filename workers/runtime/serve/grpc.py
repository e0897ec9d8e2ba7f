"""Serve mode's gRPC front end: the Open Inference Protocol's ``inference.GRPCInferenceService`` and the standard
``grpc.health.v1.Health`` service, on ``SCORING_SERVE__GRPC_PORT`` (default 8081, KServe's), beside REST.

Like ``app.py`` it only translates: each RPC calls the same ``DataPlane`` methods as REST (versioned models by
``model_version`` exactly as REST routes them, the same sticky choice by request ``id``, the same adaptive
batcher), and a ``RequestError`` becomes its gRPC status: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 413
RESOURCE_EXHAUSTED, 503 UNAVAILABLE (not ready yet, or stopping), anything unexpected INTERNAL without details.
Messages are held to ``SCORING_SERVE__MAX_BODY_BYTES`` both ways (gRPC answers RESOURCE_EXHAUSTED itself).
gRPC's own threads receive the calls (``grpc.server`` with ``THREADS`` handler threads) and hand each to the
event loop of the HTTP server, where the dataplane and its one batcher live, so REST and gRPC requests batch
together; a handler thread waits for its answer. Not ``grpc.aio``: its per-call machinery on the event loop
cost ~0.27 ms of the loop's core per call with an empty handler (3.7k calls/s on one core at 8 connections),
while the threaded server with this hand-off does 5.0-5.6k (measured for #19 with h2load, a C client): the loop
only runs the dataplane. It starts after the dataplane and stops, with a grace period, before it. Health
answers SERVING while the dataplane is ready, NOT_SERVING otherwise, for the overall server ("") and for
``inference.GRPCInferenceService``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
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


# Handler threads. Each call holds one while it waits for the event loop, and every RPC (health checks and
# liveness too) needs a free one to be answered: with 16, sixteen slow calls in flight left a Kubernetes gRPC
# probe waiting (#19's break-it review), so there are far more than concurrent clients usually are; a waiting
# thread costs no CPU. On one core 16 and 128 threads measured within noise at 1 to 32 connections (1-row calls
# 2.3-3.2k/s at 8-32 connections; 100-row calls 240-280/s).
THREADS = 128
# A call that ends (cancelled by its client) with less than this left before its deadline counts as timed out.
DEADLINE_SLACK_S = 0.1


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """Each RPC is one dataplane call on the event loop ``loop``; see the module docstring."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop, requests: Counter, latency: Histogram):
        self.plane, self.loop, self.requests, self.latency = plane, loop, requests, latency

    def _call(self, name: str, context: grpc.ServicerContext, fn: Callable[[], Awaitable[Any]],
              traced: str | None = None) -> Any:
        """``fn``'s answer (run on the event loop), its error as a gRPC status; ``traced`` (the RPC's name): a
        server span per call while tracing is on, continuing a ``traceparent`` in the call's metadata
        (serve/trace.py). A call that ends first (its deadline passed, the client cancelled or went away) drops
        its work: the coroutine is cancelled, and a request still queued for the batcher is not predicted."""
        started = time.perf_counter()
        metadata = context.invocation_metadata() if traced is not None and tracing.tracer() is not None else None
        work = asyncio.run_coroutine_threadsafe(self._answer(name, fn, traced, metadata), self.loop)
        if not context.add_callback(work.cancel):  # runs when the call ends, answered or not
            work.cancel()  # it has ended already
        try:
            answer, code, message = work.result()
        except concurrent.futures.CancelledError:
            # A client's own timer fires a little before the server's: a call ending that close to its deadline
            # timed out (its cancel arrives with a few ms left; counted CANCELLED, 15 of 40 were, break-it review).
            remaining = context.time_remaining()
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= DEADLINE_SLACK_S
                    else grpc.StatusCode.CANCELLED)
            answer, message = None, "the call ended before its answer"
        except Exception:  # noqa: BLE001 - the loop is gone (stopping): no answer can come
            answer, code, message = None, grpc.StatusCode.UNAVAILABLE, "the server is stopping"
        self.requests.labels(f"grpc.{name}", code.name).inc()
        self.latency.labels(f"grpc.{name}").observe(time.perf_counter() - started)
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)
        return answer

    async def _answer(self, name: str, fn: Callable[[], Awaitable[Any]], traced: str | None,
                      metadata: Any) -> tuple[Any, grpc.StatusCode, str]:
        """(answer, OK, "") or (None, the status, its message); on the event loop."""
        if metadata is None:
            return await self._outcome(name, fn, None)
        with trace.grpc_span(traced or name, metadata) as span:
            return await self._outcome(name, fn, span)

    async def _outcome(self, name: str, fn: Callable[[], Awaitable[Any]],
                       span: Any) -> tuple[Any, grpc.StatusCode, str]:
        answer, code, message = None, grpc.StatusCode.OK, ""
        try:
            answer = await fn()
        except RequestError as exc:
            code, message = status_code(exc.status), exc.message
            trace.failed(exc, exc.status >= 500)
        except Exception as exc:
            log.exception("unexpected error", extra={"route": f"grpc.{name}"})
            code, message = grpc.StatusCode.INTERNAL, "internal error"
            trace.failed(exc, True)
        if span is not None:
            trace.status(span, **{"rpc.grpc.status_code": code.value[0]})
        return answer, code, message

    def _ready(self) -> None:
        if not self.plane.ready:
            raise Unavailable("the server is not ready")

    def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane.ready)

    def ServerMetadata(self, request, context):  # noqa: N802
        async def go():
            m = self.plane.server_metadata()
            return pb.ServerMetadataResponse(name=m["name"], version=m["version"], extensions=m["extensions"])
        return self._call("server_metadata", context, go)

    def ModelReady(self, request, context):  # noqa: N802
        async def go():
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
        return self._call("model_ready", context, go)

    def ModelMetadata(self, request, context):  # noqa: N802
        async def go():
            return oip_grpc.metadata(self.plane.model_metadata(request.name, request.version or None))
        return self._call("model_metadata", context, go)

    def ModelInfer(self, request, context):  # noqa: N802
        async def go():
            self._ready()
            done = await self.plane.infer(request.model_name, request.model_version or None,
                                          lambda model: oip_grpc.parse(request, model))
            return oip_grpc.response(done.predictions, done.model, self.plane.name, done.request)
        return self._call("infer", context, go, "ModelInfer")


class GrpcFront:
    """The gRPC server of one dataplane: ``start`` after the dataplane started, ``stop`` before it stops."""

    def __init__(self, plane: DataPlane, host: str, port: int, max_message_bytes: int):
        self.plane, self.host, self.port = plane, host, port
        self.max_message_bytes = max_message_bytes
        r = plane.metrics.registry
        self.requests = Counter("scoring_grpc_requests", "gRPC requests", ["route", "code"], registry=r)
        self.latency = Histogram("scoring_grpc_request_seconds", "gRPC request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.bound = 0  # the port actually bound (tests pass 0)

    async def start(self) -> None:
        options = [("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.server(ThreadPoolExecutor(THREADS, thread_name_prefix="grpc"), options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceService(self.plane, asyncio.get_running_loop(), self.requests, self.latency), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.bound = self.server.add_insecure_port(address)
        self.server.start()
        await self.set_serving(self.plane.ready)
        log.info("grpc start", extra={"address": f"{self.host}:{self.bound}"})

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.server is None:
            return
        await self.set_serving(False)
        stopped = self.server.stop(grace_s)  # in-flight calls finish meanwhile: the loop stays free for them
        await asyncio.to_thread(stopped.wait)
        self.server = None

"""Serve mode's HTTP layer: an ASGI app (Starlette under uvicorn) for Knative, KServe, Triton and MLServer clients.

Routes: the Open Inference Protocol v2 REST API under ``/v2``; CloudEvents (binary, structured, batch) on
``POST /``; ``/healthz``, ``/readyz`` and ``/metrics``. This module only translates: path parameters, headers and
the body (held to ``SCORING_SERVE__MAX_BODY_BYTES``) go to the ``DataPlane`` (``dataplane.py``), which decides
what a request means; its ``Reply`` becomes the response, a ``RequestError`` its status with ``{"error": "..."}``.
User input never produces a 5xx: malformed bodies, wrong shapes or types, unknown models and oversized bodies
get a 4xx. With ``--sink`` a failing or hung store (bounded, see ``serve/store.py``) is the only 503.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from workers import tracing
from workers.errors import BadRequest, RequestError, TooLarge
from workers.observability import LATENCY_BUCKETS
from workers.runtime.serve import trace
from workers.runtime.serve.dataplane import DataPlane, Reply
from workers.scoring.model import Model
from workers.settings import Settings

if TYPE_CHECKING:
    from workers.runtime.serve.grpc import GrpcFront

log = logging.getLogger("workers.serve")

_DIGITS = re.compile(r"[0-9]{1,18}")
Endpoint = Callable[[Request], Awaitable[Response]]


class App:
    """The HTTP front end of one ``DataPlane`` (``plane``); see the module docstring. One short method per
    route (the OIP REST routes, CloudEvents, probes), each only translating to and from the dataplane."""

    def __init__(self, settings: Settings, model: Model | None = None):
        self.settings = settings
        self.plane = DataPlane(settings, model)
        sv = settings.serve
        self.grpc: GrpcFront | None = None
        if sv.grpc_port is not None:
            from workers.runtime.serve.grpc import GrpcFront

            self.grpc = GrpcFront(self.plane, sv.host, sv.grpc_port, sv.max_body_bytes)
        r = self.plane.metrics.registry
        self.requests = Counter("scoring_http_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("scoring_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette):
        await self.plane.start()
        try:
            if self.grpc is not None:
                await self.grpc.start()
            yield
        finally:
            if self.grpc is not None:
                await self.grpc.stop()
            await self.plane.stop()

    def route(self, name: str, fn: Endpoint, traced: str | None = None) -> Endpoint:
        """``fn`` with its errors answered and counted; ``traced`` (the route's template): one server span per
        request while tracing is on (serve/trace.py)."""
        async def answer(request: Request) -> Response:
            try:
                return await fn(request)
            except RequestError as exc:
                trace.failed(exc, exc.status >= 500)
                return self.error(exc.status, exc.message)
            except Exception as exc:
                log.exception("unexpected error", extra={"route": name})
                trace.failed(exc, True)
                return self.error(500, "internal error")

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            if traced is None or tracing.tracer() is None:
                response = await answer(request)
            else:
                with trace.http_span(request.method, traced, request.url.path, request.headers) as span:
                    response = await answer(request)
                    trace.status(span, **{"http.response.status_code": response.status_code})
            self.requests.labels(name, str(response.status_code)).inc()
            self.latency.labels(name).observe(time.perf_counter() - started)
            return response
        return endpoint

    @staticmethod
    def error(status: int, message: str) -> Response:
        return Response(orjson.dumps({"error": message}), status, media_type="application/json")

    @staticmethod
    def json(obj: object, status: int = 200) -> Response:
        return Response(orjson.dumps(obj), status, media_type="application/json")

    @staticmethod
    def reply(reply: Reply) -> Response:
        return Response(reply.body, reply.status, headers=reply.headers or None, media_type=reply.media_type)

    async def body(self, request: Request) -> bytes:
        limit = self.settings.serve.max_body_bytes
        length = request.headers.get("content-length")
        if length and _DIGITS.fullmatch(length) and int(length) > limit:
            raise TooLarge(f"body of {length} bytes is over the limit of {limit} (SCORING_SERVE__MAX_BODY_BYTES)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"body is over the limit of {limit} bytes (SCORING_SERVE__MAX_BODY_BYTES)")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def names(request: Request) -> tuple[str | None, str | None]:
        return request.path_params.get("name"), request.path_params.get("version")

    # -- Open Inference Protocol -----------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return self.json({"live": True})

    async def server_ready(self, request: Request) -> Response:
        ready = self.plane.ready
        return self.json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return self.json(self.plane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        return self.json(self.plane.model_metadata(*self.names(request)))

    async def model_ready(self, request: Request) -> Response:
        ready = self.plane.model_ready(*self.names(request))
        return self.json({"name": self.plane.name, "ready": ready}, 200 if ready else 503)

    async def infer(self, request: Request) -> Response:
        name, version = self.names(request)
        self.plane.version(name, version)  # a 404 before reading the body
        # On its way to the batcher from now on: a batch forming meanwhile waits for it (see batcher.py).
        with self.plane.batcher.arrival() as arrival:
            body = await self.body(request)
            header = request.headers.get("inference-header-content-length")
            if header is not None and not _DIGITS.fullmatch(header):
                # str.isdigit() would take '²' or Arabic-Indic digits, which int() then refuses or reads otherwise.
                raise BadRequest("Inference-Header-Content-Length must be a number of bytes (ASCII digits)")
            length = int(header) if header is not None else None
            return self.reply(await self.plane.infer_rest(name, version, body, length, arrival))

    # -- CloudEvents -----------------------------------------------------------------------------
    async def cloudevent(self, request: Request) -> Response:
        body = await self.body(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        return self.reply(await self.plane.cloudevents(headers, body))

    # -- probes ----------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return Response("ok", 200)

    async def readyz(self, request: Request) -> Response:
        ready = self.plane.ready
        return Response("ready" if ready else "not ready", 200 if ready else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.plane.metrics.registry), 200, media_type=CONTENT_TYPE_LATEST)

    def asgi(self) -> Starlette:
        r = self.route
        routes = [
            Route("/v2/health/live", r("live", self.live), methods=["GET"]),
            Route("/v2/health/ready", r("ready", self.server_ready), methods=["GET"]),
            Route("/v2", r("server_metadata", self.server_metadata), methods=["GET"]),
            Route("/v2/models/{name}", r("model_metadata", self.model_metadata), methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}", r("model_metadata", self.model_metadata), methods=["GET"]),
            Route("/v2/models/{name}/ready", r("model_ready", self.model_ready), methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/ready", r("model_ready", self.model_ready), methods=["GET"]),
            Route("/v2/models/{name}/infer", r("infer", self.infer, "/v2/models/{name}/infer"), methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer",
                  r("infer", self.infer, "/v2/models/{name}/versions/{version}/infer"), methods=["POST"]),
            Route("/", r("cloudevents", self.cloudevent, "/"), methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        app = Starlette(routes=routes, lifespan=self.lifespan)

        async def not_found(request: Request, exc: Exception) -> Response:
            status = getattr(exc, "status_code", 404)
            return self.error(status, f"{request.method} {request.url.path}: "
                                      f"{'no such route' if status == 404 else 'method not allowed'}")

        app.add_exception_handler(404, not_found)
        app.add_exception_handler(405, not_found)
        return app


def run_serve(settings: Settings) -> int:
    import signal

    import uvicorn

    app = App(settings)
    config = uvicorn.Config(app.asgi(), host=settings.serve.host, port=settings.serve.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=20, lifespan="on")

    class Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die of the signal.
        # Stop the same graceful way (finish in-flight requests), then exit 0.
        @contextlib.contextmanager
        def capture_signals(self):
            def stop(signum, frame):
                self.should_exit = True
                app.plane.request_stop()

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(config).run()
    return 0

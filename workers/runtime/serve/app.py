"""Serve mode: an ASGI app (Starlette under uvicorn) for Knative, KServe, Triton and MLServer clients.

Routes: the Open Inference Protocol v2 REST API under ``/v2``; CloudEvents (binary, structured, batch) on
``POST /``; ``/healthz``, ``/readyz`` and ``/metrics``. User input never produces a 5xx: malformed bodies,
wrong shapes or types, unknown models and oversized bodies get a 4xx with ``{"error": "..."}``. Inside a
CloudEvents batch each event is answered on its own: a bad record, an item that is not a CloudEvent, or a row
the sink cannot hold gets a ``.error`` reply with the reason, the others are scored, stored and answered.
With ``--sink`` a failing or hung store (bounded, see ``serve_store``) is the only 503.

Adaptive batching (``serve_batcher``): concurrent requests are gathered into one predict call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import PurePosixPath

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from workers.decode import cloudevents as ce
from workers.decode import oip
from workers.decode.oip import BadRequest
from workers.decode.records import carry_columns
from workers.observability import LATENCY_BUCKETS, SIZE_BUCKETS, Metrics
from workers.runtime.serve.batcher import Batcher
from workers.runtime.serve.store import EventStore, StoreUnavailable
from workers.runtime.watch import RoutingWatcher
from workers.scoring import sticky
from workers.scoring.build import build_router
from workers.scoring.model import Model
from workers.scoring.router import Version
from workers.settings import Settings

log = logging.getLogger("workers.serve")


_ROW = "__row"  # carried through routing so replies come back in event order
_DIGITS = re.compile(r"[0-9]{1,18}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


class App:
    def __init__(self, settings: Settings, model: Model | None = None):
        self.settings = settings
        sv = settings.serve
        self.metrics = Metrics()
        given = build_router(settings, self.metrics, model=model) if model is not None else None
        self.routing = RoutingWatcher(settings, self.metrics, given)
        self.name = sv.model_name or PurePosixPath(self.model.source.split("://", 1)[-1]).stem
        r = self.metrics.registry
        self.requests = Counter("scoring_http_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("scoring_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        rows = Histogram("scoring_serve_batch_rows", "Rows per predict call", buckets=SIZE_BUCKETS, registry=r)
        reqs = Histogram("scoring_serve_batch_requests", "Requests per predict call", buckets=SIZE_BUCKETS,
                         registry=r)
        self.batcher = Batcher(sv.max_batch_rows, sv.max_latency_ms / 1000, rows, reqs)
        self.sink = None
        self.store: EventStore | None = None
        if sv.sink:
            from workers.sinks import open_result_sink

            self.sink = open_result_sink(settings, sv.sink, "SCORING_SERVE__SINK")
            self.store = EventStore(self.sink, self.metrics, _ROW, sv.sink_timeout_s)
        self.ready = False
        self.stopping: asyncio.Event | None = None  # set on SIGTERM
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def model(self) -> Model:
        """The primary model of the current routing."""
        return self.routing.router.primary.model

    @property
    def source(self) -> str:
        return f"scoring-workers/{self.name}/{self.model.version}"

    # -- plumbing --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette):
        self.stopping = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        if self.store is not None:
            self.store.stopping = self.stopping
        self.batcher.task = asyncio.create_task(self.batcher.run())
        self.routing.start()
        self.ready = True
        log.info("serve start", extra={"model": self.name, "model_version": self.model.version,
                                       "versions": self.routing.router.describe()})
        try:
            yield
        finally:
            self.ready = False
            self.routing.stop()
            self.batcher.task.cancel()
            if self.store is not None:
                self.store.close()

    def request_stop(self) -> None:
        """From a signal handler: requests waiting on a hung sink are answered 503 at once (thread-safe)."""
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)

    def route(self, name: str, fn):
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await fn(request)
            except HTTPError as exc:
                response = self.error(exc.status, exc.message)
            except BadRequest as exc:
                response = self.error(400, str(exc))
            except Exception:
                log.exception("unexpected error", extra={"route": name})
                response = self.error(500, "internal error")
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

    async def body(self, request: Request) -> bytes:
        limit = self.settings.serve.max_body_bytes
        length = request.headers.get("content-length")
        if length and _DIGITS.fullmatch(length) and int(length) > limit:
            raise HTTPError(413, f"body of {length} bytes is over the limit of {limit} (SCORING_SERVE__MAX_BODY_BYTES)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"body is over the limit of {limit} bytes (SCORING_SERVE__MAX_BODY_BYTES)")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, request: Request) -> Version | None:
        """The version a URL names (None: the unversioned URL); 404 for an unknown name or version."""
        name = request.path_params.get("name")
        if name != self.name:
            raise HTTPError(404, f"unknown model {name!r}; this server has {self.name!r}")
        version = request.path_params.get("version")
        if version is None:
            return None
        for v in self.routing.router.versions:
            if v.name == version:
                return v
        loaded = [v.name for v in self.routing.router.versions]
        raise HTTPError(404, f"unknown version {version!r} of {self.name!r}; loaded: {loaded}")

    # -- Open Inference Protocol -----------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return self.json({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return self.json({"ready": self.ready}, 200 if self.ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        from workers import __version__

        return self.json({"name": "scoring-workers", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(self, request: Request) -> Response:
        v = self.check_model(request)
        # Every version this name serves (Triton and KServe clients pick one with model_version).
        versions = [ver.name for ver in self.routing.router.versions]
        return self.json(oip.metadata(v.model if v else self.model, self.name, versions))

    async def model_ready(self, request: Request) -> Response:
        self.check_model(request)
        return self.json({"name": self.name, "ready": self.ready}, 200 if self.ready else 503)

    async def infer(self, request: Request) -> Response:
        """OIP infer. A versioned URL is answered by that version; the unversioned URL by the served version
        the request ``id`` hashes to (sticky, like records), or by the primary when there is no id."""
        chosen = self.check_model(request)
        router = self.routing.current()
        body = await self.body(request)
        header = request.headers.get("inference-header-content-length")
        if header is not None and not _DIGITS.fullmatch(header):
            # str.isdigit() would take '²' or Arabic-Indic digits, which int() then refuses or reads differently.
            raise BadRequest("Inference-Header-Content-Length must be a number of bytes (ASCII digits)")
        length = int(header) if header is not None else None
        model = chosen.model if chosen else router.primary.model
        req = oip.parse(body, length, model)
        if chosen is None and req.id is not None and len(router.served) > 1:
            served = router.served
            chosen = served[int(sticky.assign([req.id], [v.name for v in served], router.effective_weights())[0])]
            if chosen.model.feature_names != model.feature_names or chosen.model.categorical != model.categorical:
                req = oip.parse(body, length, chosen.model)
            model = chosen.model
        if model is router.primary.model:
            router.observe(req.matrix)
        pred = await self.batcher.predict(req.matrix, model)
        out, head_len = oip.response(pred, model, self.name, req)
        if head_len is None:
            return Response(out, 200, media_type="application/json")
        return Response(out, 200, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(head_len)})

    # -- CloudEvents -----------------------------------------------------------------------------
    async def cloudevent(self, request: Request) -> Response:
        """CloudEvents in, one reply per event. A bad record, a batch item that is not a CloudEvent, or a row the
        sink cannot hold is answered with its reason (a single event: 400, so Knative dead-letters it; in a
        batch: a ``.error`` reply); the other events are stored and answered. Only a failing sink is a 503."""
        body = await self.body(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        events, is_batch = ce.parse(headers, body)
        live = [i for i, e in enumerate(events) if e.error is None]
        replies: list[tuple[dict, dict] | None] = [None] * len(events)
        reasons = {i: e.error for i, e in enumerate(events) if e.error is not None}
        if live:
            scored_replies, live_reasons = await self.score_events([events[i] for i in live])
            for k, i in enumerate(live):
                replies[i] = scored_replies[k]
                if k in live_reasons:
                    reasons[i] = live_reasons[k]
        for i in reasons:
            if replies[i] is None:
                attrs = ce.reply_attributes(events[i], f"{self.settings.serve.reply_type}.error", self.source, None)
                replies[i] = (attrs, {"error": reasons[i]})
        if is_batch:
            return Response(ce.dumps([ce.structured(a, d) for a, d in replies]), 200, media_type=ce.BATCH)
        if 0 in reasons:
            raise BadRequest(reasons[0])
        attrs, data = replies[0]
        return Response(ce.dumps(data), 200, headers=ce.binary_headers(attrs))

    async def score_events(self, events: list[ce.Event]) -> tuple[list[tuple[dict, dict]], dict[int, str]]:
        """Score, store and answer well-formed events: (reply per event, reason per rejected event)."""
        router = self.routing.current()
        routed, decoded = router.decode([e.data for e in events], [e.key for e in events], key_as_id=True)
        jobs = router.plan(routed)
        preds = await asyncio.gather(*(self.batcher.predict(job.matrix(), job.version.model) for job in jobs),
                                     return_exceptions=True)
        predictions = []
        for job, pred in zip(jobs, preds, strict=True):
            if isinstance(pred, BaseException):
                if job.version is router.primary:
                    raise pred
                router.failed(job, job.matrix().shape[0], pred)
                pred = None
            predictions.append(pred)
        self.exact_passthrough(events, decoded.passthrough)
        carry = carry_columns(decoded.passthrough)
        if self.sink is not None:  # where each event's record came from, for the stored rows
            positions = [e.kafka_position() for e in events]
            carry = carry_columns(decoded.passthrough, [p[0] for p in positions], [p[1] for p in positions],
                                  [p[2] for p in positions])
        carry[_ROW] = pa.array(np.arange(len(events)), pa.int64())
        scored = router.finish(routed, carry, predictions, jobs)
        reasons = dict(zip(scored.error_rows.tolist(), scored.errors["reason"].to_pylist(), strict=True))
        table = scored.results
        if self.sink is not None and (scored.ok or scored.rejected):
            try:
                refused = await self.store.write(scored, [e.locator for e in events])
            except StoreUnavailable as exc:
                raise HTTPError(503, str(exc)) from None  # not the sender's fault: Knative retries later
            if refused:
                for i, why in refused.items():  # a rejected record whose error row cannot be stored keeps its reason
                    reasons[i] = f"{reasons[i]}; its error row {why}" if i in reasons else why
                table = table.filter(pc.invert(pc.is_in(table[_ROW], pa.array(list(refused), pa.int64()))))
        # The reply holds each event's served result, in event order (shadow rows are stored, not replied).
        if len(router.versions) > 1:
            table = table.filter(table["served"])
        table = table.sort_by(_ROW)
        results = table.drop_columns([c for c in ("topic", "partition", "offset", _ROW, "served")
                                      if c in table.column_names]).to_pylist()
        # Passthrough values are answered as the event sent them (the stored column may hold JSON text).
        for result, i in zip(results, table[_ROW].to_pylist(), strict=True):
            for name, values in decoded.passthrough.items():
                if name in result:
                    result[name] = values[i]
        replies, r = [], 0
        for i, event in enumerate(events):
            if i in reasons:
                attrs = ce.reply_attributes(event, f"{self.settings.serve.reply_type}.error", self.source,
                                            decoded.ids[i])
                replies.append((attrs, {"error": reasons[i]}))
            else:
                attrs = ce.reply_attributes(event, self.settings.serve.reply_type, self.source, results[r]["id"])
                replies.append((attrs, results[r]))
                r += 1
        return replies, reasons

    @staticmethod
    def exact_passthrough(events: list[ce.Event], passthrough: dict[str, list]) -> None:
        """Passthrough values as the events sent them: the record decoder's JSON parser reads an integer beyond
        64 bits as a float, so a record that can hold one is read again keeping integers exact."""
        if not passthrough:
            return
        for i, event in enumerate(events):
            if event.data is None or not ce.LONG_DIGITS.search(event.data):
                continue
            try:
                obj = ce.loads(event.data)
            except (ValueError, RecursionError):  # not JSON: the decoder gave its reason already
                continue
            if isinstance(obj, dict):
                for name, values in passthrough.items():
                    values[i] = obj.get(name)

    # -- probes ----------------------------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return Response("ok", 200)

    async def readyz(self, request: Request) -> Response:
        return Response("ready" if self.ready else "not ready", 200 if self.ready else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), 200, media_type=CONTENT_TYPE_LATEST)

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
            Route("/v2/models/{name}/infer", r("infer", self.infer), methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", r("infer", self.infer), methods=["POST"]),
            Route("/", r("cloudevents", self.cloudevent), methods=["POST"]),
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
                app.request_stop()

            previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(config).run()
    return 0

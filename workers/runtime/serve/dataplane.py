"""Serve mode's dataplane: what a request means, independent of the protocol that carried it.

The HTTP layer (``app.py``) and any other front end (gRPC) call the same methods here and only translate:
path parameters and bodies in, a ``Reply`` or plain data out, ``RequestError`` (which carries its status:
``BadRequest`` 400, ``NotFound`` 404, ``Unavailable`` 503) into their own error form. Nothing here knows about
Starlette, routes or response objects, so every rule below is testable by calling a method.

- **OIP infer** (``infer``): a versioned request is answered by that version; an unversioned one by the served
  version its ``id`` hashes to (sticky, like records in stream mode), or by the primary without an id. The
  primary's matrices feed the drift hook. Predictions go through the adaptive ``Batcher``.
- **CloudEvents** (``cloudevents``): decode each event's record, route, predict, store the results and rejected
  rows (``--sink``), and build one reply per event in event order. A bad record, a batch item that is not a
  CloudEvent, or a row the sink cannot hold is answered with its reason (a single event: ``BadRequest``, so
  Knative dead-letters it; in a batch: a ``.error`` reply); the others are stored and answered. Only a failing
  or hung sink raises ``Unavailable``.
- **Lifecycle** (``start``/``stop``/``request_stop``): the batcher task, the routing watcher (hot reload,
  rollouts) and the sink's store thread; ``ready`` is true between start and stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import Histogram

from workers.decode import cloudevents as ce
from workers.decode import oip
from workers.decode.records import carry_columns
from workers.errors import BadRequest, NotFound, Unavailable
from workers.observability import SIZE_BUCKETS, Metrics
from workers.runtime.serve import trace
from workers.runtime.serve.batcher import Arrival, Batcher
from workers.runtime.serve.heap import warm_and_freeze
from workers.runtime.serve.store import EventStore, StoreUnavailable
from workers.runtime.watch import RoutingWatcher
from workers.scoring import sticky
from workers.scoring.build import build_router
from workers.scoring.model import Model
from workers.scoring.router import Version
from workers.settings import Settings

log = logging.getLogger("workers.serve")

_ROW = "__row"  # carried through routing so replies come back in event order
JSON = "application/json"


@dataclass
class Reply:
    """A protocol-neutral answer: the body, its media type and extra headers (CloudEvents binary mode puts the
    reply's attributes there)."""

    body: bytes
    media_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass
class Inference:
    """An answered OIP request: the request as parsed for the model that answered it, and its predictions."""

    request: oip.InferRequest
    model: Model
    predictions: np.ndarray


class DataPlane:
    """The serve dataplane; see the module docstring. ``model`` injects a loaded model (tests, ``demo``);
    without it the routing settings (``--model`` or a routing file) are loaded. Its methods are the operations
    a front end calls (OIP's five, CloudEvents) and the lifecycle; the batcher and the event store are
    their own modules."""

    def __init__(self, settings: Settings, model: Model | None = None):
        self.settings = settings
        sv = settings.serve
        self.metrics = Metrics()
        given = build_router(settings, self.metrics, model=model) if model is not None else None
        self.routing = RoutingWatcher(settings, self.metrics, given)
        self.name = sv.model_name or PurePosixPath(self.model.source.split("://", 1)[-1]).stem
        r = self.metrics.registry
        rows = Histogram("scoring_serve_batch_rows", "Rows per predict call", buckets=SIZE_BUCKETS, registry=r)
        reqs = Histogram("scoring_serve_batch_requests", "Requests per predict call", buckets=SIZE_BUCKETS,
                         registry=r)
        self.batcher = Batcher(sv.max_batch_rows, sv.max_latency_ms / 1000, rows, reqs)
        self.store: EventStore | None = None
        if sv.sink:
            from workers.sinks import open_result_sink

            sink = open_result_sink(settings, sv.sink, "SCORING_SERVE__SINK")
            self.store = EventStore(sink, self.metrics, _ROW, sv.sink_timeout_s)
        self.ready = False
        self.stopping: asyncio.Event | None = None  # set on SIGTERM: requests waiting on a hung sink get a 503
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def model(self) -> Model:
        """The primary model of the current routing."""
        return self.routing.router.primary.model

    @property
    def source(self) -> str:
        """The CloudEvents ``source`` of replies."""
        return f"scoring-workers/{self.name}/{self.model.version}"

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.stopping = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        if self.store is not None:
            self.store.stopping = self.stopping
        self.batcher.task = asyncio.create_task(self.batcher.run())
        warm_and_freeze(self.routing.router)  # everything long-lived exists now (heap.py)
        self.routing.on_switch = warm_and_freeze
        self.routing.start()
        self.ready = True
        log.info("serve start", extra={"model": self.name, "model_version": self.model.version,
                                       "versions": self.routing.router.describe()})

    async def stop(self) -> None:
        self.ready = False
        self.routing.stop()
        if self.batcher.task is not None:
            self.batcher.task.cancel()
        if self.store is not None:
            self.store.close()

    def request_stop(self) -> None:
        """From a signal handler: requests waiting on a hung sink are answered 503 at once (thread-safe)."""
        if self.loop is not None and self.stopping is not None:
            self.loop.call_soon_threadsafe(self.stopping.set)

    # -- models ----------------------------------------------------------------------------------
    def version(self, name: str | None, version: str | None) -> Version | None:
        """The version a request names (None: it names no version); ``NotFound`` for an unknown name or version."""
        if name != self.name:
            raise NotFound(f"unknown model {name!r}; this server has {self.name!r}")
        if version is None:
            return None
        for v in self.routing.router.versions:
            if v.name == version:
                return v
        loaded = [v.name for v in self.routing.router.versions]
        raise NotFound(f"unknown version {version!r} of {self.name!r}; loaded: {loaded}")

    def server_metadata(self) -> dict:
        from workers import __version__

        return {"name": "scoring-workers", "version": __version__, "extensions": ["binary_tensor_data"]}

    def model_metadata(self, name: str | None, version: str | None) -> dict:
        v = self.version(name, version)
        # Every version this name serves (Triton and KServe clients pick one with model_version).
        versions = [ver.name for ver in self.routing.router.versions]
        return oip.metadata(v.model if v else self.model, self.name, versions)

    def model_ready(self, name: str | None, version: str | None) -> bool:
        self.version(name, version)
        return self.ready

    # -- Open Inference Protocol -----------------------------------------------------------------
    async def infer(self, name: str | None, version: str | None, parse: Callable[[Model], oip.InferRequest],
                    arrival: Arrival | None = None) -> Inference:
        """OIP infer: ``parse`` reads the request for a model (its feature order and categories; REST and gRPC
        bring their own), called again only when the sticky choice has other features than the primary.
        ``arrival``: the batcher arrival the front end opened when the request came in (see ``batcher``)."""
        router = await self.routing.current_async()  # first: a request during an alias switch waits for it
        chosen = self.version(name, version)
        model = chosen.model if chosen else router.primary.model
        req = parse(model)
        if chosen is None and req.id is not None and len(router.served) > 1:
            served = router.served
            chosen = served[int(sticky.assign([req.id], [v.name for v in served], router.effective_weights())[0])]
            if chosen.model.feature_names != model.feature_names or chosen.model.categorical != model.categorical:
                req = parse(chosen.model)
            model = chosen.model
        if model is router.primary.model:
            router.observe(req.matrix)
        trace.annotate(model_version=model.version, rows=int(req.matrix.shape[0]))
        future = (arrival or self.batcher.arrival()).submit(req.matrix, model)
        return Inference(req, model, await future)

    async def infer_rest(self, name: str | None, version: str | None, body: bytes,
                         header_length: int | None, arrival: Arrival | None = None) -> Reply:
        """OIP infer from a REST body (JSON, or JSON header plus binary tensors), answered the same way."""
        done = await self.infer(name, version, lambda model: oip.parse(body, header_length, model), arrival)
        out, head_len = oip.response(done.predictions, done.model, self.name, done.request)
        if head_len is None:
            return Reply(out)
        return Reply(out, "application/octet-stream", {"Inference-Header-Content-Length": str(head_len)})

    # -- CloudEvents -----------------------------------------------------------------------------
    async def cloudevents(self, headers: dict[str, str], body: bytes) -> Reply:
        """CloudEvents in (``headers`` lower-cased), one reply per event; see the module docstring."""
        events, is_batch = ce.parse(headers, body)
        trace.link_events([e.traceparent for e in events])
        reply_type = self.settings.serve.reply_type
        live = [i for i, e in enumerate(events) if e.error is None]
        replies: list[tuple[dict, dict] | None] = [None] * len(events)
        reasons = {i: e.error for i, e in enumerate(events) if e.error is not None}
        if live:
            scored_replies, live_reasons = await self.score_events([events[i] for i in live])
            for k, i in enumerate(live):
                replies[i] = scored_replies[k]
                if k in live_reasons:
                    reasons[i] = live_reasons[k]
        for i, reason in reasons.items():
            if replies[i] is None:
                attrs = ce.reply_attributes(events[i], f"{reply_type}.error", self.source, None)
                replies[i] = (attrs, {"error": reason})
        answered = [r for r in replies if r is not None]
        assert len(answered) == len(events), "every event is answered"
        trace.annotate(events=len(events), rejected=len(reasons), model_version=self.model.version,
                       **({"sink": self.store.sink.name} if self.store is not None else {}))
        if is_batch:
            return Reply(ce.dumps([ce.structured(a, d) for a, d in answered]), ce.BATCH)
        if 0 in reasons:
            raise BadRequest(reasons[0])
        attrs, data = answered[0]
        return Reply(ce.dumps(data), JSON, ce.binary_headers(attrs))

    async def score_events(self, events: list[ce.Event]) -> tuple[list[tuple[dict, dict]], dict[int, str]]:
        """Score, store and answer well-formed events: (reply per event, reason per rejected event)."""
        router = await self.routing.current_async()
        routed, decoded = router.decode([e.data for e in events], [e.key for e in events], key_as_id=True)
        jobs = router.plan(routed)
        preds = await asyncio.gather(*(self.batcher.predict(job.matrix(), job.version.model) for job in jobs),
                                     return_exceptions=True)
        predictions: list[np.ndarray | None] = []
        for job, pred in zip(jobs, preds, strict=True):
            if isinstance(pred, BaseException):
                if job.version is router.primary:
                    raise pred
                router.failed(job, job.matrix().shape[0], pred)
                predictions.append(None)
            else:
                predictions.append(pred)
        self.exact_passthrough(events, decoded.passthrough)
        if self.store is not None:  # where each event's record came from, for the stored rows
            positions = [e.kafka_position() for e in events]
            carry = carry_columns(decoded.passthrough, [p[0] for p in positions], [p[1] for p in positions],
                                  [p[2] for p in positions])
        else:
            carry = carry_columns(decoded.passthrough)
        carry[_ROW] = pa.array(np.arange(len(events)), pa.int64())
        scored = router.finish(routed, carry, predictions, jobs)
        reasons = dict(zip(scored.error_rows.tolist(), scored.errors["reason"].to_pylist(), strict=True))
        table = scored.results
        if self.store is not None and (scored.num_results or scored.num_errors):
            try:
                refused = await self.store.write(scored, [e.locator for e in events])
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from None  # not the sender's fault: Knative retries later
            if refused:
                for i, why in refused.items():  # a rejected record whose error row cannot be stored keeps its reason
                    reasons[i] = f"{reasons[i]}; its error row {why}" if i in reasons else why
                table = table.filter(pc.invert(pc.is_in(table[_ROW], pa.array(list(refused), pa.int64()))))
        return self.replies(events, decoded, table, reasons), reasons

    def replies(self, events: list[ce.Event], decoded, table: pa.Table,
                reasons: dict[int, str]) -> list[tuple[dict, dict]]:
        """Each event's reply (attributes, data): its served result in event order (shadow rows are stored, not
        replied), or its reason."""
        if len(self.routing.router.versions) > 1:
            table = table.filter(table["served"])
        table = table.sort_by(_ROW)
        results = table.drop_columns([c for c in ("topic", "partition", "offset", _ROW, "served")
                                      if c in table.column_names]).to_pylist()
        # Passthrough values are answered as the event sent them (the stored column may hold JSON text).
        for result, i in zip(results, table[_ROW].to_pylist(), strict=True):
            for name, values in decoded.passthrough.items():
                if name in result:
                    result[name] = values[i]
        reply_type = self.settings.serve.reply_type
        replies, r = [], 0
        for i, event in enumerate(events):
            if i in reasons:
                attrs = ce.reply_attributes(event, f"{reply_type}.error", self.source, decoded.ids[i])
                replies.append((attrs, {"error": reasons[i]}))
            else:
                attrs = ce.reply_attributes(event, reply_type, self.source, results[r]["id"])
                replies.append((attrs, results[r]))
                r += 1
        return replies

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

"""Serve mode's adaptive batching: concurrent requests are queued and gathered into one predict call of at most
``max_batch_rows`` rows. Predict runs on one worker thread, so while it runs the next batch fills up by itself.
A request larger than ``max_batch_rows`` is scored alone and never split; one call holds one model's requests.

An idle batcher adds no latency: it waits for company (at most ``max_latency_ms``) only while another request
is known to be on its way, i.e. a front end has opened an ``arrival`` for it (its body is still being read or
parsed) and not yet submitted it. With nothing else in flight a request is predicted at once; under load the
requests queued during one predict call form the next. Waiting a fixed time with nobody coming cost a single
client 2 ms a request (2.3x slower than MLServer and KServe at one connection, measured in #19).

A lone request of at most ``INLINE_ROWS`` rows whose predict call is expected to be short (``INLINE_S``) is
predicted on the event loop itself rather than on the predict thread: the hand-off there and back cost a lone
1-row request ~0.1 ms, a fifth of its time over REST (#19). Anything larger or longer, or with company, goes to
the predict thread, so the loop keeps reading and parsing requests (and answering probes) while predict runs.
The expected time is rows times the model's cost per row, a maximum over its calls that decays by
``COST_DECAY`` a call: a row can cost far more than the rows measured so far (a tree walked to its deepest
leaf), so one slow call keeps the next ones off the loop, and the row cap bounds what such a row can block
(a review's model whose rows cost 4 us or 1.4 ms by their values blocked the loop 91 ms with one 60-row request
predicted on it before the cap).

The wait is event-driven, not polled: a gathering batch parks on one future that ``submit`` (a request queued)
or the last ``Arrival.close`` (nobody on the way any more) resolves, with a timer for the deadline. Polling the
queue every 0.5 ms cost a task, a timer and a cancellation per poll on the event loop that also parses the
requests, several times per batch under load.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from prometheus_client import Histogram

from workers import tracing
from workers.runtime.serve import trace
from workers.scoring.model import Model

# (matrix, its predictions' future, the model, the requesting span's context when tracing is on)
Item = tuple[np.ndarray, asyncio.Future, Model, Any]
# A lone request of at most INLINE_ROWS rows expected to predict within INLINE_S seconds is predicted on the event
# loop; the cost per row that predicts it decays by COST_DECAY a call from its highest (module docstring).
INLINE_S = 0.0005
INLINE_ROWS = 8
COST_DECAY = 0.9


class Arrival:
    """One request on its way to the batcher: counted from ``Batcher.arrival()`` until it is submitted or the
    ``with`` block ends (a request that failed before predicting)."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.open = batcher, True
        batcher.arriving += 1

    def close(self) -> None:
        if self.open:
            self.open = False
            self.batcher.arriving -= 1
            if self.batcher.arriving <= 0:
                self.batcher._wake()  # a batch waiting for this request can go

    def submit(self, matrix: np.ndarray, model: Model) -> asyncio.Future:
        future = self.batcher.submit(matrix, model)
        self.close()  # queued now: no longer on its way
        return future

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batcher:
    """Gathers concurrent predict calls into batches; see the module docstring."""

    def __init__(self, max_rows: int, max_latency_s: float, rows_hist: Histogram, requests_hist: Histogram,
                 inline_s: float = INLINE_S):
        self.max_rows, self.max_latency_s, self.inline_s = max_rows, max_latency_s, inline_s
        self.rows_hist, self.requests_hist = rows_hist, requests_hist
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.held: Item | None = None  # taken from the queue but left for the next batch
        self.arriving = 0  # requests opened with arrival() and not yet submitted
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="predict")
        self.task: asyncio.Task | None = None
        self.waiter: asyncio.Future | None = None  # set while a gathering batch waits; see the module docstring
        # id(model) -> (a weak reference to it, its seconds per row: see INLINE_S)
        self.row_cost: dict[int, tuple[weakref.ref, float]] = {}

    def _wake(self, timed_out: bool = False) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(timed_out)

    def arrival(self) -> Arrival:
        """Open at the start of a request (before its body is read), submit through it: see the module docstring."""
        return Arrival(self)

    def submit(self, matrix: np.ndarray, model: Model) -> asyncio.Future:
        """Queue ``matrix`` for ``model``; the future resolves to its predictions."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if matrix.shape[0] == 0:
            future.set_result(np.empty((0, model.num_class) if model.multiclass else 0))
        else:
            self.queue.put_nowait((matrix, future, model, trace.requester()))
            self._wake()
        return future

    async def predict(self, matrix: np.ndarray, model: Model) -> np.ndarray:
        """Predictions of ``matrix`` by ``model``, batched with concurrent requests for the same model."""
        return await self.submit(matrix, model)

    async def _next(self, deadline: float | None) -> Item | None:
        """The next item: the held one, a queued one, or (before ``deadline``, and only while a request is on its
        way) one that arrives; None when the batch should go now."""
        if self.held is not None:
            item, self.held = self.held, None
            return item
        if deadline is None:
            return await self.queue.get()
        loop = asyncio.get_running_loop()
        while True:
            # Looked at before every wait and after the last: an item put while the timer fired is here.
            try:
                return self.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            if self.arriving <= 0 or deadline - loop.time() <= 0:
                return None
            self.waiter = waiter = loop.create_future()
            # The timer's own flag, not the clock, says the deadline passed (call_at may fire a hair early).
            timer = loop.call_at(deadline, self._wake, True)
            try:
                timed_out = await waiter
            finally:
                timer.cancel()
                self.waiter = None
            if timed_out:
                try:
                    return self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    return None

    def _cost(self, model: Model) -> float | None:
        """``model``'s seconds per row (None: not known yet); see the module docstring."""
        known = self.row_cost.get(id(model))
        return known[1] if known is not None and known[0]() is model else None

    def _measured(self, model: Model, seconds: float, rows: int) -> None:
        if len(self.row_cost) > 64:  # models replaced by hot reloads: forget the ones gone
            self.row_cost = {k: v for k, v in self.row_cost.items() if v[0]() is not None}
        before = self._cost(model)
        cost = seconds / rows if before is None else max(seconds / rows, before * COST_DECAY)
        self.row_cost[id(model)] = (weakref.ref(model), cost)

    def _lone(self, items: list[Item], rows: int, model: Model) -> bool:
        """Predict on the loop: one small request, nobody else queued or on the way, expected short (INLINE_S)."""
        cost = self._cost(model)
        return (len(items) == 1 and rows <= INLINE_ROWS and cost is not None and cost * rows <= self.inline_s
                and self.held is None and self.arriving <= 0 and self.queue.empty())

    async def _predict(self, model: Model, matrix: np.ndarray, lone: bool) -> np.ndarray:
        started = time.perf_counter()
        if lone:
            pred = model.predict(matrix)
        else:
            pred = await asyncio.get_running_loop().run_in_executor(self.executor, model.predict, matrix)
        self._measured(model, time.perf_counter() - started, matrix.shape[0])
        return pred

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            assert first is not None
            items, rows, model = [first], first[0].shape[0], first[2]
            deadline = loop.time() + self.max_latency_s
            while rows < self.max_rows:
                item = await self._next(deadline)
                if item is None:
                    break
                if rows + item[0].shape[0] > self.max_rows or item[2] is not model:
                    self.held = item  # starts the next batch; requests are never split
                    break
                items.append(item)
                rows += item[0].shape[0]
            if any(fut.done() for _, fut, _, _ in items):  # cancelled while queued (a gRPC call that ended)
                items = [it for it in items if not it[1].done()]
                if not items:
                    continue
                rows = sum(it[0].shape[0] for it in items)
            matrix = items[0][0] if len(items) == 1 else np.concatenate([m for m, _, _, _ in items])
            self.rows_hist.observe(rows)
            self.requests_hist.observe(len(items))
            lone = self._lone(items, rows, model)
            try:
                if tracing.tracer() is None:
                    pred = await self._predict(model, matrix, lone)
                else:
                    with trace.predict_span([it[3] for it in items], rows, model.version):
                        pred = await self._predict(model, matrix, lone)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut, _, _ in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for m, fut, _, _ in items:
                if not fut.done():
                    fut.set_result(pred[start:start + m.shape[0]])
                start += m.shape[0]

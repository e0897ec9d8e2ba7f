"""Serve mode's adaptive batching: concurrent requests are queued and gathered into one predict call of at most
``max_batch_rows`` rows, waiting at most ``max_latency_ms`` for company. Predict runs on one worker thread,
so while it runs the next batch fills up by itself. A request larger than ``max_batch_rows`` is scored
alone and never split.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import Histogram

from workers.scoring.model import Model


class Batcher:
    """Gathers concurrent predict calls into batches; see the module docstring."""

    def __init__(self, max_rows: int, max_latency_s: float, rows_hist: Histogram, requests_hist: Histogram):
        self.max_rows, self.max_latency_s = max_rows, max_latency_s
        self.rows_hist, self.requests_hist = rows_hist, requests_hist
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future, Model]] = asyncio.Queue()
        self.held: tuple[np.ndarray, asyncio.Future, Model] | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="predict")
        self.task: asyncio.Task | None = None

    async def predict(self, matrix: np.ndarray, model: Model) -> np.ndarray:
        """Predictions of ``matrix`` by ``model``, batched with concurrent requests for the same model."""
        if matrix.shape[0] == 0:
            return np.empty((0, model.num_class) if model.multiclass else 0)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((matrix, future, model))
        return await future

    async def _next(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future, Model] | None:
        if self.held is not None:
            item, self.held = self.held, None
            return item
        if timeout is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            assert first is not None
            items, rows, model = [first], first[0].shape[0], first[2]
            deadline = loop.time() + self.max_latency_s
            while rows < self.max_rows:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if rows + item[0].shape[0] > self.max_rows or item[2] is not model:
                    self.held = item  # starts the next batch; requests are never split
                    break
                items.append(item)
                rows += item[0].shape[0]
            matrix = items[0][0] if len(items) == 1 else np.concatenate([m for m, _, _ in items])
            self.rows_hist.observe(rows)
            self.requests_hist.observe(len(items))
            try:
                pred = await loop.run_in_executor(self.executor, model.predict, matrix)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for m, fut, _ in items:
                if not fut.done():
                    fut.set_result(pred[start:start + m.shape[0]])
                start += m.shape[0]

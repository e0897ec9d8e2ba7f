"""``Lane``: calls run in order on one *daemon* thread, each with a Future (stream's score/store lanes, serve's
sink lane).

Not a ThreadPoolExecutor: its threads are joined when the interpreter exits, so a write hanging in the store
(a locked table) would keep the process alive past ``shutdown_timeout_s``. A daemon thread does not; the
store's connection, and its uncommitted transaction, end with the process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class Lane:
    def __init__(self, name: str):
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        #: a call is running now (serve's readiness reports a sink call in progress)
        self.busy = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self.calls.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (call := self.calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():  # its caller gave up before it started
                continue
            self.busy = True
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
            finally:
                self.busy = False

    def shutdown(self, wait_s: float) -> bool:
        """No more calls; wait up to ``wait_s`` for the one running. True when the thread has ended."""
        self.calls.put(None)
        self.thread.join(wait_s)
        return not self.thread.is_alive()

"""Hot reload: keep the router current with the routing file (or the single model file).

A background thread checks, every ``poll_s`` and on SIGHUP, whether the routing file or a local model
file it names changed (size, mtime or inode: a ConfigMap update swaps a symlink, which changes the inode).
It then loads the new versions and verifies their pins *in the background*; the mode picks the new router
up between batches (``current()``), so the batch in hand finishes with the old routing. A file that fails to
parse, load or verify leaves the old routing serving, with an error log line, ``scoring_routing_reloads_total
{result="failed"}`` and ``scoring_routing_reload_ok`` 0; it is tried again when it changes again (or on SIGHUP).
Model files on S3 are not polled (they are read at (re)load): change the routing file to roll them.

A ``models:/NAME@ALIAS`` model (``--model`` or in the routing file) is followed: every ``SCORING_MLFLOW__POLL_S``
the alias is resolved again, and when it names another version that version is loaded and verified here.
The rule: **a batch is scored by the version the alias named at the latest resolve answered before the batch
began** (so at most ``POLL_S`` old). A resolve that sees a move opens a *switch*: the next batch (``current()``)
waits for that version's load (at most ``SCORING_MLFLOW__SWITCH_WAIT_S``; ``scoring_mlflow_switch_waiting`` 1,
stream readiness names it) instead of starting on the old one. If the load fails, or outlasts the wait, the
old version keeps serving (log line, ``scoring_mlflow_switches_total{result="failed"|"timeout"}``) and the batch
goes on with it: a bad version never stops the stream. A failed load is retried on later polls with backoff
(``SCORING_MLFLOW__RETRY_S`` doubling up to ``SCORING_MLFLOW__RETRY_MAX_S``; ``scoring_mlflow_loads_total
{attempt="retry"}``), so a transient download failure does not pin the old version. A registry that cannot be
reached meanwhile changes nothing: the loaded version keeps serving, with an error log line and
``scoring_mlflow_resolves_total{result="failed"}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.errors import ScoringError
from workers.observability import Metrics
from workers.scoring.build import build_router
from workers.scoring.guard import GuardBook
from workers.scoring.registry import Registry, RegistryError, alias_of
from workers.scoring.router import Router
from workers.scoring.routing_spec import read_routing
from workers.settings import Settings

log = logging.getLogger("workers.rollout")
WAIT_SLICE_S = 0.05  # how often a batch waiting for a switch checks it (and its caller's stop request)


@dataclass
class Switch:
    """A resolve saw a followed alias move: batches from now on wait for the version it names (``done``)."""

    uri: str
    old: str | None
    new: str | None
    since: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    waited: bool = False  # a batch waited for it (its outcome is logged and counted once)

    def describe(self) -> str:
        return (f"waiting for version {self.new} of {self.uri} to load "
                f"({time.monotonic() - self.since:.1f}s; version {self.old} serves until it does)")


def _stat(path: str) -> tuple:
    if "://" in path and not path.startswith("file://"):
        return (path,)
    try:
        st = os.stat(path.removeprefix("file://"))
    except OSError as exc:
        return (path, exc.errno)
    return (path, st.st_size, st.st_mtime_ns, st.st_ino)


class RoutingWatcher:
    """Holds the current router and swaps in a reloaded one between batches (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, router: Router | None = None):
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()  # never None: a private registry then
        self.guards = router.guards if router is not None else GuardBook()
        self.aliases: dict[str, tuple[float, str | None]] = {}  # followed alias URI -> (resolved at, version)
        self.files: list[str] = []  # model files named by the last routing file read (loaded or not)
        #: the drift window outlives reloads (a reload that changes the primary's features starts a new one)
        self.drift = router.drift if router is not None else None
        self.router = router or self.load()  # at start-up a bad file is a ConfigError: stop with one line
        if not self.files:
            self.files = [v.model.source for v in self.router.versions]
        self.guards.attach(self.router)
        self.drift = self.router.drift
        self.seen = self.fingerprint()
        self.pending: Router | None = None
        self.switch: Switch | None = None  # open from a resolve that saw an alias move until its load ends
        self.failures = 0  # failed loads in a row of a routing that follows an alias (the retry backoff)
        self.retry_at: float | None = None  # monotonic time of the next retry of that load
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.forced = False
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        #: called with the new router right after a swap, on the thread that called current() (serve mode
        #: freezes the heap there: runtime/serve/heap.py)
        self.on_switch: Callable[[Router], None] | None = None

    @property
    def path(self) -> str | None:
        return self.settings.routing.path

    def load(self) -> Router:
        if self.path:
            # Watch what this file names even if loading fails below: a model uploaded after the routing
            # file was edited is then picked up when it appears.
            self.files = [v.model for v in read_routing(self.path)[0].versions]
        return build_router(self.settings, self.metrics, self.guards, drift=self.drift)

    def fingerprint(self, forced: bool = False, resolve: bool = True) -> tuple:
        """What a reload depends on. ``resolve=False`` (right after a load): aliases already known are not
        resolved again, so a move seen then is not folded into ``seen`` unloaded (the next poll sees it)."""
        files = ([self.path] if self.path else []) + self.files
        return tuple((f, self._alias_version(f, forced, resolve)) if alias_of(f) else _stat(f) for f in files)

    def _alias_version(self, uri: str, forced: bool, resolve: bool = True) -> str | None:
        """The version an alias names: resolved again when ``SCORING_MLFLOW__POLL_S`` has passed (or ``forced``);
        the last known one while the registry cannot be reached (so nothing is reloaded then)."""
        at, known = self.aliases.get(uri, (0.0, None))
        poll = self.settings.mlflow.poll_s
        now = time.monotonic()
        if uri in self.aliases and (not resolve or (not forced and (poll <= 0 or now - at < poll))):
            return known
        name, alias = alias_of(uri) or ("", "")
        try:
            version = Registry(self.settings.mlflow, self.settings.s3).resolve(uri).version
        except RegistryError as exc:
            self.aliases[uri] = (now, known)
            self.metrics.mlflow_resolves.labels("failed").inc()
            log.error("cannot resolve the MLflow alias; the loaded version keeps serving",
                      extra={"model": uri, "reason": str(exc)[:500]})
            return known
        self.aliases[uri] = (now, version)
        if known is not None and version != known:
            with self.lock:  # from now on a batch waits for this version (see the module docstring)
                if self.switch is None:  # another alias moved in the same poll: the same load settles both
                    self.switch = Switch(uri, known, version)
            self.metrics.mlflow_switch_waiting.set(1)
            log.info("MLflow alias moved; loading the version it names", extra={"model": uri, "from": known,
                                                                               "to": version})
        # Shown after the switch is open: whoever sees the new version here sees batches wait for it.
        self.metrics.mlflow_resolves.labels("ok").inc()
        if version is not None and version.isdigit():
            self.metrics.mlflow_alias_version.labels(name, alias).set(int(version))
        return version

    def _poll_s(self) -> float:
        """The loop's period: the routing's, or the alias poll when that is shorter (0 = not polled)."""
        periods = [self.settings.routing.poll_s]
        if any(alias_of(f) for f in self.files):
            periods.append(self.settings.mlflow.poll_s)
        return min((p for p in periods if p > 0), default=0.0)

    # -- background ------------------------------------------------------------------------------
    def start(self) -> None:
        poll = self._poll_s()
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, args=(poll,), name="routing-watch", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()

    def reload_now(self, *_args: object) -> None:
        """SIGHUP: reload even if nothing seems changed (safe to call from a signal handler)."""
        self.forced = True
        self.wake.set()

    def _loop(self, poll: float) -> None:
        while not self.stopped.is_set():
            poll = self._poll_s()  # a reloaded routing file may have added (or dropped) a followed alias
            timeout = poll if poll > 0 else None
            if self.retry_at is not None:
                due = max(0.0, self.retry_at - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            self.wake.wait(timeout)
            self.wake.clear()
            if self.stopped.is_set():
                return
            forced, self.forced = self.forced, False
            self.check(forced)

    def check(self, forced: bool = False) -> bool:
        """Load a changed routing (or retry a failed load that is due); True when a new router is waiting to be
        picked up. Every path out ends an open switch (``_settle``)."""
        with self.lock:
            base = self.pending or self.router
        now = self.fingerprint(forced)
        retry = self.retry_at is not None and time.monotonic() >= self.retry_at
        if now == self.seen and not forced and not retry:
            return False
        attempt = "retry" if retry and now == self.seen and not forced else "first"
        follows = any(alias_of(f) for f in self.files)
        if now != self.seen:
            self.failures = 0  # something else to load: its retries start from the first delay
        self.seen = now
        try:
            router = self.load()
        except ScoringError as exc:
            self._failed(str(exc), attempt)
            return False
        except Exception as exc:  # noqa: BLE001 - whatever a half-written file does, keep serving
            self._failed(f"{type(exc).__name__}: {exc}", attempt)
            return False
        self.seen = self.fingerprint(resolve=False)
        self.metrics.routing_reloads.labels("ok").inc()
        self.metrics.routing_reload_ok.set(1)
        if follows:
            self.metrics.mlflow_loads.labels("ok", attempt).inc()
        if self.failures:
            log.info("reload succeeded after failing", extra={"attempts": self.failures + 1})
        self.failures, self.retry_at = 0, None
        # Same bytes under another label (an alias moved to a re-registered copy) still switches: the results'
        # model_version must name the version the alias names.
        labels = [v.model.version for v in router.versions] == [v.model.version for v in base.versions]
        if router.generation == base.generation and labels and not forced:
            self._settle("ok")
            return False
        with self.lock:
            self.pending = router  # before the switch ends: a batch that waited for it takes this router
        self._settle("ok")
        log.info("routing loaded; switching at the next batch", extra={"versions": router.describe()})
        return True

    def _failed(self, reason: str, attempt: str = "first") -> None:
        extra: dict[str, object] = {"reason": reason[:500]}
        if any(alias_of(f) for f in self.files):  # a followed alias: retried with backoff (may be transient)
            self.failures += 1
            m = self.settings.mlflow
            delay = min(m.retry_max_s, m.retry_s * 2 ** min(self.failures - 1, 30))
            self.retry_at = time.monotonic() + delay
            self.metrics.mlflow_loads.labels("failed", attempt).inc()
            extra.update(attempt=attempt, failures=self.failures, retry_in_s=round(delay, 3))
        else:
            self.retry_at = None
        log.error("routing reload failed; the previous routing keeps serving", extra=extra)
        self.metrics.routing_reloads.labels("failed").inc()
        self.metrics.routing_reload_ok.set(0)
        self._settle("failed")

    def _settle(self, result: str) -> None:
        """End the open switch: batches stop waiting (a new router, if any, is pending already)."""
        with self.lock:
            switch, self.switch = self.switch, None
        if switch is None:
            return
        switch.done.set()
        self.metrics.mlflow_switch_waiting.set(0)
        self.metrics.mlflow_switches.labels(result).inc()
        if result != "ok":
            log.error("the version a moved MLflow alias names did not load; the old version keeps serving and "
                      "the next batches are scored by it (retried with backoff)",
                      extra={"model": switch.uri, "from": switch.old, "to": switch.new})

    # -- between batches -------------------------------------------------------------------------
    @property
    def changed(self) -> bool:
        """A switch is open or a new router is pending: ``current()`` would not hand back the router in use."""
        return self.switch is not None or self.pending is not None

    @property
    def waiting(self) -> str:
        """What a batch waits for now ("" when nothing): stream readiness shows it."""
        switch = self.switch
        return switch.describe() if switch is not None else ""

    def _wait_over(self, switch: Switch, elapsed: float) -> bool:
        """True when the batch stops waiting for ``switch``: done, or waited ``SWITCH_WAIT_S`` (a timeout)."""
        if switch.done.is_set():
            return True
        if elapsed < self.settings.mlflow.switch_wait_s:
            return False
        with self.lock:
            if self.switch is not switch:
                return True
            self.switch = None  # the load goes on; its router is picked up when it is done
        self.metrics.mlflow_switch_waiting.set(0)
        self.metrics.mlflow_switches.labels("timeout").inc()
        log.error("the version a moved MLflow alias names is still loading after SCORING_MLFLOW__SWITCH_WAIT_S; "
                  "batches go on with the old version until it is loaded",
                  extra={"model": switch.uri, "from": switch.old, "to": switch.new,
                         "waited_s": round(elapsed, 3)})
        return True

    def current(self, while_waiting: Callable[[], bool] | None = None) -> Router:
        """The router for the next batch (call between batches): waits first while a switch is open (see the
        module docstring). ``while_waiting`` is called about every 50 ms meanwhile; True ends the wait."""
        switch = self.switch
        if switch is not None:
            started = time.monotonic()
            while not self._wait_over(switch, time.monotonic() - started):
                if while_waiting is not None and while_waiting():
                    break
                switch.done.wait(WAIT_SLICE_S)
            self.metrics.mlflow_switch_wait.inc(time.monotonic() - started)
        return self._take()

    async def current_async(self) -> Router:
        """``current()`` for the event loop (serve mode): a request that arrives during a switch waits for it."""
        switch = self.switch
        if switch is not None:
            started = time.monotonic()
            while not self._wait_over(switch, time.monotonic() - started):
                await asyncio.sleep(WAIT_SLICE_S)
            self.metrics.mlflow_switch_wait.inc(time.monotonic() - started)
        return self._take()

    def _take(self) -> Router:
        """Swap in a reloaded router if one is pending; the router to use."""
        if self.pending is not None:
            with self.lock:
                new, self.pending = self.pending, None
            if new is not None:
                old = self.router
                self.guards.attach(new)
                self.router = new
                log.info("routing switched", extra={"from": old.generation, "to": new.generation,
                                                    "versions": new.describe()})
                if self.on_switch is not None:
                    self.on_switch(new)
        return self.router

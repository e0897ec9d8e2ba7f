"""Hot reload: keep the router current with the routing file (or the single model file).

A background thread checks, every ``poll_s`` and on SIGHUP, whether the routing file or a local model
file it names changed (size, mtime or inode: a ConfigMap update swaps a symlink, which changes the inode).
It then loads the new versions and verifies their pins *in the background*; the mode picks the new router
up between batches (``current()``), so the batch in hand finishes with the old routing. A file that fails to
parse, load or verify leaves the old routing serving, with an error log line, ``scoring_routing_reloads_total
{result="failed"}`` and ``scoring_routing_reload_ok`` 0; it is tried again when it changes again (or on SIGHUP).
Model files on S3 are not polled (they are read at (re)load): change the routing file to roll them.

A ``models:/NAME@ALIAS`` model (``--model`` or in the routing file) is followed: every ``SCORING_MLFLOW__POLL_S``
the alias is resolved again, and when it names another version that version is loaded and swapped in exactly
as above (promotion and rollback are "move the alias"). A registry that cannot be reached meanwhile changes
nothing: the loaded version keeps serving, with an error log line and ``scoring_mlflow_resolves_total
{result="failed"}``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from workers.errors import ScoringError
from workers.observability import Metrics
from workers.scoring.build import build_router
from workers.scoring.guard import GuardBook
from workers.scoring.registry import Registry, RegistryError, alias_of
from workers.scoring.router import Router
from workers.scoring.routing_spec import read_routing
from workers.settings import Settings

log = logging.getLogger("workers.rollout")


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

    def fingerprint(self, forced: bool = False) -> tuple:
        files = ([self.path] if self.path else []) + self.files
        return tuple((f, self._alias_version(f, forced)) if alias_of(f) else _stat(f) for f in files)

    def _alias_version(self, uri: str, forced: bool) -> str | None:
        """The version an alias names: resolved again when ``SCORING_MLFLOW__POLL_S`` has passed (or ``forced``);
        the last known one while the registry cannot be reached (so nothing is reloaded then)."""
        at, known = self.aliases.get(uri, (0.0, None))
        poll = self.settings.mlflow.poll_s
        now = time.monotonic()
        if uri in self.aliases and not forced and (poll <= 0 or now - at < poll):
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
        self.metrics.mlflow_resolves.labels("ok").inc()
        if version is not None and version.isdigit():
            self.metrics.mlflow_alias_version.labels(name, alias).set(int(version))
        if known is not None and version != known:
            log.info("MLflow alias moved; loading the version it names", extra={"model": uri, "from": known,
                                                                               "to": version})
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
            self.wake.wait(poll if poll > 0 else None)
            self.wake.clear()
            if self.stopped.is_set():
                return
            forced, self.forced = self.forced, False
            self.check(forced)

    def check(self, forced: bool = False) -> bool:
        """Load a changed routing; True when a new router is waiting to be picked up."""
        with self.lock:
            base = self.pending or self.router
        now = self.fingerprint(forced)
        if now == self.seen and not forced:
            return False
        self.seen = now
        try:
            router = self.load()
        except ScoringError as exc:
            self._failed(str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - whatever a half-written file does, keep serving
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        self.seen = self.fingerprint()
        self.metrics.routing_reloads.labels("ok").inc()
        self.metrics.routing_reload_ok.set(1)
        if router.generation == base.generation and not forced:
            return False
        with self.lock:
            self.pending = router
        log.info("routing loaded; switching at the next batch", extra={"versions": router.describe()})
        return True

    def _failed(self, reason: str) -> None:
        log.error("routing reload failed; the previous routing keeps serving", extra={"reason": reason[:500]})
        self.metrics.routing_reloads.labels("failed").inc()
        self.metrics.routing_reload_ok.set(0)

    def current(self) -> Router:
        """The router for the next batch (swaps in a reloaded one; call between batches)."""
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

"""Guardrails: take a misbehaving version out of traffic by itself.

A version's ``guardrail`` (routing file) sets limits on its recent error rate, the PSI of its scores
against the primary version's, and (shadows) the mean absolute difference from the served score. When a
limit is passed after ``min_records`` rows, the version is *tripped*: a served version's weight becomes 0
(its keys go to the other versions by the same sticky hash), a shadow stops being scored. A log line
and ``scoring_guardrail_tripped{model_version}`` say so. A trip is kept per worker, across reloads of the
same version (name and model SHA-256); editing the routing file to a new model file, or restarting,
clears it. Every worker judges on its own traffic, so in a fleet each trips independently.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from workers.scoring.drift import psi

if TYPE_CHECKING:
    from workers.scoring.router import Router, Version

log = logging.getLogger("workers.rollout")


class _Window:
    """The last ``limit`` values of a stream of arrays."""

    def __init__(self, limit: int):
        self.parts: deque = deque()
        self.limit, self.size = limit, 0

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        self.parts.append(values[-self.limit:])
        self.size += min(values.size, self.limit)
        while self.size - self.parts[0].size >= self.limit:
            self.size -= self.parts.popleft().size

    def values(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0)


class _State:
    def __init__(self, window: int):
        self.scores = _Window(window)
        self.diffs = _Window(window)
        self.errors = _Window(window)  # 1 per failed row, 0 per good row


class GuardBook:
    def __init__(self) -> None:
        self.states: dict[tuple[str, str], _State] = {}
        self.tripped: dict[tuple[str, str], str] = {}
        self.router: Router | None = None
        self.checked = 0.0

    @staticmethod
    def _key(v: Version) -> tuple[str, str]:
        return v.name, v.model.sha256

    def attach(self, router: Router) -> None:
        """Start serving ``router`` (at start or after a reload): keep what is known of its versions."""
        self.router = router
        keys = {self._key(v) for v in router.versions}
        self.states = {k: s for k, s in self.states.items() if k in keys}
        self.tripped = {k: r for k, r in self.tripped.items() if k in keys}
        for v in router.versions:
            window = v.guardrail.window if v.guardrail else 20_000
            self.states.setdefault(self._key(v), _State(window))
        router.publish()
        router.metrics.guardrail_tripped.clear()
        for v in router.versions:
            if v.guardrail is not None:
                router.metrics.guardrail_tripped.labels(v.name).set(float(self.is_tripped(v)))

    def is_tripped(self, v: Version) -> bool:
        return self._key(v) in self.tripped

    def _watched(self, v: Version) -> bool:
        return v.guardrail is not None or (self.router is not None and v is self.router.primary)

    def errors(self, v: Version, rows: int, bad: int) -> None:
        if v.guardrail is not None and rows:
            flags = np.zeros(rows, dtype=np.float64)
            flags[:bad] = 1.0
            self.states[self._key(v)].errors.add(flags)

    def scores(self, v: Version, scores: np.ndarray) -> None:
        if self._watched(v):
            self.states[self._key(v)].scores.add(scores[np.isfinite(scores)])

    def differences(self, v: Version, diffs: np.ndarray) -> None:
        if v.guardrail is not None:
            self.states[self._key(v)].diffs.add(diffs[np.isfinite(diffs)])

    def check(self, every_s: float = 1.0) -> None:
        """Judge every guarded version (at most once per ``every_s``); trip those over a limit."""
        router = self.router
        if router is None or time.monotonic() - self.checked < every_s:
            return
        self.checked = time.monotonic()
        for v in router.versions:
            g = v.guardrail
            if g is None or v is router.primary or self.is_tripped(v):
                continue
            state = self.states[self._key(v)]
            reason = self._judge(g, state, self.states[self._key(router.primary)])
            if reason:
                self.trip(v, reason)

    @staticmethod
    def _judge(g, state: _State, primary: _State) -> str | None:
        errors = state.errors.values()
        if g.max_error_rate is not None and errors.size >= g.min_records:
            rate = float(errors.mean())
            if rate > g.max_error_rate:
                return f"error rate {rate:.4f} > {g.max_error_rate}"
        scores = state.scores.values()
        if g.max_score_psi is not None and scores.size >= g.min_records:
            base = primary.scores.values()
            if base.size >= g.min_records:
                value = score_psi(base, scores)
                if value > g.max_score_psi:
                    return f"score PSI against the primary {value:.4f} > {g.max_score_psi}"
        diffs = state.diffs.values()
        if g.max_mean_abs_diff is not None and diffs.size >= g.min_records:
            mad = float(diffs.mean())
            if mad > g.max_mean_abs_diff:
                return f"mean absolute difference from the served score {mad:.4f} > {g.max_mean_abs_diff}"
        return None

    def trip(self, v: Version, reason: str) -> None:
        self.tripped[self._key(v)] = reason
        log.error("guardrail tripped: version taken out of traffic",
                  extra={"model_version": v.name, "role": v.role, "reason": reason})
        if self.router is not None:
            self.router.metrics.guardrail_tripped.labels(v.name).set(1)
            self.router.publish()


def score_psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """PSI of ``actual`` scores over decile bins of ``expected`` scores."""
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=edges.size + 1) / expected.size
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=edges.size + 1) / actual.size
    return psi(e, a)

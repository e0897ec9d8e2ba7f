"""Reference profiles and drift: does the input still look like the training data?

``build_profile`` computes, per feature, quantile bin edges (numeric) or one bin per category (categorical),
the share of records per bin, the null share and the min/max, from reference data. ``DriftMonitor`` keeps
per-feature bin counts over a sliding window of recent records and reports the population stability index
(PSI) against the profile, the null share and the share of values outside the reference range. It works on the
feature matrix the scorer already built (one ``searchsorted`` per feature per batch), so it is cheap to leave on.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import numpy as np

from workers.scoring.model import Model

EPS = 1e-4  # floor for shares, so an empty bin does not make PSI infinite


def _edges(column: np.ndarray, bins: int) -> list[float]:
    values = column[~np.isnan(column)]
    if values.size == 0:
        return []
    inner = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return inner.tolist()


def _bin(column: np.ndarray, edges: np.ndarray, n_bins: int) -> np.ndarray:
    """Counts per bin (len(edges) + 1 bins) of the non-null values."""
    values = column[~np.isnan(column)]
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=n_bins)[:n_bins]


def build_profile(model: Model, matrix: np.ndarray, bins: int = 10) -> dict[str, Any]:
    features = {}
    for j, name in enumerate(model.feature_names):
        column = matrix[:, j]
        cats = model.categorical.get(j)
        if cats:
            edges = [i + 0.5 for i in range(len(cats) - 1)]
        else:
            edges = _edges(column, bins)
        counts = _bin(column, np.asarray(edges), len(edges) + 1)
        present = column[~np.isnan(column)]
        features[name] = {
            "edges": edges,
            "shares": (counts / max(counts.sum(), 1)).tolist(),
            "null_share": float(np.isnan(column).mean()) if column.size else 0.0,
            "min": float(present.min()) if present.size else None,
            "max": float(present.max()) if present.size else None,
        }
    return {"model_version": model.version, "records": int(matrix.shape[0]), "bins": bins, "features": features}


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e = np.maximum(expected, EPS)
    a = np.maximum(actual, EPS)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Per-feature counts over the last ``window`` records, compared with a profile."""

    def __init__(self, profile: dict[str, Any], feature_names: list[str], window: int = 50_000):
        missing = [n for n in feature_names if n not in profile["features"]]
        if missing:
            raise ValueError(f"the profile has no entry for feature(s) {missing[:5]}")
        self.names = list(feature_names)
        self.window = window
        self.edges = [np.asarray(profile["features"][n]["edges"], dtype=np.float64) for n in self.names]
        self.expected = [np.asarray(profile["features"][n]["shares"]) for n in self.names]
        self.bounds = [(profile["features"][n]["min"], profile["features"][n]["max"]) for n in self.names]
        self.lo = np.array([np.nan if b[0] is None else b[0] for b in self.bounds])
        self.hi = np.array([np.nan if b[1] is None else b[1] for b in self.bounds])
        self.batches: collections.deque = collections.deque()
        self.records = 0

    @classmethod
    def from_file(cls, path: str, feature_names: list[str], window: int = 50_000) -> DriftMonitor:
        with open(path) as f:
            return cls(json.load(f), feature_names, window)

    def observe(self, matrix: np.ndarray) -> None:
        n = matrix.shape[0]
        if n == 0:
            return
        nulls = np.isnan(matrix)
        null_counts = nulls.sum(axis=0)
        # NaN compares false both ways, so nulls are never out of range; a feature without bounds never is.
        out = ((matrix < self.lo) | (matrix > self.hi)).sum(axis=0)
        counts = []
        for j, edges in enumerate(self.edges):
            # searchsorted puts NaN after every edge: take the nulls back out of the last bin.
            c = np.bincount(np.searchsorted(edges, matrix[:, j], side="right"), minlength=len(edges) + 1)
            c[len(edges)] -= null_counts[j]
            counts.append(c)
        stats = np.column_stack([null_counts, out, np.full(len(self.names), n)]).astype(np.float64)
        self.batches.append((counts, stats))
        self.records += n
        while self.records - self.batches[0][1][0, 2] >= self.window and len(self.batches) > 1:
            self.records -= int(self.batches.popleft()[1][0, 2])

    def report(self) -> dict[str, dict[str, float]]:
        """feature -> {psi, null_share, out_of_range_share} over the window."""
        if not self.batches:
            return {}
        out = {}
        totals = sum(b[1] for b in self.batches)
        for j, name in enumerate(self.names):
            counts = sum(b[0][j] for b in self.batches)
            actual = counts / max(counts.sum(), 1)
            rows = totals[j, 2]
            present = rows - totals[j, 0]
            out[name] = {"psi": psi(self.expected[j], actual) if counts.sum() else 0.0,
                         "null_share": float(totals[j, 0] / rows) if rows else 0.0,
                         "out_of_range_share": float(totals[j, 1] / present) if present else 0.0}
        return out


def monitor_for(settings, model: Model, window: int | None = None) -> DriftMonitor | None:
    """The drift monitor the settings ask for (``scoring.profile``), or None; a bad profile is a ConfigError."""
    from workers.errors import ConfigError

    path = settings.scoring.profile
    if not path:
        return None
    try:
        return DriftMonitor.from_file(path, model.feature_names, window or settings.scoring.drift_window)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # Any of these is the file's fault (not JSON, not a profile, another model's): one line, not a traceback.
        raise ConfigError("SCORING_SCORING__PROFILE", f"cannot use {path} as a profile from `profile`: "
                                                      f"{type(exc).__name__}: {exc}") from None


class DriftHook:
    """Drift on the scoring path, the same in every mode: the router hands it the primary version's matrix of
    each batch's scorable rows (``Router.observe``; batch, stream and CloudEvents through the router's decoding,
    OIP through ``infer``). It keeps the window and publishes the gauges at most every ``publish_s``; when a
    reload changes the primary's features it starts a new window for them. ``report()`` is the batch summary's.
    """

    def __init__(self, settings, metrics, window: int | None = None, publish_s: float = 1.0):
        self.settings, self.metrics, self.window, self.publish_s = settings, metrics, window, publish_s
        self.monitor: DriftMonitor | None = None
        self.features: list[str] | None = None
        self.published = 0.0

    @classmethod
    def from_settings(cls, settings, metrics, model: Model, window: int | None = None) -> DriftHook | None:
        """A hook when ``SCORING_SCORING__PROFILE`` is set (the profile is checked now: ConfigError), else None."""
        if not settings.scoring.profile:
            return None
        hook = cls(settings, metrics, window)
        hook.monitor, hook.features = monitor_for(settings, model, window), list(model.feature_names)
        return hook

    def observe(self, model: Model, matrix: np.ndarray) -> None:
        if not matrix.shape[0]:
            return
        if self.monitor is None or model.feature_names != self.features:
            self.monitor, self.features = monitor_for(self.settings, model, self.window), list(model.feature_names)
            if self.monitor is None:
                return
        self.monitor.observe(matrix)
        now = time.monotonic()
        if now - self.published > self.publish_s:
            self.metrics.drift(self.monitor.report())
            self.published = now

    def report(self) -> dict[str, dict[str, float]]:
        return self.monitor.report() if self.monitor is not None else {}


def feature_batches(scorer, data: str, s3):
    """(files read, generator of feature matrices) of Parquet ``data`` in the scorer's model feature order, as
    the workers see them (categories as the model's codes, bad values as missing); used by profile and report."""
    from workers.sources.parquet import iter_batches, list_inputs, open_parquet

    fs, files = list_inputs(data, s3)
    names = scorer.model.feature_names

    def matrices():
        for f in files:
            pf = open_parquet(fs, f)
            for rb in iter_batches(pf, [c for c in names if c in pf.schema_arrow.names], 65536):
                yield scorer.features_only(rb)

    return len(files), matrices()

"""Per-version statistics of a scored batch: the metrics and guardrail inputs of each version, and how a shadow
version agrees with the served score of the same records (per served version, the baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from workers.observability import observe_many
from workers.scoring.scorer import Scored

if TYPE_CHECKING:
    from workers.scoring.router import Router, Version


def observe_version(router: Router, v: Version, scored: Scored) -> None:
    """Rows, non-finite scores and the score histogram of version ``v``; the guardrails see them too."""
    n = scored.results.num_rows
    scores = scored.results["score"].to_numpy()
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    router.guards.errors(v, n, bad)
    router.guards.scores(v, scores)
    router.metrics.version_rows.labels(v.name, v.role).inc(n)
    if bad:
        router.metrics.version_errors.labels(v.name).inc(bad)
    observe_many(router.metrics.score.labels(v.name), scores[np.isfinite(scores)])


def compare_shadow(router: Router, shadow_v: Version, rows: np.ndarray, scored: Scored, served_score: np.ndarray,
                   served_label: np.ndarray, served_version: np.ndarray) -> None:
    """Shadow agreement with the served score of the same records (``rows``), per served version."""
    shadow = scored.results["score"].to_numpy()
    base_score = served_score[rows]
    base_version = served_version[rows]
    multiclass = shadow_v.model.multiclass
    if multiclass:
        label = scored.results["label"].to_numpy()
    for idx in np.unique(base_version):
        if idx < 0:
            continue
        mine = base_version == idx
        baseline = router.versions[int(idx)]
        a, b = shadow[mine], base_score[mine]
        if multiclass and baseline.model.multiclass:
            agree = int(np.count_nonzero(label[mine] == served_label[rows][mine]))
        else:
            agree = int(np.count_nonzero((a >= router.threshold) == (b >= router.threshold)))
        diff = np.abs(a - b)
        router.guards.differences(shadow_v, diff)
        router.metrics.shadow_pairs.labels(shadow_v.name, baseline.name).inc(int(mine.sum()))
        router.metrics.shadow_agree.labels(shadow_v.name, baseline.name).inc(agree)
        router.metrics.shadow_abs_diff.labels(shadow_v.name, baseline.name).inc(float(np.nansum(diff)))

"""Per-record explanations: TreeSHAP feature contributions from LightGBM (``pred_contrib``).

For each record: ``explanation`` = list of {feature, value, contribution, category} (the top-k by absolute
contribution, or all features), and ``explanation_base`` = the expected raw score. Contributions plus the base sum
to the raw score (before the link function: log-odds for binary). For multiclass, the explained class is the top class.
Contributions come from LightGBM even with the lleaves backend (lleaves has no pred_contrib).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from workers.scoring.model import Model

# value: the feature's value as a number (a numeric category as itself); category: for a pandas-categorical
# feature, the category the input value is (as text; null when missing or a category the model has not seen),
# as the model sees it internally by position in its category list, never shown.
ITEM = pa.struct([("feature", pa.string()), ("value", pa.float64()), ("contribution", pa.float64()),
                  ("category", pa.string())])


def contributions(model: Model, matrix: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(contributions [n, F], base [n]) for each row (of its top class when multiclass)."""
    raw = np.asarray(model.booster.predict(matrix, pred_contrib=True, num_threads=model.threads,
                                           validate_features=False))
    width = len(model.feature_names) + 1
    if model.multiclass:
        raw = raw.reshape(matrix.shape[0], model.num_class, width)
        raw = raw[np.arange(matrix.shape[0]), classes]
    return raw[:, :-1], raw[:, -1]


def explanation_columns(model: Model, matrix: np.ndarray, classes: np.ndarray | None, top_k: int | None
                        ) -> dict[str, pa.Array]:
    n, f = matrix.shape
    contrib, base = contributions(model, matrix, classes)
    k = f if top_k is None else min(top_k, f)
    if k < f:
        idx = np.argpartition(-np.abs(contrib), k - 1, axis=1)[:, :k]
    else:
        idx = np.tile(np.arange(f), (n, 1))
    # Most important first within each record.
    order = np.argsort(-np.abs(np.take_along_axis(contrib, idx, axis=1)), axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    rows = np.repeat(np.arange(n), k)
    flat = idx.ravel()
    names = pa.array(model.feature_names, pa.string()).take(pa.array(flat))
    values = matrix[rows, flat]
    values, categories = _shown_values(model, flat, values)
    items = pa.StructArray.from_arrays(
        [names, pa.array(values, mask=np.isnan(values)), pa.array(contrib[rows, flat]), categories],
        fields=list(ITEM))
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return {"explanation": pa.ListArray.from_arrays(offsets, items), "explanation_base": pa.array(base)}


def _shown_values(model: Model, features: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """The matrix holds a pandas-categorical feature's position in its category list: show the category
    instead (``value`` when numeric, ``category`` as text)."""
    mapped = {j: cats for j, cats in model.categorical.items() if cats is not None}
    if not mapped:
        return values, pa.nulls(len(values), pa.string())
    values = values.copy()
    shown: list[str | None] = [None] * len(values)
    for j, cats in mapped.items():
        numeric = all(isinstance(c, int | float) and not isinstance(c, bool) for c in cats)
        for i in np.flatnonzero(features == j):
            code = values[i]
            cat = cats[int(code)] if not np.isnan(code) and 0 <= code < len(cats) else None
            shown[i] = None if cat is None else str(cat)
            values[i] = float(cat) if numeric and cat is not None else np.nan
    return values, pa.array(shown, pa.string())

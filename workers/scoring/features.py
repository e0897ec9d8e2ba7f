"""Features: input columns -> the model's float64 matrix, converted as LightGBM's own pandas path converts them.

``feature_matrix`` builds the matrix in the model's feature order (null -> NaN, which LightGBM treats as
missing; a pandas-categorical feature's values -> their positions in the model's category list) with a reason
for each row that cannot be scored (e.g. a string that is not a number). The conversion of one column is
``model_values``, which every mode uses (serve's OIP tensors and stream's JSON records too), so a value scores
the same whatever its physical type: the contract is LightGBM's predict on the equivalent pandas frame
(``tests/test_differential.py``). A column of a type that cannot hold a feature, or a missing feature, raises
``InputError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import InputError
from workers.scoring.model import Model


@dataclass
class Features:
    matrix: np.ndarray  # float64 [n, n_features], C order
    reasons: dict[int, str] = field(default_factory=dict)  # row index -> why it cannot be scored


def plain(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)


_NUMBER_TEXT = r"(?i)^[ \t\n\r\f\v]*[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|inf|infinity|nan)[ \t\n\r\f\v]*$"


def _floats(name: str, col: pa.Array | pa.ChunkedArray, reasons: dict[int, str] | None) -> np.ndarray:
    """Values as float64 (null -> NaN), as LightGBM's pandas path converts a frame: every integer, float,
    decimal and boolean type is cast, integers beyond 2**53 rounded to the nearest float64 like numpy does.

    Text is parsed as a number as strictly as ``pandas.to_numeric``: ASCII digits, an optional sign, point and
    exponent, surrounding spaces; ``"inf"`` is infinity, ``"nan"`` is missing, like the float values they
    spell; ``"1_000"``, non-ASCII digits, ``"nan(1)"``, ``"0x10"`` are not numbers. A text that is not a
    number gets a reason in ``reasons`` (its row is rejected), or is missing when ``reasons`` is None (a
    category value the model has not seen). Other types (lists, timestamps, binary...) are not numbers:
    InputError, the whole batch (file) fails.
    """
    t = col.type
    if pa.types.is_null(t):
        return np.full(len(col), np.nan)
    if _is_number(t):
        # safe=False: an int64/uint64 beyond 2**53 has no exact float64; a safe cast refuses it, numpy and
        # LightGBM round it.
        return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    if not is_text(t):
        raise InputError(f"feature column '{name}' has type {t}, which is not numeric")
    # What a number may look like, as pandas.to_numeric takes it: ASCII digits only (no "1_000", no "٣"),
    # surrounding spaces allowed, "inf"/"infinity"/"nan" in any case, nothing else ("nan(1)", "0x10").
    text = pc.cast(col, pa.string())
    try:  # fast path: Arrow parses the whole column, or raises if any value is not a number for it
        fast = np.array(pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fast = None
    if fast is not None:
        # Arrow is stricter than pandas but for one thing: it reads "nan(1)" (any "nan(...)") as NaN.
        odd = np.flatnonzero(np.isnan(fast))
        if not odd.size or pc.all(pc.match_substring_regex(text.take(pa.array(odd)), _NUMBER_TEXT)).as_py():
            return fast
    valid = pc.match_substring_regex(text, _NUMBER_TEXT)
    bad = pc.invert(pc.fill_null(valid, True))
    if pc.any(bad).as_py():
        bad_idx = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        if reasons is not None:
            for i in bad_idx:
                raw = text[int(i)].as_py()
                reasons.setdefault(int(i), f"feature '{name}': {raw[:80]!r} is not a number")
        text = pc.if_else(valid, text, pa.scalar(None, pa.string()))
    values = pc.cast(pc.utf8_trim_whitespace(text), pa.float64()).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.float64)  # writable (a zero-copy Arrow view is not)


def _category_codes(name: str, col: pa.Array | pa.ChunkedArray, categories: list) -> np.ndarray:
    """Each value's position in the model's category list (NaN for null or a category the model has not seen,
    as LightGBM's pandas path does), whatever the column's type: numeric categories are matched as numbers
    (so 5, 5.0, "5", Decimal("5.00") are all the category 5), text categories as text."""
    value_set = pa.array(categories)
    vt = value_set.type
    if pa.types.is_integer(vt) and pa.types.is_integer(col.type):
        # Integers compare exactly (through a decimal wide enough for any int64/uint64): via float64,
        # neighbours beyond 2**53 would be one category.
        wide = pa.decimal128(38, 0)
        col, value_set = pc.cast(col, wide), pc.cast(value_set, wide)
    elif pa.types.is_integer(vt) or pa.types.is_floating(vt):
        values = pa.array(_floats(name, col, None), from_pandas=True)  # NaN -> null: no category
        value_set = pc.cast(value_set, pa.float64(), safe=False)
        col = values
    elif is_text(col.type) or _is_number(col.type) or pa.types.is_null(col.type):
        try:
            col, value_set = pc.cast(col, pa.string()), pc.cast(value_set, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"categorical feature column '{name}' has type {col.type}, which cannot hold its "
                             f"categories ({vt})") from None
    else:
        raise InputError(f"categorical feature column '{name}' has type {col.type}, which cannot hold its "
                         f"categories ({vt})")
    codes = pc.index_in(col, value_set=value_set)
    return pc.cast(codes, pa.float64()).to_numpy(zero_copy_only=False)


def model_values(model: Model, j: int, values, reasons: dict[int, str]) -> np.ndarray:
    """Feature ``j``'s values (an Arrow array or chunked array, a numpy array, or a list) -> what the model's
    predict takes for it: float64, NaN for missing, a pandas-categorical feature's values replaced by their
    positions in its category list. The one conversion every mode uses, so the same value scores the same
    whatever the physical type it arrives in. Rows that cannot be scored get a reason in ``reasons`` (by
    index); a column of a type that cannot hold the feature raises InputError."""
    name = model.feature_names[j]
    if isinstance(values, pa.Array | pa.ChunkedArray):
        col = values
    else:
        try:
            col = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"feature '{name}': values of mixed or unsupported types ({str(exc)[:80]})") from None
    col = plain(col)
    cats = model.categorical.get(j)
    if cats is not None:
        return _category_codes(name, col, cats)
    return _floats(name, col, reasons)  # numeric, or a categorical_feature given by integer code (used as is)


def _lightgbm_name(column: str) -> str:
    """The feature name LightGBM gives an input column: it replaces each space with '_' (``days since`` ->
    ``days_since``); it refuses JSON special characters, so no other name changes."""
    return column.replace(" ", "_")


def missing_features(missing: list[str], present) -> str:
    """The one-line reason for missing feature columns. A column LightGBM renamed when the model was trained
    (``days since`` saved as ``days_since``) is named, with what to do: the input is not renamed silently, as
    both spellings may be columns of one input."""
    shown = ", ".join(repr(c) for c in missing[:10])
    message = f"missing feature column(s) {shown}{' ...' if len(missing) > 10 else ''}"
    renamed: dict[str, str] = {}
    for c in present:
        if isinstance(c, str) and _lightgbm_name(c) != c:
            renamed.setdefault(_lightgbm_name(c), c)
    hints = [f"the input has {renamed[c]!r} for {c!r}" for c in missing if c in renamed]
    if hints:
        message += (f" ({'; '.join(hints[:10])}: LightGBM replaced spaces in feature names with '_' when the "
                    "model was trained; rename the column)")
    return message


def feature_matrix(model: Model, columns) -> Features:
    """Columns by feature name (a mapping, or an Arrow table/batch) -> the model's float64 matrix in feature
    order, with a reason for each row that cannot be scored. Raises InputError when a feature is missing."""
    names = model.feature_names
    present = set(columns.schema.names if hasattr(columns, "schema") else columns)
    missing = [c for c in names if c not in present]
    if missing:
        raise InputError(missing_features(missing, present))
    get = columns.column if hasattr(columns, "schema") else columns.__getitem__
    n = columns.num_rows if hasattr(columns, "schema") else len(get(names[0])) if names else 0
    matrix = np.empty((n, len(names)), dtype=np.float64)
    reasons: dict[int, str] = {}
    for j, name in enumerate(names):
        matrix[:, j] = model_values(model, j, get(name), reasons)
    return Features(matrix, reasons)


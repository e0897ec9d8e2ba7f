"""Differential scoring: our scores equal LightGBM's own ``Booster.predict`` on the equivalent pandas frame.

Generated models (binary, regression, multiclass; numeric features, pandas-categorical text, integer and ordered
features, integer ``categorical_feature`` codes, in any order) and generated encodings of the same values
(every integer width signed and unsigned, float16/32/64, decimal, numeric text with and without nulls,
dictionary-encoded, large_string, float columns for integer categories, NaN and nulls anywhere). Each row
scores like LightGBM's pandas path (<= 1e-9), or is rejected with the reason named here as expected.

The Arrow path (``Router.score_table``, which batch, serve's CloudEvents and the router share) and the JSON record
decoder (stream, serve) are both checked; one test runs the real ``scoring-worker batch`` on a Parquet file
written by pandas. Property-based (hypothesis) plus fixed cases; models are tiny (15 rounds, 7 leaves).
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from decimal import Decimal

import lightgbm as lgb
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.scoring_util import TableScorer
from workers.decode.records import RecordDecoder
from workers.scoring.model import load_model
from workers.settings import ModelSettings

TOLERANCE = 1e-9
STR_CATS = ["red", "green", "blue"]
INT_CATS = [1, 5, 10, 20]  # not 0..n-1: a value used as a raw code is visibly wrong
CODES = 10  # integer categorical_feature codes 0..9 (more than any list has: never mistaken for one)
ORD_CATS = ["low", "mid", "high"]  # an ordered pandas categorical: LightGBM splits on its codes as numbers
KINDS = ("num", "pcat_str", "pcat_int", "icat", "pcat_ord")
OBJECTIVES = ("binary", "regression", "multiclass")
NOT_A_NUMBER = "abc"
CATS = {"pcat_str": STR_CATS, "pcat_int": INT_CATS, "pcat_ord": ORD_CATS}

# -- models ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def trained(objective: str, kinds: tuple[str, ...], folder: str) -> tuple[str, lgb.Booster]:
    """A tiny model whose features are ``kinds`` in that order (f0, f1, ...), saved under ``folder``."""
    rng = np.random.default_rng(abs(hash((objective, kinds))) % 2**32)
    n = 400
    data, signal = {}, np.zeros(n)
    for j, kind in enumerate(kinds):
        name = f"f{j}"
        if kind == "num":
            v = rng.uniform(0, 100, n)
            data[name], signal = v, signal + (v - 50) / 25 * rng.choice([-1, 1])
        elif kind == "icat":
            v = rng.integers(0, CODES, n)
            data[name], signal = v, signal + np.isin(v, [1, 4, 7]) * 1.5 - (v == 2)
        else:
            cats = CATS[kind]
            v = rng.choice(cats, n)
            data[name] = pd.Categorical(v, categories=cats, ordered=kind == "pcat_ord")
            signal = signal + (v == cats[1]) * 1.5 - (v == cats[-1]) * 1.0
    df = pd.DataFrame(data)
    noisy = signal + rng.normal(size=n) * 0.3
    params = {"verbose": -1, "num_leaves": 7, "min_data_in_leaf": 5, "min_data_per_group": 5, "cat_smooth": 1,
              "seed": 1, "objective": objective}
    if objective == "binary":
        y = (noisy > np.median(noisy)).astype(int)
    elif objective == "regression":
        y = noisy
    else:
        params["num_class"] = 3
        y = np.digitize(noisy, np.quantile(noisy, [1 / 3, 2 / 3]))
    cat_names = [f"f{j}" for j, k in enumerate(kinds) if k not in ("num", "pcat_ord")]
    booster = lgb.train(params, lgb.Dataset(df, y, categorical_feature=cat_names or "auto"), num_boost_round=15)
    path = os.path.join(folder, f"{objective}-{'-'.join(kinds)}.txt")
    booster.save_model(path)
    return path, booster


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("differential"))


@functools.lru_cache(maxsize=64)
def loaded(path: str):
    return load_model(ModelSettings(path=path, cache_dir=os.path.join(os.path.dirname(path), "cache")))


# -- values and their encodings -----------------------------------------------------------------------------
# A value is what the row means: a float (or None: missing) for num/icat, a category (or an unseen one, or None)
# for pandas categoricals, or NOT_A_NUMBER (text that is no number; only in text encodings of num/icat).

NUMERIC_ENCODINGS = ("float64", "float64_nan", "float32", "float16", "decimal", "string", "large_string",
                     "dict_float", "dict_string")
INTEGER_ENCODINGS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
TEXT_ENCODINGS = ("string", "large_string", "dict_string", "dict_large_string")
ENCODINGS = {
    "num": NUMERIC_ENCODINGS + INTEGER_ENCODINGS,
    "icat": NUMERIC_ENCODINGS + INTEGER_ENCODINGS,
    "pcat_int": NUMERIC_ENCODINGS + INTEGER_ENCODINGS + ("float64_nan",),
    "pcat_str": TEXT_ENCODINGS,
    "pcat_ord": TEXT_ENCODINGS,
}


def _text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if int(v) % 2 else f"{v:.1f}"  # "5" and "6.0": both spellings of integers
    return repr(v) if isinstance(v, float) else str(v)


def encode(values: list, encoding: str) -> pa.Array:
    """The same values in one physical Arrow type (None -> null, or NaN for ``float64_nan``)."""
    if encoding in INTEGER_ENCODINGS:
        return pa.array([None if v is None else int(v) for v in values], getattr(pa, encoding)())
    if encoding == "float64_nan":
        return pa.array(np.array([np.nan if v is None else float(v) for v in values]), from_pandas=False)
    if encoding in ("float64", "float32", "float16"):
        arr = pa.array([None if v is None else float(v) for v in values], pa.float64())
        return arr.cast(getattr(pa, encoding)())
    if encoding == "decimal":
        return pa.array([None if v is None else Decimal(repr(float(v))) for v in values], pa.decimal128(12, 3))
    if encoding == "dict_float":
        return pa.array([None if v is None else float(v) for v in values], pa.float64()).dictionary_encode()
    texts = [None if v is None else _text(v) for v in values]
    if encoding == "string":
        return pa.array(texts, pa.string())
    if encoding == "large_string":
        return pa.array(texts, pa.large_string())
    if encoding == "dict_string":
        return pa.array(texts, pa.string()).dictionary_encode()
    if encoding == "dict_large_string":
        return pa.array(texts, pa.large_string()).dictionary_encode()
    raise ValueError(encoding)


def value_strategy(kind: str, encoding: str) -> st.SearchStrategy:
    """Values that encoding can hold exactly (eighths fit float16; integers for integer types)."""
    if kind in ("pcat_str", "pcat_ord"):
        return st.sampled_from([*CATS[kind], "purple", None])
    if kind == "pcat_int":
        return st.sampled_from([*INT_CATS, 7, None])
    if kind == "icat":
        base = st.integers(0, CODES + 2).map(float)  # 10, 11, 12: codes never seen in training
    elif encoding in INTEGER_ENCODINGS:
        base = st.integers(0, 100).map(float)
    else:
        base = st.integers(0, 800).map(lambda k: k / 8)
    options = [base, st.none()]
    if encoding in ("string", "large_string", "dict_string"):
        options.append(st.just(NOT_A_NUMBER))
    return st.one_of(*options)


# -- the expectation: LightGBM's pandas path ----------------------------------------------------------------


def expected(kinds, columns: list[list], id_null: list[bool]) -> tuple[pd.DataFrame, dict[int, str]]:
    """The equivalent pandas frame (rows with a reason left out) and the reason for each rejected row."""
    n = len(id_null)
    reasons: dict[int, str] = {}
    for j, values in enumerate(columns):
        for i, v in enumerate(values):
            if v == NOT_A_NUMBER and kinds[j] in ("num", "icat"):
                reasons.setdefault(i, f"feature 'f{j}': '{NOT_A_NUMBER}' is not a number")
    for i in range(n):
        if id_null[i]:
            reasons.setdefault(i, "missing id ('id' is null)")
    keep = [i for i in range(n) if i not in reasons]
    frame = {}
    for j, (kind, values) in enumerate(zip(kinds, columns, strict=True)):
        kept = [values[i] for i in keep]
        if kind in CATS:
            cats = CATS[kind]
            frame[f"f{j}"] = pd.Categorical([v if v in cats else None for v in kept], categories=cats,
                                            ordered=kind == "pcat_ord")
        else:
            frame[f"f{j}"] = np.array([np.nan if v is None else float(v) for v in kept], dtype=np.float64)
    return pd.DataFrame(frame, index=keep), reasons


def check(objective, kinds, columns, encodings, id_null, model_dir) -> None:
    path, booster = trained(objective, tuple(kinds), model_dir)
    model = loaded(path)
    n = len(id_null)
    ids = [None if id_null[i] else f"r{i}" for i in range(n)]
    table = pa.table({"id": pa.array(ids, pa.string()),
                      **{f"f{j}": encode(v, e) for j, (v, e) in enumerate(zip(columns, encodings, strict=True))}})
    frame, reasons = expected(kinds, columns, id_null)
    out = TableScorer(model).score(table)
    got_reasons = dict(zip(out.error_rows.tolist(), out.errors["reason"].to_pylist(), strict=True))
    assert got_reasons == reasons, (encodings, got_reasons, reasons)
    assert out.results["id"].to_pylist() == [f"r{i}" for i in frame.index]
    if len(frame):
        want = booster.predict(frame)
        got = np.array(out.results["scores"].to_pylist()) if model.multiclass else out.results["score"].to_numpy()
        assert np.max(np.abs(got - want)) <= TOLERANCE, (encodings, table.to_pylist()[:3])
    check_records(model, booster, kinds, columns, id_null, frame)


def check_records(model, booster, kinds, columns, id_null, frame: pd.DataFrame) -> None:
    """The stream/serve JSON decoder on the same values as JSON numbers and categories (text for text
    categories, numbers for integer ones): the same matrix, so the same scores as the Arrow path."""
    n = len(id_null)
    records = []
    for i in range(n):
        obj = {} if id_null[i] else {"id": f"r{i}"}
        for j, values in enumerate(columns):
            v = values[i]
            if v == NOT_A_NUMBER:
                v = None  # JSON has numbers: a text there is another case (dead-lettered by type), not this one
            elif v is not None and kinds[j] in ("num", "icat"):
                v = int(v) if float(v).is_integer() and i % 2 else float(v)  # 5 and 5.0 both
            obj[f"f{j}"] = v
        records.append(orjson.dumps(obj))
    decoded = RecordDecoder(model).decode(records)
    keep = [i for i in range(n) if not id_null[i]]
    assert sorted(decoded.features.reasons) == [i for i in range(n) if id_null[i]]
    rows = decoded.features.matrix[keep]
    if not keep:
        return
    ok = frame.index.tolist()  # rows the Arrow path scored; the decoder saw NOT_A_NUMBER as null in the others
    at = [keep.index(i) for i in ok]
    if ok:
        assert np.max(np.abs(booster.predict(rows[at]) - booster.predict(frame))) <= TOLERANCE


# -- property-based -----------------------------------------------------------------------------------------


def model_pool(size: int = 14, seed: int = 14) -> list[tuple[str, tuple[str, ...]]]:
    """Generated model shapes (objective, feature kinds in order), from a fixed seed: hypothesis draws from this
    pool rather than a new model per example, as loading a model file (its crash probe runs in a child process)
    dominates the cost. The first ones are the orders that broke before (integer codes before a pandas list)."""
    rng = random.Random(seed)
    pool = [("binary", ("icat", "pcat_str")), ("multiclass", ("pcat_ord", "icat", "pcat_int", "num")),
            ("regression", ("num", "pcat_int", "pcat_str", "icat", "pcat_ord"))]
    while len(pool) < size:
        pool.append((rng.choice(OBJECTIVES), tuple(rng.choice(KINDS) for _ in range(rng.randint(1, 5)))))
    return pool


@st.composite
def cases(draw):
    objective, kinds = draw(st.sampled_from(model_pool()))
    n = draw(st.integers(1, 30))
    encodings, columns = [], []
    for kind in kinds:
        encoding = draw(st.sampled_from(ENCODINGS[kind]))
        values = draw(st.lists(value_strategy(kind, encoding), min_size=n, max_size=n))
        encodings.append(encoding)
        columns.append(values)
    id_null = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=n, max_size=n))
    return objective, list(kinds), columns, encodings, id_null


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_generated_models_and_encodings_score_like_lightgbm(case, model_dir):
    check(*case, model_dir)


# -- fixed cases ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_encoding_of_every_feature_kind(objective, model_dir):
    """Each encoding of each kind, once, in a model with every kind (integer code before pandas categoricals)."""
    kinds = ["icat", "num", "pcat_int", "pcat_ord", "pcat_str", "num"]
    rng = np.random.default_rng(5)
    n = 24
    pools = {"num": [k / 8 for k in range(0, 800, 37)] + [None], "icat": [*map(float, range(CODES + 2)), None],
             "pcat_int": [*INT_CATS, 7, None], "pcat_str": [*STR_CATS, "purple", None],
             "pcat_ord": [*ORD_CATS, "purple", None]}
    width = max(len(ENCODINGS[k]) for k in kinds)
    for step in range(width):
        encodings = [ENCODINGS[k][step % len(ENCODINGS[k])] for k in kinds]
        columns = []
        for kind, enc in zip(kinds, encodings, strict=True):
            pool = pools[kind]
            if enc in INTEGER_ENCODINGS:
                pool = [v if v is None or isinstance(v, str) or float(v).is_integer() else float(int(v))
                        for v in pool]
            columns.append([pool[int(k)] for k in rng.integers(0, len(pool), n)])
        check(objective, kinds, columns, encodings, [False] * n, model_dir)


def test_nulls_everywhere_and_a_column_of_nulls(model_dir):
    """All-null rows, a null id, and feature columns of Arrow's null type: missing, as LightGBM sees NaN."""
    kinds = ("pcat_str", "num", "icat", "pcat_int")
    path, booster = trained("binary", kinds, model_dir)
    model = loaded(path)
    n = 6
    table = pa.table({"id": pa.array(["a", "b", None, "d", "e", "f"]),
                      "f0": pa.nulls(n), "f1": pa.nulls(n), "f2": pa.nulls(n, pa.int64()), "f3": pa.nulls(n)})
    out = TableScorer(model).score(table)
    assert out.errors["reason"].to_pylist() == ["missing id ('id' is null)"]
    nan = pd.DataFrame({"f0": pd.Categorical([None] * 5, categories=STR_CATS), "f1": [np.nan] * 5,
                        "f2": [np.nan] * 5, "f3": pd.Categorical([None] * 5, categories=INT_CATS)})
    assert np.max(np.abs(out.results["score"].to_numpy() - booster.predict(nan))) <= TOLERANCE


def test_numeric_text_spellings_inf_and_nan(model_dir):
    """Text is read as Python reads a number: spaces, exponents, 'inf' (a number), 'nan' (missing); 'abc',
    '' and '1,5' are not numbers and reject their row with that reason."""
    path, booster = trained("regression", ("num", "num"), model_dir)
    model = loaded(path)
    texts = ["12.5", " 3 ", "1e1", "+4", "inf", "-Infinity", "nan", None, "abc", "", "1,5"]
    values = [12.5, 3.0, 10.0, 4.0, np.inf, -np.inf, np.nan, np.nan]
    table = pa.table({"id": [f"r{i}" for i in range(len(texts))], "f0": pa.array(texts),
                      "f1": pa.array([50.0] * len(texts))})
    out = TableScorer(model).score(table)
    assert out.errors["reason"].to_pylist() == ["feature 'f0': 'abc' is not a number",
                                                "feature 'f0': '' is not a number",
                                                "feature 'f0': '1,5' is not a number"]
    want = booster.predict(pd.DataFrame({"f0": values, "f1": [50.0] * len(values)}))
    assert np.max(np.abs(out.results["score"].to_numpy() - want)) <= TOLERANCE


def test_integers_beyond_2_to_53_in_every_wide_type(model_dir):
    """Nanosecond epochs and uint64 counters round to float64 as pandas/numpy (and so LightGBM) round them."""
    path, booster = trained("binary", ("num", "icat"), model_dir)
    model = loaded(path)
    big = [1_700_000_000_123_456_789 + k for k in range(5)] + [2**63 - 1]
    want = booster.predict(pd.DataFrame({"f0": np.array(big, dtype=np.int64).astype(np.float64), "f1": [3.0] * 6}))
    for col in (pa.array(big, pa.int64()), pa.array(big, pa.uint64()), pa.array([str(b) for b in big]),
                pa.array([Decimal(b) for b in big], pa.decimal128(20, 0))):
        table = pa.table({"id": [f"r{i}" for i in range(6)], "f0": col, "f1": pa.array([3] * 6, pa.int8())})
        out = TableScorer(model).score(table)
        assert out.num_errors == 0, (col.type, out.errors["reason"].to_pylist())
        assert np.max(np.abs(out.results["score"].to_numpy() - want)) <= TOLERANCE, col.type


def test_batch_cli_on_a_parquet_file_written_by_pandas(model_dir, tmp_path):
    """The real ``scoring-worker batch`` on what pandas writes: an int column with nulls (float64), a pandas
    categorical (dictionary), an integer category column with nulls (float64), integer codes, numeric text."""
    kinds = ("icat", "pcat_str", "num", "pcat_int", "num")
    path, booster = trained("binary", kinds, model_dir)
    rng = np.random.default_rng(9)
    n = 300
    nums = rng.integers(0, 100, n).astype(float)
    nums[::5] = np.nan  # an integer column with nulls: pandas keeps it float64
    sizes = rng.choice(INT_CATS + [7], n).astype(float)
    sizes[::7] = np.nan
    df = pd.DataFrame({
        "id": [f"p{i}" for i in range(n)],
        "f0": rng.integers(0, CODES, n).astype(np.uint8),
        "f1": pd.Categorical(rng.choice(STR_CATS, n), categories=STR_CATS),
        "f2": nums,
        "f3": sizes,
        "f4": [repr(float(v)) for v in rng.uniform(0, 100, n)],
    })
    df.loc[17, "f4"] = "n/a"  # the one bad value: its row alone is rejected
    (tmp_path / "in").mkdir()
    df.to_parquet(tmp_path / "in" / "day.parquet", index=False)
    assert pq.read_schema(tmp_path / "in" / "day.parquet").field("f1").type.id == pa.dictionary(
        pa.int8(), pa.string()).id
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", path, "--input",
                           str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-800:]  # 1: a row was rejected (and nothing else failed)
    summary = json.loads(proc.stdout)
    assert summary["rows_scored"] == n - 1 and summary["rows_rejected"] == 1, json.dumps(summary)
    import pyarrow.dataset as ds

    results = ds.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pandas().set_index("id")
    frame = df.drop(index=17).set_index("id")
    frame["f0"] = frame["f0"].astype(float)
    frame["f3"] = pd.Categorical(frame["f3"].where(frame["f3"].isin(INT_CATS)), categories=INT_CATS)  # 7: unseen
    frame["f4"] = frame["f4"].astype(float)
    want = booster.predict(frame[[f"f{j}" for j in range(5)]])
    got = results.loc[frame.index, "score"].to_numpy()
    assert np.max(np.abs(got - want)) <= TOLERANCE
    errors = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out" / "_errors") for f in fs
              if f.endswith(".parquet") and not f.startswith(".")]
    reasons = pa.concat_tables([pq.read_table(e) for e in errors]).to_pylist()
    assert [(r["id"], r["reason"]) for r in reasons] == [("p17", "feature 'f4': 'n/a' is not a number")]

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import FEATURES, frame
from workers.errors import InputError
from workers.model import load_model
from workers.scoring import Scorer
from workers.settings import ModelSettings


def scorer(path: str, **kw) -> Scorer:
    return Scorer(load_model(ModelSettings(path=path)), **kw)


@pytest.mark.parametrize("kind", ["binary", "regression", "categorical"])
def test_scores_equal_booster_predict(models, kind):
    df = frame(2000, seed=7, categorical=kind == "categorical")
    df.loc[3, "x0"] = np.nan  # a missing value
    booster = lgb.Booster(model_file=models[kind])
    expected = booster.predict(df[booster.feature_name()])
    out = scorer(models[kind]).score(pa.Table.from_pandas(df, preserve_index=False))
    assert out.rejected == 0
    assert out.results["id"].to_pylist() == df["id"].tolist()
    assert np.max(np.abs(out.results["score"].to_numpy() - expected)) <= 1e-9


def test_multiclass_gives_top_probability_label_and_all_scores(models):
    df = frame(1500, seed=8)
    booster = lgb.Booster(model_file=models["multiclass"])
    expected = booster.predict(df[FEATURES])
    out = scorer(models["multiclass"]).score(pa.Table.from_pandas(df, preserve_index=False)).results
    scores = np.array(out["scores"].to_pylist())
    assert scores.shape == (1500, 3)
    assert np.max(np.abs(scores - expected)) <= 1e-9
    assert np.array_equal(out["label"].to_numpy(), expected.argmax(axis=1))
    assert np.max(np.abs(out["score"].to_numpy() - expected.max(axis=1))) <= 1e-9


def test_categorical_from_plain_strings_and_unknown_categories(models):
    """Parquet without pandas metadata: categories as strings/ints; unknown ones are treated as missing."""
    df = frame(300, seed=9, categorical=True)
    booster = lgb.Booster(model_file=models["categorical"])
    df.loc[0, "color"] = np.nan
    expected = booster.predict(df[booster.feature_name()])
    table = pa.table({
        "id": df["id"], **{f: df[f] for f in FEATURES},
        "color": pa.array(df["color"].astype(object).where(df["color"].notna(), None).tolist(), pa.string()),
        "size": pa.array(df["size"].astype(int).tolist(), pa.int32()),
    })
    out = scorer(models["categorical"]).score(table)
    assert np.max(np.abs(out.results["score"].to_numpy() - expected)) <= 1e-9
    unseen = table.set_column(table.schema.get_field_index("color"), "color", pa.array(["purple"] * 300))
    df_unseen = df.copy()
    df_unseen["color"] = pd_categorical_nan(df_unseen["color"])
    got = scorer(models["categorical"]).score(unseen).results["score"].to_numpy()
    assert np.max(np.abs(got - booster.predict(df_unseen[booster.feature_name()]))) <= 1e-9


def pd_categorical_nan(col):
    import pandas as pd

    return pd.Categorical([None] * len(col), categories=col.cat.categories)


def test_bad_values_reject_their_row_only(models):
    table = pa.table({
        "id": ["a", "b", "c", "d", None],
        **{f: [0.1, 0.2, 0.3, 0.4, 0.5] for f in FEATURES[1:]},
        "x0": ["1.5", "abc", "nan", None, "2"],
    })
    out = scorer(models["binary"]).score(table)
    assert out.results["id"].to_pylist() == ["a", "d"]
    reasons = dict(zip(out.errors["id"].to_pylist(), out.errors["reason"].to_pylist(), strict=True))
    assert reasons["b"] == "feature 'x0': 'abc' is not a number"
    assert "not a finite number" in reasons["c"]
    assert "missing id" in reasons[None]
    assert list(out.error_rows) == [1, 2, 4]
    assert '"x0":"abc"' in out.errors["raw"][0].as_py()
    booster = lgb.Booster(model_file=models["binary"])
    row = np.array([[1.5, *[0.1] * 7], [np.nan, *[0.4] * 7]])
    assert np.max(np.abs(out.results["score"].to_numpy() - booster.predict(row))) <= 1e-9


def test_missing_feature_column_fails_the_batch(models):
    df = frame(10).drop(columns=["x5"])
    with pytest.raises(InputError, match="missing feature column.*'x5'"):
        scorer(models["binary"]).score(pa.Table.from_pandas(df, preserve_index=False))


def test_non_numeric_column_type_fails_the_batch(models):
    df = frame(10)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(1, "x0", pa.array([[1.0]] * 10))
    with pytest.raises(InputError, match="not numeric"):
        scorer(models["binary"]).score(table)


def test_passthrough_columns_are_copied(models):
    df = frame(50)
    df["customer"] = range(50)
    out = scorer(models["binary"], passthrough=["customer"]).score(pa.Table.from_pandas(df, preserve_index=False))
    assert out.results["customer"].to_pylist() == list(range(50))
    assert out.results.column_names[:4] == ["id", "score", "model_version", "scored_at"]
    assert str(out.results.schema.field("scored_at").type) == "timestamp[us, tz=UTC]"

"""Explanations: TreeSHAP contributions per record, in every sink's format."""

from __future__ import annotations

import sqlite3

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import FEATURES, frame, write_inputs
from tests.scoring_util import TableScorer
from tests.test_batch import result_of
from workers.runtime.batch import run_batch
from workers.scoring.model import load_model
from workers.settings import ModelSettings, load_settings


@pytest.mark.parametrize("kind", ["binary", "regression", "multiclass", "categorical"])
def test_contributions_sum_to_the_raw_score_for_every_record(models, kind):
    model = load_model(ModelSettings(path=models[kind]))
    df = frame(500, seed=21, categorical=kind == "categorical")
    df.loc[3, "x1"] = np.nan
    out = TableScorer(model, explain="all").score(pa.Table.from_pandas(df, preserve_index=False)).results
    booster = lgb.Booster(model_file=models[kind])
    raw = booster.predict(df[booster.feature_name()], raw_score=True)
    if kind == "multiclass":
        raw = raw[np.arange(len(df)), out["label"].to_numpy()]
    explanations = out["explanation"].to_pylist()
    sums = np.array([sum(item["contribution"] for item in e) for e in explanations]) + out["explanation_base"].to_numpy()
    assert np.max(np.abs(sums - raw)) <= 1e-9
    assert all(len(e) == len(booster.feature_name()) for e in explanations)
    assert explanations[3][[i["feature"] for i in explanations[3]].index("x1")]["value"] is None


def test_top_k_keeps_the_largest_contributions_in_order(models):
    model = load_model(ModelSettings(path=models["binary"]))
    df = frame(200, seed=22)
    out = TableScorer(model, explain="top", explain_top_k=3).score(pa.Table.from_pandas(df, preserve_index=False)).results
    full = TableScorer(model, explain="all").score(pa.Table.from_pandas(df, preserve_index=False)).results
    for top, every in zip(out["explanation"].to_pylist(), full["explanation"].to_pylist(), strict=True):
        assert len(top) == 3
        assert top == every[:3]  # "all" is ordered by |contribution| too
        assert abs(top[0]["contribution"]) >= abs(top[1]["contribution"]) >= abs(top[2]["contribution"])
        assert {i["feature"] for i in top} <= set(FEATURES)


def test_explanations_land_in_parquet_and_table_sinks(models, tmp_path):
    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=50)
    for out in (str(tmp_path / "pq"), f"sqlite:///{tmp_path / 'e.db'}?table=scores"):
        settings = load_settings({"model": {"path": models["binary"]}, "scoring": {"explain": "top", "explain_top_k": 2},
                                  "batch": {"input": inputs, "output": out}})
        assert run_batch(settings).exit_code == 0
    table = pq.read_table(tmp_path / "pq" / result_of(f"{inputs}/part-000.parquet"))
    kind = table.schema.field("explanation").type
    assert pa.types.is_list(kind) and [f.name for f in kind.value_type] == ["feature", "value", "contribution",
                                                                          "category"]
    import orjson

    row = sqlite3.connect(tmp_path / "e.db").execute("select explanation from scores limit 1").fetchone()[0]
    assert len(orjson.loads(row)) == 2 and set(orjson.loads(row)[0]) == {"feature", "value", "contribution",
                                                                          "category"}


@pytest.mark.postgres
def test_explanations_are_jsonb_in_postgres(models, pg_dsn, pg_table, tmp_path):
    import psycopg

    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=30)
    settings = load_settings({"model": {"path": models["binary"]}, "scoring": {"explain": "top", "explain_top_k": 3},
                              "batch": {"input": inputs, "output": f"{pg_dsn}?table={pg_table}"}})
    assert run_batch(settings).exit_code == 0
    with psycopg.connect(pg_dsn) as conn:
        kind = conn.execute("SELECT data_type FROM information_schema.columns WHERE table_name = %s AND "
                            "column_name = 'explanation'", (pg_table,)).fetchone()[0]
        n = conn.execute(f'SELECT count(*) FROM "{pg_table}" WHERE jsonb_array_length(explanation) = 3 '
                         "AND explanation->0 ? 'contribution'").fetchone()[0]
    assert kind == "jsonb" and n == 30


def test_a_categorical_feature_shows_its_category_not_the_internal_code(models):
    """Review defect 14: for a pandas-categorical feature the explanation's value was the model's internal
    category position (color 'blue' shown as 2.0). Now ``category`` holds the category as text and ``value``
    the category itself when numeric (null for a text category), as the input had it."""
    model = load_model(ModelSettings(path=models["categorical"]))
    df = frame(40, seed=23, categorical=True)
    df.loc[5, "color"] = np.nan
    out = TableScorer(model, explain="all").score(pa.Table.from_pandas(df, preserve_index=False)).results
    for k, items in enumerate(out["explanation"].to_pylist()):
        by = {i["feature"]: i for i in items}
        color = None if k == 5 else df["color"].iloc[k]
        assert (by["color"]["value"], by["color"]["category"]) == (None, color)
        assert (by["size"]["value"], by["size"]["category"]) == (float(df["size"].iloc[k]), str(df["size"].iloc[k]))
        assert by["x0"]["value"] == df["x0"].iloc[k] and by["x0"]["category"] is None

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import FEATURES, frame
from tests.scoring_util import TableScorer
from workers.errors import InputError
from workers.scoring.model import load_model
from workers.settings import ModelSettings


def scorer(path: str, **kw) -> TableScorer:
    return TableScorer(load_model(ModelSettings(path=path)), **kw)


@pytest.mark.parametrize("kind", ["binary", "regression", "categorical"])
def test_scores_equal_booster_predict(models, kind):
    df = frame(2000, seed=7, categorical=kind == "categorical")
    df.loc[3, "x0"] = np.nan  # a missing value
    booster = lgb.Booster(model_file=models[kind])
    expected = booster.predict(df[booster.feature_name()])
    out = scorer(models[kind]).score(pa.Table.from_pandas(df, preserve_index=False))
    assert out.num_errors == 0
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
    """A text that is not a number rejects its row with a reason; "nan" and "inf" are the numbers they spell
    (missing, infinity), as pandas and numpy read them and as a float column holding them scores."""
    table = pa.table({
        "id": ["a", "b", "c", "d", None, "f"],
        **{f: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] for f in FEATURES[1:]},
        "x0": ["1.5", "abc", "nan", None, "2", "-inf"],
    })
    out = scorer(models["binary"]).score(table)
    assert out.results["id"].to_pylist() == ["a", "c", "d", "f"]
    reasons = dict(zip(out.errors["id"].to_pylist(), out.errors["reason"].to_pylist(), strict=True))
    assert reasons == {"b": "feature 'x0': 'abc' is not a number", None: "missing id ('id' is null)"}
    assert list(out.error_rows) == [1, 4]
    assert '"x0":"abc"' in out.errors["raw"][0].as_py()
    booster = lgb.Booster(model_file=models["binary"])
    row = np.array([[1.5, *[0.1] * 7], [np.nan, *[0.3] * 7], [np.nan, *[0.4] * 7], [-np.inf, *[0.6] * 7]])
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


def test_float_column_of_integer_categories_maps_through_the_category_list(models, tmp_path):
    """Issue #14 case 7: pandas writes an integer column with nulls as float64; its values are categories
    (1, 5, 10), not codes. Before, a float column skipped the mapping and 99 of 300 scores were wrong."""
    import pandas as pd
    import pyarrow.parquet as pq

    df = frame(300, seed=11, categorical=True)
    booster = lgb.Booster(model_file=models["categorical"])
    plain = df.copy()
    plain["size"] = df["size"].astype(float)
    plain.loc[::7, "size"] = np.nan  # what makes pandas keep the column as float64
    plain["color"] = df["color"].astype(str)
    path = tmp_path / "pandas.parquet"
    plain.to_parquet(path, index=False)
    table = pq.read_table(path)
    assert table.schema.field("size").type == pa.float64()
    expected_df = df.copy()
    expected_df["size"] = pd.Categorical(plain["size"], categories=[1, 5, 10])
    expected = booster.predict(expected_df[booster.feature_name()])
    out = scorer(models["categorical"]).score(table)
    assert out.num_errors == 0
    assert np.max(np.abs(out.results["score"].to_numpy() - expected)) <= 1e-9
    # Every other physical type of the same values scores the same.
    for t in (pa.int8(), pa.uint16(), pa.int64(), pa.float16(), pa.float32(), pa.decimal128(6, 2), pa.string(),
              pa.large_string()):
        values = [None if np.isnan(v) else (str(int(v)) if pa.types.is_string(t) or pa.types.is_large_string(t)
                                            else v) for v in plain["size"]]
        if pa.types.is_decimal(t):
            from decimal import Decimal
            values = [None if v is None else Decimal(int(v)) for v in values]
        other = table.set_column(table.schema.get_field_index("size"), "size", pa.array(values).cast(t))
        got = scorer(models["categorical"]).score(other).results["score"].to_numpy()
        assert np.max(np.abs(got - expected)) <= 1e-9, t


def test_numeric_strings_without_nulls_are_parsed_not_a_crash(models):
    """Issue #14 case 11: a numeric-string column with no nulls crashed the run ('assignment destination is
    read-only': Arrow's zero-copy view was written to)."""
    df = frame(200, seed=12)
    table = pa.Table.from_pandas(df, preserve_index=False)
    for name in ("x0", "x3"):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(df[name].map(repr)))
    out = scorer(models["binary"]).score(table)
    assert out.num_errors == 0
    booster = lgb.Booster(model_file=models["binary"])
    assert np.max(np.abs(out.results["score"].to_numpy() - booster.predict(df[FEATURES]))) <= 1e-9


@pytest.mark.parametrize("t,big", [(pa.int64(), 1_700_000_000_123_456_789), (pa.uint64(), 2**64 - 3),
                                   (pa.int64(), -(2**62) - 1)])
def test_integers_beyond_2_to_53_are_rounded_to_float64_like_lightgbm(models, t, big):
    """Issue #14 case 12: an integer feature beyond 2**53 (a nanosecond epoch, a uint64 counter) crashed the run
    (Arrow's safe cast); LightGBM's pandas path rounds it to float64, and so do we."""
    import pandas as pd

    df = frame(50, seed=13)
    values = [big - i for i in range(50)]
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.set_column(table.schema.get_field_index("x2"), "x2", pa.array(values, t))
    out = scorer(models["binary"]).score(table)
    assert out.num_errors == 0
    pdf = df[FEATURES].copy()
    pdf["x2"] = pd.Series(values, dtype="uint64" if t == pa.uint64() else "int64")
    booster = lgb.Booster(model_file=models["binary"])
    assert np.max(np.abs(out.results["score"].to_numpy() - booster.predict(pdf))) <= 1e-9


@pytest.mark.parametrize("ids,shown", [
    (pa.array([b"k\x00", b"\xff\xfe", None], pa.binary()), ["k\x00", "\\xfffe", None]),
    (pa.array([b"ab", b"\xff", b"c"], pa.large_binary()), ["ab", "\\xff", "c"]),
    (pa.array([7, 8, 2**63 + 5], pa.uint64()), ["7", "8", str(2**63 + 5)]),
    (pa.array([[1, 2], [3], None], pa.list_(pa.int32())), ["[1,2]", "[3]", None]),
    (pa.array([b"ab", b"\xff", b"ab"], pa.binary()).dictionary_encode(), ["ab", "\\xff", "ab"]),
    (pa.array([b"\x00\x01", b"ok", None], pa.binary(2)), ["\x00\x01", "ok", None]),
])
def test_rejected_rows_keep_any_type_of_id_in_the_errors_output(models, ids, shown):
    """The errors output's id is text: binary ids as UTF-8 when they are, else hex (``\\x...``, PostgreSQL's
    bytea text form), other types as Arrow or JSON renders them. Before, a binary id crashed the errors table."""
    table = pa.table({"id": ids, **{f: ["bad"] * 3 for f in FEATURES}})
    out = scorer(models["binary"]).score(table)
    assert out.num_errors == 3 and out.errors["id"].type == pa.string()
    assert out.errors["id"].to_pylist() == shown
    assert all(r.startswith("{") for r in out.errors["raw"].to_pylist())


@pytest.mark.parametrize("name", ["score", "Model_Version", "id", "label", "scores", "scored_at", "served",
                                  "explanation", "explanation_v2", "reason", "raw", "source", "topic", "partition",
                                  "OFFSET", "timestamp", "__row"])
def test_passthrough_named_like_a_result_column_is_refused(models, name):
    """Issue #14 case 5: such a column silently replaced ours (batch stored the input's old score and
    model_version, the upsert key too; serve answered the event's own score; stream crashed)."""
    from workers.errors import ConfigError
    from workers.scoring.scorer import PASSTHROUGH_SETTING

    with pytest.raises(ConfigError, match="named like a column the workers write") as err:
        scorer(models["binary"], passthrough=["customer", name])
    assert err.value.setting == PASSTHROUGH_SETTING == "SCORING_SCORING__PASSTHROUGH"
    assert "\n" not in str(err.value)


def test_passthrough_same_name_in_two_cases_is_refused_and_plain_names_are_fine(models):
    from workers.errors import ConfigError

    with pytest.raises(ConfigError, match="'Region' and 'region' are one column"):
        scorer(models["binary"], passthrough=["Region", "region"])
    ok = scorer(models["binary"], id_column="user", passthrough=["user", "scorecard", "ids", "x0"])
    assert ok.passthrough == ["user", "scorecard", "ids", "x0"]


@pytest.mark.parametrize("mode", ["batch", "stream", "serve"])
def test_every_mode_refuses_a_reserved_passthrough_at_start_up_with_one_line(models, tmp_path, mode):
    """Through the real CLI: exit 2, one line naming the setting, nothing written."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    df = frame(20).assign(score=0.123)  # an input scored before, by another system: its score must not win
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "in" / "part-0.parquet")
    args = {"batch": ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
            "stream": ["--bootstrap-servers", "127.0.0.1:1", "--topic", "t", "--group", "g",
                       "--sink", f"sqlite:///{tmp_path / 's.db'}?table=scores"],
            "serve": ["--port", "1"]}[mode]
    proc = subprocess.run([sys.executable, "-m", "workers", mode, "--model", models["binary"], *args],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={**os.environ, "SCORING_SCORING__PASSTHROUGH": "x0,score"})
    assert proc.returncode == 2, (proc.stdout[-300:], proc.stderr[-500:])
    assert proc.stderr.count("\n") == 1 and "SCORING_SCORING__PASSTHROUGH" in proc.stderr, proc.stderr[-500:]
    assert "'score'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("text,accepted", [
    ("1_000", False), ("\u0663", False), ("nan(1)", False), ("0x10", False), ("1,0", False), ("1e5 x", False),
    (" 5 ", True), ("5 ", True), ("\t+.5e1", True), ("5.", True), ("INF", True), ("-Infinity", True),
    ("nan", True), ("NaN", True),
])
def test_numeric_text_is_parsed_as_strictly_as_pandas(models, text, accepted):
    """Review defect 15: "1_000", non-ASCII digits and "nan(1)" were numbers (Python's float / Arrow's cast);
    pandas.to_numeric refuses them, and takes surrounding spaces. "nan" stays the missing value it spells."""
    table = pa.table({"id": ["a", "b"], **{f: [0.1, 0.2] for f in FEATURES[1:]}, "x0": [text, "1"]})
    out = scorer(models["binary"]).score(table)
    assert out.results["id"].to_pylist() == (["a", "b"] if accepted else ["b"])
    if not accepted:
        assert out.errors["reason"].to_pylist() == [f"feature 'x0': {text!r} is not a number"]
    else:
        expected = float(text.strip().lower().replace("infinity", "inf"))
        booster = lgb.Booster(model_file=models["binary"])
        got = booster.predict(np.array([[expected, *[0.1] * 7]]))[0]
        assert abs(out.results["score"][0].as_py() - got) <= 1e-12


def test_integer_categories_beyond_2_to_53_are_matched_exactly(tmp_path):
    """Review defect 5: integer categories and values were compared as float64, so 2**53 and 2**53 + 1 were
    one category (the score of the wrong one); the contract is LightGBM's predict on the pandas frame."""
    import pandas as pd

    rng = np.random.default_rng(0)
    big = [2**53, 2**53 + 1, 2**60 + 1, 2**60]
    c = rng.choice(big, 600)
    x = pd.DataFrame({"a": rng.normal(size=600), "c": pd.Categorical(c, categories=big)})
    y = ((c == 2**53 + 1) | (c == 2**60)).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "min_data_per_group": 5,
                         "cat_smooth": 1, "min_data_in_leaf": 5}, lgb.Dataset(x, y), 20)
    path = str(tmp_path / "bigcat.txt")
    booster.save_model(path)
    values = big * 2
    expected = booster.predict(pd.DataFrame({"a": np.zeros(8), "c": pd.Categorical(values, categories=big)}))
    assert abs(expected[0] - expected[1]) > 0.1  # the model tells the neighbours apart
    for t in (pa.int64(), pa.uint64()):
        table = pa.table({"id": [f"r{i}" for i in range(8)], "a": np.zeros(8), "c": pa.array(values, t)})
        got = scorer(path).score(table).results["score"].to_numpy()
        assert np.max(np.abs(got - expected)) <= 1e-9, t


def test_missing_feature_renamed_by_lightgbm_names_the_input_column(tmp_path):
    """Review defect 17: trained on a pandas column "days since", the model names it days_since; scoring a
    file of that frame said only "missing feature column(s) 'days_since'". The reason now names the input
    column and what to do (no silent renaming: an input may hold both spellings)."""
    import pandas as pd

    rng = np.random.default_rng(1)
    x = pd.DataFrame({"days since": rng.normal(size=300), "b": rng.normal(size=300)})
    booster = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(x, (x["b"] > 0).astype(int)), 3)
    assert booster.feature_name() == ["days_since", "b"]
    path = str(tmp_path / "renamed.txt")
    booster.save_model(path)
    table = pa.table({"id": ["a"], "days since": [1.0], "b": [0.5]})
    with pytest.raises(InputError) as err:
        scorer(path).score(table)
    assert str(err.value) == ("missing feature column(s) 'days_since' (the input has 'days since' for "
                              "'days_since': LightGBM replaced spaces in feature names with '_' when the model "
                              "was trained; rename the column)")

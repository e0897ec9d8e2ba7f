import hashlib
import pickle

import pytest

from workers.errors import ModelError
from workers.scoring.model import load_model
from workers.settings import ModelSettings


def test_loads_text_model_with_default_version(models):
    model = load_model(ModelSettings(path=models["binary"]))
    digest = hashlib.sha256(open(models["binary"], "rb").read()).hexdigest()
    assert model.sha256 == digest
    assert model.version == f"binary-{digest[:12]}"
    assert model.feature_names == [f"x{i}" for i in range(8)]
    assert model.categorical == {}


def test_categorical_mapping_comes_from_the_model_file(models):
    model = load_model(ModelSettings(path=f"file://{models['categorical']}"))
    names = model.feature_names
    assert model.categorical == {names.index("color"): ["red", "green", "blue"], names.index("size"): [1, 5, 10]}


def test_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.pkl"

    class Boom:
        def __reduce__(self):  # would run on unpickling
            return (open, (str(tmp_path / "pwned"), "w"))

    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelError, match="pickle") as err:
        load_model(ModelSettings(path=str(path)))
    assert err.value.setting == "SCORING_MODEL__PATH"
    assert not (tmp_path / "pwned").exists()


def test_joblib_compressed_file_is_refused(tmp_path):
    import zlib

    path = tmp_path / "model.joblib"
    path.write_bytes(zlib.compress(pickle.dumps({"a": 1})))
    with pytest.raises(ModelError, match="pickle/joblib"):
        load_model(ModelSettings(path=str(path)))


def test_wrong_sha256_is_refused_and_right_one_accepted(models):
    with pytest.raises(ModelError, match="not the pinned") as err:
        load_model(ModelSettings(path=models["binary"], sha256="0" * 64))
    assert err.value.setting == "SCORING_MODEL__SHA256"
    digest = hashlib.sha256(open(models["binary"], "rb").read()).hexdigest()
    assert load_model(ModelSettings(path=models["binary"], sha256=digest.upper())).sha256 == digest


def test_malformed_sha256_and_missing_or_garbage_files(models, tmp_path):
    with pytest.raises(ModelError, match="64 hex"):
        load_model(ModelSettings(path=models["binary"], sha256="abc"))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelSettings(path=str(tmp_path / "nope.txt")))
    garbage = tmp_path / "g.txt"
    garbage.write_text("hello")
    with pytest.raises(ModelError, match="not a LightGBM text model"):
        load_model(ModelSettings(path=str(garbage)))
    truncated = tmp_path / "t.txt"
    truncated.write_text(open(models["binary"]).read()[:300])
    with pytest.raises(ModelError, match="is incomplete or corrupted"):
        load_model(ModelSettings(path=str(truncated)))


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.5, 0.9, 0.97, 0.999])
def test_a_truncated_model_file_is_refused_not_a_crash(models, tmp_path, fraction):
    """LightGBM itself segfaults on a model cut in half (it trusts the header's byte offsets): we refuse first."""
    import subprocess
    import sys

    data = open(models["binary"], "rb").read()
    cut = tmp_path / "cut.txt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    proc = subprocess.run([sys.executable, "-m", "workers", "schema", "--model", str(cut)], capture_output=True,
                          text=True)
    assert proc.returncode == 2, proc.stderr[-300:]
    assert proc.stderr.count("\n") == 1 and "is incomplete or corrupted" in proc.stderr


def test_corrupted_model_files_never_crash_the_process(models, tmp_path):
    """Random edits (a character replaced, bytes deleted or inserted) in a child process: each file loads and
    predicts, or is refused with ModelError; the process never dies of SIGSEGV/SIGABRT in LightGBM (which it did
    before model files were checked and then probed in a child process: 3 of 40 edits crashed it)."""
    import subprocess
    import sys

    code = f"""
import random
import numpy as np
from workers.errors import ModelError
from workers.scoring.model import load_model
from workers.settings import ModelSettings
rng = random.Random(7)
refused = loaded = 0
for k in range(120):
    b = bytearray(open(({models["binary"]!r}, {models["categorical"]!r})[k % 2], "rb").read())
    i = rng.randrange(len(b) - 1)
    if k % 3 == 0:
        b[i] = rng.choice(b"0123456789-.eX \\n=")
    elif k % 3 == 1:
        del b[i:i + rng.randrange(1, 50)]
    else:
        b[i:i] = bytes(rng.choice(b"0123456789 ") for _ in range(rng.randrange(1, 5)))
    path = {str(tmp_path / "m.txt")!r}
    open(path, "wb").write(bytes(b))
    try:
        model = load_model(ModelSettings(path=path))
        model.predict(np.zeros((4, len(model.feature_names))))
        loaded += 1
    except ModelError:
        refused += 1
print(loaded, refused)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]
    loaded, refused = map(int, proc.stdout.strip().splitlines()[-1].split())  # LightGBM warns on stdout too
    assert loaded + refused == 120 and refused > 20


def _mixed_categorical_model(tmp_path, k_values: int):
    """A model with an integer ``categorical_feature`` column ``k`` *before* a pandas categorical ``color``."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(3)
    n = 2000
    df = pd.DataFrame({
        "x0": rng.normal(size=n),
        "k": rng.integers(0, k_values, n),
        "color": pd.Categorical(rng.choice(["red", "green", "blue"], n), categories=["red", "green", "blue"]),
        "x1": rng.normal(size=n),
    })
    y = (df.x0 + (df.k % 3 == 1) * 1.5 - (df.color == "green") * 2.0 + rng.normal(size=n) * 0.3 > 0).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "min_data_per_group": 5,
                         "cat_smooth": 1, "seed": 1},
                        lgb.Dataset(df, y, categorical_feature=["k", "color"]), num_boost_round=15)
    path = tmp_path / f"mixed-{k_values}.txt"
    booster.save_model(path)
    return str(path), booster, df


def test_pandas_category_list_goes_to_the_pandas_categorical_feature_not_the_first_categorical(tmp_path):
    """Issue #14 case 6: the category list was attached by position to the first categorical feature (the integer
    ``k``), so ``color`` was scored by its raw values; scores must equal LightGBM's own pandas predict."""
    import numpy as np
    import pyarrow as pa

    from tests.scoring_util import TableScorer

    path, booster, df = _mixed_categorical_model(tmp_path, k_values=8)
    model = load_model(ModelSettings(path=path))
    assert model.categorical == {1: None, 2: ["red", "green", "blue"]}
    table = pa.table({"id": [f"r{i}" for i in range(len(df))], "x0": df.x0, "k": pa.array(df.k, pa.int64()),
                      "color": pa.array(df.color.astype(str)), "x1": df.x1})
    out = TableScorer(model).score(table)
    assert out.num_errors == 0
    assert np.max(np.abs(out.results["score"].to_numpy() - booster.predict(df))) <= 1e-9


def test_a_category_list_that_fits_two_categorical_features_is_refused(tmp_path):
    """When the integer categorical's training values could also be codes of the list, the file cannot say which
    feature was the pandas categorical: refused with one line rather than scored by a guess."""
    path, _, _ = _mixed_categorical_model(tmp_path, k_values=3)
    with pytest.raises(ModelError, match="more than one set of the features"):
        load_model(ModelSettings(path=path))


def test_an_ordered_pandas_categorical_keeps_its_list_though_it_is_split_on_as_a_number(tmp_path):
    """Case 6's sibling: an ordered pandas categorical is not a categorical feature (LightGBM splits on its codes
    as numbers) but still has a category list; it goes on that feature, the unordered one's list on its own."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from tests.scoring_util import TableScorer

    rng = np.random.default_rng(0)
    n = 1000
    df = pd.DataFrame({
        "x0": rng.normal(size=n),
        "grade": pd.Categorical(rng.choice(["low", "mid", "high"], n), categories=["low", "mid", "high"],
                                ordered=True),
        "color": pd.Categorical(rng.choice(["r", "g", "b"], n), categories=["r", "g", "b"]),
    })
    y = (df.x0 + (df.grade == "high") * 1.0 - (df.color == "g") > 0).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7}, lgb.Dataset(df, y), 10)
    booster.save_model(tmp_path / "ordered.txt")
    model = load_model(ModelSettings(path=str(tmp_path / "ordered.txt")))
    assert model.categorical == {1: ["low", "mid", "high"], 2: ["r", "g", "b"]}
    table = pa.table({"id": [str(i) for i in range(n)], "x0": df.x0, "grade": pa.array(df.grade.astype(str)),
                      "color": pa.array(df.color.astype(str)).dictionary_encode()})
    out = TableScorer(model).score(table)
    assert np.max(np.abs(out.results["score"].to_numpy() - booster.predict(df))) <= 1e-9

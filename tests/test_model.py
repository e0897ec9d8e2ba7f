import hashlib
import pickle

import pytest

from workers.errors import ModelError
from workers.model import load_model
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
    with pytest.raises(ModelError, match="not a valid LightGBM model"):
        load_model(ModelSettings(path=str(truncated)))

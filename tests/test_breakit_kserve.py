"""Break-it review of ``--model-dir`` (workers/scoring/model_dir.py): folder layouts KServe's storage initializer
and Kubernetes volumes leave at /mnt/models, built for real on the local filesystem (no mocks)."""

from __future__ import annotations

import os

import pytest

from workers.errors import ModelError
from workers.scoring.model_dir import find_model_file

MODEL = "tree\nversion=v4\n"


def _write(path, text: str = MODEL) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_mlflow_lightgbm_flavor_folder_picks_model_lgb(tmp_path):
    """An MLflow model folder (storageUri of a logged lightgbm model) holds requirements.txt beside model.lgb:
    requirements.txt is no model, the choice is obvious."""
    for name in ("MLmodel", "conda.yaml", "python_env.yaml"):
        _write(tmp_path / name, "x: 1\n")
    _write(tmp_path / "requirements.txt", "lightgbm==4.5.0\n")
    model = _write(tmp_path / "model.lgb")
    assert find_model_file(str(tmp_path)) == model


def test_model_txt_beside_readme_and_mlmodel(tmp_path):
    _write(tmp_path / "README.md", "# model\n")
    _write(tmp_path / "MLmodel", "flavors: {}\n")
    model = _write(tmp_path / "model.txt")
    assert find_model_file(str(tmp_path)) == model


def test_readme_txt_beside_model_txt(tmp_path):
    """A README.txt (or LICENSE.txt) shipped with the model is not a second candidate: only one file is a
    LightGBM text model."""
    _write(tmp_path / "README.txt", "trained on 2026-11-30\n")
    model = _write(tmp_path / "model.txt")
    assert find_model_file(str(tmp_path)) == model


def test_nested_folder_unpacked_tar(tmp_path):
    """A tar.gz of a folder unpacks to a sub-folder; macOS tars add hidden ._ files beside the model."""
    model = _write(tmp_path / "export" / "v3" / "model.txt")
    _write(tmp_path / "export" / "v3" / "._model.txt", "\x00\x05\x16\x07")
    _write(tmp_path / ".DS_Store", "x")
    assert find_model_file(str(tmp_path)) == model


def test_projected_volume_dotdot_data_links(tmp_path):
    """ConfigMap/Secret volume layout: ..<timestamp>/model.txt, ..data -> ..<timestamp>, model.txt -> ..data/model.txt."""
    _write(tmp_path / "..2026_12_03_17_00_00.123" / "model.txt")
    os.symlink("..2026_12_03_17_00_00.123", tmp_path / "..data")
    os.symlink("..data/model.txt", tmp_path / "model.txt")
    found = find_model_file(str(tmp_path))
    assert found == str(tmp_path / "model.txt")
    assert open(found).read() == MODEL


def test_symlinked_sub_folder_is_followed(tmp_path):
    """A visible symlink to a folder (e.g. current -> v7, or a PVC sub-path link) is followed."""
    _write(tmp_path / "store" / "v7" / "model.txt")
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(tmp_path / "store" / "v7", root / "current")
    assert find_model_file(str(root)) == str(root / "current" / "model.txt")


def test_model_dir_itself_a_symlink(tmp_path):
    """KServe's modelcar makes /mnt/models a symlink to the model container's folder."""
    model_dir = tmp_path / "real"
    _write(model_dir / "model.txt")
    os.symlink(model_dir, tmp_path / "mnt-models")
    assert find_model_file(str(tmp_path / "mnt-models")) == str(tmp_path / "mnt-models" / "model.txt")


def test_names_with_spaces_and_unicode(tmp_path):
    model = _write(tmp_path / "modèles été" / "fraude modèle ✓.txt")
    assert find_model_file(str(tmp_path / "modèles été")) == model


def test_empty_folder_names_the_setting(tmp_path):
    with pytest.raises(ModelError) as err:
        find_model_file(str(tmp_path))
    assert "SCORING_MODEL__DIR" in str(err.value) and "no file" in str(err.value)


def test_two_models_refused_naming_both(tmp_path):
    _write(tmp_path / "a.txt")
    _write(tmp_path / "b.bst")
    with pytest.raises(ModelError) as err:
        find_model_file(str(tmp_path))
    assert "a.txt" in str(err.value) and "b.bst" in str(err.value)


def test_symlink_loop_does_not_hang(tmp_path):
    model = _write(tmp_path / "model.txt")
    os.symlink(tmp_path, tmp_path / "again")
    assert find_model_file(str(tmp_path)) == model

"""The model file inside a model folder: what KServe's storage initializer leaves at ``/mnt/models``.

KServe downloads an InferenceService's ``storageUri`` into an emptyDir mounted at ``/mnt/models`` before the
runtime container starts: a URI naming one file becomes ``/mnt/models/<file name>``; a URI naming a folder (a
bucket prefix) has that folder's contents copied there, sub-folders included; a ``.tar.gz`` or ``.zip`` is
unpacked there. The runtime is told only the folder (``--model-dir``), so the worker picks the file itself,
and refuses, naming the setting, a folder where that choice is not obvious rather than guess.
"""

from __future__ import annotations

import os

from workers.errors import ModelError

DIR_SETTING = "SCORING_MODEL__DIR"
# Names LightGBM text models go by: `.txt` (save_model's usual), `.bst` (KServe's lgbserver), `.lgb` (MLflow's
# lightgbm flavor), `.model`.
MODEL_SUFFIXES = (".txt", ".bst", ".lgb", ".model")
# A LightGBM text model starts with this line; it tells model.txt from README.txt or MLflow's requirements.txt.
MODEL_HEADER = b"tree\n"


def _is_lightgbm_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MODEL_HEADER)) == MODEL_HEADER
    except OSError:
        return False


def find_model_file(folder: str) -> str:
    """The one model file in ``folder`` (searched recursively, hidden entries skipped): the only file with a
    model suffix (several: the only one that is a LightGBM text model), else the only file;
    symlinked folders are followed. Raises ModelError naming SCORING_MODEL__DIR otherwise."""
    if "://" in folder:
        raise ModelError(DIR_SETTING, f"{folder} must be a local folder (use --model for a file:// or s3:// URI)")
    if not os.path.isdir(folder):
        raise ModelError(DIR_SETTING, f"{folder} is not a folder" if os.path.exists(folder)
                         else f"{folder} does not exist")
    files = []
    seen: set[str] = set()  # real paths of folders walked: symlinked folders are followed, a link loop is not
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # e.g. ..data of a projected volume
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    models = [f for f in files if f.lower().endswith(MODEL_SUFFIXES)]
    if len(models) > 1:  # e.g. model.lgb beside MLflow's requirements.txt: keep those that are LightGBM models
        models = [f for f in models if _is_lightgbm_text(f)] or models
    if len(models) == 1:
        return models[0]
    if not models and len(files) == 1:
        return files[0]
    found = models or files
    if not found:
        raise ModelError(DIR_SETTING, f"{folder} holds no file (did the storage initializer download the model?)")
    names = ", ".join(os.path.relpath(f, folder) for f in found[:5]) + (" ..." if len(found) > 5 else "")
    raise ModelError(DIR_SETTING, f"{folder} holds {len(found)} candidate model files ({names}); keep one, or "
                                  f"name it with --model")

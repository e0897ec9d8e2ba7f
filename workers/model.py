"""Load a LightGBM model safely and describe its features.

Only the text format written by ``Booster.save_model`` is accepted: it is parsed by LightGBM's
C++ reader and cannot run code. Pickle and joblib files are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import lightgbm as lgb
import numpy as np

from workers.errors import ModelError
from workers.settings import ModelSettings, S3Settings
from workers.storage import read_bytes

PATH_SETTING = "SCORING_MODEL__PATH"
SHA_SETTING = "SCORING_MODEL__SHA256"
# Magic bytes of formats that must never be loaded: pickle (protocol 2+), and the compressors joblib uses.
_PICKLE_MAGIC = (b"\x80", b"\x1f\x8b", b"x\x9c", b"x\x01", b"x\xda", b"BZh", b"\xfd7zXZ", b"\x04\x22\x4d\x18")


@dataclass
class Model:
    booster: lgb.Booster
    version: str
    sha256: str
    source: str
    feature_names: list[str]
    # feature index -> category values (pandas categorical mapping) or None (integer codes used as is)
    categorical: dict[int, list[Any] | None] = field(default_factory=dict)
    num_class: int = 1
    objective: str = ""
    threads: int = 1
    backend: str = "lightgbm"  # what predict really uses (lleaves falls back to lightgbm)
    compiled: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def multiclass(self) -> bool:
        return self.num_class > 1

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Scores for a float64 C-contiguous [n, n_features] matrix (NaN = missing)."""
        if self.compiled is not None:
            out = self.compiled(matrix)
            return out.reshape(matrix.shape[0], self.num_class) if self.num_class > 1 else out
        return self.booster.predict(matrix, num_threads=self.threads, validate_features=False)


def _check_format(data: bytes, uri: str) -> None:
    if data.startswith(b"tree"):
        return
    if data.startswith(_PICKLE_MAGIC):
        raise ModelError(
            PATH_SETTING,
            f"{uri} looks like a pickle/joblib file; pickles are never loaded because they can run code. "
            "Save the model with Booster.save_model() (text format) instead",
        )
    raise ModelError(PATH_SETTING, f"{uri} is not a LightGBM text model (it must start with 'tree')")


def _categorical_indices(text: str, n_features: int) -> list[int]:
    match = re.search(r"^\[categorical_feature: ([0-9,]*)\]$", text, re.MULTILINE)
    if match and match.group(1):
        return [int(i) for i in match.group(1).split(",") if i]
    # Models trained with categorical_feature given by name/auto keep no index list; feature_infos
    # marks categorical features with a ':'-separated category list instead of a [min:max] range.
    infos = re.search(r"^feature_infos=(.*)$", text, re.MULTILINE)
    if not infos:
        return []
    parts = infos.group(1).split(" ")
    return [i for i, p in enumerate(parts[:n_features]) if p != "none" and not p.startswith("[")]


def default_version(uri: str, sha256: str) -> str:
    stem = PurePosixPath(uri.split("://", 1)[-1]).name.split(".")[0] or "model"
    return f"{stem}-{sha256[:12]}"


def load_model(settings: ModelSettings, s3: S3Settings | None = None) -> Model:
    """Read, verify and parse the model named by ``settings.path``; raises ModelError naming the setting."""
    uri = settings.path
    if not uri:
        raise ModelError(PATH_SETTING, "no model given (set --model or SCORING_MODEL__PATH, or a routing file with "
                                       "--routing or SCORING_ROUTING__PATH)")
    try:
        data = read_bytes(uri, s3 or S3Settings())
    except FileNotFoundError:
        raise ModelError(PATH_SETTING, f"{uri} does not exist") from None
    except OSError as exc:
        raise ModelError(PATH_SETTING, f"cannot read {uri}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if settings.sha256:
        pinned = settings.sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", pinned):
            raise ModelError(SHA_SETTING, "must be 64 hex digits")
        if not hmac.compare_digest(pinned, digest):
            raise ModelError(SHA_SETTING, f"{uri} has SHA-256 {digest}, not the pinned {pinned}; refusing to load it")
    _check_format(data, uri)
    text = data.decode("utf-8", errors="replace")
    try:
        booster = lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as exc:
        raise ModelError(PATH_SETTING, f"{uri} is not a valid LightGBM model: {exc}") from None
    names = booster.feature_name()
    mapping = booster.pandas_categorical or []
    cat_idx = _categorical_indices(text, len(names))
    categorical: dict[int, list[Any] | None] = {}
    for pos, idx in enumerate(cat_idx):
        categorical[idx] = list(mapping[pos]) if pos < len(mapping) else None
    objective = re.search(r"^objective=(\S*)", text, re.MULTILINE)
    compiled = None
    if settings.backend == "lleaves":
        from workers.backends import lleaves_predictor

        compiled = lleaves_predictor(booster, text, digest, settings.cache_dir, settings.threads, len(names),
                                     categorical)
    return Model(
        booster=booster,
        version=settings.version or default_version(uri, digest),
        sha256=digest,
        source=uri,
        feature_names=names,
        categorical=categorical,
        num_class=booster.num_model_per_iteration(),
        objective=objective.group(1) if objective else "",
        threads=settings.threads,
        backend="lleaves" if compiled is not None else "lightgbm",
        compiled=compiled,
    )

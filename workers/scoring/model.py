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
from workers.settings import MlflowSettings, ModelSettings, S3Settings
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
    # feature index -> category values (pandas categorical mapping: a value is replaced by its position) or None
    # (a categorical feature given by integer code, used as is). A feature with a list may be split on as a number
    # (an ordered pandas categorical): its values are mapped all the same, as LightGBM's pandas path does.
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
        return np.asarray(self.booster.predict(matrix, num_threads=self.threads, validate_features=False))


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


_PARAM_LINE = re.compile(rb"\[[A-Za-z0-9_]+: [^\n]*\]")
_NUMBERS = re.compile(rb"(-?(\d+\.?\d*([eE][-+]?\d+)?|inf|nan)( |$))+", re.IGNORECASE)


def _check_complete(data: bytes, uri: str) -> None:
    """Refuse a truncated or half-written file before LightGBM sees it.

    LightGBM's parser trusts the header's ``tree_sizes`` byte offsets and reads past the end of a cut-off file,
    crashing the process (seen here: SIGSEGV on a model cut in half). So check the layout first: each tree where
    the header says it is, then ``end of trees``, then the parameters section that closes the file.
    """
    def broken(what: str) -> ModelError:
        return ModelError(PATH_SETTING, f"{uri} is incomplete or corrupted ({what}); a truncated or half-written "
                                        "file? Refusing to load it")

    start = data.find(b"\nTree=0\n")
    end = data.find(b"\nend of trees")
    sizes = re.search(rb"^tree_sizes=([0-9 ]*)$", data, re.MULTILINE)
    if sizes is not None and start >= 0:
        pos = start + 1
        for i, size in enumerate(sizes.group(1).split()):
            if not data.startswith(b"Tree=%d\n" % i, pos):
                raise broken(f"tree {i} is not where the header puts it")
            pos += int(size)
        if not data.startswith(b"end of trees", pos):
            raise broken("no 'end of trees' after the last tree")
    elif end < 0:
        raise broken("no 'end of trees'")
    params_at, params_end = data.find(b"\nparameters:\n"), data.find(b"\nend of parameters")
    if params_end < 0:
        raise broken("no 'end of parameters'")
    if params_at >= 0:  # LightGBM crashes on a parameter line that is cut in two, too
        for line in data[params_at + len(b"\nparameters:\n"):params_end].split(b"\n"):
            if line and not _PARAM_LINE.fullmatch(line):
                raise broken(f"parameter line {line[:40]!r} is malformed")
    # LightGBM parses trees in parallel and aborts the process (an error inside an OpenMP region cannot be
    # raised) when an array has the wrong length or a value is not a number: check both here.
    for i, block in enumerate(data[start + 1:end].split(b"\n\nTree=") if start >= 0 else []):
        fields = dict(line.split(b"=", 1) for line in block.split(b"\n")[1:] if b"=" in line)
        try:
            leaves, cats = int(fields.get(b"num_leaves", b"")), int(fields.get(b"num_cat", b""))
        except ValueError:
            raise broken(f"tree {i} has no valid num_leaves/num_cat") from None
        lengths = {b"leaf_value": leaves}
        if leaves > 1:
            lengths.update(dict.fromkeys((b"split_feature", b"split_gain", b"threshold", b"decision_type",
                                          b"left_child", b"right_child", b"internal_value", b"internal_weight",
                                          b"internal_count"), leaves - 1))
            lengths.update({b"leaf_weight": leaves, b"leaf_count": leaves})
        if cats > 0:
            lengths[b"cat_boundaries"] = cats + 1
            if not _NUMBERS.fullmatch(fields.get(b"cat_threshold", b"")):
                raise broken(f"tree {i} has no valid cat_threshold")
        for key, n in lengths.items():
            value = fields.get(key)
            if value is None:
                if key in (b"leaf_weight", b"leaf_count", b"internal_weight", b"internal_count", b"internal_value",
                           b"split_gain"):
                    continue  # optional in older model files
                raise broken(f"tree {i} has no {key.decode()}")
            tokens = value.split(b" ")
            if len(tokens) != n or not _NUMBERS.fullmatch(value):
                raise broken(f"tree {i}: {key.decode()} is not {n} numbers")


_PROBE = """
import sys
import lightgbm as lgb
import numpy as np
booster = lgb.Booster(model_str=sys.stdin.buffer.read().decode("utf-8", errors="replace"))
n = booster.num_feature()
rows = np.vstack([np.zeros((1, n)), np.full((1, n), np.nan), np.random.default_rng(0).normal(size=(8, n)) * 10])
booster.predict(rows, num_threads=1)
"""


def _probe(data: bytes, digest: str, uri: str, cache_dir: str) -> None:
    """Parse and predict with the model in a child process before this process does.

    LightGBM aborts or crashes the whole process on some corrupted files (errors inside OpenMP regions,
    out-of-range child indices); a worker must instead refuse the file with a message and, on a hot reload,
    keep serving. A file that passed is remembered by SHA-256 and LightGBM version in ``cache_dir``.
    """
    import os
    import subprocess
    import sys

    marker = os.path.join(cache_dir, f"probed-{digest}-lightgbm-{lgb.__version__}")
    if os.path.exists(marker):
        return
    proc = subprocess.run([sys.executable, "-c", _PROBE], input=data, capture_output=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        last = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
        why = last[-1][:200] if last else f"the process died of signal {-proc.returncode}"
        if proc.returncode < 0:
            why = f"LightGBM crashed on it (signal {-proc.returncode}): {why}"
        raise ModelError(PATH_SETTING, f"{uri} is not a usable LightGBM model: {why}")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        open(marker, "w").close()
    except OSError:
        pass  # a read-only cache only costs the probe next time


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


def _feature_infos(text: str, n_features: int) -> list[str]:
    infos = re.search(r"^feature_infos=(.*)$", text, re.MULTILINE)
    parts = infos.group(1).split(" ") if infos else []
    return (parts + ["none"] * n_features)[:n_features]


def _fits_codes(info: str, categorical: bool, size: int) -> bool:
    """Could a feature whose training values ``feature_infos`` describes hold the codes 0..size-1 of a list?"""
    if info == "none":  # no value seen in training (or one only): nothing to contradict
        return True
    try:
        if categorical:  # 'v1:v2:...' the values seen (-1 marks missing ones)
            return all(0 <= v < size for v in (int(x) for x in info.split(":")) if v != -1)
        low, high = (float(x) for x in info.strip("[]").split(":"))  # '[min:max]'
    except ValueError:
        return False
    return low >= 0 and high <= size - 1 and low.is_integer() and high.is_integer()


def _assignments(lists: list[list], candidates: list[list[int]], limit: int = 2) -> list[list[int]]:
    """Increasing feature indices for the lists, each list on one of its candidates (up to ``limit`` found)."""
    found: list[list[int]] = []

    def walk(k: int, after: int, chosen: list[int]) -> None:
        if len(found) >= limit:
            return
        if k == len(lists):
            found.append(list(chosen))
            return
        for j in candidates[k]:
            if j > after:
                walk(k + 1, j, [*chosen, j])

    walk(0, -1, [])
    return found


def categorical_mapping(text: str, names: list[str], mapping: list[list], uri: str = "the model"
                        ) -> dict[int, list[Any] | None]:
    """Feature index -> its pandas category list, or None for a categorical feature scored by integer code.

    LightGBM writes one ``pandas_categorical`` list per *pandas categorical column of the training frame*, in
    column order, without naming the column. Those columns are not the same set as the categorical features
    (``[categorical_feature: ...]``): integer columns given by ``categorical_feature`` have no list, and an
    ordered pandas categorical (or one left out of an explicit ``categorical_feature``) has a list but is split
    on as a number. So each list is placed on a feature whose training values (``feature_infos``) can be its
    codes 0..len-1, keeping the lists' order: first on categorical features only (the usual case); if that is
    impossible, on any feature. Exactly one placement is accepted; none, or more than one (the file cannot
    tell which feature had the list), refuses the model: scoring with a guess could be silently wrong.
    """
    n = len(names)
    cat_idx = _categorical_indices(text, n)
    categorical: dict[int, list[Any] | None] = dict.fromkeys(cat_idx)
    if not mapping:
        return categorical
    infos = _feature_infos(text, n)
    is_cat = set(cat_idx)
    placed = None
    for pool in (cat_idx, range(n)):
        candidates = [[j for j in pool if _fits_codes(infos[j], j in is_cat, len(cats))] for cats in mapping]
        found = _assignments(mapping, candidates)
        if len(found) == 1:
            placed = found[0]
            break
        if len(found) > 1:
            shown = ", ".join(repr(names[j]) for j in sorted({j for c in candidates for j in c})[:8])
            raise ModelError(PATH_SETTING, f"{uri}: its {len(mapping)} pandas category list(s) could belong to "
                                           f"more than one set of the features {shown}; the file does not say "
                                           "which, so it is refused rather than scored by a guess (train with "
                                           "every categorical feature as a pandas categorical column)")
    if placed is None:
        raise ModelError(PATH_SETTING, f"{uri}: its {len(mapping)} pandas category list(s) fit no feature's "
                                       "training values; the file is inconsistent")
    for j, cats in zip(placed, mapping, strict=True):
        categorical[j] = list(cats)
    return dict(sorted(categorical.items()))


def default_version(uri: str, sha256: str) -> str:
    stem = PurePosixPath(uri.split("://", 1)[-1]).name.split(".")[0] or "model"
    return f"{stem}-{sha256[:12]}"


def load_model(settings: ModelSettings, s3: S3Settings | None = None,
               mlflow: MlflowSettings | None = None) -> Model:
    """Read, verify and parse the model named by ``settings.path`` (a file, or a ``models:/``/``runs:/`` URI
    resolved with ``mlflow``; else the one file in ``settings.dir``); raises ModelError naming the setting."""
    uri = settings.path
    if not uri and settings.dir:
        from workers.scoring.model_dir import find_model_file

        uri = find_model_file(settings.dir)
    if not uri:
        raise ModelError(PATH_SETTING, "no model given (set --model or SCORING_MODEL__PATH, --model-dir or "
                                       "SCORING_MODEL__DIR, or a routing file with --routing or SCORING_ROUTING__PATH)")
    label = None
    if uri.startswith(("models:/", "runs:/")):
        from workers.scoring.registry import fetch_model

        data, label = fetch_model(uri, mlflow or MlflowSettings(), s3, settings.cache_dir)
    else:
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
    _check_complete(data, uri)
    _probe(data, digest, uri, settings.cache_dir)
    text = data.decode("utf-8", errors="replace")
    try:
        booster = lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as exc:
        raise ModelError(PATH_SETTING, f"{uri} is not a valid LightGBM model: {exc}") from None
    names = booster.feature_name()
    categorical = categorical_mapping(text, names, booster.pandas_categorical or [], uri)
    objective = re.search(r"^objective=(\S*)", text, re.MULTILINE)
    compiled = None
    if settings.backend == "lleaves":
        from workers.scoring.backends import lleaves_predictor

        compiled = lleaves_predictor(booster, text, digest, settings.cache_dir, settings.threads, len(names),
                                     categorical)
    return Model(
        booster=booster,
        version=settings.version or label or default_version(uri, digest),
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

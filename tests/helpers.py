"""Test data: small LightGBM models of every kind and Parquet inputs for them."""

from __future__ import annotations

import os

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = [f"x{i}" for i in range(8)]


def frame(rows: int, seed: int = 0, categorical: bool = False, id_prefix: str = "r") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({f: rng.normal(size=rows) for f in FEATURES})
    if categorical:
        df["color"] = pd.Categorical(rng.choice(["red", "green", "blue"], rows), categories=["red", "green", "blue"])
        df["size"] = pd.Categorical(rng.choice([1, 5, 10], rows), categories=[1, 5, 10])
    df.insert(0, "id", [f"{id_prefix}{seed}-{i}" for i in range(rows)])
    return df


def train(kind: str, rows: int = 3000, rounds: int = 30, seed: int = 1) -> lgb.Booster:
    categorical = kind == "categorical"
    df = frame(rows, seed=1, categorical=categorical)
    feats = FEATURES + (["color", "size"] if categorical else [])
    rng = np.random.default_rng(2)
    signal = df.x0 - df.x1 + 0.5 * df.x2 * df.x3
    if categorical:
        signal = signal + (df.color == "green") * 1.0 - (df["size"] == 10) * 0.7
    params: dict = {"verbose": -1, "num_leaves": 15, "seed": seed, "num_threads": 1}
    if kind in ("binary", "categorical"):
        params["objective"] = "binary"
        y = (signal + rng.normal(size=rows) * 0.3 > 0).astype(int)
    elif kind == "regression":
        params["objective"] = "regression"
        y = signal + rng.normal(size=rows) * 0.1
    elif kind == "multiclass":
        params.update(objective="multiclass", num_class=3)
        y = np.digitize(signal, [-0.5, 0.5])
    else:
        raise ValueError(kind)
    if seed != 1:  # a different model of the same task (a "new version"): other rows, other bagging
        params.update(bagging_fraction=0.7, bagging_freq=1, feature_fraction=0.8)
    return lgb.train(params, lgb.Dataset(df[feats], y), num_boost_round=rounds)


def save(booster: lgb.Booster, folder: str, name: str) -> str:
    path = os.path.join(folder, f"{name}.txt")
    booster.save_model(path)
    return path


def write_inputs(folder: str, files: int, rows: int, categorical: bool = False, row_group: int = 5000,
                 prefix: str = "part") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(files):
        df = frame(rows, seed=100 + k, categorical=categorical)
        path = os.path.join(folder, f"{prefix}-{k:03d}.parquet")
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group)
        paths.append(path)
    return paths

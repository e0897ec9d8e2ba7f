"""Compare model versions from stored results: ``scoring-worker compare`` and the report read this.

Per version: served and shadow rows, score mean and quantiles, the share at or above the threshold and a
histogram on edges shared by all versions (so they can be overlaid). Per shadow version and the served
version of the same records (joined on id): pairs, agreement (both scores on the same side of the
threshold; multiclass: the same label) and the mean and max absolute score difference.
"""

from __future__ import annotations

from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa

from workers.errors import ConfigError, SinkError
from workers.settings import S3Settings

SETTING = "--results"
COLUMNS = ["id", "model_version", "served", "score", "label", "scored_at"]


def read_results(uri: str, s3: S3Settings, since: str | None = None) -> pd.DataFrame:
    """Rows of a results table or dataset (the columns of ``COLUMNS`` that exist)."""
    scheme = urlparse(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("postgresql", "postgres"):
        df = _read_postgres(uri, since)
    elif scheme == "sqlite":
        df = _read_sqlite(uri, since)
    elif scheme in ("", "file", "s3"):
        df = _read_parquet(uri, s3, since)
    else:
        raise ConfigError(SETTING, f"cannot read results from {scheme}:// (use PostgreSQL, SQLite or Parquet)")
    if "served" not in df.columns:  # results written before rollout support: every row was served
        df["served"] = True
    df["served"] = df["served"].astype(bool)
    df["id"] = df["id"].astype(str)
    return df


def _since_clause(since: str | None, placeholder: str) -> tuple[str, list]:
    return (f" WHERE scored_at >= {placeholder}", [since]) if since else ("", [])


def _read_postgres(uri: str, since: str | None) -> pd.DataFrame:
    import psycopg
    from psycopg import sql

    from workers.sinks.postgres import PostgresSink

    sink = PostgresSink(uri, SETTING)
    try:
        with psycopg.connect(sink.conninfo, connect_timeout=5) as conn:
            cur = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                               + (" AND table_schema = %s" if sink.schema else ""),
                               [sink.table, sink.schema] if sink.schema else [sink.table])
            present = {r[0] for r in cur.fetchall()}
            if not present:
                raise ConfigError(SETTING, f"table {sink.table!r} does not exist in {sink.name}")
            cols = [c for c in COLUMNS if c in present]
            where, params = _since_clause(since, "%s")
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in cols), sink._ident()) + sql.SQL(where)
            rows = conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        raise SinkError(f"cannot read {sink.name}: {exc}") from None
    return pd.DataFrame(rows, columns=cols)


def _read_sqlite(uri: str, since: str | None) -> pd.DataFrame:
    import sqlite3

    from workers.sinks.sqlite import SqliteSink

    sink = SqliteSink(uri, SETTING)
    try:
        conn = sink._conn
        present = {r[1] for r in conn.execute(f'PRAGMA table_info("{sink.table}")')}
        if not present:
            raise ConfigError(SETTING, f"table {sink.table!r} does not exist in {sink.path}")
        cols = [c for c in COLUMNS if c in present]
        where, params = _since_clause(since, "?")
        rows = conn.execute(f'SELECT {", ".join(cols)} FROM "{sink.table}"{where}', params).fetchall()  # noqa: S608
    except sqlite3.Error as exc:
        raise SinkError(f"cannot read {sink.name}: {exc}") from None
    finally:
        sink.close()
    return pd.DataFrame(rows, columns=cols)


def _read_parquet(uri: str, s3: S3Settings, since: str | None) -> pd.DataFrame:
    import pyarrow.dataset as ds

    from workers.storage import resolve

    fs, root = resolve(uri, s3)
    try:
        files = ds.dataset(root, filesystem=fs, format="parquet").files  # skips _errors/, _state/, .tmp
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(SETTING, f"cannot read Parquet results under {uri}: {exc}") from None
    parts = []
    for path in files:
        table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
        parts.append(table.select([c for c in COLUMNS if c in table.column_names]).to_pandas())
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", "model_version", "score"])
    if since and "scored_at" in df.columns:
        df = df[df["scored_at"] >= pd.Timestamp(since, tz="UTC")]
    return df


def compare(df: pd.DataFrame, threshold: float = 0.5, bins: int = 20) -> dict:
    scores = df["score"].to_numpy(dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if 0.0 <= lo and hi <= 1.0:
        lo, hi = 0.0, 1.0  # probabilities: the natural axis
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    versions = []
    for name, group in df.groupby("model_version", sort=True):
        s = group["score"].to_numpy(dtype=np.float64)
        s = s[np.isfinite(s)]
        counts, _ = np.histogram(np.clip(s, edges[0], edges[-1]), edges)
        q = np.quantile(s, [0.5, 0.9, 0.99]) if s.size else [np.nan] * 3
        versions.append({
            "version": str(name),
            "served_rows": int(group["served"].sum()),
            "shadow_rows": int((~group["served"]).sum()),
            "mean": _num(s.mean() if s.size else np.nan),
            "p50": _num(q[0]), "p90": _num(q[1]), "p99": _num(q[2]),
            "at_or_above_threshold": _num((s >= threshold).mean() if s.size else np.nan),
            "histogram": counts.tolist(),
        })
    return {"threshold": threshold, "rows": int(len(df)), "edges": [round(float(e), 6) for e in edges],
            "versions": versions, "shadow": shadow_pairs(df, threshold)}


def shadow_pairs(df: pd.DataFrame, threshold: float) -> list[dict]:
    served = df[df["served"]]
    shadow = df[~df["served"]]
    if shadow.empty or served.empty:
        return []
    keep = ["id", "model_version", "score"] + (["label"] if "label" in df.columns else [])
    pairs = shadow[keep].merge(served[keep], on="id", suffixes=("", "_served"))
    out = []
    for (name, baseline), g in pairs.groupby(["model_version", "model_version_served"], sort=True):
        a, b = g["score"].to_numpy(np.float64), g["score_served"].to_numpy(np.float64)
        if "label" in g.columns and g["label"].notna().all() and g["label_served"].notna().all():
            agree = (g["label"].to_numpy() == g["label_served"].to_numpy()).mean()
        else:
            agree = ((a >= threshold) == (b >= threshold)).mean()
        diff = np.abs(a - b)
        out.append({"version": str(name), "baseline": str(baseline), "pairs": int(len(g)),
                    "agreement": _num(agree), "mean_abs_diff": _num(np.nanmean(diff)),
                    "max_abs_diff": _num(np.nanmax(diff))})
    return out


def _num(x: float) -> float | None:
    x = float(x)
    return round(x, 6) if np.isfinite(x) else None


def render_text(report: dict) -> str:
    lines = [f"{report['rows']:,} result rows; threshold {report['threshold']}", "",
             f"{'version':<28} {'served':>10} {'shadow':>10} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} "
             f"{'>=thr':>7}"]
    for v in report["versions"]:
        lines.append(f"{v['version']:<28} {v['served_rows']:>10,} {v['shadow_rows']:>10,} {_f(v['mean'])} "
                     f"{_f(v['p50'])} {_f(v['p90'])} {_f(v['p99'])} {_f(v['at_or_above_threshold'], 7)}")
    if report["shadow"]:
        lines += ["", f"{'shadow':<28} {'vs served':<28} {'pairs':>10} {'agree':>8} {'mean|d|':>8} {'max|d|':>8}"]
        for p in report["shadow"]:
            lines.append(f"{p['version']:<28} {p['baseline']:<28} {p['pairs']:>10,} {_f(p['agreement'])} "
                         f"{_f(p['mean_abs_diff'])} {_f(p['max_abs_diff'])}")
    else:
        lines += ["", "no shadow rows"]
    return "\n".join(lines)


def _f(x: float | None, width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.4f}"

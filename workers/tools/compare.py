"""Compare model versions from stored results: ``scoring-worker compare`` and the report read this.

Per version: served and shadow rows, score mean and quantiles, the share at or above the threshold and a
histogram on edges shared by all versions (so they can be overlaid). Per shadow version and the served
version of the same records (joined on id): pairs, agreement (both scores on the same side of the
threshold; multiclass: the same label) and the mean and max absolute score difference.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from urllib.parse import quote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa

from workers.errors import ConfigError, SinkError
from workers.settings import IcebergSettings, S3Settings, Settings
from workers.sinks.sqlite import sqlite_location

SETTING = "--results"
COLUMNS = ["id", "model_version", "served", "score", "label", "scored_at"]


REQUIRED = ("id", "model_version", "score")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, setting: str = "--since", now: dt.datetime | None = None) -> dt.datetime:
    """``--since`` as an aware UTC datetime: an ISO 8601 time or date (UTC unless it has an offset), or a
    duration before ``now`` (``90s``, ``30m``, ``2h``, ``7d``, ``1w``). Raises ConfigError naming ``setting``."""
    m = _DURATION.match(text)
    if m:
        ago = float(m.group(1)) * _UNIT_S[m.group(2).lower()]
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=ago)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(setting, f"{text!r} is not a time: use ISO 8601 (2026-11-25T10:00, UTC unless it "
                                   f"has an offset) or a duration ago (30m, 2h, 7d)") from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def read_results(uri: str, s3: S3Settings, since: dt.datetime | None = None,
                 iceberg: IcebergSettings | None = None) -> pd.DataFrame:
    """Rows of a results table or dataset (the columns of ``COLUMNS`` that exist), scored at or after
    ``since`` when given. Never creates or changes anything at ``uri``; ConfigError when it holds no results."""
    scheme = urlparse(uri).scheme.lower() if "://" in uri else ""
    if scheme in ("postgresql", "postgres"):
        df = _read_postgres(uri, since)
    elif scheme == "sqlite":
        df = _read_sqlite(uri, since)
    elif scheme in ("mysql", "mariadb"):
        df = _read_mysql(uri, since)
    elif scheme in ("redis", "rediss"):
        df = _read_redis(uri, since)
    elif scheme in ("", "file", "s3"):
        df = _read_parquet(uri, s3, since)
    elif scheme in ("delta+file", "delta+s3"):
        from workers.sinks.delta import read_delta

        df = _filter_since(read_delta(uri, s3, SETTING, list(COLUMNS)).to_pandas(), since)
    elif scheme == "iceberg":
        df = _filter_since(_read_iceberg(uri, s3, iceberg or IcebergSettings()).to_pandas(), since)
    else:
        raise ConfigError(SETTING, f"cannot read results from {scheme}:// (use PostgreSQL, MariaDB, SQLite, Redis, "
                                   "Delta Lake, Iceberg or Parquet)")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError(SETTING, f"{_shown(uri)} holds no scoring results (no column {', '.join(missing)})")
    if "served" not in df.columns:  # results written before rollout support: every row was served
        df["served"] = True
    df["served"] = df["served"].astype(bool)
    df["id"] = df["id"].astype(str)
    return df


def _read_iceberg(uri: str, s3: S3Settings, iceberg: IcebergSettings) -> pa.Table:
    try:
        from workers.sinks.iceberg import read_iceberg
    except ImportError as exc:
        raise ConfigError(SETTING, f"iceberg:// results need pyiceberg (pip install 'scoring-workers[iceberg]'): "
                                   f"{exc}") from None
    return read_iceberg(uri, s3, iceberg, SETTING, list(COLUMNS))


def _shown(uri: str) -> str:
    from workers.settings import redact

    return redact(uri)


def _since_clause(since: dt.datetime | None, placeholder: str) -> tuple[str, list]:
    return (f" WHERE scored_at >= {placeholder}", [since]) if since else ("", [])


def _filter_since(df: pd.DataFrame, since: dt.datetime | None) -> pd.DataFrame:
    """Rows scored at or after ``since``, comparing times (not text: SQLite holds ISO text, Parquet may
    hold naive UTC timestamps)."""
    if since is None or "scored_at" not in df.columns:
        return df
    when = pd.to_datetime(df["scored_at"], utc=True, format="ISO8601")
    return df[when >= pd.Timestamp(since)].reset_index(drop=True)


def open_sqlite_readonly(uri: str, setting: str = SETTING):
    """A read-only connection to an existing SQLite database (``mode=ro``: it never creates the file, and
    with it a stray empty database in the current folder). ConfigError when there is none."""
    import sqlite3

    path, _ = sqlite_location(uri)
    if not path:
        raise ConfigError(setting, f"{_shown(uri)}: no database path (use sqlite:///relative.db or sqlite:////abs.db)")
    if not os.path.isfile(path):
        raise ConfigError(setting, f"SQLite database {path} does not exist")
    try:
        return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise ConfigError(setting, f"cannot open SQLite database {path}: {exc}") from None


def _read_postgres(uri: str, since: dt.datetime | None) -> pd.DataFrame:
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
                sql.SQL(", ").join(sql.Identifier(c) for c in cols), sink.tables.ident()) + sql.SQL(where)
            rows = conn.execute(query, params).fetchall()
    except psycopg.Error as exc:
        raise SinkError(f"cannot read {sink.name}: {exc}") from None
    return pd.DataFrame(rows, columns=cols)


def _read_mysql(uri: str, since: dt.datetime | None) -> pd.DataFrame:
    """Rows of a MySQL / MariaDB results table (``scored_at`` is DATETIME in UTC: compared as naive UTC)."""
    import pymysql

    from workers.settings import scrub
    from workers.sinks.mysql import MysqlSink
    from workers.sinks.mysqltables import q

    sink = MysqlSink(uri, SETTING)
    try:
        conn = pymysql.connect(**sink.connect_args, charset="utf8mb4", read_timeout=300)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                            "AND TABLE_NAME = %s", (sink.table,))
                present = {str(r[0]) for r in cur.fetchall()}
                if not present:
                    raise ConfigError(SETTING, f"table {sink.table!r} does not exist in {sink.name}")
                cols = [c for c in COLUMNS if c in present]
                where, params = _since_clause(since.astimezone(dt.UTC).replace(tzinfo=None) if since else None, "%s")
                cur.execute(f"SELECT {', '.join(map(q, cols))} FROM {q(sink.table)}{where}", params)
                rows = list(cur.fetchall())
        finally:
            conn.close()
    except pymysql.err.MySQLError as exc:
        raise SinkError(scrub(f"cannot read {sink.name}: {exc}", uri)) from None
    return pd.DataFrame(rows, columns=cols)


def _read_sqlite(uri: str, since: dt.datetime | None) -> pd.DataFrame:
    import sqlite3

    path, table = sqlite_location(uri)
    conn = open_sqlite_readonly(uri)
    try:
        quoted = '"' + table.replace('"', '""') + '"'
        present = {r[1] for r in conn.execute(f"PRAGMA table_info({quoted})")}
        if not present:
            raise ConfigError(SETTING, f"table {table!r} does not exist in {path}")
        cols = [c for c in COLUMNS if c in present]
        rows = conn.execute(f'SELECT {", ".join(cols)} FROM {quoted}').fetchall()  # noqa: S608
    except sqlite3.Error as exc:
        raise SinkError(f"cannot read sqlite:///{path}?table={table}: {exc}") from None
    finally:
        conn.close()
    return _filter_since(pd.DataFrame(rows, columns=cols), since)


def _read_redis(uri: str, since: dt.datetime | None) -> pd.DataFrame:
    """Every version's row of every result hash under the prefix (the sink's own keys left out), read with SCAN
    (never KEYS: the server keeps answering others) and pipelined HGETALL, 1000 keys at a time."""
    import orjson
    import redis

    from workers.sinks.redis import META, META_PREFIXES, SERVED, RedisSink

    sink = RedisSink(uri, SETTING)
    own = tuple(sink.prefix + m.encode() for m in META_PREFIXES)
    meta = {sink.prefix + m.encode() for m in META}
    rows: list[dict] = []
    try:
        client = sink.client
        keys = [k for k in client.scan_iter(match=_glob_escape(sink.prefix) + b"*", count=1000, _type="hash")
                if k not in meta and not k.startswith(own)]
        for start in range(0, len(keys), 1000):
            pipe = client.pipeline(transaction=False)
            for key in keys[start:start + 1000]:
                pipe.hgetall(key)
            for fields in pipe.execute():
                for name, value in fields.items():
                    if name != SERVED.encode():
                        row = orjson.loads(value)
                        rows.append({c: row.get(c) for c in COLUMNS if c in row})
    except (redis.exceptions.RedisError, OSError) as exc:
        raise SinkError(f"cannot read {sink.name}: {exc}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(SETTING, f"{sink.name} holds a hash under its prefix that is not scoring results: "
                                   f"{exc}") from None
    finally:
        sink.close()
    if not rows:
        raise ConfigError(SETTING, f"{sink.name} holds no scoring results under its prefix")
    return _filter_since(pd.DataFrame(rows), since)


def _glob_escape(prefix: bytes) -> bytes:
    """The prefix as a literal in a SCAN MATCH pattern."""
    return b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in prefix)


def _read_parquet(uri: str, s3: S3Settings, since: dt.datetime | None) -> pd.DataFrame:
    import pyarrow.dataset as ds

    from workers.storage import resolve

    fs, root = resolve(uri, s3)
    try:
        files = ds.dataset(root, filesystem=fs, format="parquet").files  # skips _errors/, _state/, .tmp
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(SETTING, f"cannot read Parquet results under {_shown(uri)}: {exc}") from None
    parts = []
    for path in files:
        table = ds.dataset(path, filesystem=fs, format="parquet").to_table()
        parts.append(table.select([c for c in COLUMNS if c in table.column_names]).to_pandas())
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id", "model_version", "score"])
    return _filter_since(df, since)


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


def run_compare(settings: Settings, results: str, threshold: float | None, since: str | None,
                as_json: bool) -> None:
    """``scoring-worker compare``: read ``results`` (rows scored at or after ``since``), print the comparison as
    tables or JSON; ``threshold`` None is SCORING_ROUTING__THRESHOLD's."""
    import click
    import orjson

    table = read_results(results, settings.s3, parse_since(since) if since else None, settings.iceberg)
    report = compare(table, settings.routing.threshold if threshold is None else threshold)
    click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if as_json else render_text(report))

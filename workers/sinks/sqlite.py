"""SQLite sink: the embedded default that needs no server. ``sqlite:///path/to.db?table=NAME``.

Same tables and keys as the PostgreSQL sink; each write is one transaction with an upsert.
Timestamps are stored as ISO-8601 text, lists as JSON text.
"""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import parse_qsl, urlparse

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import ConfigError, SinkError
from workers.scoring import Scored
from workers.sinks.base import DirectUnit, Sink, UnitWriter
from workers.sinks.postgres import ERROR_KEY, RESULT_KEY


def _sqlite_type(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return "INTEGER"
    if pa.types.is_floating(t):
        return "REAL"
    return "TEXT"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _pylist(col: pa.ChunkedArray) -> list:
    t = col.type
    if pa.types.is_timestamp(t):
        return pc.strftime(col, format="%Y-%m-%dT%H:%M:%S%z" if t.tz else "%Y-%m-%dT%H:%M:%S").to_pylist()
    if pa.types.is_list(t) or pa.types.is_struct(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        return [None if v is None else orjson.dumps(v).decode() for v in col.to_pylist()]
    if pa.types.is_dictionary(t):
        return col.cast(t.value_type).to_pylist()
    return col.to_pylist()


class SqliteSink(Sink):
    def __init__(self, uri: str, setting: str):
        p = urlparse(uri)
        path = p.path if p.netloc in ("", "localhost") else p.netloc + p.path
        if uri.startswith("sqlite:////"):
            path = "/" + path.lstrip("/")
        elif uri.startswith("sqlite:///"):
            path = path[1:] if path.startswith("/") else path
        if not path:
            raise ConfigError(setting, f"{uri}: no database path (use sqlite:///relative.db or sqlite:////abs.db)")
        self.path = path
        self.table = dict(parse_qsl(p.query)).get("table", "scores")
        self.name = f"sqlite:///{path}?table={self.table}"
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._known: dict[str, set[str]] = {}

    def _ensure(self, table: str, schema: pa.Schema, key: tuple[str, ...]) -> None:
        known = self._known.get(table)
        if known is not None and all(n in known for n in schema.names):
            return
        cols = ", ".join(f"{_q(f.name)} {_sqlite_type(f.type)}" for f in schema)
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {_q(table)} ({cols}, PRIMARY KEY ({', '.join(map(_q, key))}))")
        have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({_q(table)})")}
        for f in schema:
            if f.name not in have:
                self._conn.execute(f"ALTER TABLE {_q(table)} ADD COLUMN {_q(f.name)} {_sqlite_type(f.type)}")
        self._known[table] = set(schema.names) | have

    def _upsert(self, table: str, data: pa.Table, key: tuple[str, ...]) -> None:
        if data.num_rows == 0:
            return
        self._ensure(table, data.schema, key)
        names = data.column_names
        cols = ", ".join(map(_q, names))
        updates = ", ".join(f"{_q(n)} = excluded.{_q(n)}" for n in names if n not in key)
        stmt = (
            f"INSERT INTO {_q(table)} ({cols}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT ({', '.join(map(_q, key))}) DO UPDATE SET {updates}"
        )
        # Rows in offset order: with duplicates in one batch the later record wins, as in PostgreSQL.
        self._conn.executemany(stmt, zip(*(_pylist(c) for c in data.columns), strict=True))

    def store(self, scored: Scored) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._upsert(self.table, scored.results, RESULT_KEY)
            self._upsert(f"{self.table}_errors", scored.errors, ERROR_KEY)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._known.clear()
            raise SinkError(f"writing to {self.name}: {exc}") from exc

    def begin(self, unit: str) -> UnitWriter:
        return DirectUnit(self.store)

    def _ledger(self) -> None:
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_q(self.table + '_inputs')} (unit TEXT PRIMARY KEY, "
            "fingerprint TEXT NOT NULL, rows INTEGER, rejected INTEGER, finished_at TEXT)"
        )

    def done(self, unit: str) -> str | None:
        self._ledger()
        row = self._conn.execute(
            f"SELECT fingerprint FROM {_q(self.table + '_inputs')} WHERE unit = ?", (unit,)
        ).fetchone()
        return row[0] if row else None

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        self._ledger()
        self._conn.execute(
            f"INSERT INTO {_q(self.table + '_inputs')} VALUES (?, ?, ?, ?, datetime('now')) "
            "ON CONFLICT (unit) DO UPDATE SET fingerprint = excluded.fingerprint, rows = excluded.rows, "
            "rejected = excluded.rejected, finished_at = excluded.finished_at",
            (unit, fingerprint, rows, rejected),
        )

    def check(self) -> None:
        try:
            self._conn.execute("SELECT 1")
        except sqlite3.Error as exc:
            raise SinkError(f"cannot use {self.name}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


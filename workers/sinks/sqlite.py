"""SQLite sink: the embedded default that needs no server. ``sqlite:///path/to.db?table=NAME``.

Same tables, keys and rules as the PostgreSQL sink (the later duplicate wins and is counted; a stale stream
row, older than the stored one of its topic-partition, does not overwrite it; a batch unit is
one transaction that first deletes the unit's old results and errors; rows SQLite cannot take are raised as
``RowsRejected`` before anything of the call is stored). The PostgreSQL sink's limit for an id shared by two
inputs holds here too (see its module docstring): rewriting the input that wrote it last without it deletes it.
Nothing is created before the first write: not the database file, not its folder (``check`` only looks).

Value mapping (SQLite has few types; columns keep the affinity they were created with):
    ints, bool -> INTEGER; uint64 -> no affinity (INTEGER, or exact decimal TEXT beyond 2**63 - 1)
    floats -> REAL (NaN is stored as NULL, SQLite's own rule); decimal -> TEXT (exact digits)
    binary -> BLOB; duration -> INTEGER (the count in the column's unit: s, ms, us or ns)
    timestamp -> ISO-8601 TEXT (with the offset when it has a zone); date, time, uuid -> ISO TEXT
    lists, structs, maps, intervals -> JSON TEXT (see ``tables.json_texts``); everything else -> TEXT
    JSON text (``arrow.json``: passthrough values of mixed JSON types) -> no affinity, each value as it would
    be stored alone: text, INTEGER/REAL, true/false as 1/0, null as NULL, an integer beyond 64 bits as its
    exact digits (TEXT), arrays and objects as their JSON TEXT (never a JSON string of the text)
SQLite column names ignore ASCII case: columns ``ID`` and ``id`` cannot both exist, and are refused.
Sinks on the same database file share one connection (and so one transaction per unit). A unit holds
SQLite's single write lock until it commits: other processes writing the same file (shards) wait for it,
up to the 30 s busy timeout, then fail with a retryable SinkError.
"""

from __future__ import annotations

import os
import re
import sqlite3
from urllib.parse import parse_qsl, urlparse

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.sinks.base import Ledger, Sink, UnitWriter, redact
from workers.sinks.tables import (
    ERROR_KEY,
    POSITION,
    RESULT_KEY,
    UNIT_COLUMN,
    dedupe_last,
    is_json,
    is_listlike,
    is_uuid,
    json_texts,
    missing_keys,
    plain,
    with_unit,
)

FIND_AT_MOST = 20
# One connection per database file in this process: sinks on the same file (results and a shadow table)
# share it, so one unit's transaction covers both instead of the second waiting on the first's write lock.
_SHARED: dict[str, list] = {}
_ROW_ERRORS = (sqlite3.Error, OverflowError, ValueError, TypeError)  # what binding a bad value raises


def _sqlite_type(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _sqlite_type(t.value_type)
    if pa.types.is_uint64(t) or is_json(t):
        return ""
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_duration(t):
        return "INTEGER"
    if pa.types.is_floating(t):
        return "REAL"
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)):
        return "BLOB"
    return "TEXT"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_INTEGER = re.compile(r"-?[0-9]+")


def _json_value(text: str) -> object:
    """A JSON text's value as SQLite stores the same value arriving alone: text, number, 0/1, NULL; an
    integer beyond 64 bits as its exact digits (text); arrays and objects as the JSON text itself."""
    if _INTEGER.fullmatch(text):
        n = int(text)
        return n if -(2**63) <= n < 2**63 else text
    try:
        v = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if isinstance(v, bool):
        return int(v)
    return text if isinstance(v, dict | list) else v


def _values(name: str, col: pa.ChunkedArray) -> tuple[list, dict[int, str]]:
    """The column's values as Python values sqlite3 binds, and rows that cannot be written."""
    t = col.type
    if is_uuid(t):
        return [None if v is None else str(v) for v in col.to_pylist()], {}
    if is_json(t):
        return [None if v is None else _json_value(v) for v in plain(col).to_pylist()], {}
    col = plain(col)
    t = col.type
    if pa.types.is_timestamp(t):
        return pc.strftime(col, format="%Y-%m-%dT%H:%M:%S%z" if t.tz else "%Y-%m-%dT%H:%M:%S").to_pylist(), {}
    if pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
        return pc.cast(col, pa.string()).to_pylist(), {}
    if pa.types.is_uint64(t):
        return [v if v is None or v < 2**63 else str(v) for v in col.to_pylist()], {}
    if pa.types.is_duration(t):
        return pc.cast(col, pa.int64()).to_pylist(), {}
    if pa.types.is_null(t):
        return [None] * len(col), {}
    if is_listlike(t) or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_interval(t) \
            or pa.types.is_union(t):
        return json_texts(name, col)
    return col.to_pylist(), {}


class _Unit(UnitWriter):
    """One batch unit: one transaction deleting the unit's old rows, then every write, then commit."""

    def __init__(self, sink: SqliteSink, unit: str):
        self.sink, self.unit = sink, unit
        self.started = False
        self.collapsed = 0

    def write(self, scored: Scored) -> None:
        first = not self.started
        self.started = True
        try:
            self.collapsed += self.sink._store(scored, self.unit, first=first)
        except ConfigError as exc:  # columns this table cannot hold: this input fails alone, the run goes on
            raise InputError(str(exc)) from None

    def commit(self) -> None:
        if not self.started:  # an emptied input: its old rows still go
            self.write(Scored(pa.table({}), pa.table({})))
        self.sink._finish()
        self.sink.duplicates_collapsed += self.collapsed

    def abort(self) -> None:
        self.sink._abort()


def sqlite_location(uri: str) -> tuple[str, str]:
    """(database path, table) of a ``sqlite:///`` URI: ``sqlite:///rel.db`` is relative, ``sqlite:////abs.db``
    absolute, ``?table=`` names the table (default ``scores``). The one parser of these URIs: the sink,
    compare, report and check read them alike."""
    p = urlparse(uri)
    path = p.path if p.netloc in ("", "localhost") else p.netloc + p.path
    if uri.startswith("sqlite:////"):
        path = "/" + path.lstrip("/")
    elif uri.startswith("sqlite:///"):
        path = path[1:] if path.startswith("/") else path
    return path, dict(parse_qsl(p.query)).get("table", "scores")


class SqliteSink(Sink):
    """See the module docstring. The ``Sink`` contract, the shared connection it runs on, and the table DDL
    and upsert (SQLite's are small enough to stay); the ledger is ``SqliteLedger``."""

    def __init__(self, uri: str, setting: str):
        path, self.table = sqlite_location(uri)
        if not path:
            raise ConfigError(setting, f"{uri}: no database path (use sqlite:///relative.db or sqlite:////abs.db)")
        self.path = path
        self.setting = setting
        self.name = redact(f"sqlite:///{path}?table={self.table}")
        self._conn: sqlite3.Connection | None = None
        self._key = ""
        self._known: dict[str, set[str]] = {}
        self._inputs = SqliteLedger(self)

    # -- connection: opened (and the file created) on first use, never by construction or check ----------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            key = self.path if self.path == ":memory:" else os.path.realpath(self.path)
            shared = _SHARED.get(key)
            if shared is None:
                try:
                    if self.path != ":memory:":
                        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                    conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=FULL")
                except (OSError, sqlite3.Error) as exc:
                    raise SinkError(f"cannot open {self.name}: {exc}") from exc
                shared = _SHARED[key] = [conn, 0]
            shared[1] += 1
            self._conn, self._key = shared[0], key
        return self._conn

    def _exists(self) -> bool:
        return self._conn is not None or self.path == ":memory:" or os.path.exists(self.path)

    def _abort(self) -> None:
        self._known.clear()
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _finish(self) -> None:
        try:
            conn = self._connection()
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abort()
            raise SinkError(f"writing to {self.name}: {exc}") from exc

    # -- schema ----------------------------------------------------------------------------------
    def _ensure(self, table: str, schema: pa.Schema, key: tuple[str, ...]) -> None:
        seen: dict[str, str] = {}
        for n in schema.names:
            if n.lower() in seen:
                raise ConfigError(self.setting, f"columns {seen[n.lower()]!r} and {n!r} differ only in case, and "
                                                f"SQLite treats them as one column ({self.name}): rename one")
            seen[n.lower()] = n
        known = self._known.get(table)
        if known is not None and all(n.lower() in known for n in schema.names):
            return
        cols = ", ".join(f"{_q(f.name)} {_sqlite_type(f.type)}" for f in schema)
        keys = ", ".join(map(_q, key))
        if key:
            self._connection().execute(f"CREATE TABLE IF NOT EXISTS {_q(table)} ({cols}, PRIMARY KEY ({keys}))")
        have = {row[1].lower() for row in self._connection().execute(f"PRAGMA table_info({_q(table)})")}
        for f in schema:
            if f.name.lower() not in have:
                self._connection().execute(f"ALTER TABLE {_q(table)} ADD COLUMN {_q(f.name)} {_sqlite_type(f.type)}")
        if UNIT_COLUMN in schema.names:
            self._connection().execute(f"CREATE INDEX IF NOT EXISTS {_q(table + '_by_' + UNIT_COLUMN)} "
                               f"ON {_q(table)} ({_q(UNIT_COLUMN)})")
        self._known[table] = {n.lower() for n in schema.names} | have

    def _upsert(self, table: str, data: pa.Table, key: tuple[str, ...]) -> dict[int, str]:
        """Insert or update every row; returns the rows that cannot be written (then nothing of them is)."""
        self._ensure(table, data.schema, key)
        names = data.column_names
        cols = ", ".join(map(_q, names))
        updates = ", ".join(f"{_q(n)} = excluded.{_q(n)}" for n in names if n not in key)
        action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        if updates and table == self.table and all(c in names for c in POSITION):
            # Stream rows: never over a newer offset of the same topic-partition (see the PostgreSQL sink).
            t, (topic, partition, offset) = _q(table), map(_q, POSITION)
            action += (f" WHERE NOT coalesce({t}.{topic} = excluded.{topic} AND {t}.{partition} = "
                       f"excluded.{partition} AND {t}.{offset} > excluded.{offset}, 0)")
        stmt = (f"INSERT INTO {_q(table)} ({cols}) VALUES ({', '.join('?' * len(names))}) "
                f"ON CONFLICT ({', '.join(map(_q, key))}) {action}")
        bad = missing_keys(data, key)
        columns = []
        for name in names:
            values, refused = _values(name, data.column(name))
            columns.append(values)
            for i, reason in refused.items():
                bad.setdefault(i, reason)
        if bad:
            return bad
        rows = list(zip(*columns, strict=True))
        self._connection().execute("SAVEPOINT upsert")
        try:
            self._connection().executemany(stmt, rows)
        except _ROW_ERRORS:
            # Find the rows at fault one by one, then store none of them.
            for i, row in enumerate(rows):
                try:
                    self._connection().execute(stmt, row)
                except _ROW_ERRORS as exc:
                    bad[i] = f"SQLite cannot store this row: {exc}"
                    if len(bad) >= FIND_AT_MOST:
                        break
            self._connection().execute("ROLLBACK TO upsert")
            if not bad:
                raise
        self._connection().execute("RELEASE upsert")
        return bad

    # -- writing ---------------------------------------------------------------------------------
    def _store(self, scored: Scored, unit: str | None, first: bool = False) -> int:
        """Write results and errors inside the open (or a new) transaction; returns the duplicates collapsed."""
        missing = missing_keys(scored.results, RESULT_KEY)
        if missing:  # before collapsing duplicates: rows without a key are refused one by one
            raise RowsRejected(missing)
        results = with_unit(scored.results, unit, self.setting)
        errors = with_unit(scored.errors, unit, self.setting)
        results, keep = dedupe_last(results, RESULT_KEY)
        errors, _ = dedupe_last(errors, ERROR_KEY)
        conn = self._connection()
        try:
            if not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")
            if first and unit is not None:
                self._forget(unit)
            if scored.resolved:  # error rows of records these results settle (Scored.resolved)
                errors_table = f"{self.table}_errors"
                if conn.execute(f"PRAGMA table_info({_q(errors_table)})").fetchone():
                    conn.executemany(f"DELETE FROM {_q(errors_table)} WHERE source = ? AND model_version = ?",
                                     scored.resolved)
            bad = self._upsert(self.table, results, RESULT_KEY) if results.num_rows else {}
            if bad:
                self._abort()
                raise RowsRejected({(keep[i] if keep is not None else i): reason for i, reason in bad.items()})
            bad = self._upsert(f"{self.table}_errors", errors, ERROR_KEY) if errors.num_rows else {}
            if bad:
                self._abort()
                raise InputError(f"the errors table of {self.name} cannot store rejected row(s): "
                                 f"{next(iter(bad.values()))}")
        except (sqlite3.Error, OverflowError) as exc:
            self._abort()
            raise SinkError(f"writing to {self.name}: {exc}") from exc
        except BaseException:
            self._abort()
            raise
        return scored.results.num_rows - results.num_rows

    def _forget(self, unit: str) -> None:
        """Delete what an earlier run stored for ``unit`` (results and errors), in the unit's transaction."""
        for table in (self.table, f"{self.table}_errors"):
            have = {row[1].lower() for row in self._connection().execute(f"PRAGMA table_info({_q(table)})")}
            if not have:
                continue
            if UNIT_COLUMN not in have:
                self._ensure(table, pa.schema([(UNIT_COLUMN, pa.string())]), ())
            self._connection().execute(f"DELETE FROM {_q(table)} WHERE {_q(UNIT_COLUMN)} = ?", (unit,))

    def write_batch(self, scored: Scored) -> None:
        collapsed = self._store(scored, None)
        self._finish()
        self.duplicates_collapsed += collapsed

    def begin(self, unit: str) -> UnitWriter:
        return _Unit(self, unit)

    def ledger(self) -> Ledger:
        """The batch ledger, in table ``NAME_inputs`` of the same database, on this sink's connection."""
        return self._inputs

    def check(self) -> None:
        """Can the database be used? Looks only: an existing file is opened read-only; a missing one needs a
        folder that exists (or can be made) and is writable."""
        if self.path == ":memory:" or self._conn is not None:
            return
        if os.path.exists(self.path):
            try:
                ro = sqlite3.connect(f"file:{os.path.abspath(self.path)}?mode=ro", uri=True, timeout=5)
                try:
                    ro.execute("SELECT count(*) FROM sqlite_master").fetchone()
                finally:
                    ro.close()
            except sqlite3.Error as exc:
                raise SinkError(f"cannot use {self.name}: {exc}") from exc
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise SinkError(f"cannot create {self.name}: {folder} is not a writable folder")

    def close(self) -> None:
        if self._conn is None:
            return
        shared = _SHARED.get(self._key)
        self._conn = None
        if shared is not None:
            shared[1] -= 1
            if shared[1] <= 0:
                del _SHARED[self._key]
                shared[0].close()


class SqliteLedger(Ledger):
    """The batch ledger of a ``SqliteSink``: table ``NAME_inputs`` of the same database, on the sink's
    connection. Asking ``done`` before anything was written creates no file."""

    def __init__(self, sink: SqliteSink):
        self.sink = sink
        self.table = _q(sink.table + "_inputs")

    def _ensure(self) -> None:
        self.sink._connection().execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (unit TEXT PRIMARY KEY, "
            "fingerprint TEXT NOT NULL, rows INTEGER, rejected INTEGER, finished_at TEXT)"
        )

    def done(self, unit: str) -> str | None:
        if not self.sink._exists():  # nothing written yet: nothing done, and nothing to create for asking
            return None
        try:
            self._ensure()
            row = self.sink._connection().execute(
                f"SELECT fingerprint FROM {self.table} WHERE unit = ?", (unit,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise SinkError(f"reading the ledger of {self.sink.name}: {exc}") from exc
        return row[0] if row else None

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        try:
            self._ensure()
            self.sink._connection().execute(
                f"INSERT INTO {self.table} VALUES (?, ?, ?, ?, datetime('now')) "
                "ON CONFLICT (unit) DO UPDATE SET fingerprint = excluded.fingerprint, rows = excluded.rows, "
                "rejected = excluded.rejected, finished_at = excluded.finished_at",
                (unit, fingerprint, rows, rejected),
            )
        except sqlite3.Error as exc:
            raise SinkError(f"recording an input as done in {self.sink.name}: {exc}") from exc

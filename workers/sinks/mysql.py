"""MySQL / MariaDB sink: multi-row INSERT into a temporary staging table, then one upsert, in one transaction.

``mysql://user[:password]@host:port/db?table=NAME`` (``mariadb://`` alike; default table ``scores``, port 3306;
``connect_timeout=N`` seconds the only other option). Driver: PyMySQL (pure Python). The server must be MariaDB
10.7 or later (the ``uuid`` type, collation ``utf8mb4_nopad_bin``, ``max_statement_time``,
``CREATE INDEX IF NOT EXISTS``): a MySQL server is refused on connect with a SinkError saying so, never half used;
the ``mysql://`` scheme names the protocol. Tables, created when missing
(InnoDB, utf8mb4, collation ``utf8mb4_nopad_bin``; column types in ``mysqltypes``):
    NAME         results, primary key (id, model_version)
    NAME_errors  rejected rows, primary key (source, model_version)
    NAME_inputs  the batch ledger (``MysqlLedger``): finished inputs and their fingerprints
The rules are the PostgreSQL sink's (see its module docstring), with MariaDB's spelling:
- Within one write, rows with the same key are collapsed to the later one (``duplicates_collapsed``, see
  ``tables.dedupe_last``).
- Stream/serve rows (``topic``, ``partition``, ``offset``) update a stored row only when they are not older than
  it in the same topic-partition (a zombie worker's stale write is skipped): each column of the
  ``ON DUPLICATE KEY UPDATE`` is ``c = IF(stale, c, VALUES(c))``. The trap: MariaDB assigns left to right and
  later assignments see the earlier ones' new values, so the position columns come last, ``offset`` first of
  them (once it holds the new offset, ``stale`` stays false for the rest).
- Batch (``begin(unit)``): the whole unit is one transaction that first deletes the unit's old results and
  errors (column ``input_file``). Stream/serve (``write_batch``): each call is its own transaction.
- DDL commits implicitly in MariaDB, so it never runs inside a unit's open transaction: a unit's first write
  creates or widens both tables (the errors table with the scorer's error columns) before deleting anything.
  When a later write of the same unit needs new columns (rare: a batch's shape changes within one input), the
  transaction is rolled back, the DDL runs, and the input fails alone with ``InputError`` (nothing of it
  stored, the old rows kept); the next run writes it whole.
- Rows the server cannot take (a key longer than its column, invalid UTF-8, +-infinity in a DOUBLE, a number
  out of range) are found (checks in Arrow, then bisection of the batch against the staging table under
  savepoints) and raised as ``RowsRejected`` after a rollback: never an endless retry. Strict mode
  (``STRICT_ALL_TABLES``) is set per session, so the server refuses instead of truncating.
- DDL runs under ``GET_LOCK`` on the table name (shards starting together take turns). Per session:
  ``innodb_lock_wait_timeout`` and ``lock_wait_timeout`` (metadata locks) 15 s, ``max_statement_time`` 300 s,
  ``time_zone`` UTC, isolation READ COMMITTED (no gap locks: shards deleting their units' old rows and
  inserting new ones into the same index gaps would deadlock under REPEATABLE READ); the driver's read/write
  timeouts are a little longer. A locked table, a lost or refused connection give a retryable ``SinkError``
  naming the redacted URI, never the password.
- The PostgreSQL sink's limit for an id shared by two inputs holds here too.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse

import pyarrow as pa
import pymysql
import pymysql.cursors

from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.settings import scrub
from workers.sinks.base import Ledger, Sink, UnitWriter, redact
from workers.sinks.mysqltables import CHARSET, COLLATION, MAX_IDENT, MysqlTables, NeedsDdl, q
from workers.sinks.tables import (
    ERROR_KEY,
    RESULT_KEY,
    UNIT_COLUMN,
    TransactionUnit,
    keyed_rows,
)

FIND_AT_MOST = 20  # rows named per RowsRejected when bisecting
OPTIONS = {"table", "connect_timeout"}
# The scorer's error columns, so a unit's first write can create the errors table before its transaction.
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
                          ("model_version", pa.string()), ("scored_at", pa.timestamp("us", "UTC")),
                          ("source", pa.string()), (UNIT_COLUMN, pa.string())])
# Server errors that are the rows' fault (a value the column cannot take): retrying cannot help.
DATA_ERRORS = {1048, 1101, 1264, 1265, 1292, 1300, 1366, 1367, 1406, 1411, 1416, 1690, 3140, 4025, 4078}




def split_uri(uri: str, setting: str) -> tuple[dict[str, Any], str]:
    """(PyMySQL connect arguments, table name) of a ``mysql://`` or ``mariadb://`` URI; ConfigError when wrong."""
    shown = redact(uri)
    try:
        p = urlparse(uri)
        port = p.port
    except ValueError as exc:
        raise ConfigError(setting, f"cannot read {shown!r} as a URI: {exc}") from None
    pairs = parse_qsl(p.query, keep_blank_values=True)
    if sum(1 for k, _ in pairs if k == "table") > 1:
        raise ConfigError(setting, "name one table (?table= is given more than once)")
    params = dict(pairs)
    unknown = sorted(set(params) - OPTIONS)
    if unknown:
        raise ConfigError(setting, f"unknown option {unknown[0]!r} in {shown!r}; a MariaDB URI takes "
                                   "?table=NAME and ?connect_timeout=SECONDS")
    database = unquote(p.path.lstrip("/"))
    if not database or "/" in database:
        raise ConfigError(setting, f"{shown!r} names no database: use mysql://user@host:3306/DB?table=NAME")
    if not p.hostname:
        raise ConfigError(setting, f"{shown!r} names no host: use mysql://user@host:3306/DB?table=NAME")
    table = params.get("table", "scores")
    if not table or "." in table or "`" in table or table != table.strip():
        raise ConfigError(setting, f"table {table!r} must be a plain NAME (the database is the URI's path)")
    if len(table) + len("_errors") > MAX_IDENT:
        raise ConfigError(setting, f"table name {table!r} is too long: MariaDB identifiers hold at most "
                                   f"{MAX_IDENT} characters and {table + '_errors'!r} must fit (use at most "
                                   f"{MAX_IDENT - len('_errors')})")
    timeout = params.get("connect_timeout", "5").strip()
    if not (timeout.isascii() and timeout.isdigit() and 0 < int(timeout) <= 3600):
        raise ConfigError(setting, f"connect_timeout must be a whole number of seconds, 1 to 3600 (got {timeout!r})")
    args = {"host": p.hostname, "port": port or 3306, "user": unquote(p.username or "") or "root",
            "password": unquote(p.password or ""), "database": database, "connect_timeout": int(timeout)}
    return args, table


def _supported(version: str) -> bool:
    """Whether the server (its version string, ``10.11.19-MariaDB-0+deb12u1``) is MariaDB 10.7 or later."""
    if "mariadb" not in version.lower():
        return False
    parts = version.removeprefix("5.5.5-").split("-", 1)[0].split(".")  # 5.5.5-: MariaDB's old handshake prefix
    try:
        return (int(parts[0]), int(parts[1])) >= (10, 7)
    except (ValueError, IndexError):
        return False


def _errno(exc: BaseException) -> int:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else 0


def _data_error(exc: BaseException) -> bool:
    return isinstance(exc, pymysql.err.DataError | pymysql.err.IntegrityError) or _errno(exc) in DATA_ERRORS


def _reason(exc: BaseException) -> str:
    args: tuple = getattr(exc, "args", ())
    message = str(args[1]) if len(args) > 1 else str(exc)
    return f"MariaDB refuses the row: {message}"


class MysqlSink(Sink):
    """See the module docstring: the ``Sink`` contract on one PyMySQL connection, the tables' DDL and the
    staging upsert; the ledger is ``MysqlLedger``."""

    def __init__(self, uri: str, setting: str, lock_timeout_s: float = 15.0, statement_timeout_s: float = 300.0):
        self.connect_args, self.table = split_uri(uri, setting)
        self.setting = setting
        self.name = redact(uri)
        self._uri = uri  # for scrub(): driver messages may quote the password
        self.timeouts = (lock_timeout_s, statement_timeout_s)
        self._conn: pymysql.connections.Connection | None = None
        self._open = False  # the connection's transaction holds uncommitted writes
        self.tables = MysqlTables(self)  # what this session knows of the tables, their DDL and upsert
        self.packet = 16 << 20  # the server's max_allowed_packet, read on connect
        self._inputs = MysqlLedger(self)

    # -- connection ------------------------------------------------------------------------------
    def _connection(self) -> pymysql.connections.Connection:
        if self._conn is None or not self._conn.open:
            lock_s, statement_s = self.timeouts
            try:
                self._conn = pymysql.connect(**self.connect_args, charset=CHARSET, autocommit=False,
                                             read_timeout=int(statement_s + 30), write_timeout=int(statement_s + 30))
                version = str(self._conn.get_server_info())
                if not _supported(version):
                    self._drop()
                    raise SinkError(f"{self.name} is a {version} server: this sink needs MariaDB 10.7 or later "
                                    "(its uuid type, utf8mb4_nopad_bin, max_statement_time); MySQL is not supported")
                assert self._conn is not None
                with self._conn.cursor() as cur:
                    # Every statement fails instead of hanging (a row lock, a metadata lock, a slow query);
                    # strict mode refuses what the columns cannot hold instead of truncating it.
                    cur.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, int(lock_s))}, "
                                f"lock_wait_timeout = {max(1, int(lock_s))}, "
                                f"max_statement_time = {float(statement_s)}, time_zone = '+00:00', "
                                "sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'")
                    # No gap locks: shards deleting their own units' rows (an index range each, often empty)
                    # and then inserting into the same gaps deadlock under REPEATABLE READ.
                    cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    cur.execute("SELECT @@max_allowed_packet")
                    self.packet = int(cur.fetchone()[0])
                self._conn.commit()
            except pymysql.err.MySQLError as exc:
                self._conn = None
                raise SinkError(scrub(f"cannot connect to {self.name}: {exc}", self._uri)) from None
            self.tables.forget()
            self._open = False
        return self._conn

    def _rollback(self) -> None:
        self._open = False
        if self._conn is not None and self._conn.open:
            try:
                self._conn.rollback()
            except pymysql.err.MySQLError:
                self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except pymysql.err.Error:
                pass
        self._conn = None

    def _fail(self, what: str, exc: BaseException) -> SinkError:
        """A retryable SinkError for ``exc`` after a rollback (the connection replaced when it broke)."""
        self._rollback()
        if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InterfaceError) and _errno(exc) not in (
                1205, 1213, 1969, 3024):  # lock wait, deadlock, statement time: the session stays usable
            self._drop()
        return SinkError(scrub(f"{what} in {self.name}: {exc}", self._uri))

    def _commit(self, what: str) -> None:
        try:
            self._connection().commit()
        except pymysql.err.MySQLError as exc:
            raise self._fail(what, exc) from None
        self._open = False

    def check(self) -> None:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
        except pymysql.err.MySQLError as exc:
            raise self._fail("check", exc) from None

    def close(self) -> None:
        self._drop()

    # -- writing ---------------------------------------------------------------------------------
    def _prepare(self, scored: Scored, unit: str | None) -> tuple[pa.Table, list[int] | None, pa.Table]:
        results, keep, errors = keyed_rows(scored, unit, self.setting)
        return results, keep, errors

    def _store(self, scored: Scored, unit: str | None, first: bool = False) -> int:
        """Write results and errors (not committed); returns how many duplicate rows were collapsed."""
        results, keep, errors = self._prepare(scored, unit)
        back = (lambda i: keep[i]) if keep is not None else (lambda i: i)  # noqa: E731 - index into the caller's
        conn = self._connection()
        parts = [(s, t, k) for s, t, k in (("", results, RESULT_KEY), ("_errors", errors, ERROR_KEY)) if t.num_rows]
        rendered: list[tuple] = []
        try:
            with conn.cursor() as cur:
                try:
                    if first and unit is not None and not errors.num_rows:  # before the transaction: DDL commits
                        self.tables.ensure(cur, "_errors", ERROR_SCHEMA, ERROR_KEY)
                    for suffix, table, key in parts:
                        types = self.tables.ensure(cur, suffix, table.schema, key)
                        rows, bad = self.tables.render(table, types, key)
                        if bad:
                            self._rollback()
                            if suffix:
                                raise InputError(f"the errors table of {self.name} cannot store rejected row(s): "
                                                 f"{next(iter(bad.values()))}")
                            raise RowsRejected({back(i): reason for i, reason in bad.items()})
                        rendered.append((suffix, table.column_names, rows, key))
                except NeedsDdl:
                    self._rollback()
                    for suffix, table, key in parts:
                        self.tables.ensure(cur, suffix, table.schema, key)
                    raise InputError(f"{self.name} needed new columns in the middle of this input (MariaDB commits "
                                     "on DDL, so they were added after rolling the input back): nothing of it is "
                                     "stored, the next run writes it") from None
                self._open = True
                if first and unit is not None:
                    self._forget(cur, unit)
                for suffix, names, rows, key in rendered:
                    self.tables.upsert(cur, suffix, names, rows, key)
                if scored.resolved:
                    self._settle(cur, scored.resolved)
        except pymysql.err.MySQLError as exc:
            if not _data_error(exc):
                raise self._fail("writing results", exc) from None
            self._rollback()
            bad = self._bisect(rendered[0] if rendered and not rendered[0][0] else None)
            if not bad:
                raise InputError(scrub(f"{self.name} cannot store some rows: {_reason(exc)}", self._uri)) from None
            raise RowsRejected({back(i): reason for i, reason in bad.items()}) from None
        return scored.results.num_rows - results.num_rows

    def _forget(self, cur: pymysql.cursors.Cursor, unit: str) -> None:
        """Delete what an earlier run stored for ``unit`` (results and errors), in the unit's transaction."""
        for suffix in ("", "_errors"):
            have = self.tables.known.get(suffix) or self.tables.catalog(cur, suffix)
            if have is None or UNIT_COLUMN not in have:
                continue  # no table, or one holding no batch rows: nothing of a unit to delete
            cur.execute(f"DELETE FROM {q(self.table + suffix)} WHERE {q(UNIT_COLUMN)} = %s", (unit,))

    def _settle(self, cur: pymysql.cursors.Cursor, resolved: list[tuple[str, str]]) -> None:
        """Delete the error rows of records these results settle (``Scored.resolved``), in the same transaction."""
        if (self.tables.known.get("_errors") or self.tables.catalog(cur, "_errors")) is None:
            return
        cur.executemany(f"DELETE FROM {q(self.table + '_errors')} WHERE source = %s AND model_version = %s",
                        resolved)

    def _bisect(self, part: tuple | None) -> dict[int, str]:
        """After a data error: the rows of ``part`` the server refuses, found by halving under savepoints (at
        most ``FIND_AT_MOST``), then rolled back. Empty when the results alone go in."""
        if part is None:
            return {}
        suffix, names, rows, key = part
        found: dict[int, str] = {}
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                self._open = True

                def probe(lo: int, hi: int) -> None:
                    if len(found) >= FIND_AT_MOST:
                        return
                    cur.execute("SAVEPOINT probe")
                    try:
                        self.tables.upsert(cur, suffix, names, rows[lo:hi], key)
                        cur.execute("ROLLBACK TO SAVEPOINT probe")
                        return
                    except pymysql.err.MySQLError as exc:
                        if not _data_error(exc):
                            raise
                        cur.execute("ROLLBACK TO SAVEPOINT probe")
                        if hi - lo == 1:
                            found[lo] = scrub(_reason(exc), self._uri)
                            return
                    mid = (lo + hi) // 2
                    probe(lo, mid)
                    probe(mid, hi)

                probe(0, len(rows))
        except pymysql.err.MySQLError as exc:
            raise self._fail("finding the rows the table refuses", exc) from None
        finally:
            self._rollback()
        return found

    def write_batch(self, scored: Scored) -> None:
        """Upsert one micro-batch's results and errors in one transaction."""
        collapsed = self._store(scored, None)  # its own transaction: DDL (which commits) runs before any write
        self._commit("writing results")
        self.duplicates_collapsed += collapsed

    def begin(self, unit: str) -> UnitWriter:
        return TransactionUnit(self, unit)

    def ledger(self) -> Ledger:
        """The batch ledger, in table ``NAME_inputs`` beside the results, on this sink's connection."""
        return self._inputs


class MysqlLedger(Ledger):
    """The batch ledger of a ``MysqlSink``: table ``NAME_inputs`` (unit_sha, unit, fingerprint, rows, rejected,
    finished_at), keyed by the SHA-256 of the unit (canonical locations can be longer than an InnoDB key),
    created under the sink's DDL lock on first use, on the sink's connection."""

    def __init__(self, sink: MysqlSink):
        self.sink = sink
        self.ident = q(sink.table + "_inputs")

    def _ensure(self, cur: pymysql.cursors.Cursor) -> None:
        if "_inputs" in self.sink.tables.known:
            return
        with self.sink.tables.ddl_lock(cur):
            cur.execute(f"CREATE TABLE IF NOT EXISTS {self.ident} (unit_sha CHAR(64) CHARACTER SET ascii PRIMARY KEY, "
                        "unit TEXT NOT NULL, fingerprint TEXT NOT NULL, `rows` BIGINT, rejected BIGINT, "
                        "finished_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB "
                        f"DEFAULT CHARSET={CHARSET} COLLATE={COLLATION}")
        self.sink.tables.known["_inputs"] = {}

    @staticmethod
    def _sha(unit: str) -> str:
        return hashlib.sha256(unit.encode()).hexdigest()

    def done(self, unit: str) -> str | None:
        conn = self.sink._connection()
        try:
            with conn.cursor() as cur:
                self._ensure(cur)
                cur.execute(f"SELECT fingerprint FROM {self.ident} WHERE unit_sha = %s", (self._sha(unit),))
                row = cur.fetchone()
            conn.commit()
        except pymysql.err.MySQLError as exc:
            raise self.sink._fail("reading the ledger", exc) from None
        return str(row[0]) if row else None

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        conn = self.sink._connection()
        try:
            with conn.cursor() as cur:
                self._ensure(cur)
                cur.execute(f"INSERT INTO {self.ident} (unit_sha, unit, fingerprint, `rows`, rejected) "
                            "VALUES (%s, %s, %s, %s, %s) ON DUPLICATE KEY UPDATE fingerprint = VALUES(fingerprint), "
                            "`rows` = VALUES(`rows`), rejected = VALUES(rejected), finished_at = CURRENT_TIMESTAMP(6)",
                            (self._sha(unit), unit, fingerprint, rows, rejected))
            conn.commit()
        except pymysql.err.MySQLError as exc:
            raise self.sink._fail("recording an input as done", exc) from None

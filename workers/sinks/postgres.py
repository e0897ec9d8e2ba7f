"""PostgreSQL sink: COPY into a staging table, then one upsert, in one transaction.

``postgresql://user[:password]@host:port/db?table=NAME`` (``schema.name`` allowed; default ``scores``).
Tables, created when missing:
    NAME         results, primary key (id, model_version)
    NAME_errors  rejected rows, primary key (source, model_version)
    NAME_inputs  the batch ledger: finished inputs and their fingerprints
Column types follow ``pgtypes`` (a column whose type changes is widened once). Rules:
- Within one write, rows with the same key are collapsed to the later one (``duplicates_collapsed``; stream
  rows: the higher offset of a partition, across partitions the later record timestamp, see ``tables``).
- Stream/serve rows (``topic``, ``partition``, ``offset``) update a stored row only when they are not older than
  it in the same topic-partition: a stale write (a zombie worker's, landing after the partition's new owner
  stored a later offset) is skipped. Across partitions there is no order: the later write wins.
- Batch (``begin(unit)``): the whole unit is one transaction that first deletes the unit's old results and
  errors (column ``input_file``), so a rewritten input leaves nothing stale. Stream/serve (``write_batch``):
  each call is its own transaction and touches only its keys.
- Limit (ids shared by two inputs): the table holds one row per (id, model_version), from the input written
  last, and ``input_file`` names only that input. When that input is rewritten without the id, its rows are
  deleted, the shared id with them, although the other, unchanged input still holds it: the id is missing
  until that other input is scored again (change it, or score it into a fresh table). Ids unique across the
  inputs, the documented contract, are never affected.
- Rows the server cannot take (SQLSTATE class 22/23) are found (checks in Arrow, then bisection of
  the batch under savepoints) and raised as ``RowsRejected`` after a rollback: never an endless retry.
- DDL runs under a transaction-scoped advisory lock on the table name (shards starting together), in its
  own transaction when possible; ``lock_timeout``/``statement_timeout`` bound every statement, so a locked
  table gives a retryable ``SinkError`` instead of a hang.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import psycopg
import pyarrow as pa
from psycopg import sql

from workers.errors import ConfigError, InputError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.settings import scrub
from workers.sinks.base import Ledger, Sink, UnitWriter, redact
from workers.sinks.pgtables import PgTables
from workers.sinks.pgtypes import JSON_COLUMNS, escape_nul, exact_columns
from workers.sinks.tables import (
    ERROR_KEY,
    RESULT_KEY,
    UNIT_COLUMN,
    TransactionUnit,
    keyed_rows,
)

MAX_IDENT = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes)
SUFFIXES = ("", "_errors", "_inputs")
FIND_AT_MOST = 20  # rows named per RowsRejected when bisecting: the caller writes the rest again


def split_uri(uri: str, setting: str) -> tuple[str, list[str]]:
    """(conninfo without our ``table`` parameter, [schema?, table])."""
    p = urlparse(uri)
    pairs = parse_qsl(p.query)
    if sum(1 for k, _ in pairs if k == "table") > 1:
        raise ConfigError(setting, "name one table (?table= is given more than once)")
    params = dict(pairs)
    table = params.pop("table", "scores")
    _check_options(params, setting)
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(setting, f"table {table!r} must be NAME or SCHEMA.NAME")
    for part, longest in zip(parts, [parts[0]] * (len(parts) - 1) + [parts[-1] + "_errors"], strict=True):
        if len(longest.encode()) > MAX_IDENT:
            raise ConfigError(setting, f"table name {part!r} is too long: PostgreSQL identifiers hold at most "
                                       f"{MAX_IDENT} bytes and {longest!r} must fit (use at most "
                                       f"{MAX_IDENT - (len(longest) - len(part))} bytes)")
    return urlunparse(p._replace(scheme="postgresql", query=urlencode(params))), parts


SSL_MODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


def _check_options(params: dict[str, str], setting: str) -> None:
    """Connection options libpq would refuse at every connect (so a worker would retry them as an outage
    forever): a wrong setting, refused at start-up."""
    if "sslmode" in params and params["sslmode"] not in SSL_MODES:
        raise ConfigError(setting, f"sslmode must be one of {', '.join(sorted(SSL_MODES))} (got {params['sslmode']!r})")
    for name in ("connect_timeout", "port", "keepalives_idle"):
        value = params.get(name)
        if value is not None and not (value.strip().isascii() and value.strip().isdigit()):
            raise ConfigError(setting, f"{name} must be a whole number (got {value!r})")


def _data_error(exc: psycopg.Error) -> bool:
    """The rows' fault (a value the column cannot take, a constraint), not the server's: retrying cannot help.

    Not 42804 (datatype mismatch): here it only means another writer changed a column's type since this
    session read the catalog; it stays a retryable SinkError, and the retry reads the catalog again."""
    state = getattr(exc, "sqlstate", None) or ""
    return state[:2] in ("22", "23")


def _reason(exc: psycopg.Error) -> str:
    diag = exc.diag
    message = (diag.message_primary or str(exc)).strip()
    column = diag.column_name
    if not column and diag.context and ", column " in diag.context:
        column = diag.context.split(", column ", 1)[1].split(":", 1)[0]
    return f"column {column!r}: {message}" if column else message


class PostgresSink(Sink):
    """See the module docstring. What stays here is the ``Sink`` contract and the one connection it runs on
    (connect, rollback, fail, commit); table DDL, staging and locks are ``PgTables``, the ledger ``PgLedger``."""

    def __init__(self, uri: str, setting: str, lock_timeout_s: float = 15.0, statement_timeout_s: float = 300.0):
        self.conninfo, parts = split_uri(uri, setting)
        self.setting = setting
        self.schema = parts[0] if len(parts) == 2 else None
        self.table = parts[-1]
        self.name = redact(uri)
        self._uri = uri  # for scrub(): driver messages may quote the password
        self.timeouts = (lock_timeout_s, statement_timeout_s)
        self._conn: psycopg.Connection | None = None
        self.tables = PgTables(self.schema, self.table)  # what this session knows of the tables, their DDL
        self._inputs = PgLedger(self)

    # -- connection ------------------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            lock_s, statement_s = self.timeouts
            try:
                self._conn = psycopg.connect(self.conninfo, connect_timeout=5, autocommit=False)
                # Session settings: every statement (a COPY into a locked table...) fails instead of hanging.
                self._conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(lock_s * 1000)}ms")))
                self._conn.execute(sql.SQL("SET statement_timeout = {}").format(
                    sql.Literal(f"{int(statement_s * 1000)}ms")))
                # Temporal values written as text use PostgreSQL's UTC spelling (pgtypes): a column widened to
                # text (``::text``) must spell its old values the same way.
                self._conn.execute("SET TimeZone = 'UTC'")
                self._conn.commit()
            except psycopg.Error as exc:
                raise SinkError(scrub(f"cannot connect to {self.name}: {exc}".strip(), self._uri)) from exc
            self.tables.forget()
        return self._conn

    def _rollback(self) -> None:
        # What the transaction created (tables, staging tables) is gone with it: forget it.
        self.tables.forget()
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.rollback()
            except psycopg.Error:
                self._conn.close()
                self._conn = None

    def _fail(self, what: str, exc: Exception) -> SinkError:
        # Any error leaves the transaction unusable; a broken connection must be replaced.
        self._rollback()
        if self._conn is not None and (self._conn.broken or isinstance(exc, psycopg.OperationalError)):
            self._conn.close()
            self._conn = None
        return SinkError(scrub(f"{what} in {self.name}: {str(exc).strip()}", self._uri))

    def _commit(self, what: str) -> None:
        try:
            self._connection().commit()
        except psycopg.Error as exc:
            raise self._fail(what, exc) from exc

    def check(self) -> None:
        conn = self._connection()
        try:
            conn.execute("SELECT 1")
            conn.rollback()
        except psycopg.Error as exc:
            raise self._fail("check", exc) from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writing ---------------------------------------------------------------------------------
    def _prepare(self, scored: Scored, unit: str | None) -> tuple[pa.Table, list[int] | None, pa.Table]:
        results, keep, errors = keyed_rows(scored, unit, self.setting)
        # Rejected rows are diagnostics: a NUL character (which text/jsonb refuse) is shown escaped, so the
        # error row is stored instead of failing the write.
        errors = pa.table([escape_nul(c, json=n in JSON_COLUMNS) for n, c in zip(errors.column_names, errors.columns,
                                                                                strict=True)],
                          names=errors.column_names) if errors.num_rows else errors
        return exact_columns(results), keep, exact_columns(errors)

    def _store(self, scored: Scored, unit: str | None, first: bool = False) -> int:
        """Write results and errors (not committed); returns how many duplicate rows were collapsed."""
        results, keep, errors = self._prepare(scored, unit)
        back = (lambda i: keep[i]) if keep is not None else (lambda i: i)  # noqa: E731 - index into the caller's
        conn = self._connection()
        parts = [(s, t, k) for s, t, k in (("", results, RESULT_KEY), ("_errors", errors, ERROR_KEY)) if t.num_rows]
        rendered: list[tuple] = []
        try:
            with conn.cursor() as cur:
                for suffix, table, key in parts:
                    types = self.tables.ensure(cur, suffix, table.schema, key)
                    csv, bad = self.tables.render(table, types, key)
                    if bad:
                        self._rollback()
                        if suffix:
                            raise InputError(f"the errors table of {self.name} cannot store rejected row(s): "
                                             f"{next(iter(bad.values()))}")
                        raise RowsRejected({back(i): reason for i, reason in bad.items()})
                    rendered.append((suffix, table, csv, key))
                if first and unit is not None:
                    self._forget(cur, unit)
                for suffix, table, csv, key in rendered:
                    self.tables.upsert(cur, suffix, table, csv, key)
                if scored.resolved:
                    self._settle(cur, scored.resolved)
        except psycopg.Error as exc:
            if not _data_error(exc):
                raise self._fail("writing results", exc) from exc
            self._rollback()
            bad = self._bisect(rendered[0] if rendered and not rendered[0][0] else None)
            if not bad:
                raise InputError(f"{self.name} cannot store some rejected rows: {_reason(exc)}") from None
            raise RowsRejected({back(i): reason for i, reason in bad.items()}) from None
        return scored.results.num_rows - results.num_rows

    def _forget(self, cur: psycopg.Cursor, unit: str) -> None:
        """Delete what an earlier run stored for ``unit`` (results and errors), in the unit's transaction."""
        for suffix in ("", "_errors"):
            have = self.tables.known.get(suffix) or self.tables.catalog(cur, suffix)
            if have is None:
                continue
            if UNIT_COLUMN not in have:  # a table from before units were recorded: add the column first
                have = self.tables.ensure(cur, suffix, pa.schema([(UNIT_COLUMN, pa.string())]), ())
            cur.execute(sql.SQL("DELETE FROM {} WHERE {} = %s").format(self.tables.ident(suffix),
                                                                      sql.Identifier(UNIT_COLUMN)), (unit,))

    def _settle(self, cur: psycopg.Cursor, resolved: list[tuple[str, str]]) -> None:
        """Delete the error rows of records these results settle (``Scored.resolved``), in the same transaction."""
        if (self.tables.known.get("_errors") or self.tables.catalog(cur, "_errors")) is None:
            return
        sources, versions = zip(*resolved, strict=True)
        cur.execute(sql.SQL("DELETE FROM {} WHERE (source, model_version) IN "
                            "(SELECT * FROM unnest(%s::text[], %s::text[]))").format(self.tables.ident("_errors")),
                    (list(sources), list(versions)))

    def _bisect(self, part: tuple | None) -> dict[int, str]:
        """After a data error: the rows of ``part`` the server refuses, found by halving under savepoints (at
        most ``FIND_AT_MOST``), then rolled back. Empty when the results alone go in."""
        if part is None:
            return {}
        suffix, table, _, key = part
        found: dict[int, str] = {}
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                types = self.tables.ensure(cur, suffix, table.schema, key)
                self.tables.stage(cur, suffix, {n: types[n] for n in table.column_names})  # outside the savepoints

                def probe(lo: int, hi: int) -> None:
                    if len(found) >= FIND_AT_MOST:
                        return
                    chunk = table.slice(lo, hi - lo)
                    csv, _ = self.tables.render(chunk, types, key)
                    cur.execute("SAVEPOINT probe")
                    try:
                        self.tables.upsert(cur, suffix, chunk, csv, key)
                        cur.execute("ROLLBACK TO SAVEPOINT probe")
                        return
                    except psycopg.Error as exc:
                        if not _data_error(exc):
                            raise
                        cur.execute("ROLLBACK TO SAVEPOINT probe")
                        if hi - lo == 1:
                            found[lo] = _reason(exc)
                            return
                    mid = (lo + hi) // 2
                    probe(lo, mid)
                    probe(mid, hi)

                probe(0, table.num_rows)
        except psycopg.Error as exc:
            raise self._fail("finding the rows the table refuses", exc) from exc
        finally:
            self._rollback()
        return found

    def write_batch(self, scored: Scored) -> None:
        """Upsert one micro-batch's results and errors in one transaction."""
        try:
            collapsed = self._store(scored, None)
        except SinkError as exc:
            if not isinstance(exc.__cause__, psycopg.errors.DatatypeMismatch):
                raise
            collapsed = self._store(scored, None)  # a column retyped by another writer: catalog read again
        self._commit("writing results")
        self.duplicates_collapsed += collapsed

    def begin(self, unit: str) -> UnitWriter:
        return TransactionUnit(self, unit)

    def ledger(self) -> Ledger:
        """The batch ledger, in table ``NAME_inputs`` beside the results, on this sink's connection."""
        return self._inputs


class PgLedger(Ledger):
    """The batch ledger of a ``PostgresSink``: table ``NAME_inputs`` (unit, fingerprint, rows, rejected,
    finished_at), created under the sink's DDL lock on first use, on the sink's connection (so ``mark_done``
    follows the unit's committed transaction on the same session)."""

    def __init__(self, sink: PostgresSink):
        self.sink = sink

    def _ensure(self, cur: psycopg.Cursor) -> None:
        tables = self.sink.tables
        if "_inputs" in tables.known:
            return
        tables.lock(cur)
        if self.sink.schema:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.sink.schema)))
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (unit text PRIMARY KEY, fingerprint text NOT NULL, "
                "rows bigint, rejected bigint, finished_at timestamptz NOT NULL DEFAULT now())"
            ).format(tables.ident("_inputs"))
        )
        tables.known["_inputs"] = {}

    def done(self, unit: str) -> str | None:
        conn = self.sink._connection()
        try:
            with conn.cursor() as cur:
                self._ensure(cur)
                cur.execute(
                    sql.SQL("SELECT fingerprint FROM {} WHERE unit = %s").format(self.sink.tables.ident("_inputs")),
                    (unit,),
                )
                row = cur.fetchone()
            conn.commit()
        except psycopg.Error as exc:
            raise self.sink._fail("reading the ledger", exc) from exc
        return row[0] if row else None

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        conn = self.sink._connection()
        try:
            with conn.cursor() as cur:
                self._ensure(cur)
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {} (unit, fingerprint, rows, rejected) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (unit) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                        "rows = EXCLUDED.rows, rejected = EXCLUDED.rejected, finished_at = now()"
                    ).format(self.sink.tables.ident("_inputs")),
                    (unit, fingerprint, rows, rejected),
                )
            conn.commit()
        except psycopg.Error as exc:
            raise self.sink._fail("recording an input as done", exc) from exc

"""PostgreSQL sink: COPY into a staging table, then one upsert, in one transaction.

``postgresql://user[:password]@host:port/db?table=NAME`` (``schema.name`` allowed; default ``scores``).
Tables, created when missing:
    NAME         results, primary key (id, model_version)
    NAME_errors  rejected rows, primary key (source, model_version)
    NAME_inputs  the batch ledger: finished inputs and their fingerprints
Within one write, rows with the same key are collapsed (the highest ``offset`` wins when present),
because ``ON CONFLICT DO UPDATE`` cannot touch a row twice in one statement.
"""

from __future__ import annotations

import io
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql

from workers.errors import ConfigError, SinkError
from workers.scoring import Scored
from workers.sinks.base import DirectUnit, Sink, UnitWriter

RESULT_KEY = ("id", "model_version")
ERROR_KEY = ("source", "model_version")


def redact(uri: str) -> str:
    """The URI without its password, for logs."""
    p = urlparse(uri)
    if p.password:
        p = p._replace(netloc=p.netloc.replace(f":{p.password}@", ":***@"))
    return urlunparse(p)


def split_uri(uri: str, setting: str) -> tuple[str, list[str]]:
    """(conninfo without our ``table`` parameter, [schema?, table])."""
    p = urlparse(uri)
    params = dict(parse_qsl(p.query))
    table = params.pop("table", "scores")
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(setting, f"table {table!r} must be NAME or SCHEMA.NAME")
    return urlunparse(p._replace(scheme="postgresql", query=urlencode(params))), parts


# Columns whose text holds JSON: stored as jsonb so they can be queried.
JSON_COLUMNS = {"raw", "explanation"}


def _pg_type(t: pa.DataType, name: str = "") -> str:
    if name in JSON_COLUMNS and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return "jsonb"
    if pa.types.is_integer(t):
        return "bigint"
    if pa.types.is_floating(t):
        return "double precision"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_timestamp(t):
        return "timestamptz"
    if pa.types.is_date(t):
        return "date"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type):
        return "double precision[]"
    if pa.types.is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
        return "jsonb"
    return "text"


def _csv_ready(table: pa.Table) -> pa.Table:
    """Columns Arrow's CSV writer cannot write become PostgreSQL literals (arrays, JSON)."""
    cols = []
    for field, col in zip(table.schema, table.columns, strict=True):
        t = field.type
        if pa.types.is_dictionary(t):
            col = col.cast(t.value_type)
        elif _pg_type(t) == "double precision[]":
            col = pa.array(
                [None if v is None else "{" + ",".join(repr(x) for x in v) + "}" for v in col.to_pylist()],
                pa.string(),
            )
        elif _pg_type(t) == "jsonb":
            import orjson

            col = pa.array([None if v is None else orjson.dumps(v).decode() for v in col.to_pylist()], pa.string())
        elif pa.types.is_timestamp(t) and t.tz is None:
            col = pc.assume_timezone(col, "UTC")
        cols.append(col)
    return pa.table(cols, names=table.column_names)


class PostgresSink(Sink):
    def __init__(self, uri: str, setting: str):
        self.conninfo, parts = split_uri(uri, setting)
        self.schema = parts[0] if len(parts) == 2 else None
        self.table = parts[-1]
        self.name = redact(uri)
        self._conn: psycopg.Connection | None = None
        self._known: dict[str, set[str]] = {}  # table -> columns known to exist

    # -- connection ------------------------------------------------------------------------------
    def _ident(self, suffix: str = "") -> sql.Identifier:
        name = self.table + suffix
        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.conninfo, connect_timeout=5, autocommit=False)
            except psycopg.Error as exc:
                raise SinkError(f"cannot connect to {self.name}: {exc}".strip()) from exc
            self._known.clear()
        return self._conn

    def _fail(self, what: str, exc: Exception) -> SinkError:
        # Any error leaves the transaction unusable; a broken connection must be replaced.
        if self._conn is not None:
            try:
                self._conn.rollback()
            except psycopg.Error:
                pass
            if self._conn.broken or isinstance(exc, psycopg.OperationalError):
                self._conn.close()
                self._conn = None
        return SinkError(f"{what} in {self.name}: {str(exc).strip()}")

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

    # -- schema ----------------------------------------------------------------------------------
    def _ensure(self, cur: psycopg.Cursor, suffix: str, schema: pa.Schema, key: tuple[str, ...]) -> None:
        ident = self._ident(suffix)
        known = self._known.get(suffix)
        if known is not None and all(n in known for n in schema.names):
            return
        if self.schema:
            cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        cols = [sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(_pg_type(f.type, f.name))) for f in schema]
        pk = sql.SQL(", PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, key)))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}{})").format(ident, sql.SQL(", ").join(cols), pk))
        for f in schema:
            cur.execute(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    ident, sql.Identifier(f.name), sql.SQL(_pg_type(f.type, f.name))
                )
            )
        self._known[suffix] = set(schema.names)

    def _upsert(self, cur: psycopg.Cursor, suffix: str, table: pa.Table, key: tuple[str, ...]) -> None:
        if table.num_rows == 0:
            return
        self._ensure(cur, suffix, table.schema, key)
        target = self._ident(suffix)
        stage = sql.Identifier(f"stage_{self.table}{suffix}")
        names = table.column_names
        cols = sql.SQL(", ").join(map(sql.Identifier, names))
        cur.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(stage, target)
        )
        buf = io.BytesIO()
        pacsv.write_csv(_csv_ready(table), buf, pacsv.WriteOptions(include_header=False))
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(stage, cols)) as copy:
            copy.write(buf.getbuffer())
        keys = sql.SQL(", ").join(map(sql.Identifier, key))
        order = sql.SQL(", {} DESC").format(sql.Identifier("offset")) if "offset" in names else sql.SQL("")
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names if n not in key
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO {t} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM {s} ORDER BY {keys}{order} "
                "ON CONFLICT ({keys}) DO UPDATE SET {updates}"
            ).format(t=target, cols=cols, keys=keys, s=stage, order=order, updates=updates)
        )

    # -- writing ---------------------------------------------------------------------------------
    def store(self, scored: Scored) -> None:
        """Upsert one batch of results and errors in one transaction."""
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                self._upsert(cur, "", scored.results, RESULT_KEY)
                self._upsert(cur, "_errors", scored.errors, ERROR_KEY)
            conn.commit()
        except psycopg.Error as exc:
            self._known.clear()
            raise self._fail("writing results", exc) from exc

    def begin(self, unit: str) -> UnitWriter:
        return DirectUnit(self.store)

    def _ledger(self, cur: psycopg.Cursor) -> None:
        if "_inputs" in self._known:
            return
        cur.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (unit text PRIMARY KEY, fingerprint text NOT NULL, "
                "rows bigint, rejected bigint, finished_at timestamptz NOT NULL DEFAULT now())"
            ).format(self._ident("_inputs"))
        )
        self._known["_inputs"] = set()

    def done(self, unit: str) -> str | None:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                self._ledger(cur)
                cur.execute(
                    sql.SQL("SELECT fingerprint FROM {} WHERE unit = %s").format(self._ident("_inputs")), (unit,)
                )
                row = cur.fetchone()
            conn.commit()
        except psycopg.Error as exc:
            self._known.clear()
            raise self._fail("reading the ledger", exc) from exc
        return row[0] if row else None

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                self._ledger(cur)
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {} (unit, fingerprint, rows, rejected) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (unit) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                        "rows = EXCLUDED.rows, rejected = EXCLUDED.rejected, finished_at = now()"
                    ).format(self._ident("_inputs")),
                    (unit, fingerprint, rows, rejected),
                )
            conn.commit()
        except psycopg.Error as exc:
            self._known.clear()
            raise self._fail("recording an input as done", exc) from exc


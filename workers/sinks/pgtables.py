"""The PostgreSQL sink's tables in one database session: their names, their columns (read once per session),
the DDL that creates or widens them (under a transaction-scoped advisory lock on the table name, so shards
starting together take turns), and the COPY-into-staging-then-upsert that writes rows.

Forget what is known (``forget``) whenever a transaction rolls back or the connection is replaced: tables and
staging tables created inside it are gone with it.
"""

from __future__ import annotations

import hashlib
import io

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.pq import TransactionStatus

from workers.sinks.pgtypes import USING, csv_column, join, pg_type
from workers.sinks.tables import POSITION, UNIT_COLUMN, missing_keys


class PgTables:
    def __init__(self, schema: str | None, table: str):
        self.schema = schema
        self.table = table
        self.known: dict[str, dict[str, str]] = {}  # suffix -> the table's columns and types, once read
        self.stages: set[str] = set()  # staging tables created in this session
        qualified = f"{schema or ''}.{table}"
        self.lock_key = int.from_bytes(hashlib.sha256(f"scoring-sink:{qualified}".encode()).digest()[:8],
                                       "big", signed=True)

    def forget(self) -> None:
        self.known.clear()
        self.stages.clear()

    def ident(self, suffix: str = "") -> sql.Identifier:
        name = self.table + suffix
        return sql.Identifier(self.schema, name) if self.schema else sql.Identifier(name)

    def lock(self, cur: psycopg.Cursor) -> None:
        """Take the table name's advisory lock until the transaction ends (one shard's DDL at a time)."""
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key,))

    def catalog(self, cur: psycopg.Cursor, suffix: str) -> dict[str, str] | None:
        """The table's columns and their types, or None when it does not exist."""
        cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                    "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                    (self.ident(suffix).as_string(cur),))
        rows = cur.fetchall()
        return dict(rows) if rows else None

    def ensure(self, cur: psycopg.Cursor, suffix: str, schema: pa.Schema, key: tuple[str, ...]) -> dict[str, str]:
        """Create or widen the table so it holds ``schema``; returns its columns' types. Runs its DDL in its own
        committed transaction unless a unit's transaction is open (then inside it)."""
        want = {f.name: pg_type(f.type, f.name) for f in schema}
        have = self.known.get(suffix)
        if have is not None and all(n in have and join(have[n], t, n in key) == have[n] for n, t in want.items()):
            return have
        conn = cur.connection
        own = conn.info.transaction_status == TransactionStatus.IDLE
        # Shards starting together: one at a time past this point (released at commit/rollback).
        self.lock(cur)
        ident = self.ident(suffix)
        have = self.catalog(cur, suffix)
        if have is None:
            if self.schema:
                cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            cols = [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in want.items()]
            for k in key:
                if k not in want:  # a key the rows lack (never expected): text, so the table is still usable
                    cols.append(sql.SQL("{} text").format(sql.Identifier(k)))
            pk = sql.SQL(", PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, key)))
            cur.execute(sql.SQL("CREATE TABLE {} ({}{})").format(ident, sql.SQL(", ").join(cols), pk))
        else:
            for n, t in want.items():
                if n not in have:
                    cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(ident, sql.Identifier(n),
                                                                                  sql.SQL(t)))
                elif join(have[n], t, n in key) != have[n]:
                    wider = join(have[n], t, n in key)
                    cur.execute(sql.SQL("ALTER TABLE {t} ALTER COLUMN {c} TYPE {w} USING " + USING[wider]).format(
                        t=ident, c=sql.Identifier(n), w=sql.SQL(wider)))
        if UNIT_COLUMN in want:
            # Rewriting a unit deletes its rows by this column: it must not scan the whole table.
            index = "ix_" + hashlib.sha256(f"{self.schema}.{self.table}{suffix}".encode()).hexdigest()[:20]
            cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(index), ident, sql.Identifier(UNIT_COLUMN)))
        have = self.catalog(cur, suffix) or {}
        if own:
            conn.commit()
        self.known[suffix] = have
        return have

    def stage(self, cur: psycopg.Cursor, suffix: str, types: dict[str, str]) -> sql.Identifier:
        """A session-local staging table with exactly these columns and types, empty. Named by a hash (short:
        long table names cannot collide after truncation), so each column set has its own."""
        signature = f"{self.schema}.{self.table}{suffix}|" + "|".join(f"{n}:{t}" for n, t in types.items())
        name = "_stage_" + hashlib.sha256(signature.encode()).hexdigest()[:20]
        stage = sql.Identifier(name)
        if name not in self.stages:
            cols = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in types.items())
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(stage, cols))
            self.stages.add(name)
        cur.execute(sql.SQL("TRUNCATE {}").format(stage))
        return stage

    def render(self, table: pa.Table, types: dict[str, str], key: tuple[str, ...]) -> tuple[bytes, dict[int, str]]:
        """The table as CSV for COPY, and the rows known not to fit before the server sees them."""
        bad = missing_keys(table, key)
        cols = []
        for name in table.column_names:
            col, rows = csv_column(name, table.column(name), types[name])
            cols.append(col)
            for i, reason in rows.items():
                bad.setdefault(i, reason)
        buf = io.BytesIO()
        pacsv.write_csv(pa.table(cols, names=table.column_names), buf, pacsv.WriteOptions(include_header=False))
        return buf.getvalue(), bad

    def upsert(self, cur: psycopg.Cursor, suffix: str, table: pa.Table, csv: bytes, key: tuple[str, ...]) -> None:
        names = table.column_names
        types = {n: self.known[suffix][n] for n in names}
        stage = self.stage(cur, suffix, types)
        cols = sql.SQL(", ").join(map(sql.Identifier, names))
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(stage, cols)) as copy:
            copy.write(csv)
        keys = sql.SQL(", ").join(map(sql.Identifier, key))
        updates = [sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names if n not in key]
        action = sql.SQL("DO UPDATE SET ") + sql.SQL(", ").join(updates) if updates else sql.SQL("DO NOTHING")
        if updates and not suffix and all(c in names for c in POSITION):
            # Stream rows: never over a newer offset of the same topic-partition (a zombie worker's write that
            # lands after the partition's new owner stored a later record). Across partitions there is no
            # order: the later write wins. A missing position (NULL) compares as unknown: the write wins.
            topic, partition, offset = map(sql.Identifier, POSITION)
            action += sql.SQL(" WHERE NOT coalesce(t.{0} = EXCLUDED.{0} AND t.{1} = EXCLUDED.{1} "
                              "AND t.{2} > EXCLUDED.{2}, false)").format(topic, partition, offset)
        cur.execute(sql.SQL("INSERT INTO {t} AS t ({cols}) SELECT {cols} FROM {s} ON CONFLICT ({keys}) {action}"
                            ).format(t=self.ident(suffix), cols=cols, s=stage, keys=keys, action=action))

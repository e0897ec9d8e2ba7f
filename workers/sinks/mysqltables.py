"""The MariaDB sink's tables: what this session knows of them, their DDL (under a named lock, before any unit's
transaction: MariaDB commits implicitly on DDL), the session's staging tables, rows rendered as SQL literals in
Arrow, and the staging upsert with the stale-write guard. ``MysqlSink`` (``mysql.py``) owns the connection and
the ``Sink`` contract; this is what it runs on that connection (as ``pgtables.py`` is for PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pymysql.cursors

from workers.errors import ConfigError, SinkError
from workers.sinks.mysqltypes import join, key_type, literals, my_type, sub_micro_keys, values
from workers.sinks.tables import POSITION, UNIT_COLUMN, missing_keys

if TYPE_CHECKING:
    from workers.sinks.mysql import MysqlSink

MAX_IDENT = 64  # MariaDB identifiers hold at most 64 characters
STATEMENT_BYTES = 4 << 20  # most SQL text per staging INSERT (the server's max_allowed_packet is 16 MiB by default)
CHARSET = "utf8mb4"
COLLATION = "utf8mb4_nopad_bin"


def q(name: str) -> str:
    """An identifier quoted for MariaDB."""
    return "`" + name.replace("`", "``") + "`"


def _alias(have: dict[str, str] | None, want: dict[str, str]) -> dict[str, str] | None:
    """The catalog's columns, also under the spelling ``want`` uses when it differs only in case (MariaDB column
    names ignore case: a table made by hand with ``ID`` holds our ``id``, and must not be given a second one)."""
    if have is None:
        return None
    lower = {n.lower(): n for n in have}
    return have | {n: have[lower[n.lower()]] for n in want if n not in have and n.lower() in lower}


class NeedsDdl(Exception):  # noqa: N818 - internal signal between the sink and its tables
    """A write inside an open unit transaction needs DDL, which would commit the transaction."""


class MysqlTables:
    """The tables of one ``MysqlSink`` (results ``NAME``, ``NAME_errors``, ``NAME_inputs``) on its connection."""

    def __init__(self, sink: MysqlSink):
        self.sink = sink
        self.known: dict[str, dict[str, str]] = {}  # suffix -> the table's columns and types, once read
        self.stages: set[str] = set()  # temporary staging tables of this session

    def forget(self) -> None:
        """A new connection: nothing is known, its temporary tables are gone."""
        self.known.clear()
        self.stages.clear()

    @contextmanager
    def ddl_lock(self, cur: pymysql.cursors.Cursor) -> Iterator[None]:
        """One shard's DDL on these tables at a time (a session lock: DDL commits, so no transaction lock)."""
        name = "scoring-sink:" + hashlib.sha256(f"{self.sink.connect_args['database']}.{self.sink.table}".encode()
                                                ).hexdigest()[:40]
        cur.execute("SELECT GET_LOCK(%s, %s)", (name, max(1, int(self.sink.timeouts[0]))))
        got = cur.fetchone()
        if not got or got[0] != 1:
            raise SinkError(f"creating the tables of {self.sink.name}: another writer held the DDL lock for "
                            f"{self.sink.timeouts[0]:.0f} s")
        try:
            yield
        finally:
            cur.execute("SELECT RELEASE_LOCK(%s)", (name,))
            cur.fetchall()

    def catalog(self, cur: pymysql.cursors.Cursor, suffix: str) -> dict[str, str] | None:
        """The table's columns and their types, or None when it does not exist."""
        cur.execute("SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = "
                    "DATABASE() AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION", (self.sink.table + suffix,))
        rows = cur.fetchall()
        return {str(n): str(t).lower() for n, t in rows} if rows else None

    def want(self, schema: pa.Schema, key: tuple[str, ...]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for n in schema.names:  # MariaDB column names ignore case
            if n.lower() in seen:
                raise ConfigError(self.sink.setting, f"columns {seen[n.lower()]!r} and {n!r} differ only in case, "
                                                f"and MariaDB treats them as one column ({self.sink.name}): rename one")
            if len(n) > MAX_IDENT:
                raise ConfigError(self.sink.setting, f"column {n[:20]!r}... is longer than MariaDB's {MAX_IDENT} "
                                                "characters: rename it")
            seen[n.lower()] = n
        return {f.name: "text" if f.name == UNIT_COLUMN else my_type(f.type, f.name, f.name in key) for f in schema}

    def ensure(self, cur: pymysql.cursors.Cursor, suffix: str, schema: pa.Schema,
               key: tuple[str, ...]) -> dict[str, str]:
        """Create or widen the table so it holds ``schema``; returns its columns' types. Raises ``NeedsDdl``
        instead when the connection holds uncommitted writes (DDL would commit them)."""
        want = self.want(schema, key)
        have = self.known.get(suffix)
        if have is not None and all(n in have and join(have[n], t, n in key, n) == have[n] for n, t in want.items()):
            return have
        if self.sink._open:
            raise NeedsDdl
        with self.ddl_lock(cur):
            ident = q(self.sink.table + suffix)
            have = _alias(self.catalog(cur, suffix), want)
            if have is None:
                cols = [f"{q(n)} {t}" for n, t in want.items()]
                cols += [f"{q(k)} {key_type(k)}" for k in key if k not in want]
                pk = f", PRIMARY KEY ({', '.join(map(q, key))})" if key else ""
                cur.execute(f"CREATE TABLE IF NOT EXISTS {ident} ({', '.join(cols)}{pk}) ENGINE=InnoDB "
                            f"DEFAULT CHARSET={CHARSET} COLLATE={COLLATION}")
            else:
                changes = []
                for n, t in want.items():
                    if n not in have:
                        changes.append(f"ADD COLUMN {q(n)} {t}")
                    elif join(have[n], t, n in key, n) != have[n]:
                        changes.append(f"MODIFY COLUMN {q(n)} {join(have[n], t, n in key, n)}"
                                       + (" NOT NULL" if n in key else ""))
                if changes:
                    cur.execute(f"ALTER TABLE {ident} {', '.join(changes)}")
            if UNIT_COLUMN in want:
                # Rewriting a unit deletes its rows by this column: it must not scan the whole table.
                cur.execute(f"CREATE INDEX IF NOT EXISTS {q('ix_' + UNIT_COLUMN)} ON {ident} "
                            f"({q(UNIT_COLUMN)}(255))")
            have = _alias(self.catalog(cur, suffix), want) or {}
            self.sink._connection().commit()
        self.known[suffix] = have
        return have

    def stage(self, cur: pymysql.cursors.Cursor, types: dict[str, str]) -> str:
        """A session-local staging table with exactly these columns and types, emptied (DELETE: TRUNCATE would
        commit). Temporary tables outlive a rollback, so each column set is created once per session."""
        signature = "|".join(f"{n}:{t}" for n, t in types.items())
        name = "_stage_" + hashlib.sha256(signature.encode()).hexdigest()[:24]
        if name not in self.stages:
            cols = ", ".join(f"{q(n)} {t}" for n, t in types.items())
            cur.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {q(name)} ({cols}) ENGINE=InnoDB "
                        f"DEFAULT CHARSET={CHARSET} COLLATE={COLLATION}")
            self.stages.add(name)
        cur.execute(f"DELETE FROM {q(name)}")
        return name

    def render(self, table: pa.Table, types: dict[str, str], key: tuple[str, ...]) -> tuple[list[str],
                                                                                           dict[int, str]]:
        """Each row as the SQL text of its VALUES tuple, ``(v1,v2,...)``, and the rows known not to fit before
        the server sees them. Built column by column in Arrow (``mysqltypes.literals``)."""
        bad = missing_keys(table, key)
        columns = []
        for name in table.column_names:
            if name in key:
                for i, reason in sub_micro_keys(name, table.column(name)).items():
                    bad.setdefault(i, reason)
            vals, refused = values(name, table.column(name), types[name])
            columns.append(literals(vals))
            for i, reason in refused.items():
                bad.setdefault(i, reason)
        if not columns:
            return [], bad
        sep = pa.scalar(",", pa.large_string())
        joined = pc.binary_join_element_wise(*[pc.cast(c, pa.large_string()) for c in columns], sep)
        rows = pc.binary_join_element_wise(pa.scalar("(", pa.large_string()), joined,
                                           pa.scalar(")", pa.large_string()), pa.scalar("", pa.large_string()))
        # A row the server cannot receive in one packet would drop the connection at every retry: reject it.
        longest = self.sink.packet - 4096  # room for the INSERT's head
        sizes = pc.binary_length(rows)
        if pc.any(pc.greater(sizes, longest)).as_py():
            for i, n in enumerate(sizes.to_pylist()):
                if n > longest:
                    bad.setdefault(i, f"the row is {n} bytes of SQL, more than the server's max_allowed_packet "
                                      f"({self.sink.packet}) lets one statement carry")
        return rows.to_pylist(), bad

    def upsert(self, cur: pymysql.cursors.Cursor, suffix: str, names: list[str], rows: list[str],
               key: tuple[str, ...]) -> None:
        """Rows into the staging table (multi-row INSERTs of at most ``STATEMENT_BYTES`` or half the server's
        ``max_allowed_packet``), then one
        INSERT ... SELECT ... ON DUPLICATE KEY UPDATE."""
        types = {n: self.known[suffix][n] for n in names}
        stage = self.stage(cur, types)
        cols = ", ".join(map(q, names))
        head = f"INSERT INTO {q(stage)} ({cols}) VALUES "
        start, size = 0, 0
        for i, row in enumerate(rows):
            size += len(row) + 1
            if size >= min(STATEMENT_BYTES, self.sink.packet // 2) or i == len(rows) - 1:
                cur.execute(head + ",".join(rows[start:i + 1]))
                start, size = i + 1, 0
        target = q(self.sink.table + suffix)
        plain = [n for n in names if n not in key and n not in POSITION]
        positions = [n for n in ("offset", "partition", "topic") if n in names]  # offset first: see the docstring
        if not suffix and all(c in names for c in POSITION):
            topic, partition, offset = (f"{target}.{q(c)}" for c in POSITION)
            stale = (f"COALESCE({topic} = VALUES({q('topic')}) AND {partition} = VALUES({q('partition')}) "
                     f"AND {offset} > VALUES({q('offset')}), 0)")
            updates = [f"{target}.{q(n)} = IF({stale}, {target}.{q(n)}, VALUES({q(n)}))" for n in plain + positions]
        else:
            updates = [f"{target}.{q(n)} = VALUES({q(n)})" for n in plain + positions]
        if not updates:  # only key columns: nothing to update
            updates = [f"{target}.{q(key[0])} = {target}.{q(key[0])}"]
        cur.execute(f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {q(stage)} "
                    f"ON DUPLICATE KEY UPDATE {', '.join(updates)}")

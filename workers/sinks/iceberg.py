"""Apache Iceberg sink (pyiceberg): ``iceberg://CATALOG/namespace.table``.

- Catalog: pyiceberg's ``SqlCatalog`` named CATALOG (its rows in the catalog database carry that name, so several
  catalogs can share one database), at ``SCORING_ICEBERG__CATALOG_URI`` (a SQLAlchemy URL: PostgreSQL through
  psycopg 3, ``postgresql://`` is read as ``postgresql+psycopg://``; or SQLite). New tables go to
  ``SCORING_ICEBERG__WAREHOUSE/namespace/table`` (``file:///abs/path`` or ``s3://bucket/prefix``, S3 with the
  ``SCORING_S3__*`` settings). The catalog URI's password is redacted wherever the sink is named, and scrubbed
  from driver errors.
- Three tables, as the other table sinks keep three: results ``namespace.table``, rejected rows
  ``namespace.table_errors``, the batch ledger ``namespace.table_inputs``. The results' identifier fields are
  ``(id, model_version)`` (required columns), when the id's type can be one (not a float, double or nested type).
- Upsert, one commit per table and write: a pyiceberg transaction that overwrites (copy-on-write) every stored
  row whose key is among the new rows (``model_version = v AND id IN (...)``, per version; plus the ids' min/max,
  so files of other ids are pruned by their statistics) and appends the new rows. A batch unit (one input file or
  row-group range) is buffered and committed whole, and its filter also takes the unit's earlier rows
  (``input_file = unit``): a rewritten unit replaces its rows atomically, a crash leaves the old rows or the new
  ones, never a mix. Each snapshot names its unit in its summary (``scoring.unit``). pyiceberg's own
  ``Table.upsert`` is not used: with two join columns it builds one OR branch per row and reads every matched
  row to compare, much slower on our write sizes.
- The ledger is an upsert into ``_inputs`` after the results commit (the ``Ledger`` order): a crash between the
  two leaves results without an entry, the rerun replaces the same keys: nothing lost, nothing doubled.
- Shards writing one table at once: Iceberg commits are optimistic (the catalog row's metadata pointer is
  compare-and-swapped; a stale one raises ``CommitFailedException``): each write is redone from a freshly
  loaded table with jittered backoff, up to ``lake.ATTEMPTS`` times, then ``SinkError``. Creating a table (or the
  catalog's own tables) at once is retried the same way.
- Stream: one micro-batch is one commit (redelivery replaces the same keys); a row older than the stored one of
  its topic-partition does not overwrite it (the zombie guard of the other table sinks: the stored positions of
  the batch's keys are read first, in the same optimistic commit).
- Ids Iceberg cannot filter on (lists, maps, structs) cannot be keys: those rows are refused with the reason.

Value mapping (Iceberg v2 has boolean, int, long, float, double, decimal(<=38), string, binary, date, time and
timestamp in microseconds, lists, maps, structs): int8/int16/uint8/uint16 -> int; uint32 -> long; uint64 ->
decimal(20, 0); timestamps -> microseconds (a zone -> UTC); time -> microseconds; date64 -> date; duration -> its
count (long, in the column's unit); uuid -> text; JSON text -> the text; intervals, unions and nested values
holding any of these -> JSON text (``tables.json_texts``). A decimal of more than 38 digits cannot be held: that
input fails alone (batch) or its records are dead-lettered with the reason (stream).
"""

from __future__ import annotations

import logging
import re
import warnings
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyiceberg  # noqa: F401 - imported first: when it is missing, the sink factory says so in one line

from workers.errors import ConfigError, SinkError
from workers.settings import IcebergSettings, S3Settings, scrub
from workers.sinks.base import redact
from workers.sinks.deltatypes import ICEBERG, conform
from workers.sinks.lake import LakeSink, retry_commits
from workers.sinks.tables import POSITION, RESULT_KEY, UNIT_COLUMN, is_listlike
from workers.sources.units import RANGE_MARK, split_range

log = logging.getLogger("workers.sinks.iceberg")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CATALOG_SETTING = "SCORING_ICEBERG__CATALOG_URI"
WAREHOUSE_SETTING = "SCORING_ICEBERG__WAREHOUSE"


def iceberg_location(uri: str, setting: str) -> tuple[str, str, str]:
    """(catalog, namespace, table) of ``iceberg://CATALOG/namespace.table`` (a namespace may be dotted:
    ``a.b.t``); ConfigError naming ``setting`` otherwise."""
    p = urlparse(uri)
    parts = p.path.strip("/").split(".")
    if p.scheme.lower() == "iceberg" and _NAME.fullmatch(p.netloc or "") and "/" not in p.path.strip("/") \
            and len(parts) >= 2 and all(_NAME.fullmatch(x) for x in parts) and not p.query:
        return p.netloc, ".".join(parts[:-1]), parts[-1]
    raise ConfigError(setting, f"{redact(uri)!r} is not an Iceberg table: use iceberg://CATALOG/namespace.table "
                               "(letters, digits and _)")


def warehouse_location(iceberg: IcebergSettings) -> str:
    """The warehouse as pyiceberg opens it (``/abs/path`` or ``s3://bucket/prefix``); ConfigError naming the
    setting when it is missing or neither."""
    raw = iceberg.warehouse
    if not raw:
        raise ConfigError(WAREHOUSE_SETTING, "needed by iceberg:// outputs: file:///abs/path or s3://bucket/prefix")
    p = urlparse(raw if "://" in raw else "file://" + raw)
    if p.scheme.lower() == "file" and p.netloc in ("", "localhost") and p.path.startswith("/") and \
            p.path.strip("/"):
        return p.path.rstrip("/")
    if p.scheme.lower() == "s3" and p.netloc:
        return f"s3://{p.netloc}/{p.path.strip('/')}".rstrip("/")
    raise ConfigError(WAREHOUSE_SETTING, f"{redact(raw)!r} is not a warehouse location: use file:///abs/path or "
                                         "s3://bucket/prefix")


def catalog_url(iceberg: IcebergSettings) -> str:
    """The SQLAlchemy URL of the catalog: ``postgresql://`` driven by psycopg 3 (the driver installed here)."""
    raw = iceberg.catalog_uri
    if not raw:
        raise ConfigError(CATALOG_SETTING, "needed by iceberg:// outputs: postgresql://user@host:5432/db or "
                                           "sqlite:////abs/path/catalog.db")
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres", "postgresql+psycopg", "sqlite"):
        raise ConfigError(CATALOG_SETTING, f"{redact(raw)!r}: use postgresql://user@host:5432/db or "
                                           "sqlite:////abs/path/catalog.db")
    if scheme.lower() in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    return raw


def catalog_properties(iceberg: IcebergSettings, s3: S3Settings) -> dict[str, str]:
    """pyiceberg's properties of the SqlCatalog: its URL, the warehouse, the S3 settings (PyArrow's FileIO)."""
    props = {"uri": catalog_url(iceberg), "warehouse": warehouse_location(iceberg),
             "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO", "s3.region": s3.region}
    if s3.endpoint_url:
        props["s3.endpoint"] = s3.endpoint_url
    if s3.access_key_id:
        props["s3.access-key-id"] = s3.access_key_id
        props["s3.secret-access-key"] = s3.secret_access_key.get_secret_value() if s3.secret_access_key else ""
    return props


def _keyable(t: pa.DataType) -> bool:
    return not (is_listlike(t) or pa.types.is_map(t) or pa.types.is_struct(t))


def _identifier(t: pa.DataType) -> bool:
    """Can a column of this (mapped) type be an Iceberg identifier field? Primitive and not floating point."""
    return _keyable(t) and not pa.types.is_floating(t) and not pa.types.is_null(t)


def _keys_filter(data: pa.Table, key: tuple[str, ...]):  # -> BooleanExpression
    """Rows whose key is among ``data``'s: per value of the key's second column (model_version, few), the first
    column IN the values (with their min and max, which prune data files by their statistics)."""
    from pyiceberg.expressions import And, EqualTo, IsNull, Or

    if len(key) == 1:
        return _in(key[0], data.column(key[0]))
    first, second = key
    parts = []
    for v in pc.unique(data.column(second)).to_pylist():
        same = pc.is_null(data.column(second)) if v is None else pc.equal(data.column(second), v)
        parts.append(And(IsNull(second) if v is None else EqualTo(second, v),
                         _in(first, data.filter(same).column(first))))
    return parts[0] if len(parts) == 1 else Or(*parts)


def _in(name: str, col: pa.ChunkedArray):  # -> BooleanExpression
    from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, In, LessThanOrEqual

    values = pc.unique(col)
    if len(values) == 1:
        return EqualTo(name, values[0].as_py())
    expr = In(name, set(values.to_pylist()))
    try:
        lo, hi = pc.min_max(values).values()
        if lo.is_valid and hi.is_valid and not pa.types.is_boolean(col.type):
            return And(expr, GreaterThanOrEqual(name, lo.as_py()), LessThanOrEqual(name, hi.as_py()))
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    return expr


def _replaced(table, unit: str):  # -> BooleanExpression
    """The stored rows a write of ``unit`` replaces (those it does not rewrite are deleted): the unit's own, and
    those of the same input under another cut: its whole-file unit and, for a range, the ranges of another
    row-group count (the file was replaced). Without the other cuts, rows dropped from a replaced input stayed
    under its old unit names for good. Ranges of the same count are the current cut's (other shards' work).
    Iceberg's expressions have no "ends with", so a range unit reads the stored range names of its input (the
    unit column alone, only for files above the unit size) and names the other counts' ranges."""
    from pyiceberg.expressions import EqualTo, In, Or, StartsWith

    span = split_range(unit)
    location = unit if span is None else span[0]
    ranges = StartsWith(UNIT_COLUMN, location + RANGE_MARK)
    if span is None:
        return Or(EqualTo(UNIT_COLUMN, unit), ranges)
    stored = set(table.scan(row_filter=ranges, selected_fields=(UNIT_COLUMN,)).to_arrow()
                 .column(UNIT_COLUMN).to_pylist())
    other = sorted(u for u in stored if (got := split_range(u)) is not None and got[3] != span[3])
    expr = Or(EqualTo(UNIT_COLUMN, unit), EqualTo(UNIT_COLUMN, location))
    return Or(expr, In(UNIT_COLUMN, other)) if other else expr


def _transient(exc: BaseException) -> bool:
    """A commit that lost a race with another writer, or catalog tables created at once (retry), not a wrong
    table."""
    from pyiceberg.exceptions import (
        CommitFailedException,
        NamespaceAlreadyExistsError,
        TableAlreadyExistsError,
        ValidationException,
    )

    # ValidationException: pyiceberg's serializable-isolation check found files another writer added since our
    # snapshot that match our overwrite filter: a conflict like a stale pointer, redone from a fresh table.
    if isinstance(exc, CommitFailedException | ValidationException | TableAlreadyExistsError
                  | NamespaceAlreadyExistsError):
        return True
    text = str(exc).lower()
    return any(w in text for w in ("duplicate key", "already exists", "database is locked", "could not serialize",
                                   "deadlock"))


class IcebergSink(LakeSink):
    """See the module docstring (what it shares with the Delta sink: ``workers/sinks/lake.py``)."""

    lake = ICEBERG

    def __init__(self, uri: str, s3: S3Settings, iceberg: IcebergSettings, setting: str):
        self.setting = setting
        self.catalog_name, self.namespace, table = iceberg_location(uri, setting)
        self.props = catalog_properties(iceberg, s3)
        self.secret_uri = iceberg.catalog_uri or ""
        self.warehouse = self.props["warehouse"]
        self.location = f"{self.namespace}.{table}"  # the results' identifier; _errors and _inputs beside it
        self.name = f"iceberg://{self.catalog_name}/{self.location}"
        self._catalog = None
        self.read_only = False  # compare, report and check: never create the catalog's tables
        super().__init__()

    # -- the catalog -----------------------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException) -> SinkError:
        text = scrub(f"{type(exc).__name__}: {str(exc)[:300]}", self.secret_uri)
        return SinkError(f"{what} {self.name}: {text}")

    def catalog(self):  # -> SqlCatalog
        """The SqlCatalog, opened once (creating its own tables on first use, retried when shards race; a reader
        creates nothing)."""
        if self._catalog is None:
            from pyiceberg.catalog.sql import SqlCatalog

            init = "false" if self.read_only else "true"
            self._catalog = self._retry(lambda: SqlCatalog(self.catalog_name, **self.props, init_catalog_tables=init),
                                        "opening the catalog of")
        return self._catalog

    def _retry(self, step, what: str):
        def quiet():
            with warnings.catch_warnings():  # "Delete operation did not match any records" and the like
                warnings.simplefilter("ignore")
                return step()

        return retry_commits(quiet, self.name, what, _transient, lambda exc: scrub(str(exc), self.secret_uri), log)

    def _load(self, ident: str):  # -> Table | None
        from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            return self.catalog().load_table(ident)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None
        except (OperationalError, ProgrammingError) as exc:
            if self.read_only and "iceberg_tables" in str(exc):  # a catalog no one has written to yet
                return None
            raise

    def _create(self, ident: str, schema: pa.Schema, key: tuple[str, ...]) -> None:
        """Create the table (its namespace too); the results' and the ledger's keys are its identifier fields
        when their types allow (the errors' model_version may be null: no identifier there)."""
        catalog = self.catalog()
        catalog.create_namespace_if_not_exists(self.namespace)
        ids = list(key) if ident != self.location + "_errors" and all(
            k in schema.names and _identifier(schema.field(k).type) for k in key) else []
        schema = pa.schema([f.with_nullable(f.name not in ids) for f in schema])
        tx = catalog.create_table_transaction(ident, schema, location=f"{self.warehouse}/{ident.replace('.', '/')}")
        if ids:
            with tx.update_schema() as update:
                update.set_identifier_fields(*ids)
        tx.commit_transaction()

    # -- one commit, retried on conflicts --------------------------------------------------------------
    def merge(self, path: str, data: pa.Table, key: tuple[str, ...], unit: str | None = None,
              guard: bool = False, extra=None) -> None:
        """One commit into table ``path``: stored rows with ``data``'s keys (with ``unit``: also the unit's
        rows; with ``extra``: also those matching it) replaced by ``data``; with ``guard``, rows older than the
        stored one of their topic-partition dropped first. Creates the table on first use."""
        props = {"scoring.unit": unit or "stream"}

        def step() -> bool:
            from pyiceberg.expressions import AlwaysFalse, Or

            table = self._load(path)
            if table is None:
                if not data.num_rows:  # nothing to insert, and no earlier rows to delete
                    return True
                self._create(path, data.schema, key)
                return False
            target = table.schema().as_arrow()
            rows = conform(data, target, self.name if path == self.location else f"iceberg table {path}")
            if guard and rows.num_rows and all(c in rows.column_names and c in target.names for c in POSITION):
                rows = _drop_stale(table, rows, key)
            # The table's required (identifier) columns stay required; every other column may be null.
            rows = rows.cast(pa.schema([pa.field(f.name, f.type, f.name not in target.names
                                                 or target.field(f.name).nullable) for f in rows.schema]))
            filt = _keys_filter(rows, key) if rows.num_rows else AlwaysFalse()
            if unit is not None and UNIT_COLUMN in target.names:
                filt = Or(filt, _replaced(table, unit))
            if extra is not None:
                filt = Or(filt, extra)
            if isinstance(filt, AlwaysFalse) and not rows.num_rows:
                return True
            tx = table.transaction()
            new = [f for f in rows.schema if f.name not in target.names]
            if new:
                with tx.update_schema() as update:
                    update.union_by_name(pa.schema(new))
            if rows.num_rows:
                tx.overwrite(rows, overwrite_filter=filt, snapshot_properties=props)
            else:
                tx.delete(filt, snapshot_properties=props)
            tx.commit_transaction()
            return True

        while not self._retry(step, "writing to"):
            pass  # the table was just created (or by another shard): write into it

    def _delete_resolved(self, resolved: list[tuple[str, str]]) -> None:
        from pyiceberg.expressions import And, EqualTo, Or

        parts = [And(EqualTo("source", s), EqualTo("model_version", v)) for s, v in resolved]
        if self._load(self.location + "_errors") is not None:
            self.merge(self.location + "_errors", pa.table({}), ("source", "model_version"),
                       extra=parts[0] if len(parts) == 1 else Or(*parts))

    def _exists(self, path: str) -> bool:
        try:
            return self._load(path) is not None
        except Exception as exc:  # noqa: BLE001
            raise self._fail("cannot reach the catalog of", exc) from None

    def _entries(self, path: str) -> list[dict]:
        try:
            table = self._load(path)
            return table.scan(selected_fields=("unit", "fingerprint")).to_arrow().to_pylist() if table else []
        except Exception as exc:  # noqa: BLE001
            raise self._fail("reading the ledger of", exc) from None

    def rows_bad(self, results: pa.Table) -> dict[int, str]:
        for k in RESULT_KEY:
            if k in results.column_names and not _keyable(results.schema.field(k).type):
                reason = f"{k} is {results.schema.field(k).type}: Iceberg cannot key rows by a nested value"
                return dict.fromkeys(range(results.num_rows), reason)
        return {}

    def check(self) -> None:
        """Can the catalog be reached and the warehouse written? Looks only: creates nothing (the catalog's own
        tables are not created by a check either)."""
        import os

        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(self.props["uri"])
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT 1"))
            engine.dispose()
        except Exception as exc:  # noqa: BLE001 - any driver error: the catalog cannot be used
            raise self._fail("cannot reach the catalog of", exc) from None
        if self.warehouse.startswith("s3://"):
            import pyarrow.fs as pafs

            from workers.storage import s3_filesystem

            s3 = _s3_of(self.props)
            bucket = self.warehouse[len("s3://"):].split("/", 1)[0]
            try:
                s3_filesystem(s3).get_file_info(pafs.FileSelector(bucket, allow_not_found=False))
            except Exception as exc:  # noqa: BLE001
                raise SinkError(f"cannot use the warehouse of {self.name}: {str(exc)[:300]}") from None
            return
        folder = self.warehouse
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise SinkError(f"cannot create the warehouse of {self.name}: {folder} is not a writable folder")

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.engine.dispose()
            self._catalog = None


def _s3_of(props: dict[str, str]) -> S3Settings:
    return S3Settings(endpoint_url=props.get("s3.endpoint"), access_key_id=props.get("s3.access-key-id"),
                      secret_access_key=props.get("s3.secret-access-key"), region=props.get("s3.region", "us-east-1"))


def _drop_stale(table, rows: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """``rows`` without those older than the stored row of their key in the same topic-partition."""
    stored = table.scan(row_filter=_keys_filter(rows, key), selected_fields=(*key, *POSITION)).to_arrow()
    if not stored.num_rows:
        return rows
    at = {tuple(r[k] for k in key): (r["topic"], r["partition"], r["offset"]) for r in stored.to_pylist()}
    keep = []
    for i, r in enumerate(rows.select([*key, *POSITION]).to_pylist()):
        s = at.get(tuple(r[k] for k in key))
        stale = s is not None and None not in s and (s[0], s[1]) == (r["topic"], r["partition"]) and \
            r["offset"] is not None and s[2] > r["offset"]
        if not stale:
            keep.append(i)
    return rows.take(pa.array(keep, pa.int64()))


def read_iceberg(uri: str, s3: S3Settings, iceberg: IcebergSettings, setting: str, columns: list[str]) -> pa.Table:
    """The columns of ``columns`` an Iceberg results table has (``compare`` and ``report`` read it); ConfigError
    naming ``setting`` when there is no table there. Reads only: never creates or changes the table."""
    sink = IcebergSink(uri, s3, iceberg, setting)
    sink.read_only = True
    try:
        table = sink._retry(lambda: sink._load(sink.location), "cannot read")
        if table is None:
            raise ConfigError(setting, f"no Iceberg table {sink.location} in catalog {sink.catalog_name}")
        present = table.schema().as_arrow().names
        return table.scan(selected_fields=tuple(c for c in columns if c in present)).to_arrow()
    finally:
        sink.close()

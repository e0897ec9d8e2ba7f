"""Delta Lake sink (delta-rs): ``delta+file:///path/to/table`` or ``delta+s3://bucket/path/to/table``.

Three Delta tables, as the other table sinks keep three tables: results at the path, rejected rows at
``<path>_errors``, the batch ledger at ``<path>_inputs``. Rows are merged on ``(id, model_version)``: when matched
update, else insert, so a rewritten unit or a redelivered stream batch stores each key once.

- A batch unit (one input file or a row-group range) is buffered and written by ``commit`` as *one* MERGE into
  the results, which also deletes the unit's earlier rows the new ones do not replace (``when not matched by
  source and input_file = unit``; also the same input's rows under another cut, ``_replaced``): one Delta
  commit, so a crash leaves the old rows or the new ones, never a mix. Each commit names its unit in the commit
  metadata (``scoring.unit``, read back with ``history()``).
  The unit's results are held in memory until then (results only: ids, scores and passthrough columns).
- The ledger is a MERGE into ``<path>_inputs`` after the results commit (the ``Ledger`` order): a crash between
  the two leaves results without an entry, the rerun merges the same keys again: nothing lost, nothing doubled.
- Shards writing one table at once: Delta's optimistic commits conflict (``CommitFailedError`` and the like);
  each write is retried from a fresh snapshot with jittered backoff, up to ``lake.ATTEMPTS`` times, then
  ``SinkError``. On S3 the commit uses conditional put (``If-None-Match``) so two writers never both win one
  version: S3 needs no lock table.
- Stream: one micro-batch is one MERGE (redelivery merges the same keys); a row older than the stored one of its
  topic-partition does not overwrite it (the zombie guard of the other table sinks).

Value mapping (Delta has signed integers, float, double, decimal(<=38), string, binary, boolean, date,
timestamp in microseconds, arrays, maps, structs): uint8/16/32 -> the next wider signed integer; uint64 ->
decimal(20, 0); timestamps -> microseconds (a zone -> UTC; an id with nanoseconds is a row Delta cannot
hold: two would become one key); date64 -> date; time -> ISO text; duration -> its count (int64, in the
column's unit); uuid -> text; JSON text (``arrow.json``) -> the text; intervals, unions
and nested values holding any of these -> JSON text (``tables.json_texts``). A decimal of more than 38 digits
cannot be held: that input fails alone (batch) or its records are dead-lettered with the reason (stream).
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

import deltalake  # noqa: F401 - imported first: when it is missing, the sink factory says so in one line
import pyarrow as pa

from workers.errors import ConfigError, SinkError
from workers.settings import S3Settings
from workers.sinks.base import redact
from workers.sinks.deltatypes import conform
from workers.sinks.lake import LakeSink, retry_commits
from workers.sinks.tables import POSITION, UNIT_COLUMN
from workers.sources.units import RANGE_MARK, split_range

log = logging.getLogger("workers.sinks.delta")


def delta_location(uri: str, setting: str) -> str:
    """The table URI delta-rs opens (``/abs/path`` or ``s3://bucket/path``) of a ``delta+file`` or ``delta+s3``
    URI; ConfigError naming ``setting`` otherwise."""
    scheme, _, rest = uri.partition("://")
    kind = scheme.lower().removeprefix("delta+")
    p = urlparse("x://" + rest)
    if kind == "file" and p.netloc in ("", "localhost") and p.path not in ("", "/"):
        return p.path.rstrip("/")
    if kind == "s3" and p.netloc and p.path.strip("/"):
        return f"s3://{p.netloc}/{p.path.strip('/')}"
    raise ConfigError(setting, f"{redact(uri)!r} is not a Delta table location: use delta+file:///abs/path or "
                               "delta+s3://bucket/path")


def storage_options(location: str, s3: S3Settings) -> dict[str, str]:
    """delta-rs' object-store options of the S3 settings (the Parquet sink's), empty for a local table."""
    if not location.startswith("s3://"):
        return {}
    opts = {"AWS_REGION": s3.region, "conditional_put": "etag"}
    if s3.endpoint_url:
        opts["AWS_ENDPOINT_URL"] = s3.endpoint_url
        if s3.endpoint_url.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if s3.access_key_id:
        opts["AWS_ACCESS_KEY_ID"] = s3.access_key_id
        opts["AWS_SECRET_ACCESS_KEY"] = s3.secret_access_key.get_secret_value() if s3.secret_access_key else ""
    return opts


def arrow_filesystem(location: str, s3: S3Settings):  # -> pyarrow.fs.FileSystem
    """A pyarrow filesystem rooted at the table, for ``DeltaTable.to_pyarrow_table(filesystem=...)``. Without
    one, delta-rs reads through a ``PyFileSystem`` whose handler is Python: pyarrow's I/O threads then call
    into Python, and the process aborted at exit ("terminate called without an active exception", exit 134)
    after a run that read a table, in about one run of five (measured on reruns whose ledger was read)."""
    import pyarrow.fs as pafs

    if location.startswith("s3://"):
        from workers.storage import s3_filesystem

        return pafs.SubTreeFileSystem(location[len("s3://"):], s3_filesystem(s3))
    return pafs.SubTreeFileSystem(location, pafs.LocalFileSystem())


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _replaced(unit: str, alias: str) -> str:
    """The stored rows a write of ``unit`` replaces (those it does not rewrite are deleted): the unit's own, and
    those of the same input under another cut: its whole-file unit and, for a range, the ranges of another
    row-group count (the file was replaced). Without the other cuts, rows dropped from a replaced input stayed
    under its old unit names for good. Ranges of the same count are the current cut's (other shards' work)."""
    col = alias + _q(UNIT_COLUMN)
    span = split_range(unit)
    location = unit if span is None else span[0]
    ranges = f"starts_with({col}, {_lit(location + RANGE_MARK)})"
    if span is None:
        return f"({col} = {_lit(unit)} OR {ranges})"
    return (f"({col} = {_lit(unit)} OR {col} = {_lit(location)} OR ({ranges} AND NOT "
            f"ends_with({col}, {_lit(f'-of-{span[3]}')})))")


def _transient(exc: BaseException) -> bool:
    """A commit that lost a race with another writer (retry from a fresh snapshot), not a wrong table."""
    from deltalake.exceptions import CommitFailedError

    text = str(exc).lower()
    return isinstance(exc, CommitFailedError) or any(w in text for w in (
        "conflict", "concurrent", "already exists"))


# -- the sink -----------------------------------------------------------------------------------------------
class DeltaSink(LakeSink):
    """See the module docstring (what it shares with the Iceberg sink: ``workers/sinks/lake.py``)."""

    def __init__(self, uri: str, s3: S3Settings, setting: str):
        self.setting = setting
        self.location = delta_location(uri, setting)
        self.options = storage_options(self.location, s3)
        self.s3 = s3
        self.name = redact(("delta+" + self.location) if self.location.startswith("s3://")
                           else f"delta+file://{self.location}")
        super().__init__()

    # -- one MERGE, retried on conflicts ---------------------------------------------------------------
    def _open(self, path: str):  # -> DeltaTable | None
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(path, storage_options=self.options or None)
        except TableNotFoundError:
            return None

    def merge(self, path: str, data: pa.Table, key: tuple[str, ...], unit: str | None = None,
              guard: bool = False) -> None:
        """Merge ``data`` (one row per key) into the Delta table at ``path`` in one commit: matched keys
        updated (with ``guard``: unless the stored row is newer in its topic-partition), others inserted; with
        ``unit``, the unit's stored rows not in ``data`` deleted. Creates the table on first use."""
        from deltalake import CommitProperties, DeltaTable

        props = CommitProperties(custom_metadata={"scoring.unit": unit or "stream"})

        def step() -> None:
            nonlocal data
            table = self._open(path)
            if table is None:
                if not data.num_rows:  # nothing to insert, and no earlier rows to delete
                    return
                self._refuse_foreign(path)
                DeltaTable.create(path, data.schema, mode="ignore", storage_options=self.options or None)
                table = self._open(path)
                if table is None:
                    raise SinkError(f"writing to {self.name}: the table at {path} vanished right after creation")
            target = pa.schema(table.schema().to_arrow())
            has_unit = UNIT_COLUMN in target.names
            data = conform(data, target, self.name if path == self.location else path)
            if not data.num_rows:  # an emptied unit: only its earlier rows go
                if unit is not None and has_unit:
                    table.delete(_replaced(unit, ""), commit_properties=props)
                return
            on = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in key)
            merger = table.merge(data, on, source_alias="s", target_alias="t", merge_schema=True,
                                 commit_properties=props)
            newer = None
            if guard and all(c in data.column_names for c in POSITION):
                topic, part, off = map(_q, POSITION)
                newer = (f"NOT coalesce(t.{topic} = s.{topic} AND t.{part} = s.{part} "
                         f"AND t.{off} > s.{off}, false)")
            merger = merger.when_matched_update_all(predicate=newer).when_not_matched_insert_all()
            if unit is not None and has_unit:
                merger = merger.when_not_matched_by_source_delete(_replaced(unit, "t."))
            merger.execute()

        retry_commits(step, self.name, "writing to", _transient, str, log)

    def _foreign(self, path: str) -> str | None:
        """Why ``path`` (where no Delta table is) must not become one: it is a file, or a folder holding files
        other than a Delta log (another dataset: a table created there would sit among files it does not
        know, and a user who named the wrong folder would never be told). None when it is absent or empty (a
        bare ``_delta_log`` is another shard's table being created)."""
        import os

        import pyarrow.fs as pafs

        if path.startswith("s3://"):
            from workers.storage import s3_filesystem

            fs: pafs.FileSystem = s3_filesystem(self.s3)
            inner = path[len("s3://"):]
        else:
            if os.path.exists(path) and not os.path.isdir(path):
                return f"{path} is a file, not a Delta table folder"
            fs, inner = pafs.LocalFileSystem(), path
        entries = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        others = sorted(e.base_name for e in entries if e.base_name != "_delta_log")
        if others:
            return (f"{path} exists and is not a Delta table (no _delta_log) but holds {len(others)} other "
                    f"entr{'y' if len(others) == 1 else 'ies'} (e.g. {others[0]!r}); name a new or empty "
                    "folder, or an existing Delta table")
        return None

    def _refuse_foreign(self, path: str) -> None:
        reason = self._foreign(path)
        if reason is not None:
            raise SinkError(f"cannot use {self.name}: {reason}")

    def _delete_resolved(self, resolved: list[tuple[str, str]]) -> None:
        """Error rows of records these results settle (``Scored.resolved``)."""
        table = self._open(self.location + "_errors")
        if table is None or not resolved:
            return
        pred = " OR ".join(f"(source = {_lit(s)} AND model_version = {_lit(v)})" for s, v in resolved)
        try:
            table.delete(pred)
        except Exception as exc:  # noqa: BLE001
            raise SinkError(f"writing to {self.name}_errors: {str(exc)[:300]}") from None

    def _exists(self, path: str) -> bool:
        try:
            return self._open(path) is not None
        except Exception as exc:  # noqa: BLE001
            raise SinkError(f"reading {self.name}: {str(exc)[:300]}") from None

    def _entries(self, path: str) -> list[dict]:
        try:
            table = self._open(path)
            return table.to_pyarrow_table(columns=["unit", "fingerprint"], filesystem=arrow_filesystem(
                path, self.s3)).to_pylist() if table else []
        except Exception as exc:  # noqa: BLE001
            raise SinkError(f"reading the ledger of {self.name}: {str(exc)[:300]}") from None

    def check(self) -> None:
        """Can the table be used? An existing one is opened; a missing one (created on the first write) needs a
        writable nearest existing folder (local) or a bucket that exists and can be listed (S3). Looks only."""
        import os

        import pyarrow.fs as pafs

        try:
            for path in (self.location, self.location + "_errors", self.location + "_inputs"):
                # A file, or a folder of other files, named as the table: a wrong setting, said before any work.
                reason = self._foreign(path) if os.path.isfile(path) or self._open(path) is None else None
                if reason is not None:
                    raise ConfigError(self.setting, f"{self.name}: {reason}")
            if self._open(self.location) is not None:
                return
            if self.location.startswith("s3://"):
                from workers.storage import s3_filesystem

                bucket = self.location[len("s3://"):].split("/", 1)[0]
                s3_filesystem(self.s3).get_file_info(pafs.FileSelector(bucket, allow_not_found=False))
                return
        except (SinkError, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - delta-rs' and Arrow's object-store errors alike
            raise SinkError(f"cannot use {self.name}: {str(exc)[:300]}") from None
        folder = os.path.dirname(self.location)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise SinkError(f"cannot create {self.name}: {folder} is not a writable folder")


def read_delta(uri: str, s3: S3Settings, setting: str, columns: list[str]) -> pa.Table:
    """The columns of ``columns`` a Delta results table has (``compare`` and ``report`` read it); ConfigError
    naming ``setting`` when there is no table there. Reads only: never creates or changes the table."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    location = delta_location(uri, setting)
    shown = redact(uri)
    try:
        table = DeltaTable(location, storage_options=storage_options(location, s3) or None)
        present = table.schema().to_arrow().names
        return table.to_pyarrow_table(columns=[c for c in columns if c in present],
                                      filesystem=arrow_filesystem(location, s3))
    except TableNotFoundError:
        raise ConfigError(setting, f"no Delta table at {shown}") from None
    except Exception as exc:  # noqa: BLE001 - delta-rs' object-store errors are plain exceptions
        raise SinkError(f"cannot read {shown}: {str(exc)[:300]}") from None

"""Parquet dataset sink: one results file per unit, written under a temporary name then moved in place.

Layout under the root (local directory or s3:// prefix):
    <name>.parquet           results of one input file (batch) or one partition slice (stream)
    _errors/<name>.parquet   rejected rows of that unit (only when there are any)
    _state/<hash>.json       the ledger: per output name, the unit (input location) and its fingerprint
In batch mode a unit is the input's canonical location (``/data/lake/day=1/part-0.parquet`` or
``s3://lake/day=1/part-0.parquet``) and its name that location without the scheme or leading '/'
(``storage.output_name``), so runs from different input roots never replace each other's files.
Readers of the dataset (pyarrow, Spark, DuckDB) skip names starting with '_' and '.'.
On S3 an object appears only when its upload completes, so the final key is written directly.
A unit rewritten replaces everything of its earlier write: an emptied input's results file has no rows, and an
errors file not written this time (no rejected rows any more) is removed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.errors import InputError, RowsRejected, SinkError
from workers.scoring.scorer import Scored
from workers.settings import S3Settings
from workers.sinks.base import Ledger, Sink, UnitWriter
from workers.sources.units import RANGE_MARK, split_range
from workers.storage import is_s3, output_name, redact, resolve


def result_name(unit: str) -> str:
    """The file of a unit's results, relative to the root (its errors: ``_errors/`` + the same). Row groups
    A..B of N of a large input (``sources.units``) go beside the whole file's name:
    ``part-0.row-groups-A-B-of-N.parquet``."""
    span = split_range(unit)
    if span is not None:
        location, first, last, groups = span
        return f"{_stem(location)}.row-groups-{first}-{last}-of-{groups}.parquet"
    name = output_name(unit)
    return name if name.endswith(".parquet") else f"{name}.parquet"


def _stem(location: str) -> str:
    whole = result_name(location)
    return whole[: -len(".parquet")]


def _parts_pattern(location: str) -> re.Pattern:
    """Names (in the whole file's folder) of the row-group ranges of ``location``: (first, last, groups)."""
    stem = _stem(location).rsplit("/", 1)[-1]
    return re.compile(re.escape(stem) + r"\.row-groups-([0-9]+)-([0-9]+)-of-([0-9]+)\.parquet")


def is_result_of(rel: str, location: str) -> bool:
    """Whether ``rel`` (relative to an output root) is the results file of ``location`` or of a row-group
    range of it."""
    whole = result_name(location)
    if rel == whole:
        return True
    folder, _, base = rel.rpartition("/")
    return folder == whole.rpartition("/")[0] and _parts_pattern(location).fullmatch(base) is not None


def ledger_file(name: str) -> str:
    """The ledger entry (under ``_state/``) of the result file ``name``."""
    return f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# A temporary file of another host (another pod on a shared volume) or of an older version (no owner in its
# name) is left alone until it is this old: its writer may still be running.
STALE_AFTER_S = 6 * 3600
_TMP_SUFFIX = re.compile(r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-)?[0-9a-f]{12}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; or not a pid at all
        return pid > 0
    return True


# Result columns whose values are (nearly) all distinct: a dictionary of them only costs. Parquet writers try a
# dictionary for every column first and keep it until it passes 1 MiB, so a row group of 50k ids is stored as
# a dictionary of all of them plus an index per row: measured here on 50k-row batches of the results' columns,
# twice the CPU time of writing them plain (8.4 ms against 4.2 ms per batch, zstd) and a 45% larger file.
UNIQUE_COLUMNS = frozenset({"id", "score", "scores", "explanation_base"})


def _leaf_paths(schema: pa.Schema) -> list[str]:
    """Parquet's column paths (one per leaf, dotted: ``scores.list.element``) of ``schema``, as the writer
    names them: taken from the footer of an empty file written with it, so nested types are named exactly."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buf)
    md = pq.read_metadata(pa.BufferReader(buf.getvalue()))
    return [md.schema.column(i).path for i in range(md.num_columns)]


@functools.lru_cache(maxsize=64)  # one results schema per run, usually: 2 ms each, saved per file
def dictionary_columns(schema: pa.Schema, unique: frozenset[str] = UNIQUE_COLUMNS) -> list[str] | bool:
    """What ``ParquetWriter(use_dictionary=...)`` gets for a results file: every leaf but those of the
    ``unique`` top-level columns (True, the writer's default, when there are none, or when the schema cannot be
    written: the writer itself then raises, with its own message)."""
    plain = [f for f in schema if f.name in unique]
    if not plain:
        return True
    try:
        skip = set(_leaf_paths(pa.schema(plain)))
        return [p for p in _leaf_paths(schema) if p not in skip]
    except pa.ArrowException:
        return True


class _File:
    """A Parquet file written batch by batch and published atomically."""

    def __init__(self, fs: pafs.FileSystem, final: str, atomic_rename: bool, unique: frozenset[str] = frozenset()):
        self.fs, self.final = fs, final
        self.unique = unique  # top-level columns written without a dictionary
        folder, base = final.rsplit("/", 1)
        self.tmp = final
        if atomic_rename:
            # Named after the unit and its writer (host, pid), so rewriting the unit clears what a killed
            # writer left behind, and never the file of a writer still running (a concurrent run).
            self.tmp = f"{folder}/.tmp-{base}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._remove_stale(folder, f".tmp-{base}-")
        self.writer: pq.ParquetWriter | None = None

    def _remove_stale(self, folder: str, prefix: str) -> None:
        """Delete the unit's temporary files whose writer is gone: a process of this host that no longer
        runs, or (another host, an older version's name) one not modified for ``STALE_AFTER_S``."""
        try:
            entries = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError:
            return
        now_ns = time.time_ns()
        for entry in entries:
            if not entry.base_name.startswith(prefix):
                continue
            owner = _TMP_SUFFIX.fullmatch(entry.base_name[len(prefix):])
            if owner is None:
                continue
            if owner["host"] == _HOST:
                stale = not _pid_alive(int(owner["pid"]))
            else:
                stale = entry.mtime_ns is not None and now_ns - entry.mtime_ns > STALE_AFTER_S * 1_000_000_000
            if stale:
                try:
                    self.fs.delete_file(entry.path)
                except OSError:
                    pass

    def write(self, table) -> None:
        if self.writer is None:
            if self.tmp != self.final:  # local disk; S3 has no directories to create
                self.fs.create_dir(self.tmp.rsplit("/", 1)[0], recursive=True)
            self.writer = pq.ParquetWriter(self.tmp, table.schema, filesystem=self.fs, compression="zstd",
                                           use_dictionary=dictionary_columns(table.schema, self.unique))
        self.writer.write_table(table)

    def commit(self) -> bool:
        if self.writer is None:
            return False
        self.writer.close()
        if self.tmp != self.final:
            self.fs.move(self.tmp, self.final)
        return True

    def abort(self) -> None:
        if self.writer is not None:
            try:
                # On S3 there is no temporary name and closing completes the upload: the partial object is
                # then deleted, so a failed write never stands as if it were the unit's results.
                self.writer.close()
                self.fs.delete_file(self.tmp)
            except OSError:
                pass

    def remove(self) -> None:
        """Delete the published file (a rewrite that wrote nothing here must not leave the old one)."""
        try:
            self.fs.delete_file(self.final)
        except (FileNotFoundError, OSError):
            pass


# Parquet has no type for Arrow's month_day_nano_interval (its INTERVAL holds milliseconds): such values are
# written as this struct, which keeps every part exactly.
INTERVAL_STRUCT = pa.struct([("months", pa.int32()), ("days", pa.int32()), ("nanoseconds", pa.int64())])


def _storable_type(t: pa.DataType) -> pa.DataType:
    if t == pa.month_day_nano_interval():
        return INTERVAL_STRUCT
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = t.value_field.with_type(_storable_type(t.value_type))
        if pa.types.is_fixed_size_list(t):
            return pa.list_(inner, t.list_size)
        return pa.large_list(inner) if pa.types.is_large_list(t) else pa.list_(inner)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_storable_type(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_storable_type(t.key_type)),
                       t.item_field.with_type(_storable_type(t.item_type)), t.keys_sorted)
    return t


def _storable_value(v, t: pa.DataType):
    if v is None:
        return None
    if t == pa.month_day_nano_interval():
        return {"months": v.months, "days": v.days, "nanoseconds": v.nanoseconds}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [_storable_value(x, t.value_type) for x in v]
    if pa.types.is_struct(t):
        return {f.name: _storable_value(v.get(f.name), f.type) for f in t}
    if pa.types.is_map(t):
        return [(_storable_value(k, t.key_type), _storable_value(x, t.item_type)) for k, x in v]
    return v


def storable(table: pa.Table) -> pa.Table:
    """``table`` with the columns Parquet cannot hold in a type it can (``INTERVAL_STRUCT``)."""
    for i, f in enumerate(table.schema):
        target = _storable_type(f.type)
        if target != f.type:
            values = [_storable_value(v, f.type) for v in table.column(i).to_pylist()]
            table = table.set_column(i, f.with_type(target), pa.array(values, target))
    return table


def _unwritable(table: pa.Table, exc: Exception) -> str:
    return f"the Parquet output cannot hold these values ({type(exc).__name__}: {str(exc)[:200]})"


class _ParquetUnit(UnitWriter):
    def __init__(self, sink: ParquetSink, unit: str):
        self.sink, self.unit = sink, unit
        name = result_name(unit)
        self.results = _File(sink.fs, f"{sink.root}/{name}", sink.atomic_rename, UNIQUE_COLUMNS)
        self.errors = _File(sink.fs, f"{sink.root}/_errors/{name}", sink.atomic_rename)

    def write(self, scored: Scored) -> None:
        try:
            # A unit's results file exists even without rows (an emptied input: the results' columns, no rows),
            # so each input has its output and readers see it was scored. Errors only when there are any.
            if scored.results.num_rows or self.results.writer is None:
                results = storable(scored.results)
                try:
                    self.results.write(results)
                except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    # A type or value the file cannot take: the rows' fault (RowsRejected's contract:
                    # nothing of this call is stored), never a run stopped by a traceback.
                    reason = _unwritable(results, exc)
                    raise RowsRejected({i: reason for i in range(max(results.num_rows, 1))}) from None
            if scored.errors.num_rows:
                errors = storable(scored.errors)
                try:
                    self.errors.write(errors)
                except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise InputError(f"rejected rows: {_unwritable(errors, exc)}") from None
        except OSError as exc:
            raise SinkError(f"writing {self.results.final}: {exc}") from exc

    def commit(self) -> None:
        try:
            # A rewrite must not leave an older file behind: no rejected rows now means no errors file (and
            # a unit that wrote nothing at all, no results file).
            for part in (self.results, self.errors):
                if not part.commit():
                    part.remove()
            self.sink.retire_others(self.unit)
        except OSError as exc:
            raise SinkError(f"publishing {self.results.final}: {exc}") from exc

    def abort(self) -> None:
        self.results.abort()
        self.errors.abort()


class ParquetSink(Sink, Ledger):
    # A unit's files are its own (no connection, no shared state but pyarrow's thread-safe filesystem).
    concurrent_writes = True

    def __init__(self, uri: str, s3: S3Settings):
        self.fs, self.root = resolve(uri, s3)
        self.root = self.root.rstrip("/")
        self.atomic_rename = not is_s3(uri)
        self.name = redact(uri)

    def begin(self, unit: str) -> UnitWriter:
        return _ParquetUnit(self, unit)

    def write_batch(self, scored: Scored) -> None:
        for unit, part in _stream_units(scored):
            self.write_unit(unit, part)

    def ledger(self) -> Ledger:
        """This sink keeps the ledger itself, one JSON file per output name under ``_state/``."""
        return self

    def _state_path(self, unit: str) -> str:
        # Keyed by the output name, not the unit: the entry says which unit owns that name.
        return f"{self.root}/_state/{ledger_file(result_name(unit))}"

    def done(self, unit: str) -> str | None:
        """The unit's recorded fingerprint. InputError when its output name holds another unit's results
        (only ``/b/k`` and ``s3://b/k`` share a name): that input fails alone rather than replace them."""
        try:
            with self.fs.open_input_stream(self._state_path(unit)) as f:
                entry = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None
        owner = entry.get("unit")
        if owner != unit:
            if owner and entry.get("output") == result_name(unit):
                raise InputError(f"{self.name}/{result_name(unit)} already holds the results of {owner}; "
                                 f"score {unit} into another output")
            return None
        return entry.get("fingerprint")

    def mark_done(self, unit: str, fingerprint: str, rows: int, rejected: int) -> None:
        entry = {"unit": unit, "output": result_name(unit), "fingerprint": fingerprint, "rows": rows,
                 "rejected": rejected, "at": time.time()}
        self._write_entry(unit, entry)
        # Another run cut otherwise removes overlapping results (a range's, or the whole file's), then their
        # entries; had it done so between this unit's publish and the entry just written, the entry would say
        # done for rows that are gone (a rerun skipped them). Looked at after the write, what the unit published
        # (results, rejected rows) is there, or the entry goes and the unit fails.
        published = [name for name, n in ((result_name(unit), rows), (f"_errors/{result_name(unit)}", rejected))
                     if n]
        try:
            gone = [name for name in published
                    if self.fs.get_file_info(f"{self.root}/{name}").type == pafs.FileType.NotFound]
        except OSError:
            gone = []  # not known: the end-of-run check still looks at the entry
        if gone:
            if split_range(unit) is None:  # the other cut marked the file split: kept, so its ranges go later
                self._write_entry(unit, {"unit": unit, "output": result_name(unit), "split": True})
            else:
                try:
                    self.fs.delete_file(self._state_path(unit))
                except (FileNotFoundError, OSError):
                    pass
            raise InputError(f"its results ({gone[0]}) were removed meanwhile, by another run into this output "
                             "cut with another SCORING_BATCH__UNIT_BYTES (or by hand); rerun (and give every run "
                             "into one output the same unit_bytes)")

    def _write_entry(self, unit: str, entry: dict) -> None:
        out = _File(self.fs, self._state_path(unit), self.atomic_rename)
        path = out.tmp
        try:
            if self.atomic_rename:
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(json.dumps(entry).encode())
            if path != out.final:
                self.fs.move(path, out.final)
        except OSError as exc:
            raise SinkError(f"recording {unit} as done: {exc}") from exc

    def retire_others(self, unit: str) -> None:
        """After ``unit`` is published: delete results of the same input under another cut, so a replaced
        input (or another ``SCORING_BATCH__UNIT_BYTES``) never leaves rows twice in the dataset.

        A row-group range removes the whole file's results and every range of the same input that overlaps it
        or belongs to a file with another row-group count; ranges of the current cut never overlap, so
        concurrent shards writing the other ranges are left alone. It also marks the whole file's ledger
        entry as split, which is how a later whole-file write of that input knows that ranges exist to be
        removed (listing the folder for every small file would cost a listing per input)."""
        span = split_range(unit)
        if span is None:
            try:
                with self.fs.open_input_stream(self._state_path(unit)) as f:
                    split = json.loads(f.read()).get("split", False)
            except (FileNotFoundError, OSError, ValueError):
                split = False
            if split:
                self._remove_results(unit, lambda first, last, groups: True)
            return
        location, first, last, groups = span
        split = {"unit": location, "output": result_name(location), "split": True}
        self._write_entry(location, split)

        def stale(a: int, b: int, n: int) -> bool:
            return n != groups or ((a, b) != (first, last) and a <= last and first <= b)

        self._remove_results(location, stale, whole=True)
        # Again after the removal: a whole-file run that recorded the file done meanwhile (after the first
        # write) lost its results just now; the mark replaces its entry, so a rerun scores the file again.
        self._write_entry(location, split)

    def _remove_results(self, location: str, stale, whole: bool = False) -> None:
        pattern = _parts_pattern(location)
        whole_name = result_name(location)
        whole_base = whole_name.rsplit("/", 1)[-1]
        for top in ("", "_errors/"):
            folder = f"{self.root}/{top}{whole_name}".rsplit("/", 1)[0]
            try:
                entries = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            except OSError:
                continue
            for entry in entries:
                m = pattern.fullmatch(entry.base_name)
                if m and self._owned_by_other(f"{location}{RANGE_MARK}{m[1]}-{m[2]}-of-{m[3]}"):
                    continue  # another input's results that only look like a range of this one
                if (m and stale(int(m[1]), int(m[2]), int(m[3]))) or (whole and entry.base_name == whole_base):
                    try:
                        self.fs.delete_file(entry.path)
                    except (FileNotFoundError, OSError):
                        pass
                    if m and not top:
                        # Its ledger entry goes with it: a later run cut like that one scores the range again
                        # (kept, it said "done" for rows no longer there: a rerun skipped them for good).
                        try:
                            self.fs.delete_file(self._state_path(f"{location}{RANGE_MARK}{m[1]}-{m[2]}-of-{m[3]}"))
                        except (FileNotFoundError, OSError):
                            pass

    def _owned_by_other(self, unit: str) -> bool:
        """Whether the ledger entry of ``unit``'s output name belongs to another unit (an input named like a
        range of another, ``big.row-groups-0-9-of-20.parquet`` beside ``big.parquet``)."""
        try:
            with self.fs.open_input_stream(self._state_path(unit)) as f:
                owner = json.loads(f.read()).get("unit")
        except (FileNotFoundError, OSError, ValueError):
            return False
        return bool(owner) and owner != unit

    def check(self) -> None:
        try:
            if self.atomic_rename:
                self.fs.create_dir(self.root, recursive=True)
            else:  # S3: the bucket must exist and be listable
                self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True, recursive=False))
        except OSError as exc:
            raise SinkError(f"cannot use {self.name}: {exc}") from exc


def _stream_units(scored: Scored) -> list[tuple[str, Scored]]:
    """Split a stream batch by (topic, partition): unit ``topic/partition=P/<first offset>``.

    A redelivered slice starts at the same committed offset, so it gets the same name and replaces the
    file an uncommitted attempt left behind.
    """
    import pyarrow.compute as pc

    results = scored.results
    if results.num_rows == 0:
        return []
    keys = results.select(["topic", "partition"]).group_by(["topic", "partition"]).aggregate([])
    out = []
    for topic, partition in zip(keys["topic"].to_pylist(), keys["partition"].to_pylist(), strict=True):
        mask = pc.and_(pc.equal(results["topic"], topic), pc.equal(results["partition"], partition))
        part = results.filter(mask)
        first = pc.min(part["offset"]).as_py()
        out.append((f"{topic}/partition={partition}/{first:020d}", Scored(part, scored.errors.slice(0, 0))))
    return out

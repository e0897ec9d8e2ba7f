"""Parquet inputs: find the files, stream their row groups in bounded memory (``units`` cuts and shards them)."""

from __future__ import annotations

import fnmatch
import logging
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.errors import ConfigError, InputError
from workers.settings import S3Settings
from workers.storage import canonical, inside, is_s3, resolve

log = logging.getLogger("workers.batch")

INPUT_SETTING = "SCORING_BATCH__INPUT"
_GLOB_CHARS = "*?["
_PARQUET_ENDINGS = (".parquet", ".parq", ".pq")


@dataclass(frozen=True)
class InputFile:
    path: str  # path inside the filesystem
    rel: str  # path relative to the input root: how messages name the file
    size: int
    mtime_ns: int | None
    # Canonical location (``storage.canonical``): names the output file, the ledger entry, the errors' source
    # and the shard, so two runs from different roots (or spellings) agree on it and different files never
    # share it.
    source: str = ""

    @property
    def fingerprint(self) -> str:
        """Changes when the file is replaced: a finished input with the same fingerprint is skipped."""
        return f"size={self.size};mtime_ns={self.mtime_ns}"


@dataclass(frozen=True)
class Listing:
    fs: pafs.FileSystem
    files: list[InputFile]
    root: str  # canonical input root: the folder, the folder of a single file, or the glob's fixed prefix
    excluded: list[InputFile]  # files the spec names that lie under an excluded root (an output), not inputs


def _visible(rel: str) -> bool:
    # Spark/Hive markers (_SUCCESS), our own state (_state, _errors) and hidden temp files are not data.
    return not any(part.startswith(("_", ".")) for part in rel.split("/"))


def _match(pattern: list[str], parts: list[str]) -> bool:
    """Segment-wise glob: ``*``, ``?`` and ``[...]`` stay within one path segment; ``**`` spans any depth
    (zero or more segments), as in shell globstar and Python's ``glob(recursive=True)``."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


def _canonical_path(fs_path: str, s3_spec: bool) -> str:
    return canonical("s3://" + fs_path) if s3_spec else canonical(fs_path)


def find_inputs(spec: str, s3: S3Settings, exclude: tuple[str, ...] = ()) -> Listing:
    """Every Parquet file named by ``spec`` (a file, a directory, a glob or an s3:// prefix), sorted. A glob
    names files (of any name) and folders: a folder it matches gives every Parquet file below it, as the folder
    given alone would (``lake/day=*``, ``lake/*/``).

    ``exclude``: canonical roots (the run's outputs) whose files are never inputs, even when the spec covers
    them; they are returned in ``excluded`` for the caller to judge.
    """
    fs, path = resolve(spec, s3)
    on_s3 = is_s3(spec)
    glob_at = min((path.find(c) for c in _GLOB_CHARS if c in path), default=-1)
    if glob_at >= 0:
        head, sep, _ = path[:glob_at].rpartition("/")
        rest = path[len(head) + 1:] if sep else path
        base = _canonical_path((head or "/") if sep else ".", on_s3)
        pattern: list[str] | None = [seg for seg in rest.split("/") if seg]
    else:
        base, pattern = _canonical_path(path, on_s3), None
    inner = base[len("s3://"):] if on_s3 else base
    try:
        info = fs.get_file_info(inner)
    except OSError as exc:
        raise ConfigError(INPUT_SETTING, f"cannot list {spec}: {exc}") from None
    if info.type == pafs.FileType.File and pattern is None:
        root = base.rsplit("/", 1)[0] or "/"
        one = _info(info, info.base_name, base)
        hidden = [x for x in exclude if inside(base, x)]
        return Listing(fs, [] if hidden else [one], root, [one] if hidden else [])
    if info.type != pafs.FileType.Directory:
        raise ConfigError(INPUT_SETTING, f"{spec} does not exist")
    found: list[InputFile] = []
    excluded: list[InputFile] = []
    tables: set[str] = set()  # folders (relative) holding a _delta_log: Delta tables
    for entry in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        rel = entry.path[len(inner):].lstrip("/")
        parts = rel.split("/")
        if "_delta_log" in parts:
            tables.add("/".join(parts[:parts.index("_delta_log")]))
        if entry.type != pafs.FileType.File:
            continue
        if not _visible(rel):
            continue
        parquet = entry.path.endswith(_PARQUET_ENDINGS)
        if pattern is not None:
            parts = rel.split("/")
            # A file the glob names, or a Parquet file below a folder it names (as if that folder were given).
            if not (_match(pattern, parts) or (parquet and any(_match(pattern, parts[:k])
                                                               for k in range(1, len(parts))))):
                continue
        elif not parquet:
            continue
        f = _info(entry, rel, _canonical_path(entry.path, on_s3))
        (excluded if any(inside(f.source, x) for x in exclude) else found).append(f)
    _refuse_delta_tables(spec, found, tables)
    return Listing(fs, sorted(found, key=lambda f: f.rel), base, excluded)


def _refuse_delta_tables(spec: str, found: list[InputFile], tables: set[str]) -> None:
    """ConfigError when an input file lies in a Delta table's folder (outputs of this run are excluded before):
    such a folder also holds the Parquet files of removed versions (until VACUUM), so reading its files as
    files scores rows the table no longer has, and rows updated since twice."""
    for t in sorted(tables):
        inside_table = [f for f in found if not t or f.rel.startswith(t + "/")]
        if inside_table:
            where = f"{spec.rstrip('/')}/{t}" if t else spec
            raise ConfigError(INPUT_SETTING, f"{where} is a Delta table (it has a _delta_log): its folder also "
                                             "holds the files of removed versions, so reading them as Parquet "
                                             "files would score rows twice or rows it no longer has; export its "
                                             "current version to Parquet files and score those")


def _info(info: pafs.FileInfo, rel: str, source: str) -> InputFile:
    return InputFile(path=info.path, rel=rel, size=info.size or 0, mtime_ns=info.mtime_ns, source=source)


def list_inputs(spec: str, s3: S3Settings) -> tuple[pafs.FileSystem, list[InputFile]]:
    """(filesystem, files) of ``find_inputs`` without exclusions (profile and report read inputs this way)."""
    listing = find_inputs(spec, s3)
    return listing.fs, listing.files


def open_parquet(fs: pafs.FileSystem, f: InputFile) -> pq.ParquetFile:
    try:
        # pre_buffer=False: pyarrow's default pre-buffering reads far ahead of the row group in hand, and
        # peak memory then grows with the file (measured: 206 MiB vs 82 MiB to read a 1.5M-row file).
        return pq.ParquetFile(fs.open_input_file(f.path), pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read {f.rel} as Parquet: {exc}") from None


def _plain_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every view type replaced by its classic layout (string_view -> string, binary_view ->
    binary, list_view -> list), nested ones too. Arrow has no take/filter kernels for some view types, so a
    file's columns are read into these once, and every later step (routing, rejected rows, sinks) sees only
    layouts it handles."""
    if pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_list_view(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_large_list_view(t) or pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_plain_type(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_plain_type(t.key_type)),
                       t.item_field.with_type(_plain_type(t.item_type)), t.keys_sorted)
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, _plain_type(t.value_type), t.ordered)
    return t


def plain_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with view-typed columns in their classic layout (``_plain_type``); unchanged when it has none.
    Raises InputError when a column cannot be converted."""
    schema = batch.schema
    target = pa.schema([f.with_type(_plain_type(f.type)) for f in schema], metadata=schema.metadata)
    if target.equals(schema):
        return batch
    columns = []
    for field, col in zip(target, batch.columns, strict=True):
        if col.type == field.type:
            columns.append(col)
            continue
        try:
            out = col.cast(field.type)
            out.validate()  # pyarrow 26 casts list_view to an invalid list array
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            try:
                out = pa.array(col.to_pylist(), field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise InputError(f"column '{field.name}' of type {col.type} cannot be read as {field.type}: "
                                 f"{str(exc)[:200]}") from None
        columns.append(out)
    return pa.RecordBatch.from_arrays(columns, schema=target)


def duplicated_columns(schema: pa.Schema, wanted: list[str]) -> list[str]:
    """Names of ``wanted`` that ``schema`` holds more than once (which of them is the id, the feature...?)."""
    return [c for c in wanted if len(schema.get_all_field_indices(c)) > 1]


def iter_batches(pf: pq.ParquetFile, columns: list[str], batch_rows: int,
                 row_groups: list[int] | None = None, started: Started | None = None,
                 on_end: Callable[[], None] | None = None) -> Generator[pa.RecordBatch, None, None]:
    """Row groups one at a time (all, or ``row_groups``): memory holds two batches, whatever the file size.

    The next batch is read and decoded on a helper thread while the caller scores this one (pyarrow
    releases the GIL while it reads and decompresses), so I/O overlaps scoring. The helper starts on the
    batch after next only once the caller took the next one: the batch in hand and the one read ahead
    are all there is (a queue slot as well made a third, and peak memory then depended on whether a file
    had more than two batches).

    ``started``: the reading as ``Prefetch`` began it (its first batch already read); ``on_end`` is called on the
    helper thread once the last batch was taken (the caller scores it meanwhile: ``Prefetch.start`` then reads
    the next unit's first batch, still two batches in memory).
    """
    import queue

    done = object()
    ahead: queue.Queue = queue.Queue(maxsize=1)
    taken = threading.Semaphore(0)
    stop = threading.Event()

    def read() -> None:
        try:
            if started is not None:
                batches: Iterator[pa.RecordBatch] = chain([started.first], started.rest)
            else:
                batches = pf.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=columns,
                                          use_threads=False)
            for batch in batches:
                ahead.put(plain_batch(batch))
                del batch
                while not taken.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
            ahead.put(done)
            if on_end is not None:
                on_end()
        except InputError as exc:
            ahead.put(exc)
        except (pa.ArrowInvalid, OSError) as exc:
            ahead.put(InputError(f"corrupt Parquet data: {exc}"))
        except Exception as exc:  # noqa: BLE001 - e.g. a type this pyarrow cannot decode: that file fails alone
            # (and the caller, waiting for the next item, must get one: a silent end here would hang the run)
            ahead.put(InputError(f"cannot read Parquet data: {type(exc).__name__}: {str(exc)[:200]}"))

    reader = threading.Thread(target=read, name="parquet-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = ahead.get()
            taken.release()
            if item is done:
                return
            if isinstance(item, InputError):
                raise item
            yield item
            del item
    finally:
        stop.set()
        reader.join(timeout=5)


@dataclass
class Started:
    """A unit's reading begun ahead of time: its first batch, and the reader that goes on from there."""

    first: pa.RecordBatch
    rest: Iterator[pa.RecordBatch]


@dataclass
class Opened:
    """A unit's file opened ahead of time (``Prefetch``): its ParquetFile, the columns read, the reading begun
    (None: the unit has no rows)."""

    pf: pq.ParquetFile
    columns: list[str]
    started: Started | None


class Prefetch:
    """Opens the next unit (footer, first batch) on a thread of its own while the current unit's last batch is
    scored, so a run over many files or ranges does not wait for each one's first read (7% of a compiled batch
    run over 3 files of 2 row groups, measured in #19). ``columns_of``: the columns to read given the file's
    schema. Anything that goes wrong ahead of time is dropped: the unit is then opened as usual, where its
    error is reported. ``start`` runs on a reader thread, ``take`` on the scoring thread, possibly at the same
    time (a unit that failed after its last read goes on to the next one while its reader still starts the
    prefetch): one lock hands over (unit, thread, result) whole, each opening with a result slot of its own."""

    def __init__(self, fs: pafs.FileSystem, columns_of: Callable[[pa.Schema], list[str]], batch_rows: int):
        self.fs, self.columns_of, self.batch_rows = fs, columns_of, batch_rows
        self.lock = threading.Lock()
        self.pending: tuple[Any, threading.Thread, dict[str, Opened]] | None = None

    def start(self, unit: Any) -> None:
        """Begin opening ``unit`` (a ``sources.units.Unit``) on a thread."""
        slot: dict[str, Opened] = {}
        thread = threading.Thread(target=self._open, args=(unit, slot), name="parquet-prefetch", daemon=True)
        thread.start()
        with self.lock:
            earlier, self.pending = self.pending, (unit, thread, slot)
        if earlier is not None:  # never taken (its unit was not scored): let it finish, drop it
            earlier[1].join()

    def _open(self, unit: Any, slot: dict[str, Opened]) -> None:
        try:
            pf = open_parquet(self.fs, unit.file)
            columns = self.columns_of(pf.schema_arrow)
            rest = pf.iter_batches(batch_size=self.batch_rows, row_groups=unit.row_groups, columns=columns,
                                   use_threads=False)
            first = next(rest, None)
            slot["opened"] = Opened(pf, columns, None if first is None else Started(first, rest))
        except Exception:  # noqa: BLE001 - reported where the unit is opened as usual
            log.debug("prefetch dropped", exc_info=True, extra={"input": unit.rel})

    def take(self, unit: Any) -> Opened | None:
        """What was opened ahead for ``unit`` (waiting for it), or None: open it as usual."""
        with self.lock:
            pending, self.pending = self.pending, None
        if pending is None:
            return None
        wanted, thread, slot = pending
        thread.join()
        return slot.get("opened") if wanted is unit else None

    def close(self) -> None:
        """Drop anything opened ahead (the run stopped)."""
        with self.lock:
            pending, self.pending = self.pending, None
        if pending is not None:
            pending[1].join()

"""Batch units of work: whole files, or ranges of a large file's row groups, planned the same on every pod.

A Kubernetes Indexed Job gives each pod an index and nothing else, so every pod lists the inputs, reads the
footers of the files that are large enough to split, and computes the same plan with no coordination:

- A file of at most ``unit_bytes`` (or with one row group, or whose footer cannot be read: it then fails alone
  when scored, as before) is one unit, named by its canonical location, exactly as before units existed.
- A larger file is cut at row-group boundaries into consecutive ranges of about ``unit_bytes`` of compressed
  column data each; a range's unit is ``<location>#row-groups=A-B-of-N`` (inclusive, 0-based, of the N row
  groups the file has). The cut is a function
  of the file's footer and ``unit_bytes`` alone, never of the other files or the shard count, so a rerun (of
  the same pod, of its replacement, or with more pods) names the same units and the ledger resumes mid-file.
- Units are assigned to shards by bytes, largest first, each to the least-loaded shard (ties: the lower
  index; equal sizes: sorted by name), which bounds every shard's load by the mean plus one unit.

The plan is deterministic for a given listing. Pods that list at different moments while files arrive can
disagree; a unit that no pod took is found unfinished by the next run, and one that two pods took is written
twice to the same idempotent place (same output name, upsert on ``(id, model_version)``).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.sources.parquet import InputFile

#: Between the input location and the row-group range in a unit's name.
RANGE_MARK = "#row-groups="


@dataclass(frozen=True)
class Unit:
    """One unit of batch work: a file, or row groups ``first..last`` (inclusive) of it."""

    file: InputFile
    size: int  # bytes: the file's, or its row groups' compressed column data
    first: int | None = None  # None: the whole file
    last: int | None = None
    first_row: int = 0  # index in the file of the unit's first row (error sources name rows by it)
    groups: int = 0  # row groups the file has (in a range unit's name: a replaced file's old ranges are told apart)

    @property
    def whole(self) -> bool:
        return self.first is None

    @property
    def name(self) -> str:
        """The ledger entry, output name and table sinks' unit column of this unit."""
        if self.whole:
            return self.file.source
        return f"{self.file.source}{RANGE_MARK}{self.first}-{self.last}-of-{self.groups}"

    @property
    def rel(self) -> str:
        """How messages name the unit."""
        return self.file.rel if self.whole else f"{self.file.rel} (row groups {self.first}-{self.last})"

    @property
    def row_groups(self) -> list[int] | None:
        if self.first is None or self.last is None:
            return None
        return list(range(self.first, self.last + 1))


_SPAN = re.compile(r"([0-9]+)-([0-9]+)-of-([0-9]+)")


def split_range(unit: str) -> tuple[str, int, int, int] | None:
    """(location, first, last, groups) of a row-group unit's name; None for a whole-file unit."""
    location, mark, span = unit.rpartition(RANGE_MARK)
    m = _SPAN.fullmatch(span) if mark else None
    if m is None:
        return None
    return location, int(m[1]), int(m[2]), int(m[3])


def _row_group_sizes(fs: pafs.FileSystem, f: InputFile) -> list[tuple[int, int]] | None:
    """(compressed bytes, rows) per row group from the footer; None when the footer cannot be read."""
    try:
        with fs.open_input_file(f.path) as handle:
            meta = pq.read_metadata(handle)
    except (pa.ArrowException, OSError, ValueError):
        return None
    sizes = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        compressed = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        sizes.append((max(compressed, 1), rg.num_rows))
    return sizes


def file_units(fs: pafs.FileSystem, f: InputFile, unit_bytes: int) -> list[Unit]:
    """The units of one file: itself when small, else consecutive row-group ranges of about ``unit_bytes``."""
    if unit_bytes <= 0 or f.size <= unit_bytes:
        return [Unit(f, f.size)]
    groups = _row_group_sizes(fs, f)
    if not groups or len(groups) == 1:
        return [Unit(f, f.size)]
    units: list[Unit] = []
    start, size, row, first_row = 0, 0, 0, 0
    for i, (nbytes, nrows) in enumerate(groups):
        size += nbytes
        row += nrows
        # Close the range when it reached the target, or when the rest is too small to stand alone.
        if size >= unit_bytes or i == len(groups) - 1:
            units.append(Unit(f, size, start, i, first_row, len(groups)))
            start, size, first_row = i + 1, 0, row
    if len(units) == 1:  # all of it fit one range: the file is the unit (its plain name)
        return [Unit(f, f.size)]
    return units


def plan(fs: pafs.FileSystem, files: list[InputFile], unit_bytes: int, shard_count: int) -> list[list[Unit]]:
    """Every shard's units (in file order), the same on every pod for the same listing."""
    units = [u for f in files for u in file_units(fs, f, unit_bytes)]
    shards: list[list[Unit]] = [[] for _ in range(shard_count)]
    loads = [(0, index) for index in range(shard_count)]  # a heap of (bytes, shard)
    for u in sorted(units, key=lambda u: (-u.size, u.name)):
        load, index = heapq.heappop(loads)
        shards[index].append(u)
        heapq.heappush(loads, (load + u.size, index))
    order = {u.name: k for k, u in enumerate(units)}
    return [sorted(s, key=lambda u: order[u.name]) for s in shards]

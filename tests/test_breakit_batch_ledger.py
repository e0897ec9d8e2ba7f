"""Break-it review of 238a4bc (a range unit's ledger entry checked against its published results): candidate
regression tests, each failing on db9e8dd. The interleavings of two runs are forced by calling the Parquet
sink's steps in the order two processes can take (scratch/whole_vs_range.py and scratch/all_rejected_range.py
reproduce them with two real CLI runs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tests import helpers
from tests.test_batch_units import big_file, unit_bytes_for
from workers.errors import InputError
from workers.scoring.scorer import Scored
from workers.settings import S3Settings
from workers.sinks.parquet import ParquetSink

LOC = "/in/big.parquet"
FP = "size=1;mtime=1;model=m"


def _results(ids: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.string()), "score": pa.array([0.5] * len(ids), pa.float64())})


def _errors(sources: list[str]) -> pa.Table:
    return pa.table({"id": pa.array([None] * len(sources), pa.string()), "reason": ["null id"] * len(sources),
                     "source": sources})


def _publish(sink: ParquetSink, unit: str, results: pa.Table, errors: pa.Table | None = None) -> None:
    w = sink.begin(unit)
    w.write(Scored(results, errors if errors is not None else pa.table({})))
    w.commit()


def _recorded_without_results(sink: ParquetSink, unit: str, fingerprint: str, rows: int, rejected: int) -> bool:
    """mark_done; True when it succeeded and the ledger says done although the unit's results are gone."""
    try:
        sink.mark_done(unit, fingerprint, rows, rejected)
    except InputError:
        return False
    return sink.done(unit) == fingerprint


def test_a_whole_file_recorded_after_another_cut_removed_its_results_is_not_done(tmp_path):
    """Run B (unit_bytes 0: the whole file) publishes and finds no 'split' mark; run A (cut in ranges) publishes
    range 0-5, marking the file split and removing B's whole results; B then records the file done. A killed
    now, a rerun with B's cut skipped the file for good: 14,000 of 20,000 rows missing, every run exit 0.
    The new check covers range units only (``split_range(unit) is not None``)."""
    sink = ParquetSink(str(tmp_path / "out"), S3Settings())
    _publish(sink, LOC, _results([f"r{i}" for i in range(20)]))               # B: publish whole, retire reads no split
    _publish(sink, f"{LOC}#row-groups=0-5-of-20", _results([f"r{i}" for i in range(6)]))  # A: removes B's file
    sink.mark_done(f"{LOC}#row-groups=0-5-of-20", FP, 6, 0)
    assert not os.path.exists(tmp_path / "out" / "in" / "big.parquet")
    assert not _recorded_without_results(sink, LOC, FP, 20, 0), \
        "the whole file is recorded done while its results were removed by the other cut"


def test_a_range_whose_rows_were_all_rejected_is_not_done_when_its_errors_were_removed(tmp_path):
    """Range 0-5 of run A has every row rejected (rows=0, rejected=6): its results file is empty, its rows are in
    _errors/. Run B cut otherwise publishes 0-3, removing A's results and errors; A then records 0-5 done: the
    check is skipped (``if rows and ...``), so a rerun skips the range and its rejected rows are in no output."""
    out = tmp_path / "out"
    sink = ParquetSink(str(out), S3Settings())
    a = f"{LOC}#row-groups=0-5-of-20"
    _publish(sink, a, _results([]), _errors([f"{LOC}#{i}" for i in range(6)]))
    _publish(sink, f"{LOC}#row-groups=0-3-of-20", _results([]), _errors([f"{LOC}#{i}" for i in range(4)]))
    assert not (out / "_errors" / "in" / "big.row-groups-0-5-of-20.parquet").exists()
    assert not _recorded_without_results(sink, a, FP, 0, 6), \
        "range recorded done while its results and rejected rows were removed by the other cut"


def test_an_input_named_like_a_range_of_another_input_is_not_lost_by_one_job(tmp_path):
    """``big.row-groups-0-9-of-20.parquet`` (an ordinary input) beside ``big.parquet`` cut in ranges: one Indexed
    Job with one unit_bytes, 5 pods, the small file's pod finishing first. Publishing big's range 0-5 removes the
    small file's results (and ledger entry) as an overlapping range of big: every pod exits 0 with 500 rows
    missing until some rerun."""
    model = helpers.save(helpers.train("binary", rounds=5), str(tmp_path), "m")
    folder, out = str(tmp_path / "in"), str(tmp_path / "out")
    path = big_file(folder, rows=20_000, row_group=1_000)
    pq.write_table(pa.Table.from_pandas(helpers.frame(500, seed=9, id_prefix="s"), preserve_index=False),
                   os.path.join(folder, "big.row-groups-0-9-of-20.parquet"))
    codes = []
    for index in (4, 0, 1, 2, 3):  # pod 4 holds the small file alone (plan for 5 shards)
        r = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", model, "--input", folder,
                            "--output", out, "--unit-bytes", str(unit_bytes_for(path, 5)), "--shard-count", "5",
                            "--shard-index", str(index)], capture_output=True, text=True, timeout=180)
        codes.append(r.returncode)
        assert "Traceback" not in r.stderr
    rows = ds.dataset(out, format="parquet").count_rows()
    assert rows == 20_500 or any(codes), f"every pod exited 0 ({codes}) with {rows} of 20,500 rows"

"""Batch opens the next unit (footer and first batch) while the last batch of the current one is scored
(``sources.parquet.Prefetch``, #19): each unit is opened once, results are those of opening each in turn, and
whatever fails ahead of time fails that unit alone, with the reason it gives when opened in its turn.

The spy below wraps the real ``open_parquet`` (it counts calls and calls through); every file is real Parquet.
"""

from __future__ import annotations

import collections
import os

import lightgbm as lgb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tests.helpers import FEATURES, frame, write_inputs
from workers.runtime import batch
from workers.runtime.batch import run_batch
from workers.settings import S3Settings, load_settings
from workers.sources import parquet as source


def spy_opens(monkeypatch) -> tuple[collections.Counter, collections.Counter]:
    """(opened ahead, opened in turn): file name -> calls."""
    ahead: collections.Counter = collections.Counter()
    in_turn: collections.Counter = collections.Counter()
    real = source.open_parquet

    def counting(into):
        def open_parquet(fs, f):
            into[os.path.basename(f.path)] += 1
            return real(fs, f)
        return open_parquet

    monkeypatch.setattr(source, "open_parquet", counting(ahead))  # what Prefetch calls
    monkeypatch.setattr(batch, "open_parquet", counting(in_turn))  # what a unit not opened ahead calls
    return ahead, in_turn


def settings(model: str, inputs: str, out: str, **batch) -> object:
    return load_settings({"model": {"path": model},
                          "batch": {"input": inputs, "output": out, "batch_rows": 100, **batch}})


def scores(out: str) -> pd.Series:
    df = ds.dataset(out, format="parquet").to_table().to_pandas()
    assert df["id"].is_unique
    return df.set_index("id")["score"].sort_index()


def expected(model: str, paths: list[str]) -> pd.Series:
    df = pd.concat([pq.read_table(p).to_pandas() for p in paths])
    return pd.Series(lgb.Booster(model_file=model).predict(df[FEATURES]), index=df["id"]).sort_index()


def test_every_unit_is_opened_once_and_scored_as_alone(models, tmp_path, monkeypatch):
    ahead, in_turn = spy_opens(monkeypatch)
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = write_inputs(inputs, files=4, rows=300, row_group=100)
    # an empty file between them: its prefetch reads no batch; it still gets its (empty) output
    empty = os.path.join(inputs, "part-001b.parquet")
    pq.write_table(pa.Table.from_pandas(frame(0), preserve_index=False), empty)
    report = run_batch(settings(models["binary"], inputs, out))
    assert (report.files_scored, report.rows, report.failed) == (5, 1200, [])
    names = sorted(os.path.basename(p) for p in [*paths, empty])
    assert dict(in_turn) == {names[0]: 1} and dict(ahead) == {n: 1 for n in names[1:]}
    pd.testing.assert_series_equal(scores(out), expected(models["binary"], paths), check_names=False,
                                   rtol=0, atol=1e-12)


def test_ranges_of_one_file_are_each_opened_once(models, tmp_path, monkeypatch):
    ahead, in_turn = spy_opens(monkeypatch)
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    [path] = write_inputs(inputs, files=1, rows=2_000, row_group=100)  # 20 row groups
    meta = pq.read_metadata(path)
    group = sum(meta.row_group(0).column(c).total_compressed_size for c in range(meta.num_columns))
    report = run_batch(settings(models["binary"], inputs, out, unit_bytes=group * 4))
    assert report.units_in_shard > 3 and report.failed == [] and report.rows == 2_000
    name = os.path.basename(path)
    assert (in_turn[name], ahead[name]) == (1, report.units_in_shard - 1)
    pd.testing.assert_series_equal(scores(out), expected(models["binary"], [path]), check_names=False,
                                   rtol=0, atol=1e-12)


def test_a_file_that_fails_ahead_of_time_fails_alone_with_its_own_reason(models, tmp_path):
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = write_inputs(inputs, files=3, rows=300, row_group=100)
    bad = os.path.join(inputs, "part-001.parquet")
    with open(bad, "r+b") as f:  # a footer that is not Parquet: opening it (ahead or in turn) fails
        f.seek(-8, os.SEEK_END)
        f.write(b"\0" * 8)
    twice = os.path.join(inputs, "part-002.parquet")  # a column given twice: refused when opened in turn
    df = frame(300, seed=102)
    pq.write_table(pa.Table.from_arrays([*pa.Table.from_pandas(df, preserve_index=False).columns,
                                         pa.array(df[FEATURES[0]])],
                                        names=[*df.columns, FEATURES[0]]), twice)
    report = run_batch(settings(models["binary"], inputs, out))
    assert (report.files_scored, report.rows) == (1, 300)
    reasons = dict(report.failed)
    assert set(reasons) == {"part-001.parquet", "part-002.parquet"}
    assert "cannot read part-001.parquet as Parquet" in reasons["part-001.parquet"]
    assert f"more than one column named '{FEATURES[0]}'" in reasons["part-002.parquet"]
    pd.testing.assert_series_equal(scores(out), expected(models["binary"], paths[:1]), check_names=False,
                                   rtol=0, atol=1e-12)


def test_a_resumed_run_opens_only_what_it_scores(models, tmp_path, monkeypatch):
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    paths = write_inputs(inputs, files=4, rows=200, row_group=100)
    first = run_batch(settings(models["binary"], inputs, out))
    assert first.files_scored == 4
    os.utime(paths[2], ns=(1, 1))  # rewritten (another fingerprint): the only file a rerun scores
    ahead, in_turn = spy_opens(monkeypatch)
    again = run_batch(settings(models["binary"], inputs, out))
    assert (again.files_skipped, again.files_scored, again.failed) == (3, 1, [])
    assert dict(in_turn) == {os.path.basename(paths[2]): 1} and not ahead  # finished units are not read ahead
    pd.testing.assert_series_equal(scores(out), expected(models["binary"], paths), check_names=False,
                                   rtol=0, atol=1e-12)


def test_take_while_a_reader_thread_is_still_starting_the_prefetch_never_fails(tmp_path):
    """A unit failing after its last read lets the scoring thread reach the next unit's ``take`` while that
    unit's reader is still in ``start``: once seen in CI as "cannot join thread before it is started" (the
    thread was published before it was started). Hammered here from two threads."""
    import threading

    import pyarrow.fs as pafs

    from workers.sources.units import plan

    inputs = str(tmp_path / "in")
    write_inputs(inputs, files=1, rows=50, row_group=10)
    listing = source.find_inputs(inputs, S3Settings())
    [unit] = plan(listing.fs, listing.files, 1 << 30, 1)[0]
    prefetch = source.Prefetch(pafs.LocalFileSystem(), lambda schema: schema.names, 10)
    for _ in range(300):
        starter = threading.Thread(target=prefetch.start, args=(unit,))
        starter.start()
        got = prefetch.take(unit)  # either before the start (None) or after it (the opened unit)
        assert got is None or got.started is not None
        starter.join()
    prefetch.close()

"""Batch mode writes a batch's results on a thread while it scores the next (``runtime.write_behind``), and the
Parquet sink writes the all-distinct result columns without a dictionary. Neither may lose or double a row:

- a write failing in a later batch of a file fails that file alone (rows refused) or stops the run (the store
  failed), with nothing of the file published or recorded, and a rerun is exact;
- the threaded path stores exactly what the inline one (the path before) stores, whatever the batch sizes,
  rejected rows and refused rows (property-based, differential);
- the files hold the same values; only the encoding of ``id``/``score`` changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import FEATURES, write_inputs
from workers import sinks
from workers.errors import RowsRejected
from workers.runtime.batch import run_batch
from workers.settings import load_settings
from workers.sinks.parquet import ParquetSink, _ParquetUnit, dictionary_columns


def read_results(out: str) -> pd.DataFrame:
    return ds.dataset(out, format="parquet").to_table().to_pandas()


def temporary_files(out: str) -> list[str]:
    return [n for _, _, names in os.walk(out) for n in names if n.startswith(".tmp-")]


def picky_sink(monkeypatch, refused: set[str]) -> None:
    """``picky://FOLDER``: the real Parquet sink with one rule added: it cannot hold the ids in ``refused``
    (RowsRejected, as a store refusing a value raises it). The Parquet format itself refuses no value once
    its schema is written, so this rule stands in for a store that does."""

    class PickyUnit(_ParquetUnit):
        def write(self, scored):
            ids = scored.results["id"].to_pylist()
            bad = {i: f"column 'id': the store cannot hold {v!r}" for i, v in enumerate(ids) if v in refused}
            if bad:
                raise RowsRejected(bad)
            super().write(scored)

    class PickySink(ParquetSink):
        def begin(self, unit):
            return PickyUnit(self, unit)

    monkeypatch.setitem(sinks.SINKS, "picky", lambda uri, s3, setting, **_: PickySink(uri[len("picky://"):], s3))


def test_rows_refused_in_a_later_batch_fail_that_file_alone_and_a_rerun_is_exact(models, tmp_path, monkeypatch):
    """The refused row is in the third batch of the second file: its write runs on the write thread while the
    fourth batch is scored, and the error reaches the loop one batch later. The file still fails alone, named
    by the refused id (not an id of the batch in hand), and nothing of it is published."""
    picky_sink(monkeypatch, {"r101-250"})
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_inputs(inputs, files=3, rows=400, row_group=100)
    picky = load_settings({"model": {"path": models["binary"]},
                           "batch": {"input": inputs, "output": f"picky://{out}", "batch_rows": 100}})
    report = run_batch(picky)
    assert (report.files_scored, report.rows, report.exit_code) == (2, 800, 1)
    [(name, reason)] = report.failed
    assert name.endswith("part-001.parquet")
    assert "id 'r101-250': column 'id': the store cannot hold 'r101-250'" in reason
    got = read_results(out)
    assert len(got) == 800 and got["id"].is_unique and not got["id"].str.startswith("r101-").any()
    assert not temporary_files(out)
    assert len(os.listdir(os.path.join(out, "_state"))) == 2
    # The same folder through the plain Parquet sink: only the failed file is scored, every row once.
    plain = load_settings({"model": {"path": models["binary"]},
                           "batch": {"input": inputs, "output": out, "batch_rows": 100}})
    again = run_batch(plain)
    assert (again.files_skipped, again.files_scored, again.rows, again.failed) == (2, 1, 400, [])
    got = read_results(out)
    assert len(got) == 1200 and got["id"].is_unique


_FSIZE_RUN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG (an OSError)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from workers.cli import main
sys.argv = ["scoring-worker", *sys.argv[1:]]
main()
"""


def test_a_store_failing_in_a_later_batch_stops_the_run_and_a_rerun_is_exact(models, tmp_path):
    """A real write failure on the write thread: no file of this process may grow past 2 MB (RLIMIT_FSIZE), and
    the second file's results pass that at its second batch of long ids. The run stops there (the store
    failed: SinkError), with the first file published and recorded, nothing of the second left (no temporary
    file either), the third untouched; a rerun without the limit scores exactly the two others."""
    inputs, out = tmp_path / "in", str(tmp_path / "out")
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for k, (rows, id_len) in enumerate([(300, 8), (600, 12000), (300, 8)]):
        ids = [f"r{k}-{i}-" + rng.bytes(id_len // 2).hex() for i in range(rows)]  # hex of random bytes: halved
        table = pa.table({"id": ids, **{f: rng.normal(size=rows) for f in FEATURES}})  # by zstd, no more
        pq.write_table(table, inputs / f"part-{k:03d}.parquet", row_group_size=200)
    args = ["batch", "--model", models["binary"], "--input", str(inputs), "--output", out, "--batch-rows", "200"]
    proc = subprocess.run([sys.executable, "-c", _FSIZE_RUN.format(limit=2_000_000), *args], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    [failure] = summary["failures"]
    assert failure["input"] == "<sink>"
    # Raised by a write (the second batch's, on the write thread), not by publishing the file.
    assert "writing" in failure["reason"] and "part-001.parquet" in failure["reason"], failure
    assert (summary["files_scored"], summary["rows_scored"]) == (1, 300)
    got = read_results(out)
    assert sorted(set(got["id"].str.split("-").str[0])) == ["r0"] and len(got) == 300
    assert not temporary_files(out)
    assert len(os.listdir(os.path.join(out, "_state"))) == 1
    again = subprocess.run([sys.executable, "-m", "workers", *args], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["files_skipped"], summary["files_scored"], summary["rows_scored"]) == (1, 2, 900)
    got = read_results(out)
    assert len(got) == 1200 and got["id"].is_unique


def _stored(out: str) -> dict:
    """Everything a run left under ``out``, comparable across runs (``scored_at`` and ledger times dropped)."""
    results = read_results(out).drop(columns=["scored_at"]).sort_values("id").reset_index(drop=True)
    errors_dir = os.path.join(out, "_errors")
    errors = None
    if os.path.isdir(errors_dir):
        errors = (ds.dataset(errors_dir, format="parquet").to_table().to_pandas().drop(columns=["scored_at"])
                  .sort_values("source").reset_index(drop=True))
    ledger = sorted((e["unit"], e["fingerprint"], e["rows"], e["rejected"]) for e in
                    (json.load(open(os.path.join(out, "_state", n))) for n in os.listdir(os.path.join(out, "_state"))))
    return {"results": results, "errors": errors, "ledger": ledger, "tmp": temporary_files(out)}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 260), min_size=1, max_size=3), batch_rows=st.sampled_from([1, 7, 50, 100, 500]),
       bad=st.sets(st.integers(0, 259), max_size=4), refused=st.sets(st.integers(0, 259), max_size=2))
def test_the_write_thread_stores_what_inline_writes_store(models, tmp_path_factory, monkeypatch, sizes, batch_rows,
                                                          bad, refused):
    """Differential: the same inputs (rows that cannot be scored among them, ids the store refuses) into the
    threaded path and into the inline one (``concurrent_writes`` off: the path before) store the same results,
    errors and ledger, and report the same counts and failures."""
    root = tmp_path_factory.mktemp("wb")
    inputs = root / "in"
    inputs.mkdir()
    rng = np.random.default_rng(len(sizes) * 1000 + batch_rows)
    for k, rows in enumerate(sizes):
        cols = {f: rng.normal(size=rows) for f in FEATURES}
        x0 = pa.array([("oops" if i in bad else str(v)) for i, v in enumerate(cols.pop("x0"))], pa.string())
        # id typed as text also without rows (a bare empty list is Arrow's null type: not an input writers make)
        table = pa.table({"id": pa.array([f"r{k}-{i}" for i in range(rows)], pa.string()), "x0": x0, **cols})
        pq.write_table(table, inputs / f"part-{k:03d}.parquet", row_group_size=max(1, rows // 3 or 1))
    picky_sink(monkeypatch, {f"r{k}-{i}" for k in range(len(sizes)) for i in refused})
    stored, reports = {}, {}
    for threaded in (True, False):
        monkeypatch.setattr(ParquetSink, "concurrent_writes", threaded)
        out = str(root / f"out-{threaded}")
        report = run_batch(load_settings({"model": {"path": models["binary"]},
                                          "batch": {"input": str(inputs), "output": f"picky://{out}",
                                                    "batch_rows": batch_rows, "allow_bad_rows": True}}))
        reports[threaded] = (report.files_scored, report.rows, report.rejected, report.failed)
        stored[threaded] = _stored(out) if report.files_scored else None
    assert reports[True] == reports[False]
    if stored[True] is None:
        assert stored[False] is None
        return
    pd.testing.assert_frame_equal(stored[True]["results"], stored[False]["results"])
    if stored[False]["errors"] is None:
        assert stored[True]["errors"] is None
    else:
        pd.testing.assert_frame_equal(stored[True]["errors"], stored[False]["errors"])
    assert stored[True]["ledger"] == stored[False]["ledger"]
    assert stored[True]["tmp"] == stored[False]["tmp"] == []
    # And every row of a file that was not refused is there once: scored or rejected.
    refused_files = {name for name, _ in reports[True][3]}
    kept = [k for k in range(len(sizes)) if not any(n.endswith(f"part-{k:03d}.parquet") for n in refused_files)]
    assert reports[True][1] + reports[True][2] == sum(sizes[k] for k in kept)


def test_results_files_hold_the_same_values_with_ids_and_scores_written_plain(models, tmp_path):
    """``id`` and ``score`` are written without a dictionary (their values are all distinct), the constant
    columns with one; reading the file gives back exactly the table that was written."""
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_inputs(inputs, files=1, rows=3000, row_group=1000)
    report = run_batch(load_settings({"model": {"path": models["binary"]}, "scoring": {"passthrough": ["x1"]},
                                      "batch": {"input": inputs, "output": out, "batch_rows": 1000}}))
    assert report.rows == 3000 and not report.failed
    [path] = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names
              if n.endswith(".parquet") and "_state" not in d]
    md = pq.read_metadata(path)
    assert md.num_row_groups == 3
    for g in range(md.num_row_groups):
        pages = {md.row_group(g).column(i).path_in_schema: md.row_group(g).column(i).has_dictionary_page
                 for i in range(md.num_columns)}
        # (Parquet has no dictionary encoding for booleans: ``served`` never had one.)
        assert pages == {"id": False, "score": False, "model_version": True, "scored_at": True, "served": False,
                         "x1": True}
    table = pq.read_table(path)
    src = pq.read_table(os.path.join(inputs, "part-000.parquet"))
    assert table["id"].to_pylist() == src["id"].to_pylist()
    assert table["x1"].to_pylist() == src["x1"].to_pylist()


@pytest.mark.parametrize("schema", [
    pa.schema([("id", pa.string()), ("score", pa.float64()), ("model_version", pa.string())]),
    pa.schema([("id", pa.int64()), ("scores", pa.list_(pa.float64())), ("label", pa.int32()),
               ("p.q", pa.struct([("a.b", pa.int64()), ("m", pa.map_(pa.string(), pa.int32()))]))]),
    pa.schema([("explanation", pa.list_(pa.struct([("feature", pa.string()), ("contribution", pa.float64())]))),
               ("explanation_base", pa.float64()), ("score", pa.float64())]),
    pa.schema([("model_version", pa.string())]),
])
def test_dictionary_columns_names_every_leaf_but_the_unique_columns(tmp_path, schema):
    """Checked against files written with it: a leaf of ``id``/``score``/``scores``/``explanation_base`` has no
    dictionary page, every other leaf (nested, dotted names too) has one, as the writer's default gives."""
    n = 50
    rng = np.random.default_rng(1)

    def values(t: pa.DataType):
        if pa.types.is_struct(t):
            return pa.StructArray.from_arrays([values(f.type) for f in t], fields=list(t))
        if pa.types.is_map(t):
            return pa.array([[("k", 1)] for _ in range(n)], t)
        if pa.types.is_list(t):
            return pa.array([[{"feature": "f", "contribution": 0.5}] if pa.types.is_struct(t.value_type)
                             else [float(i)] for i in range(n)], t)
        if pa.types.is_string(t):
            return pa.array(["v"] * n)
        return pa.array(rng.integers(0, 3, size=n)).cast(t)

    table = pa.table([values(f.type) for f in schema], schema=schema)
    path = str(tmp_path / "f.parquet")
    pq.write_table(table, path, use_dictionary=dictionary_columns(schema))
    md = pq.read_metadata(path)
    unique = {"id", "score", "scores", "explanation_base"}
    for i in range(md.num_columns):
        col = md.row_group(0).column(i)
        owner = next(f.name for f in schema if col.path_in_schema == f.name
                     or col.path_in_schema.startswith(f.name + "."))
        assert col.has_dictionary_page == (owner not in unique), (col.path_in_schema, owner)
    assert pq.read_table(path).equals(table)

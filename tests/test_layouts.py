"""Input and output layouts of batch mode, as real pipelines have them (issue #14 cases 1, 2, 9, 10).

Daily folders (``day=YYYY-MM-DD/part-0.parquet``) written by pandas and by pyarrow; outputs that are, contain or
sit inside the inputs under several spellings (trailing slash, ``..``, a symlink, ``s3://`` with and without a
trailing slash); repeated runs from different roots into one output; inputs emptied or rewritten. The promises:
an output that could land on an input is refused before anything is written (exit 2, one line naming the
setting); results of different inputs never replace each other; a rewritten input leaves nothing stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.helpers import frame
from tests.test_batch import cli, result_files, result_of

DAYS = ["2026-11-29", "2026-11-30", "2026-12-01"]


def write_day(lake, day: str, rows: int, seed: int, writer: str = "pandas", name: str = "part-0.parquet") -> str:
    """One daily file, written by pandas (``DataFrame.to_parquet``: index metadata, pandas schema) or pyarrow."""
    folder = os.path.join(str(lake), f"day={day}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    df = frame(rows, seed=seed, id_prefix=f"d{day}-")
    if writer == "pandas":
        df.to_parquet(path)
    else:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def lake_of(tmp_path, rows: int = 40) -> str:
    lake = str(tmp_path / "lake")
    for k, day in enumerate(DAYS):
        write_day(lake, day, rows, seed=k, writer="pandas" if k % 2 == 0 else "pyarrow")
    return lake


def digest(folder: str) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes (to prove nothing was touched)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def batch(models, inp: str, out: str, *extra: str, env: dict | None = None):
    return cli("batch", "--model", models["binary"], "--input", inp, "--output", out, *extra, env=env)


def refused(proc, setting: str = "SCORING_BATCH__OUTPUT") -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {setting}") and "Traceback" not in proc.stderr, lines
    return lines[0]


def ids_in(out: str) -> list[str]:
    return sorted(ds.dataset(out, format="parquet").to_table(columns=["id"])["id"].to_pylist())


# -- path relations, local ---------------------------------------------------------------------------------------

def test_an_output_that_is_or_contains_the_input_is_refused_under_every_spelling(models, tmp_path):
    lake = lake_of(tmp_path)
    day = os.path.join(lake, f"day={DAYS[0]}")
    os.symlink(lake, tmp_path / "link")
    before = digest(lake)
    cases = [
        (lake, lake),  # the same folder
        (lake, lake + "/"),  # trailing slash
        (lake + "/", lake),
        (lake, f"{lake}/day={DAYS[0]}/.."),  # '..'
        (lake, str(tmp_path / "link")),  # a symlink to it
        (str(tmp_path / "link") + "/", lake),
        (f"{day}/part-0.parquet", day),  # the folder of a single input file
        (f"{day}/part-0.parquet", f"{lake}/day={DAYS[0]}/./"),
        (day, lake),  # the output contains the input
        (f"{day}/part-0.parquet", str(tmp_path)),
        (f"{lake}/day=*/*.parquet", lake),  # a glob's fixed prefix
        (f"file://{lake}", lake),
    ]
    for inp, out in cases:
        line = refused(batch(models, inp, out))
        assert "(--output)" in line and "is the input folder" in line, line
    assert digest(lake) == before, "nothing may be written before the refusal"
    assert not os.path.exists(os.path.join(lake, "_state"))


def test_an_output_inside_the_input_is_left_out_of_the_inputs(models, tmp_path):
    """``--input DIR --output DIR/results``: allowed, as the listing leaves the output out, so a rerun neither
    scores its own results nor fails on them (it did, every time)."""
    lake = lake_of(tmp_path)
    out = os.path.join(lake, "results")
    first = batch(models, lake, out)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["files_scored"] == 3
    again = batch(models, lake + "/", out)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["files_found"] == 3 and summary["files_skipped"] == 3 and summary["rows_scored"] == 0
    # A glob that would match the results (any depth) still sees only the inputs.
    deep = batch(models, f"{lake}/**/*.parquet", out)
    assert deep.returncode == 0 and json.loads(deep.stdout)["files_found"] == 3, deep.stderr
    assert len(ids_in(out)) == 3 * 40
    # Foreign data already under such an output would silently never be scored: refused.
    other = os.path.join(lake, "results2")
    write_day(other, "2026-12-02", 10, seed=9)
    line = refused(batch(models, lake, other))
    assert "not its results" in line and "day=2026-12-02/part-0.parquet" in line, line


def test_a_shadow_sink_or_sqlite_database_on_the_input_is_refused(models, tmp_path):
    lake = lake_of(tmp_path)
    line = refused(batch(models, lake, str(tmp_path / "out"), "--shadow-sink", lake + "/"),
                   "SCORING_ROUTING__SHADOW_SINK")
    assert "is the input folder" in line
    db = os.path.join(lake, f"day={DAYS[0]}", "part-0.parquet")
    refused(batch(models, db, f"sqlite:///{db}?table=scores"))
    assert not os.path.exists(tmp_path / "out")


# -- repeated runs from different roots into one output ----------------------------------------------------------

def test_daily_folders_scored_one_run_each_keep_every_day(models, tmp_path):
    lake = lake_of(tmp_path)
    out = str(tmp_path / "scores")
    for k, day in enumerate(DAYS):
        proc = batch(models, f"{lake}/day={day}/", out)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["files_scored"] == 1
        assert len(ids_in(out)) == 40 * (k + 1), "a day's results must not replace another day's"
    assert result_files(out) == sorted(result_of(f"{lake}/day={d}/part-0.parquet") for d in DAYS)
    # The ledger knows each source: the whole lake, a single file and other spellings are all finished.
    for spelling in (lake, f"{lake}/day={DAYS[1]}/part-0.parquet", f"{lake}/day={DAYS[1]}/../day={DAYS[2]}",
                     f"{lake}/day=*/*.parquet"):
        proc = batch(models, spelling, out)
        summary = json.loads(proc.stdout)
        assert proc.returncode == 0 and summary["files_scored"] == 0 and summary["files_skipped"] >= 1, spelling
    # Resume keeps working per source: one day rewritten is the only one scored again.
    write_day(lake, DAYS[1], 25, seed=7)
    summary = json.loads(batch(models, lake, out).stdout)
    assert summary["files_scored"] == 1 and summary["files_skipped"] == 2
    ids = ids_in(out)
    assert len(ids) == 40 + 25 + 40 and len(set(ids)) == len(ids)


def test_single_files_of_the_same_name_from_different_folders_do_not_collide(models, tmp_path):
    a = write_day(tmp_path / "a", DAYS[0], 30, seed=1)
    b = write_day(tmp_path / "b", DAYS[0], 20, seed=2)  # same relative path, other rows
    out = str(tmp_path / "out")
    for path in (a, b):
        assert batch(models, path, out).returncode == 0
    assert result_files(out) == sorted([result_of(a), result_of(b)])
    ids = ids_in(out)
    assert len(ids) == 50 and len(set(ids)) == 50
    assert json.loads(batch(models, a, out).stdout)["files_skipped"] == 1


def test_inputs_under_hidden_folders_get_visible_results(models, tmp_path):
    """Readers skip names starting with '_' or '.': results of an input under such a folder stay readable."""
    path = write_day(tmp_path / ".cache" / "_lake", DAYS[0], 15, seed=3)
    out = str(tmp_path / "out")
    assert batch(models, path, out).returncode == 0
    assert len(ids_in(out)) == 15


# -- globs ------------------------------------------------------------------------------------------------------

def test_a_star_matches_within_one_folder_and_double_star_any_depth(models, tmp_path):
    lake = lake_of(tmp_path, rows=10)
    write_day(lake, DAYS[0] + "/late", 5, seed=8, name="c.parquet")  # day=.../late/c.parquet
    pq.write_table(pa.Table.from_pandas(frame(3, seed=9), preserve_index=False), f"{lake}/top.parquet")
    one = batch(models, f"{lake}/day=*/*.parquet", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["files_found"] == 3 and len(ids_in(str(tmp_path / "one"))) == 30
    every = batch(models, f"{lake}/**/*.parquet", str(tmp_path / "every"))
    assert json.loads(every.stdout)["files_found"] == 5 and len(ids_in(str(tmp_path / "every"))) == 38
    late = batch(models, f"{lake}/day=*/*/*.parquet", str(tmp_path / "late"))
    assert json.loads(late.stdout)["files_found"] == 1


def test_a_glob_matching_folders_scores_the_parquet_files_below_them(models, tmp_path):
    """Review defect 11: a glob that matched folders ('lake/day=*', 'lake/day=*/', 'lake/*') found no file and
    exited 0 having scored nothing. A matched folder now gives every Parquet file below it, as that folder
    given alone does (not its other files: a note beside the data is not an input)."""
    lake = lake_of(tmp_path, rows=10)
    write_day(lake, DAYS[0] + "/late", 5, seed=8, name="c.parquet")
    pq.write_table(pa.Table.from_pandas(frame(3, seed=9), preserve_index=False), f"{lake}/top.parquet")
    with open(f"{lake}/day={DAYS[1]}/notes.txt", "w") as f:
        f.write("not data")
    for k, (spec, files, rows) in enumerate([(f"{lake}/day=*", 4, 35), (f"{lake}/day=*/", 4, 35),
                                             (f"{lake}/*", 5, 38), (f"{lake}/day=2026-11-3*", 1, 10)]):
        out = str(tmp_path / f"out{k}")
        proc = batch(models, spec, out)
        assert proc.returncode == 0, (spec, proc.stderr)
        summary = json.loads(proc.stdout)
        assert (summary["files_found"], summary["files_scored"]) == (files, files), spec
        assert len(ids_in(out)) == rows, spec


# -- rewritten and emptied inputs -------------------------------------------------------------------------------

def test_a_rewritten_or_emptied_input_leaves_nothing_stale(models, tmp_path):
    lake = lake_of(tmp_path, rows=30)
    out = str(tmp_path / "out")
    path = f"{lake}/day={DAYS[0]}/part-0.parquet"
    result = os.path.join(out, result_of(path))
    errors = os.path.join(out, "_errors", result_of(path))
    # Rewritten with a bad row: results and an errors file.
    df = frame(12, seed=4, id_prefix="new-")
    good = df["x1"].copy()
    df["x1"] = df["x1"].map(str).astype(object)  # a numeric-string column, as CSV-born data often has
    df.loc[3, "x1"] = "oops"
    df.to_parquet(path)
    assert batch(models, lake, out, "--allow-bad-rows").returncode == 0
    assert len(pq.read_table(result)) == 11 and pq.read_table(errors)["id"].to_pylist() == ["new-4-3"]
    # Fixed: the errors file goes, the results are the new rows only.
    df["x1"] = good
    df.to_parquet(path)
    assert batch(models, lake, out).returncode == 0
    assert sorted(pq.read_table(result)["id"].to_pylist()) == sorted(df["id"]) and not os.path.exists(errors)
    # Emptied (a pandas frame with no rows, same columns): its old results go too; its results file stays,
    # with no rows (review defect 18: one output file per input file).
    df.iloc[:0].to_parquet(path)
    proc = batch(models, lake, out)
    assert proc.returncode == 0 and json.loads(proc.stdout)["files_scored"] == 1, proc.stderr
    assert pq.read_table(result).num_rows == 0 and "score" in pq.read_schema(result).names
    assert len(ids_in(out)) == 2 * 30 and not any(i.startswith("new-") for i in ids_in(out))


# -- S3 (moto_server) -------------------------------------------------------------------------------------------

def _put_day(client, bucket: str, key: str, rows: int, seed: int, writer: str = "pandas") -> None:
    df = frame(rows, seed=seed, id_prefix=f"s{seed}-")
    buf = io.BytesIO()
    if writer == "pandas":
        df.to_parquet(buf)
    else:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def _keys(client, bucket: str, prefix: str) -> list[str]:
    got = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    # Not the empty "folder/" markers pyarrow leaves when it deletes a folder's last object (readers skip them).
    return sorted(o["Key"] for o in got if not o["Key"].endswith("/"))


@pytest.mark.s3
def test_s3_layouts(models, s3_endpoint, s3_bucket, tmp_path):
    bucket, client = s3_bucket
    env = {"SCORING_S3__ENDPOINT_URL": s3_endpoint, "SCORING_S3__ACCESS_KEY_ID": "test",
           "SCORING_S3__SECRET_ACCESS_KEY": "test"}
    for k, day in enumerate(DAYS[:2]):
        _put_day(client, bucket, f"lake/day={day}/part-0.parquet", 20, seed=k, writer=("pandas", "pyarrow")[k])
    _put_day(client, bucket, f"lake/day={DAYS[0]}/late/c.parquet", 5, seed=5)
    lake = f"s3://{bucket}/lake"
    before = _keys(client, bucket, "lake/")
    # The same prefix, spelled with and without a trailing slash or doubled slashes, or containing the input.
    for inp, out in ((lake, lake), (lake, lake + "/"), (lake + "/", lake), (f"{lake}/day=*/*.parquet", lake + "//"),
                     (f"{lake}/day={DAYS[0]}/part-0.parquet", f"{lake}/day={DAYS[0]}"),
                     (f"{lake}/day={DAYS[0]}", lake), (lake, f"s3://{bucket}")):
        assert "is the input folder" in refused(batch(models, inp, out, env=env)), (inp, out)
    assert _keys(client, bucket, "lake/") == before
    # '*' stays within one segment on S3 too; '**' any depth.
    out = f"s3://{bucket}/scores"
    proc = batch(models, f"{lake}/day=*/*.parquet", out, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["files_found"] == 2, proc.stderr
    every = batch(models, f"{lake}/**/*.parquet", f"s3://{bucket}/every", env=env)
    assert json.loads(every.stdout)["files_found"] == 3
    # One day per run into one output: both kept, each named by its bucket and key.
    days = f"s3://{bucket}/days"
    for day in DAYS[:2]:
        assert batch(models, f"{lake}/day={day}/", days, env=env).returncode == 0
    results = [k for k in _keys(client, bucket, "days/") if not k.startswith(("days/_state/", "days/_errors/"))]
    assert results == [f"days/{bucket}/lake/day={DAYS[0]}/late/c.parquet",  # a folder input: all below it
                       *(f"days/{bucket}/lake/day={d}/part-0.parquet" for d in DAYS[:2])]
    assert json.loads(batch(models, f"{lake}/day=*/*.parquet", days, env=env).stdout)["files_skipped"] == 2
    # An output inside the input prefix: its results are not inputs on the rerun.
    inner = f"{lake}/results"
    assert batch(models, lake, inner, env=env).returncode == 0
    again = json.loads(batch(models, lake + "/", inner, env=env).stdout)
    assert again["files_found"] == 3 and again["files_skipped"] == 3
    # Emptied input: its old results are replaced by a results object with no rows (review defect 18).
    empty = io.BytesIO()
    frame(3, seed=1).iloc[:0].to_parquet(empty)
    emptied = f"lake/day={DAYS[1]}/part-0.parquet"
    client.put_object(Bucket=bucket, Key=emptied, Body=empty.getvalue())
    assert batch(models, f"{lake}/day={DAYS[1]}", days, env=env).returncode == 0
    results = [k for k in _keys(client, bucket, "days/") if not k.startswith(("days/_state/", "days/_errors/"))]
    assert results == [f"days/{bucket}/lake/day={DAYS[0]}/late/c.parquet",
                       f"days/{bucket}/lake/day={DAYS[0]}/part-0.parquet", f"days/{bucket}/{emptied}"]
    body = client.get_object(Bucket=bucket, Key=f"days/{bucket}/{emptied}")["Body"].read()
    table = pq.read_table(pa.BufferReader(body))
    assert table.num_rows == 0 and "score" in table.schema.names



def test_a_queued_file_inside_the_output_fails_alone(models, tmp_path):
    """Queue mode (files named by events): a file inside the output is never scored (its own results would be
    scored again); the event fails alone with the reason, and a queued input elsewhere is scored."""
    from workers.runtime.batch import BatchReport, open_batch_sink
    from workers.runtime.batch_queue import _score_event
    from workers.runtime.progress import Progress
    from workers.scoring.build import build_router
    from workers.settings import load_settings

    lake = lake_of(tmp_path, rows=10)
    out = str(tmp_path / "out")
    settings = load_settings({"model": {"path": models["binary"]}, "batch": {"output": out}})
    router = build_router(settings)
    sink, ledger = open_batch_sink(settings)
    sink.check()
    report, progress = BatchReport(), Progress("log", 0, 0)
    first = f"{lake}/day={DAYS[0]}/part-0.parquet"
    _score_event(router, settings, sink, ledger, first.encode(), report, progress, router.fingerprint)
    assert report.files_scored == 1 and not report.failed
    inside_out = os.path.join(out, result_of(first))
    _score_event(router, settings, sink, ledger, f"file://{out}/./{result_of(first)}".encode(), report,
                 progress, router.fingerprint)
    assert report.files_scored == 1 and len(report.failed) == 1
    assert "is inside the output" in report.failed[0][1]
    assert len(pq.read_table(inside_out)) == 10  # untouched
    sink.close()


def test_the_one_name_two_sources_can_share_is_guarded_by_the_ledger(tmp_path):
    """``/b/k`` and ``s3://b/k`` map to the same output name; the ledger records which source owns it, so the
    second fails alone (InputError, that file only) instead of replacing the first one's results."""
    from workers.errors import InputError
    from workers.settings import S3Settings
    from workers.sinks.parquet import ParquetSink

    sink = ParquetSink(str(tmp_path / "out"), S3Settings())
    sink.check()
    ledger = sink.ledger()
    from tests.test_breakit_batch_ledger import _publish, _results

    _publish(sink, "/lake/day=1/part-0.parquet", _results([f"r{i}" for i in range(10)]))  # the Ledger order
    ledger.mark_done("/lake/day=1/part-0.parquet", "fp", 10, 0)
    assert ledger.done("/lake/day=1/part-0.parquet") == "fp"
    with pytest.raises(InputError, match="already holds the results of /lake/day=1/part-0.parquet"):
        ledger.done("s3://lake/day=1/part-0.parquet")
    assert ledger.done("/lake/day=2/part-0.parquet") is None

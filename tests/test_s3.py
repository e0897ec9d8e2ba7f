"""Model, input and output on object storage, against a local moto_server."""

from __future__ import annotations

import io
import json

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import frame
from tests.test_batch import cli

pytestmark = pytest.mark.s3


def test_s3_model_input_and_output(models, s3_endpoint, s3_bucket):
    bucket, client = s3_bucket
    client.upload_file(models["binary"], bucket, "models/binary.txt")
    frames = [frame(3000, seed=200 + k) for k in range(3)]
    for k, df in enumerate(frames):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, row_group_size=1000)
        client.put_object(Bucket=bucket, Key=f"in/day={k}/data.parquet", Body=buf.getvalue())
    client.put_object(Bucket=bucket, Key="in/_SUCCESS", Body=b"")
    env = {"SCORING_S3__ENDPOINT_URL": s3_endpoint, "SCORING_S3__ACCESS_KEY_ID": "test",
           "SCORING_S3__SECRET_ACCESS_KEY": "test"}
    args = ["batch", "--model", f"s3://{bucket}/models/binary.txt", "--input", f"s3://{bucket}/in",
            "--output", f"s3://{bucket}/out"]
    proc = cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows_scored"] == 9000
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    # Named by the input's canonical location (bucket and key), so other input roots never collide.
    assert [k for k in keys if not k.startswith("out/_state/")] == [
        f"out/{bucket}/in/day={k}/data.parquet" for k in range(3)]
    booster = lgb.Booster(model_file=models["binary"])
    for k, df in enumerate(frames):
        body = client.get_object(Bucket=bucket, Key=f"out/{bucket}/in/day={k}/data.parquet")["Body"].read()
        got = pq.read_table(io.BytesIO(body)).to_pandas()
        assert got["id"].tolist() == df["id"].tolist()
        assert np.max(np.abs(got["score"].to_numpy() - booster.predict(df[booster.feature_name()]))) <= 1e-9
    again = cli(*args, env=env)
    assert json.loads(again.stdout)["files_skipped"] == 3
    assert "test" not in again.stderr.replace("tests", "")  # the secret is never logged


def test_missing_s3_object_model_is_a_clear_error(s3_endpoint, s3_bucket, tmp_path):
    bucket, _ = s3_bucket
    env = {"SCORING_S3__ENDPOINT_URL": s3_endpoint, "SCORING_S3__ACCESS_KEY_ID": "test",
           "SCORING_S3__SECRET_ACCESS_KEY": "test"}
    proc = cli("batch", "--model", f"s3://{bucket}/nope.txt", "--input", str(tmp_path), "--output",
               str(tmp_path / "o"), env=env)
    assert proc.returncode == 2 and "SCORING_MODEL__PATH" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_file_failing_partway_leaves_no_partial_object(models, s3_endpoint, s3_bucket, monkeypatch):
    """On S3 results are written to their final key (no rename), and closing the writer completes the upload:
    a file that fails after its first batch must not leave that batch standing as its results.

    The store is the real Parquet sink on moto with one rule added (it "cannot hold" one id of the second
    batch), standing in for any store refusing rows (RowsRejected), as in tests/test_batch.py."""
    from workers import sinks
    from workers.errors import RowsRejected
    from workers.runtime.batch import run_batch
    from workers.settings import load_settings
    from workers.sinks.parquet import ParquetSink, _ParquetUnit

    bucket, client = s3_bucket

    class PickyUnit(_ParquetUnit):
        def write(self, scored):
            ids = scored.results["id"].to_pylist()
            if "r200-150" in ids:
                raise RowsRejected({ids.index("r200-150"): "the store cannot hold 'r200-150'"})
            super().write(scored)

    class PickySink(ParquetSink):
        def begin(self, unit):
            return PickyUnit(self, unit)

    monkeypatch.setitem(sinks.SINKS, "picky", lambda uri, s3, setting, **_: PickySink(uri[len("picky://"):], s3))
    for k in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame(300, seed=200 + k), preserve_index=False), buf, row_group_size=100)
        client.put_object(Bucket=bucket, Key=f"in/part-{k}.parquet", Body=buf.getvalue())
    settings = load_settings({
        "model": {"path": models["binary"]},
        "s3": {"endpoint_url": s3_endpoint, "access_key_id": "test", "secret_access_key": "test"},
        "batch": {"input": f"s3://{bucket}/in", "output": f"picky://s3://{bucket}/out", "batch_rows": 100}})
    report = run_batch(settings)
    assert report.files_scored == 1 and len(report.failed) == 1 and "r200-150" in report.failed[0][1]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    results = [k for k in keys if not k.startswith("out/_state/") and not k.endswith("/")]
    assert results == [f"out/{bucket}/in/part-1.parquet"], results

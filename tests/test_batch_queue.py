"""Batch mode fed by "file arrived" events on a Kafka topic (what a KEDA ScaledJob runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import orjson
import pyarrow.dataset as ds
import pytest

from tests.helpers import write_inputs
from tests.test_batch import result_files, result_of

pytestmark = pytest.mark.kafka

FAST = {"SCORING_STREAM__SESSION_TIMEOUT_MS": "6000", "SCORING_STREAM__HEARTBEAT_INTERVAL_MS": "2000"}


def run(models, kafka, topic: str, out: str, root: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--queue-topic", topic,
         "--queue-group", f"g-{topic}", "--bootstrap-servers", kafka.bootstrap, "--input", root,
         "--output", out, "--idle-exit-s", "3"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **FAST})


def test_queue_events_are_scored_once_and_the_job_exits_when_drained(models, kafka, tmp_path):
    root, out = str(tmp_path / "landing"), str(tmp_path / "out")
    paths = write_inputs(root, files=4, rows=1000)
    topic = kafka.topic(partitions=2, prefix="files")
    kafka.produce(topic, [(None, paths[0].encode()), (None, f"file://{paths[1]}".encode()),
                          (None, orjson.dumps({"path": paths[2]})), (None, b"/nope/missing.parquet"),
                          (None, b'{"unrelated": 1}')])
    first = run(models, kafka, topic, out, root)
    assert first.returncode == 1, first.stderr  # two events named no usable file
    summary = json.loads(first.stdout)
    assert summary["files_scored"] == 3 and summary["files_failed"] == 2 and summary["rows_scored"] == 3000
    assert "does not exist" in first.stderr and "names no file" in first.stderr
    # New events, one naming a file already scored: skipped by the ledger, the rest scored.
    kafka.produce(topic, [(None, paths[2].encode()), (None, paths[3].encode())])
    second = run(models, kafka, topic, out, root)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["files_scored"] == 1 and summary["files_skipped"] == 1
    ids = ds.dataset(out, format="parquet").to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == 4000 and len(set(ids)) == 4000
    # Named by each file's canonical location, as in listed runs (a file:// URI is the same file).
    assert result_files(out) == sorted(result_of(p) for p in paths)
    # Drained: a third run finds nothing and exits 0 quickly.
    third = run(models, kafka, topic, out, root)
    assert third.returncode == 0 and json.loads(third.stdout)["files_found"] == 0

"""Reference profiles and drift metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from tests.conftest import free_port
from tests.helpers import write_inputs
from tests.kafka_util import wait_for
from workers.scoring.drift import DriftMonitor, build_profile
from workers.scoring.model import load_model
from workers.settings import ModelSettings


def test_profile_command_writes_bins_shares_nulls_and_ranges(models, tmp_path):
    data = str(tmp_path / "ref")
    write_inputs(data, files=2, rows=5000)
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "workers", "profile", "--model", models["binary"], "--data", data,
                           "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    profile = json.loads(out.read_text())
    assert profile["records"] == 10_000 and set(profile["features"]) == {f"x{i}" for i in range(8)}
    x0 = profile["features"]["x0"]
    assert len(x0["edges"]) == 9 and abs(sum(x0["shares"]) - 1) < 1e-9
    assert max(abs(s - 0.1) for s in x0["shares"]) < 0.01  # quantile bins hold about 10% each
    assert x0["null_share"] == 0 and x0["min"] < -3 and x0["max"] > 3


def test_psi_separates_a_shifted_sample_from_an_unshifted_one(models):
    model = load_model(ModelSettings(path=models["binary"]))
    rng = np.random.default_rng(0)
    profile = build_profile(model, rng.normal(size=(20_000, 8)))
    same = DriftMonitor(profile, model.feature_names)
    same.observe(rng.normal(size=(20_000, 8)))
    shifted = DriftMonitor(profile, model.feature_names)
    moved = rng.normal(size=(20_000, 8))
    moved[:, 0] += 0.5
    moved[:1000, 1] = np.nan
    moved[:, 2] *= 3
    shifted.observe(moved)
    a, b = same.report(), shifted.report()
    print({k: round(v["psi"], 4) for k, v in a.items()}, {k: round(v["psi"], 4) for k, v in b.items()})
    assert max(v["psi"] for v in a.values()) < 0.01
    assert b["x0"]["psi"] > 0.1 and b["x0"]["psi"] > 10 * a["x0"]["psi"]
    assert b["x1"]["null_share"] == pytest.approx(0.05) and a["x1"]["null_share"] == 0
    assert b["x2"]["out_of_range_share"] > 0.1 and a["x2"]["out_of_range_share"] < 0.001
    # The window slides: after enough unshifted data the shift is forgotten.
    window = DriftMonitor(profile, model.feature_names, window=5000)
    window.observe(moved[:5000])
    for _ in range(3):
        window.observe(rng.normal(size=(5000, 8)))
    assert window.report()["x0"]["psi"] < 0.02


@pytest.mark.kafka
def test_stream_exports_drift_and_score_metrics(models, kafka, tmp_path):
    from tests.test_stream import records

    model = load_model(ModelSettings(path=models["binary"]))
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(build_profile(model, np.random.default_rng(1).normal(size=(20_000, 8)))))
    topic = kafka.topic(partitions=1)
    recs = records(3000)
    for r in recs:
        r["x0"] += 1.0  # drifted input
    kafka.produce_json(topic, recs)
    port = free_port()
    worker = kafka.worker("--model", models["binary"], "--topic", topic, "--group", f"g-{topic}", "--sink",
                          f"sqlite:///{tmp_path / 'd.db'}?table=scores", "--metrics-port", str(port),
                          env={"SCORING_SCORING__PROFILE": str(profile)})

    def scrape() -> str:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:  # not listening yet
            return ""

    def gauges() -> dict[str, float]:
        text = scrape()
        return {line.split('feature="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("scoring_feature_psi{")}

    def written() -> float:
        text = scrape()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("scoring_score_count"))

    wait_for(lambda: written() >= 3000, 60, what="scores observed")
    psi = wait_for(lambda: gauges() or None, 10, what="psi gauges")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert psi["x0"] > 0.2 and max(v for k, v in psi.items() if k != "x0") < 0.1


def test_batch_summary_reports_drift_against_the_profile(models, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import frame

    model = load_model(ModelSettings(path=models["binary"]))
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(build_profile(model, np.random.default_rng(3).normal(size=(20_000, 8)))))
    inputs = tmp_path / "in"
    inputs.mkdir()
    df = frame(5000, seed=4)
    df["x0"] += 1.0
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), inputs / "a.parquet")
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--model", models["binary"], "--input",
                           str(inputs), "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          env={**__import__("os").environ, "SCORING_SCORING__PROFILE": str(profile)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    drift = json.loads(proc.stdout)["drift"]
    assert drift["x0"]["psi"] > 0.2 and max(v["psi"] for k, v in drift.items() if k != "x0") < 0.05


def test_serve_exports_drift_gauges(models, tmp_path):
    import httpx
    import orjson

    from tests.test_serve import start

    model = load_model(ModelSettings(path=models["binary"]))
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(build_profile(model, np.random.default_rng(5).normal(size=(20_000, 8)))))
    import os

    os.environ["SCORING_SCORING__PROFILE"] = str(profile)
    try:
        proc, addr = start(models["binary"])
    finally:
        del os.environ["SCORING_SCORING__PROFILE"]
    try:
        x = np.random.default_rng(6).normal(size=(3000, 8))
        x[:, 3] *= 4
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [3000, 8], "datatype": "FP64",
                                          "data": x.ravel().tolist()}]})
        assert httpx.post(f"http://{addr}/v2/models/binary/infer", content=body, timeout=30).status_code == 200
        text = httpx.get(f"http://{addr}/metrics").text
        psi = {line.split('feature="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("scoring_feature_psi{")}
    finally:
        proc.terminate()
        proc.wait(30)
    assert psi["x3"] > 0.2 and psi["x0"] < 0.05

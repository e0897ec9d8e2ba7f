"""Model rollout: sticky split, shadow rows, agreement, guardrails, routing-file errors, hot reload (no broker)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import helpers
from workers.errors import ConfigError
from workers.observability import Metrics
from workers.runtime.watch import RoutingWatcher
from workers.scoring import sticky
from workers.scoring.router import Router
from workers.scoring.routing_spec import read_routing
from workers.settings import Settings

KEYS = [f"user-{i}" for i in range(100_000)]


def write_routing(path, versions: list[dict], key: str | None = None) -> str:
    doc = {"versions": versions, **({"key": key} if key else {})}
    with open(path, "w") as fh:
        fh.write(json.dumps(doc) if str(path).endswith(".json") else _yaml(doc))
    return str(path)


def ab_with_shadow(models, tmp_path, files: int, rows: int, names=("v1", "v2", "v3"), weights=(50, 50)):
    """Parquet inputs and a routing file: names[0] (binary) and names[1] (binary_v2) split by ``weights``, and
    names[2] (binary_v2's model again) in the shadow of both. Returns (inputs folder, routing path)."""
    inputs = tmp_path / "in"
    helpers.write_inputs(str(inputs), files=files, rows=rows)
    path = write_routing(tmp_path / "routing.yaml", [
        {"name": names[0], "model": models["binary"], "weight": weights[0]},
        {"name": names[1], "model": models["binary_v2"], "weight": weights[1]},
        {"name": names[2], "model": models["binary_v2"], "shadow": True},
    ])
    return inputs, path


def _yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- sticky split ------------------------------------------------------------------------------
def test_split_matches_weights_within_one_point_and_agrees_across_processes(tmp_path):
    names, weights = ["v1", "v2", "v3"], [70, 20, 10]
    got = sticky.assign(KEYS, names, weights)
    shares = np.bincount(got, minlength=3) / len(KEYS) * 100
    assert np.all(np.abs(shares - np.array(weights)) < 1.0), shares
    # Another process, with another hash seed, maps the same keys to the same versions.
    code = ("import hashlib,sys; from workers.scoring import sticky; "
            "keys=[f'user-{i}' for i in range(100_000)]; "
            "print(hashlib.sha256(sticky.assign(keys, ['v1','v2','v3'], [70,20,10]).tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == hashlib.sha256(got.tobytes()).hexdigest()


def test_raising_a_weight_only_moves_keys_to_that_version():
    before = sticky.assign(KEYS, ["v1", "v2"], [90, 10])
    after = sticky.assign(KEYS, ["v1", "v2"], [80, 20])
    moved = before != after
    assert np.all(after[moved] == 1), "a key moved away from the new version"
    assert np.all(after[before == 1] == 1)
    assert abs(moved.mean() - 0.10) < 0.01  # about the 10 points that changed hands
    # Three versions, order in the file irrelevant, a removed version only moves its own keys.
    three = sticky.assign(KEYS, ["a", "b", "c"], [60, 30, 10])
    reordered = sticky.assign(KEYS, ["c", "a", "b"], [10, 60, 30])
    assert np.array_equal(np.array(["a", "b", "c"])[three], np.array(["c", "a", "b"])[reordered])
    without_c = sticky.assign(KEYS, ["a", "b", "c"], [60, 30, 0])
    changed = three != without_c
    assert np.all(three[changed] == 2)


# -- the routing file --------------------------------------------------------------------------
@pytest.mark.parametrize(("versions", "message"), [
    ([{"name": "a", "model": "MODEL", "weight": 60}, {"name": "b", "model": "MODEL", "weight": 30}],
     "weights of served versions must sum to 100, not 90"),
    ([{"name": "a", "model": "MODEL", "weight": 100}, {"name": "a", "model": "MODEL", "shadow": True}],
     "version names must be unique; repeated: a"),
    ([{"name": "a", "model": "MODEL", "weight": 100}, {"name": "b", "model": "MODEL", "shadow": True, "weight": 5}],
     "version 'b' is a shadow and cannot have a weight"),
    ([{"name": "a", "model": "MODEL", "shadow": True}], "at least one version must be served"),
    ([{"name": "a", "model": "MODEL", "weight": 100, "wieght": 3}], "versions[0].wieght: Extra inputs"),
    ([{"name": "a", "model": "MODEL", "weight": 100, "sha256": "abc"}], "versions[0].sha256: String should match"),
])
def test_routing_file_mistakes_stop_start_up_with_one_line(models, tmp_path, versions, message):
    for v in versions:
        v["model"] = models["binary"]
    path = write_routing(tmp_path / "routing.yaml", versions)
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--routing", path, "--input", str(tmp_path),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SCORING_ROUTING__PATH (--routing): ")
    assert message in lines[0], lines[0]


def test_a_version_whose_model_fails_its_pin_or_is_missing_names_the_version(models, tmp_path):
    wrong = "0" * 64
    path = write_routing(tmp_path / "r.yaml", [{"name": "v1", "model": models["binary"], "weight": 100},
                                               {"name": "v2", "model": models["binary_v2"], "shadow": True,
                                                "sha256": wrong}])
    with pytest.raises(ConfigError, match=r"version 'v2': .* not the pinned 0000"):
        RoutingWatcher(Settings(routing={"path": path}))
    write_routing(tmp_path / "r.yaml", [{"name": "v1", "model": "nope.txt", "weight": 100}])
    with pytest.raises(ConfigError, match=r"version 'v1': .*nope.txt does not exist"):
        RoutingWatcher(Settings(routing={"path": path}))


def test_relative_model_paths_are_relative_to_the_routing_file(models, tmp_path):
    os.makedirs(tmp_path / "cfg" / "models")
    with open(models["binary"], "rb") as src, open(tmp_path / "cfg" / "models" / "m.txt", "wb") as dst:
        dst.write(src.read())
    path = write_routing(tmp_path / "cfg" / "routing.json", [{"name": "v1", "model": "models/m.txt"}])
    spec, _ = read_routing(path)
    assert spec.versions[0].model == str(tmp_path / "cfg" / "models" / "m.txt")
    assert spec.versions[0].weight == 100  # a single served version needs no weight


# -- routing, shadow rows, agreement -----------------------------------------------------------
def _router(models, tmp_path, versions, **kw) -> tuple[Router, Metrics]:
    metrics = Metrics()
    path = write_routing(tmp_path / "routing.yaml", versions, **kw)
    settings = Settings(routing={"path": path, "threshold": 0.5})
    return RoutingWatcher(settings, metrics).router, metrics


def test_batch_rows_split_by_key_with_shadow_rows_and_agreement_metrics(models, tmp_path):
    router, metrics = _router(models, tmp_path, [
        {"name": "v1", "model": models["binary"], "weight": 70},
        {"name": "v2", "model": models["binary_v2"], "weight": 30},
        {"name": "v3", "model": models["regression"], "shadow": True},
    ])
    df = helpers.frame(5000, seed=11)
    table = pa.Table.from_pandas(df, preserve_index=False)
    scored = router.finish(router.from_table(table))
    res = scored.results.to_pandas()
    served, shadow = res[res.served], res[~res.served]
    # Every record: exactly one served row and one shadow row.
    assert sorted(served.id) == sorted(df.id) and sorted(shadow.id) == sorted(df.id)
    assert set(shadow.model_version) == {"v3"}
    expected_version = np.array(["v1", "v2"])[sticky.assign(list(df.id), ["v1", "v2"], [70, 30])]
    assert dict(zip(served.id, served.model_version, strict=True)) == dict(zip(df.id, expected_version, strict=True))
    # Scores are each version's own Booster.predict.
    x = df[helpers.FEATURES].to_numpy()
    preds = {name: dict(zip(df.id, lgb.Booster(model_file=models[m]).predict(x), strict=True))
             for name, m in (("v1", "binary"), ("v2", "binary_v2"), ("v3", "regression"))}
    for row in res.itertuples():
        assert abs(row.score - preds[row.model_version][row.id]) <= 1e-9
    # Agreement against the served version of the same record, computed independently.
    for base in ("v1", "v2"):
        ids = served.id[served.model_version == base]
        a = np.array([preds["v3"][i] for i in ids])
        b = np.array([preds[base][i] for i in ids])
        labels = {"model_version": "v3", "baseline": base}
        assert metric(metrics, "scoring_shadow_pairs_total", **labels) == len(ids)
        assert metric(metrics, "scoring_shadow_agree_total", **labels) == np.count_nonzero((a >= .5) == (b >= .5))
        assert metric(metrics, "scoring_shadow_abs_diff_total", **labels) == pytest.approx(np.abs(a - b).sum())
    assert metric(metrics, "scoring_version_rows_total", model_version="v3", role="shadow") == 5000
    assert metric(metrics, "scoring_routing_weight", model_version="v2", role="served") == 30


def test_agreement_on_a_constructed_case(models, tmp_path):
    """The same model as served and shadow: agreement 1, difference 0. A regression model as the shadow of
    a binary one at threshold 0.5: agreement equals the share of records where both sides match."""
    router, metrics = _router(models, tmp_path, [
        {"name": "a", "model": models["binary"]},
        {"name": "same", "model": models["binary"], "shadow": True},
    ])
    df = helpers.frame(2000, seed=3)
    router.finish(router.from_table(pa.Table.from_pandas(df, preserve_index=False)))
    assert metric(metrics, "scoring_shadow_agree_total", model_version="same", baseline="a") == 2000
    assert metric(metrics, "scoring_shadow_abs_diff_total", model_version="same", baseline="a") == 0


def test_routing_key_field_keeps_a_user_on_one_version(models, tmp_path):
    router, _ = _router(models, tmp_path, [
        {"name": "v1", "model": models["binary"], "weight": 50},
        {"name": "v2", "model": models["binary_v2"], "weight": 50},
    ], key="user")
    df = helpers.frame(3000, seed=5)
    df["user"] = [f"u{i % 40}" for i in range(len(df))]
    table = pa.Table.from_pandas(df, preserve_index=False)
    res = router.finish(router.from_table(table)).results.to_pandas().merge(df[["id", "user"]], on="id")
    per_user = res.groupby("user").model_version.nunique()
    assert per_user.max() == 1 and res.model_version.nunique() == 2
    # Stream records: the same key field in JSON gives the same versions.
    values = [json.dumps({"id": r.id, "user": r.user, **{f: getattr(r, f) for f in helpers.FEATURES}}).encode()
              for r in df.itertuples()]
    routed, _ = router.decode(values)
    streamed = router.finish(routed).results.to_pandas()
    assert dict(zip(streamed.id, streamed.model_version, strict=True)) == dict(zip(res.id, res.model_version,
                                                                                   strict=True))


def test_guardrail_takes_a_drifting_canary_out_and_its_keys_go_to_the_primary(models, tmp_path):
    router, metrics = _router(models, tmp_path, [
        {"name": "v1", "model": models["binary"], "weight": 80},
        # Regression outputs are not probabilities: their distribution is far from v1's.
        {"name": "bad", "model": models["regression"], "weight": 20,
         "guardrail": {"max_score_psi": 0.5, "min_records": 500, "window": 5000}},
    ])
    router.guards.checked = 0.0
    first = router.finish(router.from_table(pa.Table.from_pandas(helpers.frame(5000, seed=1), preserve_index=False)))
    assert "bad" in set(first.results["model_version"].to_pylist())
    assert metric(metrics, "scoring_guardrail_tripped", model_version="bad") == 1
    assert metric(metrics, "scoring_routing_weight", model_version="bad", role="served") == 0
    later = router.finish(router.from_table(pa.Table.from_pandas(helpers.frame(3000, seed=2), preserve_index=False)))
    assert set(later.results["model_version"].to_pylist()) == {"v1"}


def test_a_failing_canary_falls_back_to_the_primary_for_its_rows(models, tmp_path):
    router, metrics = _router(models, tmp_path, [
        {"name": "v1", "model": models["binary"], "weight": 50},
        {"name": "v2", "model": models["binary_v2"], "weight": 50},
    ])

    def broken(matrix):
        raise RuntimeError("simulated model failure")

    v2 = next(v for v in router.versions if v.name == "v2")
    v2.model.predict = broken
    df = helpers.frame(1000, seed=4)
    res = router.finish(router.from_table(pa.Table.from_pandas(df, preserve_index=False))).results
    assert res.num_rows == 1000 and set(res["model_version"].to_pylist()) == {"v1"}
    assert metric(metrics, "scoring_version_errors_total", model_version="v2") > 0


# -- hot reload --------------------------------------------------------------------------------
def test_reload_swaps_between_batches_and_a_broken_file_keeps_the_old_routing(models, tmp_path):
    path = write_routing(tmp_path / "routing.yaml", [{"name": "v1", "model": models["binary"]}])
    metrics = Metrics()
    source = RoutingWatcher(Settings(routing={"path": path, "poll_s": 0}), metrics)
    old = source.current()
    assert source.check() is False  # nothing changed
    time.sleep(0.01)
    write_routing(path, [{"name": "v1", "model": models["binary"], "weight": 90},
                         {"name": "v2", "model": models["binary_v2"], "weight": 10}])
    assert source.check() is True
    assert source.router is old  # loaded, not yet in use: the batch in hand finishes with the old routing
    new = source.current()
    assert [v.name for v in new.versions] == ["v1", "v2"]
    # A model file that is a pickle: refused, the old routing keeps serving, reported.
    bad_model = tmp_path / "evil.pkl"
    bad_model.write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    write_routing(path, [{"name": "v1", "model": str(bad_model)}])
    assert source.check() is False
    assert source.current() is new
    assert metric(metrics, "scoring_routing_reload_ok") == 0
    assert metric(metrics, "scoring_routing_reloads_total", result="failed") == 1
    # SIGHUP path: a forced reload of a fixed file.
    write_routing(path, [{"name": "v2", "model": models["binary_v2"]}])
    source.reload_now()
    source.start()
    deadline = time.monotonic() + 10
    while source.pending is None and time.monotonic() < deadline:
        time.sleep(0.05)
    source.stop()
    assert [v.name for v in source.current().versions] == ["v2"]
    assert metric(metrics, "scoring_routing_reload_ok") == 1


def test_batch_mode_with_routing_stores_served_and_shadow_rows_and_compare_reads_them(models, tmp_path):
    inputs, path = ab_with_shadow(models, tmp_path, files=2, rows=3000)
    db = tmp_path / "r.db"
    shadow_dir = tmp_path / "shadow"
    proc = subprocess.run([sys.executable, "-m", "workers", "batch", "--routing", path, "--input", str(inputs),
                           "--output", f"sqlite:///{db}?table=scores", "--shadow-sink", str(shadow_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows_scored"] == 6000
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT model_version, served, count(*), count(DISTINCT id) FROM scores "
                            "GROUP BY model_version, served ORDER BY model_version").fetchall()
    assert {r[0] for r in rows} == {"v1", "v2"} and all(r[1] == 1 for r in rows)
    assert sum(r[2] for r in rows) == 6000 and all(r[2] == r[3] for r in rows)
    shadow = pq.read_table(shadow_dir).to_pandas()
    assert len(shadow) == 6000 and set(shadow.model_version) == {"v3"} and not shadow.served.any()
    # compare over both stores (a Parquet dataset holding both kinds would do too): v3 == v2's model.
    out = subprocess.run([sys.executable, "-m", "workers", "compare", "--results", f"sqlite:///{db}?table=scores",
                          "--json"], capture_output=True, text=True, check=True).stdout
    report = json.loads(out)
    assert {v["version"]: v["served_rows"] for v in report["versions"]} == {r[0]: r[2] for r in rows}
    assert sum(report["versions"][0]["histogram"]) == rows[0][2]


def test_compare_reports_shadow_agreement_from_a_parquet_dataset(models, tmp_path):
    inputs, path = ab_with_shadow(models, tmp_path, files=1, rows=4000)
    out_dir = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "workers", "batch", "--routing", path, "--input", str(inputs),
                    "--output", str(out_dir)], capture_output=True, text=True, check=True)
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "workers", "compare", "--results", str(out_dir), "--json", "--threshold", "0.3"],
        capture_output=True, text=True, check=True).stdout)
    pairs = {p["baseline"]: p for p in report["shadow"]}
    # v3 is v2's model: where v2 served, the pair agrees exactly.
    assert pairs["v2"]["agreement"] == 1.0 and pairs["v2"]["mean_abs_diff"] == 0.0
    df = pq.read_table(out_dir).to_pandas()
    served = df[df.served].set_index("id")
    shadow = df[~df.served].set_index("id")
    ids = served.index[served.model_version == "v1"]
    a, b = shadow.loc[ids, "score"].to_numpy(), served.loc[ids, "score"].to_numpy()
    assert pairs["v1"]["pairs"] == len(ids)
    assert pairs["v1"]["agreement"] == pytest.approx(((a >= 0.3) == (b >= 0.3)).mean(), abs=1e-6)
    assert pairs["v1"]["mean_abs_diff"] == pytest.approx(np.abs(a - b).mean(), abs=1e-6)
    text = subprocess.run([sys.executable, "-m", "workers", "compare", "--results", str(out_dir)],
                          capture_output=True, text=True, check=True).stdout
    assert "v1" in text and "v3" in text and "agree" in text


def test_a_model_uploaded_after_the_routing_file_is_picked_up_when_it_appears(models, tmp_path):
    path = write_routing(tmp_path / "routing.yaml", [{"name": "v1", "model": models["binary"]}])
    source = RoutingWatcher(Settings(routing={"path": path, "poll_s": 0}), Metrics())
    later = tmp_path / "v2.txt"
    write_routing(path, [{"name": "v1", "model": models["binary"], "weight": 50},
                         {"name": "v2", "model": str(later), "weight": 50}])
    assert source.check() is False  # v2's file is not there yet: the old routing stays
    assert source.check() is False  # nothing changed since: not tried again
    later.write_bytes(open(models["binary_v2"], "rb").read())
    assert source.check() is True
    assert [v.name for v in source.current().versions] == ["v1", "v2"]


def test_compile_with_a_routing_file_compiles_every_version(models, tmp_path):
    """`compile --routing` (issue #14 case 20: the flag was listed but ignored, so only --model was compiled)."""
    routing = write_routing(tmp_path / "routing.yaml", [
        {"name": "v1", "model": models["binary"], "weight": 100},
        {"name": "v2-shadow", "model": models["binary_v2"], "shadow": True},
    ])
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "workers", "compile", "--routing", routing, "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[:3] for line in proc.stdout.splitlines()] == [
        ["compiled", models["binary"], "(v1)"], ["compiled", models["binary_v2"], "(v2-shadow)"]]
    assert len(list(cache.glob("*.so"))) == 2

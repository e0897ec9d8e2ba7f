"""Break-it review of the serve dataplane through the HTTP app (Starlette's TestClient, in process).

The review's defects are fixed and their tests pass; the others pin behaviour the review checked and found
right (names colliding with result fields, nulls, duplicated ids, a SQLite sink, NaN/Infinity literals in OIP).

Defects found (fixed; all in ``workers.decode.oip._loads``: a body orjson refuses is parsed again with
Python's ``json`` whenever the bytes ``NaN`` or ``Infinity`` appear *anywhere* in it, e.g. in the request id,
and that parser accepted what orjson refused):
- an FP64 value written as an integer beyond the float range (``1`` and 400 zeros) is a 500
  (``OverflowError``) instead of the 400 it gets without ``NaN`` in the body;
- a lone surrogate escape (``"\\ud800"``) in the request id is a 500 (``TypeError`` writing the reply) instead
  of the 400 it gets without ``NaN`` in the body;
- ``1e400`` (out of the FP64 range, refused with 400 otherwise) is scored as +Infinity when the body also holds
  ``NaN``.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import orjson
import pandas as pd
import pytest
from starlette.testclient import TestClient

from tests.helpers import FEATURES
from tests.test_serve_inputs import BATCH, app_for, good_record, kafka_event, read_table

INFER = "/v2/models/binary/infer"


def body_with(data: bytes, rid: bytes | None = None) -> bytes:
    """An OIP request body with the raw JSON text ``data`` as the tensor's data (8 values, one row)."""
    head = b'{"id":' + rid + b"," if rid is not None else b"{"
    return head + b'"inputs":[{"name":"x","shape":[1,8],"datatype":"FP64","data":[' + data + b"]}]}"


@pytest.fixture(scope="module")
def client(models):
    with TestClient(app_for(models["binary"]).asgi(), raise_server_exceptions=False) as c:
        yield c


# -- OIP: NaN / Infinity literals ---------------------------------------------------------------------------
def test_nan_and_infinity_literals_score_like_lightgbm(client, models):
    booster = lgb.Booster(model_file=models["binary"])
    for text, row in [(b"NaN,1,2,3,4,5,6,7", [np.nan, 1, 2, 3, 4, 5, 6, 7]),
                      (b"Infinity,-Infinity,2,3,4,5,6,7", [np.inf, -np.inf, 2, 3, 4, 5, 6, 7]),
                      (b"null,NaN,null,3,4,5,6,7", [np.nan, np.nan, np.nan, 3, 4, 5, 6, 7])]:
        resp = client.post(INFER, content=body_with(text))
        assert resp.status_code == 200, resp.text
        got = resp.json()["outputs"][0]["data"]
        np.testing.assert_allclose(got, booster.predict(np.array([row], dtype=np.float64)), rtol=1e-9)
    # A number beyond the FP64 range is refused, and the string "NaN" is not a number.
    assert client.post(INFER, content=body_with(b"1e400,1,2,3,4,5,6,7")).status_code == 400
    resp = client.post(INFER, content=body_with(b'"NaN",1,2,3,4,5,6,7'))
    assert resp.status_code == 400 and "must be numbers" in resp.json()["error"], resp.text


HUGE_INT = b"1" + b"0" * 400  # an integer literal beyond the float range


def test_an_integer_beyond_the_float_range_is_400_without_nan_in_the_body(client):
    resp = client.post(INFER, content=body_with(HUGE_INT + b",1,2,3,4,5,6,7"))
    assert resp.status_code == 400, resp.text


@pytest.mark.parametrize("body", [body_with(HUGE_INT + b",1,2,3,4,5,6,7", rid=b'"NaN"'),
                                  body_with(b"NaN," + HUGE_INT + b",2,3,4,5,6,7")], ids=["nan-in-id", "nan-in-data"])
def test_an_integer_beyond_the_float_range_is_400_with_nan_in_the_body(client, body):
    resp = client.post(INFER, content=body)
    assert resp.status_code == 400, resp.text


def test_a_lone_surrogate_in_the_request_id_is_400_without_nan_in_the_body(client):
    resp = client.post(INFER, content=body_with(b"0,1,2,3,4,5,6,7", rid=b'"\\ud800"'))
    assert resp.status_code == 400, resp.text


def test_a_lone_surrogate_in_the_request_id_is_400_with_nan_in_the_body(client):
    resp = client.post(INFER, content=body_with(b"NaN,1,2,3,4,5,6,7", rid=b'"\\ud800"'))
    assert resp.status_code == 400, resp.text


def test_1e400_is_refused_whatever_else_the_body_holds(client):
    resp = client.post(INFER, content=body_with(b"1e400,1,2,3,4,5,6,7", rid=b'"NaN"'))
    assert resp.status_code == 400, resp.text


# -- CloudEvents: names colliding with ours, nulls, duplicated ids, a SQLite sink ----------------------------
def test_record_fields_named_like_result_columns_do_not_leak_into_results(models, tmp_path):
    uri = f"sqlite:///{tmp_path}/s.db?table=scores"
    booster = lgb.Booster(model_file=models["binary"])
    r = good_record(0)
    evil = {**r, "score": 5, "model_version": "evil", "served": False, "__row": 99, "offset": "x", "topic": 3,
            "scored_at": "never"}
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(evil, 1), kafka_event(good_record(1), 2)]))
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert [e["type"] for e in got] == ["scoring.result"] * 2
    want = booster.predict(np.array([[good_record(i)[f] for f in FEATURES] for i in (0, 1)]))
    np.testing.assert_allclose([e["data"]["score"] for e in got], want, rtol=1e-9)
    assert got[0]["data"]["model_version"] != "evil" and "served" not in got[0]["data"]
    rows = sorted(read_table(uri, "scores"), key=lambda row: row["id"])
    assert [(row["id"], row["offset"], row["topic"], row["served"]) for row in rows] == [
        ("e0", 1, "events", 1), ("e1", 2, "events", 1)]
    np.testing.assert_allclose([row["score"] for row in rows], want, rtol=1e-9)


def test_a_model_whose_features_are_named_like_result_columns_scores_and_stores(tmp_path):
    names = ["score", "model_version", "served", "__row", "offset", "topic", "scored_at", "partition"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, len(names)))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7},
                        lgb.Dataset(pd.DataFrame(x, columns=names), (x[:, 0] + x[:, 1] > 0).astype(int)), 10)
    path = str(tmp_path / "m.txt")
    booster.save_model(path)
    uri = f"sqlite:///{tmp_path}/s.db?table=scores"
    records = [{"id": f"r{i}", **{f: float(v) for f, v in zip(names, x[i], strict=True)}} for i in range(3)]
    with TestClient(app_for(path, serve={"sink": uri}).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps([kafka_event(r, 40 + i) for i, r in enumerate(records)]))
        assert resp.status_code == 200, resp.text
        oip = c.post("/v2/models/m/infer", content=orjson.dumps({"inputs": [
            {"name": f, "shape": [3], "datatype": "FP64", "data": x[:3, j].tolist()} for j, f in enumerate(names)]}))
        assert oip.status_code == 200, oip.text
    want = booster.predict(x[:3])
    np.testing.assert_allclose([e["data"]["score"] for e in resp.json()], want, rtol=1e-9)
    np.testing.assert_allclose(oip.json()["outputs"][0]["data"], want, rtol=1e-9)
    rows = sorted(read_table(uri, "scores"), key=lambda row: row["id"])
    assert [(row["id"], row["offset"]) for row in rows] == [("r0", 40), ("r1", 41), ("r2", 42)]
    np.testing.assert_allclose([row["score"] for row in rows], want, rtol=1e-9)


def test_nulls_everywhere_are_answered_per_event(models, tmp_path):
    uri = f"sqlite:///{tmp_path}/s.db?table=scores"
    booster = lgb.Booster(model_file=models["binary"])
    batch = [kafka_event({"id": None, **dict.fromkeys(FEATURES)}, 1),  # no id: error
             kafka_event(None, 2),  # data null: error
             kafka_event({"id": "n1", **dict.fromkeys(FEATURES)}, 3),  # every feature missing: scored
             kafka_event({"id": "n2"}, 4)]  # no feature at all: scored as missing
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps(batch))
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert [e["type"] for e in got] == ["scoring.result.error"] * 2 + ["scoring.result"] * 2
    assert all(e["data"]["error"] for e in got[:2])
    missing = float(booster.predict(np.full((1, 8), np.nan))[0])
    np.testing.assert_allclose([e["data"]["score"] for e in got[2:]], [missing] * 2, rtol=1e-9)
    assert sorted(row["id"] for row in read_table(uri, "scores")) == ["n1", "n2"]
    assert len(read_table(uri, "scores_errors")) == 2


def test_duplicated_ids_in_one_batch_the_last_event_wins_in_the_store(models, tmp_path):
    """Two events of one batch with one record id (and 5 vs "5"): both are answered with their own score, the
    store keeps one row per (id, model_version), the later event's (an upsert in event order). Not a defect by
    the sink contract, but the first event's reply describes a result the store no longer holds."""
    uri = f"sqlite:///{tmp_path}/s.db?table=scores"
    booster = lgb.Booster(model_file=models["binary"])
    r1, r2 = good_record(1), {**good_record(2), "id": "e1"}
    batch = [kafka_event(r1, 10), kafka_event(r2, 11), kafka_event({**r1, "id": 5}, 12),
             kafka_event({**r2, "id": "5"}, 13)]
    with TestClient(app_for(models["binary"], serve={"sink": uri}).asgi()) as c:
        resp = c.post("/", headers=BATCH, content=orjson.dumps(batch))
    assert resp.status_code == 200, resp.text
    got = resp.json()
    p1, p2 = booster.predict(np.array([[r[f] for f in FEATURES] for r in (r1, r2)]))
    assert [e["subject"] for e in got] == ["e1", "e1", "5", "5"]
    np.testing.assert_allclose([e["data"]["score"] for e in got], [p1, p2, p1, p2], rtol=1e-9)
    rows = {row["id"]: row for row in read_table(uri, "scores")}
    assert sorted(rows) == ["5", "e1"]
    assert (rows["e1"]["offset"], rows["5"]["offset"]) == (11, 13)
    np.testing.assert_allclose([rows["e1"]["score"], rows["5"]["score"]], [p2, p2], rtol=1e-9)

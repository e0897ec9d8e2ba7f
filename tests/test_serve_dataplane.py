"""Serve's dataplane and batcher called directly, without HTTP: what a gRPC front end would call.

No Starlette, no sockets: each test runs the dataplane's lifecycle in ``asyncio.run`` and checks scores against
``Booster.predict`` on the same model file, errors by their ``RequestError`` kind (which carries the status a
front end answers with), and the batcher's rules (concurrent requests share one predict call, a request is never
split, one model per call, a failing predict reaches every request it held).
"""

from __future__ import annotations

import asyncio
import sqlite3

import lightgbm as lgb
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, Histogram

from tests.helpers import FEATURES
from workers.decode import oip
from workers.errors import BadRequest, NotFound, RequestError
from workers.runtime.serve.batcher import Batcher
from workers.runtime.serve.dataplane import DataPlane
from workers.scoring.model import Model, load_model
from workers.settings import ModelSettings, load_settings


def plane_for(path: str, **groups) -> DataPlane:
    return DataPlane(load_settings({"model": {"path": path}, **groups}))


def run(plane: DataPlane, coro_fn):
    async def main():
        await plane.start()
        try:
            return await coro_fn()
        finally:
            await plane.stop()
    return asyncio.run(main())


def body(rows: np.ndarray, rid: str | None = None) -> bytes:
    req: dict = {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP64",
                             "data": rows.ravel().tolist()}]}
    if rid is not None:
        req["id"] = rid
    return orjson.dumps(req)


def event(i: int, record: dict | bytes) -> dict:
    data = record if isinstance(record, bytes) else orjson.dumps(record).decode()
    return {"specversion": "1.0", "id": f"partition:0/offset:{i}", "source": "/kafka#t", "type": "t",
            "datacontenttype": "application/json", "data": data if isinstance(data, str) else data.decode(),
            "key": f"k{i}"}


def test_infer_without_http_scores_like_booster_predict(models):
    plane = plane_for(models["binary"])
    rows = np.random.default_rng(3).normal(size=(17, len(FEATURES)))

    async def go():
        done = await plane.infer("binary", None, lambda model: oip.parse(body(rows), None, model))
        reply = await plane.infer_rest("binary", None, body(rows), None)
        return done, reply

    done, reply = run(plane, go)
    expected = lgb.Booster(model_file=models["binary"]).predict(rows)
    np.testing.assert_allclose(done.predictions, expected, rtol=1e-12)
    out = orjson.loads(reply.body)
    assert reply.status == 200 and reply.media_type == "application/json"
    np.testing.assert_allclose(out["outputs"][0]["data"], expected, rtol=1e-12)


def test_unknown_model_or_version_is_not_found_and_malformed_body_a_bad_request(models):
    plane = plane_for(models["binary"])

    async def go():
        errors = []
        for call in (lambda: plane.infer_rest("nope", None, body(np.zeros((1, 8))), None),
                     lambda: plane.infer_rest("binary", "v9", body(np.zeros((1, 8))), None),
                     lambda: plane.infer_rest("binary", None, b"{not json", None),
                     lambda: plane.cloudevents({"content-type": "text/plain"}, b"x")):
            try:
                await call()
            except RequestError as exc:
                errors.append(exc)
        return errors

    errors = run(plane, go)
    assert [type(e) for e in errors] == [NotFound, NotFound, BadRequest, BadRequest], errors
    assert [e.status for e in errors] == [404, 404, 400, 400]
    assert "unknown model 'nope'" in errors[0].message and "loaded:" in errors[1].message
    with pytest.raises(NotFound):
        plane.model_metadata("nope", None)
    assert plane.model_metadata("binary", None)["name"] == "binary"
    assert plane.model_ready("binary", None) is False  # not started: not ready


def test_cloudevents_batch_answers_each_event_and_stores_the_good_ones(models, tmp_path):
    db = tmp_path / "serve.db"
    plane = plane_for(models["binary"], serve={"sink": f"sqlite:///{db}?table=scores"})
    rng = np.random.default_rng(5)
    good = [dict(zip(FEATURES, rng.normal(size=8).tolist(), strict=True)) for _ in range(3)]
    items = [event(0, good[0]), event(1, b"{broken"), event(2, good[1]), event(3, good[2])]

    reply = run(plane, lambda: plane.cloudevents({"content-type": "application/cloudevents-batch+json"},
                                                 orjson.dumps(items)))
    answers = orjson.loads(reply.body)
    assert reply.status == 200 and len(answers) == 4
    assert [a["type"].endswith(".error") for a in answers] == [False, True, False, False]
    assert "error" in answers[1]["data"]
    booster = lgb.Booster(model_file=models["binary"])
    expected = booster.predict(np.array([[g[f] for f in FEATURES] for g in good]))
    got = [answers[i]["data"]["score"] for i in (0, 2, 3)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    with sqlite3.connect(db) as conn:
        stored = dict(conn.execute("SELECT id, score FROM scores").fetchall())
    assert sorted(stored) == ["k0", "k2", "k3"]
    np.testing.assert_allclose([stored[k] for k in ("k0", "k2", "k3")], expected, rtol=1e-12)


def test_single_bad_cloudevent_is_a_bad_request_so_knative_dead_letters_it(models):
    plane = plane_for(models["binary"])
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t",
               "content-type": "application/json"}

    async def go():
        with pytest.raises(BadRequest, match="JSON"):
            await plane.cloudevents(headers, b"[1, 2")
        return await plane.cloudevents(headers, orjson.dumps({"id": "a", **dict.fromkeys(FEATURES, 0.1)}))

    reply = run(plane, go)
    assert reply.headers["ce-type"] and orjson.loads(reply.body)["score"] > 0


# -- the batcher on its own -------------------------------------------------------------------------------------
class Counting:
    """A model stand-in that records each predict call's rows (the batcher only calls ``predict``); each test
    also checks the answers against the real model's predictions."""

    def __init__(self, model: Model):
        self.model, self.calls = model, []
        self.multiclass, self.num_class = model.multiclass, model.num_class

    def predict(self, matrix):
        self.calls.append(matrix.shape[0])
        return self.model.predict(matrix)


def batcher(max_rows: int, latency_s: float, **kw) -> Batcher:
    r = CollectorRegistry()
    return Batcher(max_rows, latency_s, Histogram("rows", "r", registry=r), Histogram("reqs", "r", registry=r), **kw)


@pytest.fixture(scope="module")
def binary(models) -> Model:
    return load_model(ModelSettings(path=models["binary"]))


def test_batcher_gathers_concurrent_requests_and_never_splits_one(binary):
    counting = Counting(binary)
    rng = np.random.default_rng(1)
    sizes = [3, 4, 5, 30, 2]  # 30 is over max_rows: scored alone, whole
    mats = [rng.normal(size=(n, 8)) for n in sizes]

    async def go():
        b = batcher(10, 0.05)
        b.task = asyncio.create_task(b.run())
        try:
            return await asyncio.gather(*(b.predict(m, counting) for m in mats))
        finally:
            b.task.cancel()

    preds = asyncio.run(go())
    for m, p in zip(mats, preds, strict=True):
        np.testing.assert_allclose(p, binary.predict(m), rtol=1e-12)
    assert sum(counting.calls) == sum(sizes) and 30 in counting.calls
    assert len(counting.calls) < len(sizes), counting.calls  # some requests shared a call
    assert all(c <= 10 or c == 30 for c in counting.calls), counting.calls


def test_batcher_keeps_models_apart_and_hands_a_failure_to_every_request_it_held(binary, models):
    other = Counting(load_model(ModelSettings(path=models["binary_v2"])))
    mine = Counting(binary)

    class Broken:
        multiclass, num_class = False, 1

        def predict(self, matrix):
            raise RuntimeError("model exploded")

    m = np.ones((2, 8))

    async def go():
        b = batcher(100, 0.05)
        b.task = asyncio.create_task(b.run())
        try:
            ok = await asyncio.gather(b.predict(m, mine), b.predict(m, other), b.predict(m, mine))
            failed = await asyncio.gather(b.predict(m, Broken()), b.predict(m, Broken()), return_exceptions=True)
            return ok, failed
        finally:
            b.task.cancel()

    (a, o, c), failed = asyncio.run(go())
    np.testing.assert_allclose(a, binary.predict(m))
    np.testing.assert_allclose(c, binary.predict(m))
    np.testing.assert_allclose(o, other.model.predict(m))
    assert not np.allclose(a, o)  # the two versions really differ, so a mix-up would show
    assert all(n == 2 for n in other.calls)  # never batched with the other model's requests
    assert all(isinstance(f, RuntimeError) and "exploded" in str(f) for f in failed)


def test_batcher_answers_an_empty_request_without_calling_the_model(binary):
    counting = Counting(binary)

    async def go():
        b = batcher(10, 0.0)
        return await b.predict(np.empty((0, 8)), counting)

    assert asyncio.run(go()).shape == (0,) and counting.calls == []


def test_an_idle_batcher_predicts_at_once_and_waits_only_for_a_request_on_its_way(binary):
    counting = Counting(binary)
    a, b = np.ones((2, 8)), np.zeros((3, 8))

    async def go():
        bt = batcher(100, 5.0)  # would wait 5 s for company if it waited blindly
        bt.task = asyncio.create_task(bt.run())
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            alone = await bt.predict(a, counting)
            alone_s = loop.time() - started
            # A request on its way (its body being read): the batch waits for it, and both share one call.
            with bt.arrival() as on_its_way:
                first = asyncio.ensure_future(bt.predict(a, counting))
                await asyncio.sleep(0.05)
                assert not first.done()  # held for the request on its way
                second = await on_its_way.submit(b, counting)
            # One that fails before it is submitted (a 400) lets the waiting batch go.
            with bt.arrival():
                third = asyncio.ensure_future(bt.predict(a, counting))
                await asyncio.sleep(0.05)
            await asyncio.wait_for(third, 2.0)
            return alone, alone_s, await first, second
        finally:
            bt.task.cancel()

    alone, alone_s, first, second = asyncio.run(go())
    assert alone_s < 2.5, f"an idle batcher waited {alone_s:.2f} s"  # vs the 5 s it would wait blindly
    np.testing.assert_allclose(alone, binary.predict(a))
    np.testing.assert_allclose(first, binary.predict(a))
    np.testing.assert_allclose(second, binary.predict(b))
    assert counting.calls == [2, 5, 2], counting.calls


def test_a_batch_waiting_for_a_request_that_never_comes_goes_at_its_deadline(binary):
    counting = Counting(binary)
    a = np.ones((2, 8))

    async def go():
        bt = batcher(100, 0.2)
        bt.task = asyncio.create_task(bt.run())
        loop = asyncio.get_running_loop()
        try:
            with bt.arrival():  # on its way for longer than the batch may wait
                started = loop.time()
                pred = await asyncio.wait_for(bt.predict(a, counting), 5.0)
                waited = loop.time() - started
                late = await bt.predict(a, counting)  # the batcher is not stuck after a deadline
            return pred, waited, late
        finally:
            bt.task.cancel()

    pred, waited, late = asyncio.run(go())
    assert 0.19 <= waited < 4.0, waited  # held for company until the deadline, then predicted
    np.testing.assert_allclose(pred, binary.predict(a))
    np.testing.assert_allclose(late, binary.predict(a))
    assert counting.calls == [2, 2], counting.calls


class Threads(Counting):
    """Counting, and on which thread each call ran; ``delay`` seconds per call (a slow model)."""

    def __init__(self, model, delay: float = 0.0):
        super().__init__(model)
        self.delay, self.threads = delay, []

    def predict(self, matrix):
        import threading
        import time

        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        return super().predict(matrix)


def test_a_lone_short_request_is_predicted_on_the_loop_and_anything_else_on_the_predict_thread(binary):
    """A lone request whose model is known to be fast skips the hand-off to the predict thread (#19: ~0.1 ms of a
    1-row request's 0.5 ms); the first call (cost unknown), a slow model, a large request and requests with
    company go to the predict thread, so the loop stays free while they run. Answers are the same either way."""
    import threading

    fast, slow = Threads(binary), Threads(binary, delay=0.2)  # 0.2 s a call: over inline_s for any size
    one, big = np.ones((1, 8)), np.random.default_rng(3).normal(size=(20_000, 8))

    async def go():
        # 50 ms (the product's is 0.5 ms) so that a busy test machine still counts a 1-row call as short
        bt = batcher(100_000, 0.05, inline_s=0.05)
        bt.task = asyncio.create_task(bt.run())
        loop_thread = threading.current_thread().name
        try:
            got = [await bt.predict(one, fast) for _ in range(3)]  # first on the predict thread, then measured
            await bt.predict(big, fast)  # 20,000 rows: longer than INLINE_S at the measured cost per row
            got.append(await bt.predict(one, fast))
            pair = await asyncio.gather(bt.predict(one, fast), bt.predict(one * 2, fast))  # with company
            for _ in range(2):
                await bt.predict(one, slow)
            return loop_thread, got, pair
        finally:
            bt.task.cancel()

    loop_thread, got, pair = asyncio.run(go())
    assert fast.threads[0] != loop_thread and fast.threads[1:3] == [loop_thread, loop_thread], fast.threads
    assert fast.threads[3] != loop_thread, "a 20,000-row request ran on the loop"
    assert fast.threads[4] == loop_thread and fast.threads[5] != loop_thread, fast.threads  # alone; with company
    assert fast.calls[5] == 2  # the pair shared one call, on the predict thread
    assert all(t != loop_thread for t in slow.threads), slow.threads
    for p in got:
        np.testing.assert_allclose(p, binary.predict(one), rtol=0)
    np.testing.assert_allclose(pair[1], binary.predict(one * 2), rtol=0)


def test_a_row_that_costs_more_than_those_measured_blocks_the_loop_at_most_once_and_briefly(binary):
    """Break-it review: a model whose rows cost 4 us or 1.4 ms by their values (a tree walked to its deepest leaf)
    had a lone 60-row request predicted on the loop for 91 ms, its cost guessed from cheap rows. Now only
    requests of at most INLINE_ROWS rows go there, and the cost per row is the highest seen, decaying a call:
    after one slow call the next ones go to the predict thread until the cost has come down again."""
    from workers.runtime.serve import batcher as bm

    bt = batcher(100, 0.05)
    item = (np.ones((1, 8)), None, binary, None)
    assert not bt._lone([item], 1, binary)  # cost unknown: the predict thread
    bt._measured(binary, 4e-6 * 256, 256)  # cheap rows
    assert bt._lone([item], 1, binary) and bt._lone([item], bm.INLINE_ROWS, binary)
    assert not bt._lone([item], bm.INLINE_ROWS + 1, binary)  # 60 deep rows can never run on the loop
    assert not bt._lone([item, item], 2, binary)  # with company
    bt._measured(binary, 1.4e-3 * 4, 4)  # one slow call (4 deep rows, on the loop: 5.6 ms once)
    assert not bt._lone([item], 1, binary)
    calls = 0
    while not bt._lone([item], 1, binary):  # cheap calls again: the remembered cost comes down by COST_DECAY each
        bt._measured(binary, 4e-6, 1)
        calls += 1
    assert 5 <= calls <= 40, calls
    assert bt._cost(binary) <= bm.INLINE_S and bt._cost(binary) > 4e-6


def test_a_large_request_after_cheap_ones_runs_on_the_predict_thread(binary):
    slow_rows = Threads(binary)
    cheap, large = np.ones((1, 8)), np.ones((60, 8))

    async def go():
        import threading

        bt = batcher(1000, 0.05, inline_s=10.0)  # any expected time counts as short here: only the row cap decides
        bt.task = asyncio.create_task(bt.run())
        try:
            for _ in range(3):
                await bt.predict(cheap, slow_rows)
            await bt.predict(large, slow_rows)
            return threading.current_thread().name
        finally:
            bt.task.cancel()

    loop_thread = asyncio.run(go())
    assert slow_rows.threads[1:3] == [loop_thread, loop_thread] and slow_rows.threads[3] != loop_thread

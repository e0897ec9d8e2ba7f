"""Fuzzing the input decoders: never an unhandled exception; always a result or a reason."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.decode import cloudevents as ce
from workers.decode import oip
from workers.decode.records import RecordDecoder
from workers.errors import BadRequest
from workers.scoring.model import load_model
from workers.settings import ModelSettings

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=20)
feature_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.lists(
    st.integers(), max_size=2)
records = st.fixed_dictionaries(
    {}, optional={"id": st.none() | st.text(max_size=30) | st.integers() | st.floats(),
                  **{f"x{j}": feature_values for j in range(8)}})


@pytest.fixture(scope="module")
def model(models):
    return load_model(ModelSettings(path=models["categorical"]))


def _check_decoded(decoder, values):
    out = decoder.decode(values, [None] * len(values))
    assert out.features.matrix.shape == (len(values), len(decoder.names))
    for i in range(len(values)):
        if i in out.features.reasons:
            assert out.features.reasons[i]
        else:
            assert isinstance(out.ids[i], str) and out.ids[i]
            row = out.features.matrix[i]
            assert not np.isinf(row).any()


def test_record_decoder_on_arbitrary_bytes_json_and_records(model):
    decoder = RecordDecoder(model)

    @FUZZ
    # stdlib json writes what orjson refuses (NaN, Infinity, integers beyond 64 bits): good poison.
    @given(st.lists(st.binary(max_size=200) | json_values.map(orjson.dumps) | records.map(
        lambda r: json.dumps(r).encode()), min_size=1, max_size=8))
    def run(values):
        _check_decoded(decoder, values)

    run()


def test_oip_parser_raises_only_bad_request(model):
    tensor = st.fixed_dictionaries({"name": st.text(max_size=5) | st.sampled_from(["x", "x0", "color"]),
                                    "shape": st.lists(st.integers(-1, 4), max_size=3),
                                    "datatype": st.sampled_from(["FP64", "FP32", "INT64", "BYTES", "BOOL", "X"]),
                                    "data": json_values})
    bodies = st.binary(max_size=100) | json_values.map(orjson.dumps) | st.fixed_dictionaries(
        {"inputs": st.lists(tensor, max_size=3)}).map(orjson.dumps)

    @FUZZ
    @given(bodies, st.none() | st.integers(-5, 200))
    def run(body, header_length):
        try:
            req = oip.parse(body, header_length, model)
        except BadRequest as exc:
            assert str(exc)
            return
        assert req.matrix.ndim == 2 and req.matrix.shape[1] == len(model.feature_names)

    run()


def test_cloudevents_parser_raises_only_bad_request():
    header_names = st.sampled_from(["content-type", "ce-specversion", "ce-id", "ce-type", "ce-source", "ce-key", "x"])
    ctype = st.sampled_from(["application/json", ce.STRUCTURED, ce.BATCH, "text/plain", ""])

    @FUZZ
    @given(st.dictionaries(header_names, st.text(max_size=10), max_size=6), ctype,
           st.binary(max_size=100) | json_values.map(orjson.dumps))
    def run(headers, content_type, body):
        headers = {**headers, "content-type": content_type}
        try:
            events, _ = ce.parse(headers, body)
        except BadRequest as exc:
            assert str(exc)
            return
        for event in events:
            assert event.attributes["id"] and event.attributes["source"]

    run()


def test_http_app_never_answers_5xx_to_user_input(models):
    from starlette.testclient import TestClient

    from workers.runtime.serve.app import App
    from workers.settings import load_settings

    app = App(load_settings({"model": {"path": models["binary"]}}))
    paths = st.sampled_from(["/", "/v2/models/binary/infer", "/v2/models/nope/infer", "/v2/models/binary"])
    headers = st.dictionaries(st.sampled_from(["content-type", "ce-specversion", "ce-id", "ce-type", "ce-source",
                                               "inference-header-content-length"]),
                              st.text(alphabet="abc01/.+-", max_size=12), max_size=5)
    with TestClient(app.asgi()) as client:
        @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
        @given(paths, headers, st.binary(max_size=120) | json_values.map(orjson.dumps))
        def run(path, hdrs, body):
            resp = client.post(path, content=body, headers=hdrs)
            assert resp.status_code < 500, (path, hdrs, body, resp.text)
            if resp.status_code >= 400:
                assert resp.json()["error"]

        run()

"""The stream record decoder: every kind of bad record gets a reason, good ones match the scorer."""

import numpy as np
import orjson

from workers.decode.records import RecordDecoder
from workers.scoring.model import load_model
from workers.settings import ModelSettings


def decoder(models, kind="binary", **kw):
    return RecordDecoder(load_model(ModelSettings(path=models[kind])), **kw)


def good(i, **extra):
    return orjson.dumps({"id": f"r{i}", **{f"x{j}": j * 0.5 + i for j in range(8)}, **extra})


def test_good_records_become_a_matrix_in_model_order(models):
    out = decoder(models).decode([good(1), good(2, other="ignored"), orjson.dumps({"id": 3, "x0": None})])
    assert out.ids == ["r1", "r2", "3"]
    assert not out.features.reasons
    assert out.features.matrix.shape == (3, 8)
    assert out.features.matrix[0].tolist() == [j * 0.5 + 1 for j in range(8)]
    assert np.isnan(out.features.matrix[2]).all()


def test_each_kind_of_bad_record_gets_its_reason(models):
    values = [
        b"\xff\xfe not utf-8",
        b"{not json",
        b"[1, 2]",
        b'"just a string"',
        orjson.dumps({"x0": 1.0}),
        orjson.dumps({"id": None}),
        orjson.dumps({"id": {"a": 1}}),
        orjson.dumps({"id": "a", "x3": "1.5"}),
        orjson.dumps({"id": "b", "x3": True}),
        orjson.dumps({"id": "c", "x3": [1]}),
        b'{"id": "d", "x0": NaN}',
        b'{"id": "e", "x0": Infinity}',
        None,
        orjson.dumps({"id": ""}),
        orjson.dumps({"id": "x" * 2000}),
        good(9),
    ]
    out = decoder(models).decode(values)
    r = out.features.reasons
    assert sorted(r) == list(range(15)), r
    assert r[0].startswith("not valid JSON") and r[1].startswith("not valid JSON")
    assert r[2] == "JSON list where an object was expected" and r[3] == "JSON str where an object was expected"
    assert r[4] == r[5] == "missing id field 'id'"
    assert "must be a string or integer" in r[6]
    assert r[7] == "feature 'x3': expected a number, got str \"1.5\""
    assert r[8] == "feature 'x3': expected a number, got bool true"
    assert "got list" in r[9]
    assert r[10].startswith("not valid JSON") and r[11].startswith("not valid JSON")
    assert r[12] == "empty value (tombstone)"
    assert "1 to 1024 characters" in r[13] and "1 to 1024 characters" in r[14]
    assert out.ids[15] == "r9"


def test_key_as_id_and_custom_id_field(models):
    d = decoder(models, id_field="user", key_as_id=True)
    out = d.decode([orjson.dumps({"x0": 1}), orjson.dumps({"user": "u7"})], keys=[b"k1", b"k2"])
    assert out.ids == ["k1", "u7"] and not out.features.reasons


def test_categorical_records_map_through_the_model_categories(models):
    import lightgbm as lgb

    d = decoder(models, "categorical")
    objs = [{"id": "a", **{f"x{j}": 0.1 for j in range(8)}, "color": "green", "size": 10},
            {"id": "b", **{f"x{j}": 0.1 for j in range(8)}, "color": "purple", "size": None}]
    out = d.decode([orjson.dumps(o) for o in objs])
    assert not out.features.reasons
    booster = lgb.Booster(model_file=models["categorical"])
    import pandas as pd

    df = pd.DataFrame(objs)
    df["color"] = pd.Categorical(df["color"].where(df["color"] != "purple"), categories=["red", "green", "blue"])
    df["size"] = pd.Categorical(df["size"], categories=[1, 5, 10])
    expected = booster.predict(df[booster.feature_name()])
    got = booster.predict(out.features.matrix)
    assert np.max(np.abs(got - expected)) <= 1e-12


def test_category_values_spelled_as_the_other_kind_map_like_the_arrow_path(models):
    """Issue #14 case 7 (stream side): every mode maps a value through the category list the same way. An
    integer category sent as text ("5") or as a float (5.0) is the category 5 in the Arrow path (batch, serve)
    and in the JSON decoder (stream); before, the decoder treated "5" as an unseen category (missing)."""
    import pyarrow as pa

    from workers.scoring.features import feature_matrix

    model = load_model(ModelSettings(path=models["categorical"]))
    sizes = ["5", 5.0, "10.0", 1, "abc", None, 7]
    objs = [{"id": f"r{i}", **{f"x{j}": 0.1 for j in range(8)}, "color": "green", "size": s}
            for i, s in enumerate(sizes)]
    out = RecordDecoder(model).decode([orjson.dumps(o) for o in objs])
    assert not out.features.reasons
    size = model.feature_names.index("size")
    assert out.features.matrix[:, size].tolist()[:4] == [1.0, 1.0, 2.0, 0.0]
    assert np.isnan(out.features.matrix[4:, size]).all()  # not a category the model has seen: missing
    for spelled in ([None if s is None else str(s) for s in sizes], [5, 5, 10, 1, None, None, 7]):
        columns = {**{f"x{j}": pa.array([0.1] * 7) for j in range(8)}, "color": pa.array(["green"] * 7),
                   "size": pa.array(spelled)}
        arrow = feature_matrix(model, columns).matrix
        assert np.array_equal(arrow, out.features.matrix, equal_nan=True), spelled


def test_schema_check_calls_an_error_exactly_what_the_decoder_dead_letters(models):
    """``schema --check`` must predict the decoder: a JSON type it reports as an error is dead-lettered, and
    one it accepts is scored (before, a float or a numeric text for an integer category was called an error, and
    "5" an unknown category, though the decoder maps both)."""
    from workers.tools.schema import check_producer

    model = load_model(ModelSettings(path=models["categorical"]))
    samples = {"number": 5.0, "integer": 5, "string": "5", "boolean": True, "array": [5], "object": {"a": 5}}
    for feature in ("x3", "color", "size"):
        for json_type, value in samples.items():
            record = {"id": "a", **{f"x{j}": 0.1 for j in range(8)}, "color": "red", "size": 1, feature: value}
            rejected = bool(RecordDecoder(model).decode([orjson.dumps(record)]).features.reasons)
            schema = {"properties": {"id": {"type": "string"}, feature: {"type": json_type}}, "required": ["id"]}
            errors, _ = check_producer(schema, model)
            assert bool(errors) == rejected, (feature, json_type, errors)
    _, warnings = check_producer({"properties": {"id": {}, "size": {"enum": ["5", 10.0, 7]}}}, model)
    assert [w for w in warnings if "unknown" in w] == ["feature 'size': categories [7] are unknown to the model "
                                                       "(missing)"]


def test_passthrough_values_of_any_json_shape_become_an_array_never_an_exception():
    """Issue #14 case 13 (the decoder's part): a passthrough integer >= 2**63 raised OverflowError out of
    ``passthrough_array`` (stream crash-looped, serve answered 500). Any JSON values give an array."""
    import pyarrow as pa
    from hypothesis import given, settings
    from hypothesis import strategies as st

    assert RecordDecoder.passthrough_array([1, 2**63, None]).to_pylist() == [1, 2**63, None]
    assert RecordDecoder.passthrough_array([-1, 2**63]).to_pylist() == ["-1", str(2**63)]
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=8)

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.lists(json_values, min_size=1, max_size=6))
    def never_raises(values):
        out = RecordDecoder.passthrough_array(values)
        assert isinstance(out, pa.Array) and len(out) == len(values)
        assert [v is None for v in out.to_pylist()] == [v is None for v in values]

    never_raises()


def test_passthrough_integers_beyond_64_bits_are_decoded_exactly_and_mixed_values_marked_as_json(models):
    """Review 1 defects 6, 7 (decoder part): orjson reads 18446744073709551621 as a float; the decoder keeps it
    exact, and a passthrough column of mixed JSON types is JSON text marked as such (``arrow.json``), so the
    sinks store the values, not strings of JSON text."""
    import pyarrow as pa

    model = load_model(ModelSettings(path=models["binary"]))
    decoder = RecordDecoder(model, passthrough=["p", "q"])
    feats = {name: 0.5 for name in model.feature_names}
    records = [orjson.dumps({"id": "a", **feats}).replace(b"}", b', "p": 18446744073709551621, "q": 1}'),
               orjson.dumps({"id": "b", **feats}).replace(b"}", b', "p": -9223372036854775809, "q": "x"}'),
               orjson.dumps({"id": "c", **feats, "p": None, "q": {"k": [1, 2]}})]
    decoded = decoder.decode(records)
    assert decoded.passthrough["p"] == [18446744073709551621, -9223372036854775809, None]
    assert not decoded.features.reasons
    p = RecordDecoder.passthrough_array(decoded.passthrough["p"])
    q = RecordDecoder.passthrough_array(decoded.passthrough["q"])
    assert p.type == pa.json_() and p.to_pylist() == ["18446744073709551621", "-9223372036854775809", None]
    assert q.type == pa.json_() and q.to_pylist() == ["1", '"x"', '{"k":[1,2]}']


def test_a_feature_holding_an_integer_beyond_64_bits_gets_a_reason_not_an_exception(models):
    """Found by the fuzz suite: the reason quoted the value with orjson, which cannot write such integers."""
    out = decoder(models).decode([b'{"id":" ","x0":[-9223372036854775809]}'])
    assert out.features.reasons[0].startswith("feature 'x0': expected a number, got list [-9223372036854775809]")

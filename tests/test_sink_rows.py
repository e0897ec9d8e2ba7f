"""Differential tests of the column-wise sink row builders (issue #19 part 2) against the per-row builders they
replaced, kept here as the trusted reference: Kafka JSON messages (``kafka.result_messages``), the rows of the
registry format jsonschema and the Redis sink (``rowjson.json_rows``), the PostgreSQL COPY text
(``PgTables.render``) and the column-wise UTC timestamp text (``utctext``), on random result tables holding every
Arrow type a passthrough can carry, nulls anywhere."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.scoring.scorer import Scored, to_json
from workers.sinks.kafka import _key, result_messages
from workers.sinks.pgtables import PgTables
from workers.sinks.pgtypes import csv_column, exact_columns, pg_type
from workers.sinks.regformat import columns
from workers.sinks.rowjson import _fragment, _value_json, json_rows, json_value_default, plain_columns
from workers.sinks.tables import RESULT_KEY, is_json, json_column, missing_keys, plain
from workers.sinks.utctext import fast_utc_text, utc_text

# -- the reference builders (the code before the column-wise rewrite) ----------------------------------------


def old_json_ready(col: pa.ChunkedArray) -> list:
    if is_json(col.type):
        return [None if v is None else orjson.Fragment(v) for v in plain(col).to_pylist()]
    if pa.types.is_timestamp(col.type) and col.type.tz in (None, "UTC", "+00:00"):
        encoded = pc.dictionary_encode(col.combine_chunks())
        fmt = "%Y-%m-%dT%H:%M:%S" + ("Z" if col.type.tz else "")
        texts = pc.strftime(encoded.dictionary, format=fmt).to_pylist()
        return [None if i is None else texts[i] for i in encoded.indices.to_pylist()]
    return col.to_pylist()


def old_result_messages(scored: Scored) -> list[tuple[bytes | None, bytes]]:
    """One dict per row, one orjson.dumps per row."""
    table = scored.results
    names = table.column_names
    cols = [old_json_ready(table.column(name)) for name in names]
    keys = [_key(i) for i in cols[names.index("id")]]
    return [(key, orjson.dumps(dict(zip(names, row, strict=True)), default=json_value_default))
            for key, row in zip(keys, zip(*cols, strict=True), strict=True)]


def old_json_rows(table: pa.Table, fragments: tuple[str, ...] = ()) -> list[bytes]:
    """Per row: a mapping of each column's value (timestamps as strftime text, fragments as JSON) dumped."""
    out = []
    names = table.column_names
    cols = []
    for name in names:
        col = table.column(name)
        if name in fragments or is_json(col.type):
            cols.append([None if v is None else orjson.Fragment(_fragment(v)) for v in plain(col).to_pylist()])
        else:
            cols.append(old_json_ready(plain(col)))
    for row in zip(*cols, strict=True):
        out.append(b"{" + b",".join(orjson.dumps(n) + b":" + (b"null" if v is None else _value_json(v))
                                    for n, v in zip(names, row, strict=True)) + b"}")
    return out


def old_render(table: pa.Table, types: dict[str, str], key: tuple[str, ...]) -> tuple[bytes, dict[int, str]]:
    """``PgTables.render`` with the timestamp branch as it was: the zoned column handed to Arrow's CSV writer."""
    bad = missing_keys(table, key)
    cols = []
    for name in table.column_names:
        col = table.column(name)
        if types[name] == "timestamp with time zone" and pa.types.is_timestamp(col.type) \
                and col.type.tz in (None, "UTC", "+00:00"):
            p = plain(col)
            cols.append(pc.assume_timezone(p, "UTC") if p.type.tz is None else p)
            continue
        c, rows = csv_column(name, col, types[name])
        cols.append(c)
        for i, reason in rows.items():
            bad.setdefault(i, reason)
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(cols, names=table.column_names), buf, pacsv.WriteOptions(include_header=False))
    return buf.getvalue(), bad


# -- random result tables -----------------------------------------------------------------------------------

_PER_S = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
FIRST, LAST = -62135596800, 253402300799  # 0001-01-01 and 9999-12-31T23:59:59, seconds since the epoch
text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8) | st.sampled_from(
    ['"', "\\", '","', "\x00", "\x01\x1f\n\r\t", "é漢字🙂", "%s", "%", "null", ",", "2026-01-02 03:04:05Z"])


def utc_instants(unit: str, wide: bool = True) -> st.SearchStrategy[int]:
    """Counts of ``unit`` since the epoch: anywhere (years outside 1..9999 too, for the fallback) and at edges."""
    per = _PER_S[unit]
    if unit == "ns":
        return st.integers(-(2**63) + 1, 2**63 - 1) | st.sampled_from([0, -1, 1, 10**18])
    edges = [FIRST * per, FIRST * per - 1, LAST * per + per - 1, (LAST + 1) * per, 0, -1]
    span = 10**11 * per if wide else 10**10 * per
    return st.integers(-span, span) | st.sampled_from(edges)


def nulls_or(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | values


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | text, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)


@st.composite
def column(draw, n: int) -> pa.Array:  # noqa: C901 - one case per Arrow type
    kind = draw(st.sampled_from([
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64", "bool",
        "string", "large_string", "ts_utc", "ts_naive", "ts_plus0", "ts_paris", "date32", "decimal", "list_int",
        "list_float", "struct", "struct_nested", "struct_ts", "binary", "map", "json", "null"]))

    def values(strategy):
        return draw(st.lists(nulls_or(strategy), min_size=n, max_size=n))

    if kind.startswith(("int", "uint")):
        t = getattr(pa, kind)()
        bits = t.bit_width
        lo, hi = (0, 2**bits - 1) if kind.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return pa.array(values(st.integers(lo, hi) | st.sampled_from([lo, hi])), t)
    if kind.startswith("float"):
        width = 32 if kind == "float32" else 64
        return pa.array(values(st.floats(width=width) | st.sampled_from([float("nan"), float("inf"), -0.0])),
                        getattr(pa, kind)())
    if kind == "bool":
        return pa.array(values(st.booleans()), pa.bool_())
    if kind in ("string", "large_string"):
        return pa.array(values(text), getattr(pa, kind)())
    if kind.startswith("ts_"):
        unit = draw(st.sampled_from(["s", "ms", "us", "ns"]))
        tz = {"ts_utc": "UTC", "ts_naive": None, "ts_plus0": "+00:00", "ts_paris": "Europe/Paris"}[kind]
        if tz == "Europe/Paris":  # to_pylist (the per-value path both builders take) holds years 1..9999 only
            per = _PER_S[unit]
            strategy = st.integers(-(2**31) * per if unit != "ns" else -(2**62), 2**33 * per if unit != "ns"
                                   else 2**62)
        else:
            strategy = utc_instants(unit)
        return pa.array(values(strategy), pa.timestamp(unit, tz=tz))
    if kind == "date32":
        return pa.array(values(st.dates()), pa.date32())
    if kind == "decimal":
        return pa.array(values(st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False,
                                           allow_infinity=False)), pa.decimal128(10, 3))
    if kind == "list_int":
        return pa.array(values(st.lists(nulls_or(st.integers(-(2**63), 2**63 - 1)), max_size=3)),
                        pa.list_(pa.int64()))
    if kind == "list_float":
        return pa.array(values(st.lists(nulls_or(st.floats()), max_size=3)), pa.list_(pa.float64()))
    if kind == "struct":
        fields = st.fixed_dictionaries({"a": nulls_or(st.integers(-(2**63), 2**63 - 1)), "b": nulls_or(text)})
        return pa.array(values(fields), pa.struct([("a", pa.int64()), ("b", pa.string())]))
    if kind == "struct_nested":  # numbers, booleans, text and a struct of them: built field column by field column
        inner = st.fixed_dictionaries({"f": nulls_or(st.floats(width=32)), "ok": nulls_or(st.booleans())})
        fields = st.fixed_dictionaries({'k"%s': nulls_or(st.floats()), "u": nulls_or(st.integers(0, 2**64 - 1)),
                                        "in": nulls_or(inner)})
        return pa.array(values(fields), pa.struct([('k"%s', pa.float64()), ("u", pa.uint64()), ("in", pa.struct(
            [("f", pa.float32()), ("ok", pa.bool_())]))]))
    if kind == "struct_ts":  # a timestamp inside: the per-value mapping spells it (not the column-wise text)
        fields = st.fixed_dictionaries({"at": nulls_or(st.integers(FIRST * 10**6, LAST * 10**6)),
                                        "d": nulls_or(st.dates())})
        return pa.array(values(fields), pa.struct([("at", pa.timestamp("us", tz="UTC")), ("d", pa.date32())]))
    if kind == "binary":
        return pa.array(values(st.binary(max_size=6)), pa.binary())
    if kind == "map":
        return pa.array(values(st.lists(st.tuples(text, nulls_or(st.integers(-5, 5))), max_size=2)),
                        pa.map_(pa.string(), pa.int64()))
    if kind == "json":
        return json_column([None if v is None else to_json(v) for v in values(json_values)])
    return pa.nulls(n)


@st.composite
def results(draw) -> pa.Table:
    """A results table: id and model_version (the keys; an id may be null), scored_at, then random columns."""
    n = draw(st.integers(0, 12))
    cols = {
        "id": pa.array(draw(st.lists(nulls_or(text), min_size=n, max_size=n)), pa.string()),
        "score": pa.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)), pa.float64()),
        "model_version": pa.array(["m1"] * n, pa.string()),
        "scored_at": pa.array([draw(utc_instants("us", wide=False))] * n, pa.timestamp("us", tz="UTC")),
    }
    for i in range(draw(st.integers(0, 6))):
        cols[f"p{i}"] = draw(column(n))
    if n > 1 and draw(st.booleans()):  # a table of several chunks (results of shadow versions, concatenated)
        cut = draw(st.integers(1, n - 1))
        return pa.table({k: pa.chunked_array([c[:cut], c[cut:]], c.type) for k, c in cols.items()})
    return pa.table(cols)


SETTINGS = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _raises_or(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - the reference failing is a case of its own
        return exc


# -- tests ----------------------------------------------------------------------------------------------------


@SETTINGS
@given(results())
def test_kafka_json_messages_are_the_bytes_of_one_mapping_per_row(table):
    """``result_messages`` (column-wise) gives the keys and values the per-row dict + orjson.dumps gave."""
    scored = plain_columns(Scored(table, pa.table({})))
    old = _raises_or(old_result_messages, scored)
    new = result_messages(scored)
    if isinstance(old, Exception):
        # The reference could fail where the new builder does not (JSON text that is not JSON): every value
        # made is then valid JSON
        assert all(orjson.loads(v) is not None for _, v in new)
        return
    assert new == old


@SETTINGS
@given(results(), st.data())
def test_json_rows_are_the_per_row_reference(table, data):
    """The Redis rows and the jsonschema payloads (``json_rows``, fragments: text columns holding JSON)."""
    texts = [n for n in table.column_names if pa.types.is_string(table.column(n).type)]
    fragments = tuple(data.draw(st.lists(st.sampled_from(texts), unique=True)) if texts else [])
    assert json_rows(table, fragments) == old_json_rows(table, fragments)


@SETTINGS
@given(results())
def test_jsonschema_rows_of_nested_values_are_their_json(table):
    """Registry format jsonschema: the "json" kind columns (structs, lists, decimals, dates, maps...) as
    fragments; each value is the JSON the per-value mapping gives (a decimal inside used to raise TypeError)."""
    fragments = tuple(n for n, k in columns(table.schema) if k == "json")
    rows = [orjson.loads(r) for r in json_rows(table, fragments)]
    plain_rows = [orjson.loads(r) for r in json_rows(table)]
    assert rows == plain_rows or all(
        n in fragments and is_json(table.column(n).type) for r, p in zip(rows, plain_rows, strict=True)
        for n in r if r[n] != p[n])


_QUOTED_UTC = re.compile(rb'"(-?\d{4,}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?(?:Z|\+0000))"')


def _unquote_utc(payload: bytes) -> bytes:
    """CSV text with quoted UTC timestamps unquoted (quoting is CSV syntax: COPY reads both alike)."""
    return _QUOTED_UTC.sub(rb"\1", payload)


@SETTINGS
@given(results())
def test_copy_text_is_the_reference_modulo_quotes_around_utc_timestamps(table):
    """``PgTables.render``: the same CSV as before, byte for byte, but that the UTC timestamps (now text) are
    quoted; the same rows rejected."""
    table = exact_columns(table)
    types = {f.name: pg_type(f.type, f.name) for f in table.schema}
    new, new_bad = PgTables(None, "t").render(table, types, RESULT_KEY)
    old, old_bad = old_render(table, types, RESULT_KEY)
    assert new_bad == old_bad
    assert _unquote_utc(new) == _unquote_utc(old)
    assert list(csv.reader(io.StringIO(new.decode()))) == list(csv.reader(io.StringIO(old.decode())))


@settings(max_examples=500, deadline=None, database=None)
@given(st.sampled_from(["s", "ms", "us", "ns"]).flatmap(
    lambda u: st.tuples(st.just(u), st.lists(nulls_or(utc_instants(u)), max_size=20))),
    st.sampled_from([None, "UTC", "+00:00"]), st.sampled_from(["T", " "]), st.sampled_from(["Z", "", "+00:00"]))
def test_utc_text_is_strftime(unit_values, tz, sep, zone):
    """Column-wise UTC text equals Arrow's strftime, for every unit, at the edges of years 1 and 9999 and
    beyond them (where the fast path steps aside)."""
    unit, values = unit_values
    col = pa.array(values, pa.timestamp(unit, tz=tz))
    want = pc.strftime(col, format=f"%Y-%m-%d{sep}%H:%M:%S{zone}")
    assert utc_text(col, sep, zone).to_pylist() == want.to_pylist()
    fast = fast_utc_text(pa.chunked_array([col[: len(col) // 2], col[len(col) // 2:]], col.type), sep, zone)
    counts = [v for v in values if v is not None]
    per = _PER_S[unit]
    if counts and (min(counts) < FIRST * per or max(counts) > LAST * per + per - 1):
        assert fast is None
    else:
        assert fast is not None and fast.to_pylist() == want.to_pylist()


def test_utc_text_of_known_instants():
    """The spelling itself, not only agreement with strftime: fixed fraction digits by unit, nulls kept."""
    stamp = dt.datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=dt.UTC)
    col = pa.array([stamp, None], pa.timestamp("ms", tz="UTC"))
    assert utc_text(col).to_pylist() == ["2026-01-02T03:04:05.120Z", None]
    assert utc_text(col.cast(pa.timestamp("us", tz="UTC")), " ", "").to_pylist() == ["2026-01-02 03:04:05.120000",
                                                                                      None]
    assert utc_text(pa.array([-62135596800], pa.timestamp("s"))).to_pylist() == ["0001-01-01T00:00:00Z"]
    with pytest.raises(TypeError):
        utc_text(pa.array([1], pa.timestamp("s", tz="Europe/Paris")))


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_copy_timestamps_read_back_as_the_same_instants_in_postgresql(pg_dsn, unit):
    """The real server reads the new COPY text (quoted, ``Z``) as the instants the old text gave, whatever the
    session time zone (the new text carries its zone)."""
    import psycopg

    per = _PER_S[unit]
    values = [0, -1, 1_700_000_000 * per + per // 7, FIRST * per, LAST * per, None]
    if unit == "ns":
        values = [0, -1000, 1_700_000_000_123_456_000, None]
    table = pa.table({"id": [str(i) for i in range(len(values))], "model_version": ["m"] * len(values),
                      "t": pa.array(values, pa.timestamp(unit, tz="UTC")),
                      "naive": pa.array(values, pa.timestamp(unit))})
    types = {"id": "text", "model_version": "text", "t": "timestamp with time zone",
             "naive": "timestamp with time zone"}
    new, _ = PgTables(None, "t").render(table, types, RESULT_KEY)
    old, _ = old_render(table, types, RESULT_KEY)
    assert new != old  # the new text really is another spelling (quoted), read back below
    read = []
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET TimeZone = 'America/New_York'")  # not UTC: the text must carry the zone itself
        for payload in (old, new):
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS sinkrows_ts (id text, model_version text, "
                         "t timestamptz, naive timestamptz)")
            conn.execute("TRUNCATE sinkrows_ts")
            with conn.cursor() as cur, cur.copy("COPY sinkrows_ts FROM STDIN (FORMAT csv)") as copy:
                copy.write(payload)
            read.append(conn.execute("SELECT id, extract(epoch FROM t), extract(epoch FROM naive), t::text "
                                     "FROM sinkrows_ts ORDER BY id").fetchall())
    assert read[0] == read[1]
    assert read[1][0][1] == 0 and read[1][0][2] == 0  # the epoch, though the session is not in UTC
    assert sum(r[1] is None for r in read[1]) == 1


def test_kafka_messages_of_a_scored_stream_batch_are_unchanged(models):
    """A real scored stream batch (passthrough of every JSON shape, the carry columns): the same messages."""
    import numpy as np

    from workers.decode.records import carry_columns
    from workers.scoring.model import load_model
    from workers.scoring.router import Router
    from workers.settings import ModelSettings, ScoringSettings

    model = load_model(ModelSettings(path=models["binary"]))
    router = Router.single(model, ScoringSettings(passthrough=["s", "big", "mixed", "nested"]))
    values = [orjson.dumps({"id": f"r{i}", "x0": i / 7, "x1": -i, "s": f'q"\\{i}é', "big": 2**63 + i,
                            "mixed": [1, "a", None][i % 3], "nested": {"k": [i, None], "d": 1.5}})
              for i in range(50)] + [b'{"id": "bad", "x0": "nope"}']
    routed, decoded = router.decode(values, [None] * len(values))
    n = len(values)
    carry = carry_columns(decoded.passthrough, ["in"] * n, [i % 3 for i in range(n)], list(range(n)),
                          np.array([1_700_000_000_000 + i if i % 5 else -1 for i in range(n)], dtype=np.int64))
    scored = plain_columns(router.finish(routed, carry))
    assert scored.results.num_rows == 50 and scored.num_errors == 1
    new = result_messages(scored)
    assert new == old_result_messages(scored)
    first = orjson.loads(new[1][1])
    assert first["timestamp"] == "2023-11-14T22:13:20.001Z" and first["big"] == 2**63 + 1


@settings(max_examples=400, deadline=None, database=None)
@given(st.sampled_from(["s", "ms", "us", "ns"]).flatmap(lambda u: st.tuples(st.just(u), st.lists(nulls_or(
    st.integers(-(2**62), 2**62) if u == "ns" else st.integers(-30610224000 * _PER_S[u], LAST * _PER_S[u])),
    max_size=12))), st.sampled_from([None, "UTC", "+00:00", "Europe/Paris", "America/St_Johns"]))
def test_registry_format_timestamps_are_the_per_value_text_of_the_same_instant(unit_values, tz):
    """Avro / Protobuf timestamp text (``regformat._values``) against the per-value ``datetime.strftime`` it
    replaced (years 1000..9999: the platform's strftime drops leading zeros before): UTC and zone-less columns
    give the same text; another zone's instants the text of that instant in UTC (the old text was the local
    wall-clock time with a ``Z``: another instant)."""
    from workers.sinks.regformat import _values

    unit, values = unit_values
    col = pa.chunked_array([pa.array(values, pa.timestamp(unit, tz=tz))])
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if tz else "%Y-%m-%dT%H:%M:%S.%f"
    stamps = col.cast(pa.timestamp(unit, tz="UTC")) if tz else col
    want = [None if v is None else v.strftime(fmt) for v in stamps.to_pylist()]
    assert _values(col, "time") == want


def test_registry_format_timestamp_of_another_zone_names_its_instant():
    from workers.sinks.regformat import _values

    paris = pa.chunked_array([pa.array([0], pa.timestamp("us", tz="Europe/Paris"))])
    assert _values(paris, "time") == ["1970-01-01T00:00:00.000000Z"]  # was 01:00:00Z, an hour off


def test_registry_format_timestamp_beyond_microseconds_raises_not_wraps():
    """A seconds timestamp beyond int64 microseconds: a data error (the store step dead-letters its row), never
    a wrapped, wrong instant."""
    from workers.sinks.regformat import _values

    with pytest.raises(pa.ArrowInvalid):
        _values(pa.chunked_array([pa.array([10**17], pa.timestamp("s", tz="UTC"))]), "time")
    assert _values(pa.chunked_array([pa.array([-1], pa.timestamp("ns"))]), "time") == ["1969-12-31T23:59:59.999999"]

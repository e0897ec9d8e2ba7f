"""Break-it review of the native Avro reader (workers/decode/_avrorows.cpp, 6bd9a7d): each test fails before a fix.

Every case compares ``AvroFormat.rows`` (the native reader and the Python path behind it) with the Python path
alone (``RecordDecoder.decode(values, keys, fmt.parse(values))``), as tests/test_avrorows.py's ``check`` does."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

from tests.test_avrorows import check, fmt_with, header, model, written  # noqa: F401 - the model fixture


def test_a_field_name_written_twice_takes_the_last_value_as_the_python_path_does(model):  # noqa: F811
    """fastavro (and the test registry) accept a record with two fields of one name; the Python path's object
    holds the last one. The native reader leaves the first value in the matrix when the last one is null (a
    null branch does not write NaN), so x0 = 1.5 is scored where the Python path scores x0 missing."""
    schema = {"type": "record", "name": "D", "fields": [
        {"name": "id", "type": "string"}, {"name": "x0", "type": "double"}, {"name": "x0", "type": "null"}]}
    union = {"type": "record", "name": "U", "fields": [
        {"name": "id", "type": "string"}, {"name": "x0", "type": "double"}, {"name": "x0", "type": ["null", "double"]}]}
    fmt = fmt_with({1: schema, 2: union})
    values = [header(1) + written(schema, {"id": "a", "x0": 1.5}),
              header(2) + b"\x02b" + struct.pack("<d", 1.5) + b"\x00"]  # the second x0 null
    check(model, fmt, values)  # the native reader now leaves such a schema to the Python path


def test_a_fixed_of_negative_size_does_not_crash_the_reader(models, tmp_path):
    """fastavro accepts {"type": "fixed", "size": -1000000000}; the Python path gives the record a reason
    (EOFError: Expected -1000000000 bytes). The native reader moved its pointer back by the size and read far
    before the value: a segfault (the stream worker died with -11 on the first batch, and again on restart)."""
    script = textwrap.dedent(f"""
        import json, struct
        from tests.test_avrorows import fmt_with, header
        from workers.decode.records import RecordDecoder
        from workers.scoring.model import load_model
        from workers.settings import ModelSettings
        model = load_model(ModelSettings(path={models["binary"]!r}))
        schema = {{"type": "record", "name": "R", "fields": [
            {{"name": "f", "type": {{"type": "fixed", "name": "F", "size": -1000000000}}}},
            {{"name": "id", "type": "string"}}, {{"name": "x0", "type": "double"}}]}}
        fmt = fmt_with({{1: schema}})
        values = [header(1) + b"\\x02a" + struct.pack("<d", 1.5)] * 3
        decoder = RecordDecoder(model)
        got = fmt.rows(decoder, values, None)
        want = decoder.decode(values, None, fmt.parse(values))
        print(json.dumps([got is None or got.features.reasons == want.features.reasons, got is None or got.ids == want.ids]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True, True]


def test_a_fixed_size_beyond_64_bits_in_one_schema_does_not_fail_every_batch(model):  # noqa: F811
    """A fixed of size 2**63 (or 1e30) compiles (fastavro, avrofast) and its records get a reason on the Python
    path. Its program does not fit the reader's int64 (load_program: OverflowError), and every program is loaded
    on every call: once such a schema is known, rows() raises for every batch, records of other schemas too (the
    stream worker dead-lettered every good record: "cannot be scored: OverflowError: int too big to convert")."""
    huge = {"type": "record", "name": "H", "fields": [
        {"name": "id", "type": "string"}, {"name": "f", "type": {"type": "fixed", "name": "F", "size": 2**63}}]}
    flat = {"type": "record", "name": "G", "fields": [{"name": "id", "type": "string"},
                                                      {"name": "x0", "type": "double"}]}
    fmt = fmt_with({1: huge, 2: flat})
    values = [header(2) + written(flat, {"id": "g", "x0": 1.0}), header(1) + b"\x02a"]
    check(model, fmt, values)
    check(model, fmt, values[:1])

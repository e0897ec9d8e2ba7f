"""Candidate regressions for the native JSON record reader (workers/decode/_jsonrows.cpp), found by breaking it:
each compares RecordDecoder.decode with the native reader against the same decoder on the Python path
(records._jsonrows = None), which the change promises to equal for every input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from workers.decode import records
from workers.decode.records import RecordDecoder
from workers.scoring.model import load_model
from workers.settings import ModelSettings

pytestmark = pytest.mark.skipif(records._jsonrows is None, reason="workers.decode._jsonrows is not built")


@pytest.fixture(scope="module")
def id_feature_model(tmp_path_factory):
    """A model one of whose features is the record's id field (a customer id used as a number)."""
    feats = ["cust_id", "amount"]
    rng = np.random.default_rng(0)
    df = pd.DataFrame({f: rng.normal(size=500) for f in feats})
    booster = lgb.train({"verbose": -1, "objective": "binary", "num_leaves": 4, "num_threads": 1},
                        lgb.Dataset(df, (df.amount > 0).astype(int)), 3)
    path = str(tmp_path_factory.mktemp("m") / "idfeat.txt")
    booster.save_model(path)
    return load_model(ModelSettings(path=path))


def both(model, values, keys=None, **kw):
    got = RecordDecoder(model, **kw).decode(values, keys)
    saved = records._jsonrows
    records._jsonrows = None
    try:
        want = RecordDecoder(model, **kw).decode(values, keys)
    finally:
        records._jsonrows = saved
    return got, want


def bits(m: np.ndarray) -> bytes:
    m = m.copy()
    m[np.isnan(m)] = np.nan
    return m.tobytes()


def test_an_id_field_that_is_also_a_feature_is_read_from_the_record_not_the_key(id_feature_model):
    """Python path: the id is the record's value ("17", or a reason for 1.5); the native reader took the
    message key as the id because the field matched a feature column first (parse_record never sets id_kind)."""
    values = [b'{"cust_id":17,"amount":0.5}', b'{"cust_id":1.5,"amount":0.5}', b'{"cust_id":null,"amount":1}',
              b'{"amount":1}']
    keys = [b"k0", b"k1", b"k2", b"k3"]
    got, want = both(id_feature_model, values, keys, id_field="cust_id", key_as_id=True)
    assert want.ids == ["17", None, "k2", "k3"]
    assert got.ids == want.ids
    assert got.features.reasons == want.features.reasons
    assert bits(got.features.matrix) == bits(want.features.matrix)


def test_an_id_field_that_utf8_cannot_encode_gives_the_python_reason_not_an_exception(id_feature_model):
    """--id-column from argv/env with undecodable bytes is a str with lone surrogates (surrogateescape): the
    Python path says "missing id field"; rows() raised UnicodeEncodeError (PyArg_ParseTuple "s#")."""
    values = [b'{"cust_id":1,"amount":1}']
    got, want = both(id_feature_model, values, id_field="\udcff")
    assert got.ids == want.ids and got.features.reasons == want.features.reasons


def test_a_values_list_changed_by_another_thread_during_the_parse_does_not_crash():
    """rows() keeps raw pointers into the bytes of the caller's list while the GIL is released; another
    thread replacing items frees them (garbage ids, then SIGSEGV). Run in a child process."""
    code = textwrap.dedent('''
        import threading, time, numpy as np
        from workers.decode import _jsonrows
        n = 200_000
        vals = [b'{"id":"r%d","x0":%d,"pad":"%s"}' % (i, i, b"p" * 200) for i in range(n)]
        stop = False
        def mutator():
            while not stop:
                for i in range(n):
                    vals[i] = b'{"id":"zz","x0":"%s"}' % (b"q" * 200)
                for i in range(n):
                    vals[i] = b'{"id":"r%d","x0":%d,"pad":"%s"}' % (i, i, b"p" * 200)
        th = threading.Thread(target=mutator); th.start()
        t = time.time()
        try:
            while time.time() - t < 5:
                out = np.full((n, 1), np.nan)
                ids, slow = _jsonrows.rows(vals, None, ("x0",), "id", 1024, out)
                for i in range(0, n, 997):
                    assert ids[i] is None or ids[i] == "r%d" % i, repr(ids[i])
        finally:
            stop = True; th.join()
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])

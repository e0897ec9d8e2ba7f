"""workers/decode/jsonparse.py: the batch JSON parse and the big-integer check equal the per-value path they
replace (the trusted one: orjson per value, a regex for 19 digits), over adversarial values."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.decode.jsonparse import long_number

_OLD_LONG = re.compile(rb"[0-9]{19}")  # the check as it was (records.py before the translate)


def old_long_number(value: bytes | str) -> bool:
    return _OLD_LONG.search(value.encode() if isinstance(value, str) else value) is not None


digit_runs = st.lists(st.one_of(st.text("0123456789", min_size=15, max_size=22), st.binary(max_size=4),
                                st.sampled_from(["", ",", ".", "-", "e", "\"", "1", "٣"])), max_size=12)


@settings(max_examples=400, deadline=None)
@given(digit_runs, st.booleans())
def test_long_number_is_the_regex(parts, as_text):
    value = b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    assert long_number(value) == old_long_number(value)
    assert long_number(bytearray(value)) == old_long_number(value)
    assert long_number(memoryview(value)) == old_long_number(value)
    if as_text:
        text = value.decode("utf-8", "replace")
        assert long_number(text) == old_long_number(text)


def test_long_number_edges():
    assert long_number(b"1234567890123456789")  # exactly 19
    assert not long_number(b"123456789012345678")  # 18
    assert not long_number(b"123456789.123456789")
    assert long_number('{"n": 18446744073709551621}')

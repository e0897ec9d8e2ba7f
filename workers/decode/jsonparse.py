"""JSON record values (bytes) -> parsed objects, a batch at a time, with the reason of each value that is not JSON.

Why a batch: one ``orjson.loads`` over all of a micro-batch's values costs less than one call per value, and the
check for integers beyond 64 bits (which orjson reads as inexact floats) runs over the joined text once. The
result must be exactly what parsing each value alone gives, so the joined text is built to make any value that
is not one complete JSON text on its own fail the whole parse or be caught, never shift or merge records:

    {"<nonce>0":V0,\n"<nonce>1":V1,\n ... }

- ``<nonce>`` is a secret of this process (24 random letters, ~137 bits, never shown anywhere): no value can
  name a key of the outer object. The parsed object must hold exactly the n keys ``<nonce>0``..``<nonce>n-1``;
  each then comes from its separator, which must have been read at the top level, so the text between two
  separators (one value) was read as exactly one whole JSON value. A value that opens or closes brackets or
  strings across its neighbours (``1],[2``, ``{"a":[{}`` + ``{}]}``, ``{"a":"}`` + ``{"}``) either breaks the parse
  or swallows a separator, whose key is then missing: the batch falls back to one parse per value.
- The separator holds a raw newline, which JSON forbids inside strings: it cannot be swallowed into one either.
- Empty or whitespace-only values make ``"<nonce>i":,`` (invalid); a BOM or bad UTF-8 fails the joined parse, as
  does any value orjson refuses; in every such case the per-value path gives each value its reason as before.

The integer check: 19 digits in a row (anywhere, strings included: a cheap over-approximation) mean the value may
hold an integer beyond 64 bits; only those values are parsed again with Python's json (exact integers).
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from itertools import chain
from typing import Any

import orjson

# digits -> "0", every other byte -> "." (the nonce and separators hold no run of 19 digits: they cannot add one)
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x2E for c in range(256))
_RUN = b"0" * 19
_NONCE = "".join(secrets.choice(string.ascii_letters) for _ in range(24))


def long_number(value: bytes | bytearray | memoryview | str) -> bool:
    """Whether ``value`` holds 19 digits in a row: maybe an integer beyond 64 bits, which orjson turns into a
    float (silently inexact). A translate and a substring search, not a regex (~10x cheaper on numeric JSON)."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, memoryview):
        value = value.tobytes()
    return _RUN in value.translate(_DIGITS)


def exact_loads(value: bytes) -> Any:
    """JSON (already valid for orjson) with integers of any size kept exact, as Python's json reads them;
    passthrough values are copied unchanged, so 18446744073709551621 must not become 1.8446744073709552e19."""
    return json.loads(value)


def parse_one(value: bytes | None) -> tuple[Any, str | None]:
    """One value: (object, None) or (None, the reason it cannot be read)."""
    if value is None:
        return None, "empty value (tombstone)"
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return None, f"not valid JSON: {str(exc)[:120]}"
    if long_number(value):
        obj = exact_loads(value)
    return obj, None


class BatchParser:
    """The separators and keys of the joined text, made once per batch size seen (they only grow)."""

    def __init__(self) -> None:
        self.seps: list[bytes] = []
        self.keys: list[str] = []

    def _grow(self, n: int) -> None:
        for i in range(len(self.keys), n):
            key = f"{_NONCE}{i}"
            self.keys.append(key)
            self.seps.append((b'{"' if i == 0 else b',\n"') + key.encode() + b'":')

    def parse(self, values: Sequence[bytes | None]) -> tuple[list[Any], dict[int, str]]:
        """Objects (None where a reason is) and reasons by index, exactly as ``parse_one`` per value gives."""
        n = len(values)
        present = values
        where: list[int] | None = None
        if None in values:  # tombstones: left out of the joined text
            where = [i for i, v in enumerate(values) if v is not None]
            present = [values[i] for i in where]
        got = self._joined(present)
        if got is None:
            objs: list[Any] = []
            reasons: dict[int, str] = {}
            for i, value in enumerate(values):
                obj, reason = parse_one(value)
                objs.append(obj)
                if reason is not None:
                    reasons[i] = reason
            return objs, reasons
        if where is None:
            return got, {}
        full: list[Any] = [None] * n
        for i, obj in zip(where, got, strict=True):
            full[i] = obj
        return full, {i: "empty value (tombstone)" for i in range(n) if values[i] is None}

    def _joined(self, values: Sequence[Any]) -> list[Any] | None:
        """Every value parsed by one orjson.loads, or None when that cannot prove each value whole and valid."""
        n = len(values)
        if n == 0:
            return []
        if n > len(self.keys):
            self._grow(n)
        try:
            text = b"".join(chain.from_iterable(zip(self.seps, values, strict=False))) + b"}"
            outer = orjson.loads(text)
            if type(outer) is not dict or len(outer) != n:
                return None
            objs = list(map(outer.__getitem__, self.keys[:n]))
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return None  # a value that is not JSON alone (or not bytes): one parse per value gives the reasons
        if _RUN in text.translate(_DIGITS):
            for i, value in enumerate(values):
                if long_number(value):
                    objs[i] = exact_loads(value)
        return objs

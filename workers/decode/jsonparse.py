"""JSON record values (bytes) -> parsed objects, a batch at a time, with the reason of each value that is not JSON.

Why a batch: one ``orjson.loads`` over all of a micro-batch's values costs less than one call per value, and the
check for integers beyond 64 bits (which orjson reads as inexact floats) runs over the joined text once. The
result must be exactly what parsing each value alone gives, so the joined text is built to make any value that
is not one complete JSON text on its own fail the whole parse or be caught, never shift or merge records:

    [V0,\n"<nonce>",V1,\n"<nonce>",V2, ... Vn-1]

- ``<nonce>`` is a secret of this process (24 random letters, ~137 bits, never shown anywhere): no value can
  hold it (nor write it with escapes), so every ``"<nonce>"`` element comes from a separator. The parsed array
  must have 2n-1 elements with the nonce at every odd position: then each separator's string was read as an
  element of the outer array, so the commas around it were the outer array's, and the text between two
  separators (one value) was read as exactly one whole JSON value. A value that opens or closes brackets or
  strings across its neighbours (``1],[2``, ``[{}`` + ``{}]``, ``{"a":"}`` + ``{"}``, ``{},{}``) either breaks
  the parse or moves a separator string off its place: the batch falls back to one parse per value.
- The separator holds a raw newline, which JSON forbids inside strings: it cannot be swallowed into one either.
- Empty or whitespace-only values make ``,,`` (invalid); a BOM or bad UTF-8 fails the joined parse, as does any
  value orjson refuses; in every such case the per-value path gives each value its reason as before.

The integer check: 19 digits in a row (anywhere, strings included: a cheap over-approximation) that do not follow
a decimal point mean the value may hold an integer beyond 64 bits; only those values are parsed again with
Python's json (exact integers). Digits after a '.' are a fraction (a float in either parser; in a string, text
either parser keeps exactly): small floats such as 0.0012345678901234567 would otherwise send ~8% of random
records through Python's json.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from typing import Any

import orjson

# digits -> "0", "." stays, every other byte -> " " (the nonce and separators hold no digit: they add no run)
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x2E if c == 0x2E else 0x20 for c in range(256))
_RUN = b"0" * 19
_START_RUN = b" " + _RUN  # a run after a byte that is neither a digit nor '.'
_NONCE = "".join(secrets.choice(string.ascii_letters) for _ in range(24))
_SEP = b',\n"' + _NONCE.encode() + b'",'


def _runs(translated: bytes) -> bool:
    """Whether ``translated`` (bytes through _DIGITS) has 19 digits in a row that do not follow a '.': a run at
    the start or after any other byte (a space once translated). One substring search: looking for the run
    alone and then at the byte before it degenerates on fraction runs of 16-18 digits (3.8 us/record)."""
    return translated.startswith(_RUN) or _START_RUN in translated


def long_number(value: bytes | bytearray | memoryview | str) -> bool:
    """Whether ``value`` may hold an integer beyond 64 bits, which orjson turns into a float (silently inexact):
    19 digits in a row, not after a decimal point. A translate and substring searches, not a regex (~10x
    cheaper on numeric JSON)."""
    if isinstance(value, str):
        value = value.encode()
    elif not isinstance(value, bytes):
        value = bytes(value)
    return _runs(value.translate(_DIGITS))


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


def parse_values(values: Sequence[bytes | None]) -> tuple[list[Any], dict[int, str]]:
    """Objects (None where a reason is) and reasons by index, exactly as ``parse_one`` per value gives: one
    orjson.loads for the batch (see the module's docstring), one per value when that proves nothing."""
    n = len(values)
    present = values
    where: list[int] | None = None
    if None in values:  # tombstones: left out of the joined text
        where = [i for i, v in enumerate(values) if v is not None]
        present = [values[i] for i in where]
    got = _joined(present)
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


def _joined(values: Sequence[Any]) -> list[Any] | None:
    """Every value parsed by one orjson.loads, or None when that cannot prove each value whole and valid."""
    n = len(values)
    if n == 0:
        return []
    try:
        text = b"[" + _SEP.join(values) + b"]"
        outer = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return None  # a value that is not JSON alone (or not bytes): one parse per value gives the reasons
    if len(outer) != 2 * n - 1 or outer[1::2].count(_NONCE) != n - 1:
        return None
    objs: list[Any] = outer[0::2]
    if _runs(text.translate(_DIGITS)):
        for i, value in enumerate(values):
            if long_number(value):
                objs[i] = exact_loads(value)
    return objs

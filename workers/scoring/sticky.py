"""Sticky weighted split: the same key always gets the same version while the weights are unchanged.

Weighted rendezvous hashing. For each key and each served version ``i`` with weight ``w_i > 0``:

    h   = first 8 bytes (little endian) of BLAKE2b(key as UTF-8, digest_size=8)
    s_i = first 8 bytes (little endian) of BLAKE2b(version name as UTF-8, digest_size=8)
    u_i = (splitmix64(h XOR s_i) >> 11 + 0.5) / 2**53          # uniform in (0, 1)
    version = argmin_i  -ln(u_i) / w_i

``-ln(u)/w`` is exponential with rate ``w``, so version ``i`` wins with probability ``w_i / sum(w)``. The
properties rollouts need follow: raising one version's weight (and lowering others) only moves keys
*to* that version; removing a version only moves its own keys; the order of versions in the file does not
matter. Everything is a fixed function of bytes, so every process and machine agrees (unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    return np.fromiter((_digest64(k) for k in keys), dtype=np.uint64, count=len(keys))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def assign(keys: Sequence[str], names: Sequence[str], weights: Sequence[float]) -> np.ndarray:
    """Index into ``names`` of the version each key goes to (weights > 0 somewhere)."""
    hashes = key_hashes(keys)
    best = np.full(len(keys), np.inf)
    choice = np.zeros(len(keys), dtype=np.int64)
    for i, (name, weight) in enumerate(zip(names, weights, strict=True)):
        if weight <= 0:
            continue
        mixed = _splitmix64(hashes ^ np.uint64(_digest64(name)))
        u = ((mixed >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
        score = -np.log(u) / weight
        better = score < best
        best[better] = score[better]
        choice[better] = i
    return choice

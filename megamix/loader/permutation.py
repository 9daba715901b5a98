"""Seeded pseudo-random bijections on ``[0, n)``, evaluated lazily and identical on every platform.

The loader needs one permutation per (domain, epoch) and one per global batch. Two properties
matter more than raw shuffle quality:

* **No materialisation on weight changes.** A permutation is a pure function ``pi(i)``; nothing is
  rebuilt when the mixture weights change. The whole permutation of a domain is only computed when
  the caller *chooses* to cache it (:class:`PermutationCache`), once per (domain, epoch).
* **Bit-identical everywhere.** The bijection is a keyed Feistel network on ``2m`` bits with a
  SplitMix64 round function, written with plain uint64 numpy arithmetic. Unlike
  ``np.random.Generator.permutation`` (whose stream NumPy does not promise to keep across releases)
  it does not depend on the NumPy version, so a checkpoint resumes to the same stream after an upgrade.

Domain sizes that are not a power of four are handled by *cycle walking*: the network permutes
``[0, 4^m)`` with ``4^m < 4n``, and values ``>= n`` are fed through again until they land in range
(at most 4 passes expected; the result is still a bijection on ``[0, n)``).

Why Feistel and not an affine map ``a*i+b mod n``: an affine map keeps arithmetic structure
(neighbouring indices stay a constant stride apart), which is a visible pattern in the data order.
A 6-round Feistel network with a strong round function is indistinguishable from a random
permutation for data-loading purposes, at O(1) memory for any ``n`` (also 10^12 windows).

How it is used: domains with at most ``cache_max_size`` samples (default 2^22) get their
permutation materialised once per epoch (int32, ~0.25 s for 4M samples) under a memory budget, so
a step is a slice; larger domains are evaluated lazily, all domains of a step in one vectorised
call (:func:`feistel_many`). Both paths give identical values. The per-step shuffle of the global
batch uses :func:`hash_order` (sorting a keyed hash), which is cheaper for a few thousand items.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)

#: Feistel rounds. Changing this changes every stream (it is recorded in state dicts).
ROUNDS = 6


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser on a Python int (mod 2^64)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """Hash a tuple of non-negative ints (seed, tag, domain, epoch, ...) into one 64-bit key."""
    h = 0x243F6A8885A308D3
    for p in parts:
        if p < 0:
            raise ValueError(f"key parts must be >= 0, got {p}")
        h = splitmix64(h ^ (int(p) & _M64))
        h = splitmix64(h ^ (int(p) >> 64))  # parts wider than 64 bits still matter
    return h


def _mix(z: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser (uint64 wraps silently for arrays)."""
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


def keyed_hash(values: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit hash (uint64) of each non-negative integer in ``values``; bit-identical everywhere."""
    x = np.asarray(values).astype(np.uint64) ^ np.uint64(key & _M64)
    return _mix(_mix(x) ^ np.uint64(splitmix64(key)))


def hash_order(n: int, key: int) -> np.ndarray:
    """A random order of ``range(n)``: argsort of a keyed 64-bit hash of each position.

    O(n log n) but with one vectorised pass, so much cheaper than Feistel for small ``n``
    (the per-step batch shuffle). Distinct positions collide with probability ~n^2/2^65, and a
    stable sort keeps even that case deterministic.
    """
    return np.argsort(keyed_hash(np.arange(n), key), kind="stable").astype(np.int64)


def _round_keys(keys: np.ndarray) -> list[np.ndarray]:
    """Per-round keys ``splitmix64(key ^ r*golden)`` for an array of 64-bit keys."""
    keys = np.asarray(keys, dtype=np.uint64)
    return [_mix((keys ^ np.uint64(r * _GOLDEN & _M64)) + np.uint64(_GOLDEN)) for r in range(ROUNDS)]


def _half_bits(n: int) -> int:
    bits = max(2, (max(int(n) - 1, 1)).bit_length())
    return (bits + bits % 2) // 2


def _network(x: np.ndarray, half, mask, rks) -> np.ndarray:
    """Balanced Feistel network on ``2*half`` bits; ``half``, ``mask`` and round keys broadcast with x."""
    left = x >> half
    right = x & mask
    for k in rks:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << half) | right


def feistel_many(pos: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Evaluate many permutations at once: element j gets ``pi_{n[j], keys[j]}(pos[j])``.

    This is how the sampler reads lazily permuted domains: one vectorised call per step for all
    domains, instead of one call per domain. Results equal :class:`FeistelPermutation`'s.
    """
    pos = np.asarray(pos, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    if pos.size == 0:
        return pos.copy()
    if np.any(pos < 0) or np.any(pos >= n):
        raise IndexError("permutation positions must lie in [0, n)")
    uniq, inv = np.unique(n, return_inverse=True)
    half = np.asarray([_half_bits(u) for u in uniq.tolist()], dtype=np.uint64)[inv]
    mask = (np.uint64(1) << half) - np.uint64(1)
    rks = _round_keys(keys)
    nn = n.astype(np.uint64)
    y = _network(pos.astype(np.uint64), half, mask, rks)
    out = y >= nn
    while out.any():  # cycle walking
        sel = np.flatnonzero(out)
        y[sel] = _network(y[sel], half[sel], mask[sel], [k[sel] for k in rks])
        out[sel] = y[sel] >= nn[sel]
    small = n <= 1
    if small.any():
        y[small] = pos[small].astype(np.uint64)
    return y.astype(np.int64)


class FeistelPermutation:
    """A keyed bijection ``pi`` on ``[0, n)``.

    Args:
        n: size of the domain (``>= 0``).
        key: 64-bit key, e.g. from :func:`derive_key`.

    ``perm(idx)`` maps an integer array of positions to permuted values; ``perm.full()`` gives the
    whole permutation (O(n) time and memory: only call it when you mean to cache).
    """

    def __init__(self, n: int, key: int):
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = int(n)
        self.half = _half_bits(self.n)
        self._half = np.uint64(self.half)
        self._mask = np.uint64((1 << self.half) - 1)
        self._keys = [np.uint64(int(k[0])) for k in _round_keys(np.asarray([key & _M64], dtype=np.uint64))]

    def __call__(self, idx) -> np.ndarray:
        """Permuted values of the positions ``idx`` (int array, each in ``[0, n)``) as int64."""
        x = np.asarray(idx, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation positions must lie in [0, {self.n})")
        if self.n <= 1:
            return x.copy()
        nn = np.uint64(self.n)
        y = _network(x.astype(np.uint64), self._half, self._mask, self._keys)
        out = y >= nn
        while out.any():  # cycle walking: re-encrypt values that fell outside [0, n)
            sel = np.flatnonzero(out)
            y[sel] = _network(y[sel], self._half, self._mask, self._keys)
            out[sel] = y[sel] >= nn
        return y.astype(np.int64)

    def full(self, chunk: int = 1 << 20) -> np.ndarray:
        """The whole permutation as an int64 array (int32 if n < 2^31 to halve memory)."""
        dtype = np.int32 if self.n < (1 << 31) else np.int64
        out = np.empty(self.n, dtype=dtype)
        for lo in range(0, self.n, chunk):
            hi = min(self.n, lo + chunk)
            out[lo:hi] = self(np.arange(lo, hi, dtype=np.int64))
        return out


class PermutationCache:
    """Evaluate per-(domain, epoch) permutations, caching small ones as arrays under a memory budget.

    Caching never changes results: a cached array holds exactly ``FeistelPermutation(n, key).full()``.
    It only trades memory for speed. Domains larger than ``max_cached_size`` are always evaluated
    lazily; the least recently used arrays are evicted once ``budget_bytes`` is exceeded.

    Args:
        max_cached_size: largest permutation (in elements) that is materialised (0 = never).
        budget_bytes: total bytes the cached arrays may hold.
    """

    def __init__(self, max_cached_size: int = 1 << 20, budget_bytes: int = 256 << 20):
        if max_cached_size < 0 or budget_bytes < 0:
            raise ValueError("max_cached_size and budget_bytes must be >= 0")
        self.max_cached_size = int(max_cached_size)
        self.budget_bytes = int(budget_bytes)
        self._arrays: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0

    def array(self, n: int, key: int, cache_id: tuple[int, int]) -> np.ndarray | None:
        """The cached full permutation (built now if it is eligible), or ``None`` if it stays lazy."""
        arr = self._arrays.get(cache_id)
        if arr is not None and len(arr) == n:
            self._arrays.move_to_end(cache_id)
            return arr
        nbytes = n * (4 if n < (1 << 31) else 8)
        if not (0 < n <= self.max_cached_size and nbytes <= self.budget_bytes):
            return None
        arr = FeistelPermutation(n, key).full()
        self._arrays[cache_id] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.budget_bytes and self._arrays:
            _, old = self._arrays.popitem(last=False)
            self._bytes -= old.nbytes
        return arr

    def lookup(self, n: int, key: int, cache_id: tuple[int, int], positions: np.ndarray) -> np.ndarray:
        """``pi_key(positions)`` for a permutation of size ``n``; ``cache_id`` names it, e.g. (domain, epoch)."""
        arr = self.array(n, key, cache_id)
        if arr is not None:
            return arr[positions].astype(np.int64, copy=False)
        return FeistelPermutation(n, key)(positions)

    def clear(self) -> None:
        self._arrays.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

"""Hash-chain verification on several cores: the chain is cut into contiguous ranges, each range is hashed in a
forked worker process (the entries are inherited copy-on-write, never pickled), and the ranges are stitched in
order: range k is accepted only if it is entirely valid and its first entry links to range k-1's last hash.

The result is exactly :func:`pilothouse.ledger.domain.serial_scan`'s: the leaf hashes of the valid prefix. Anything
short of a fully valid range ends the prefix there, and :func:`~pilothouse.ledger.domain.verify` diagnoses the first
failure serially, as always. Worth it from tens of thousands of entries (a fork and a pool cost milliseconds); below
``min_entries`` it simply runs serially. ``fork`` is Linux/macOS only; elsewhere it runs serially too.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

from pilothouse.ledger.domain import GENESIS_PREV_HASH, Scanner, scan_range, serial_scan

_SHARED: tuple[Sequence[Any], str, bool] | None = None  # set in the parent just before forking; read by the workers


def _work(bounds: tuple[int, int]) -> tuple[int, bytes, str, str]:
    assert _SHARED is not None
    items, chain, want_digests = _SHARED
    lo, hi = bounds
    first = items[lo]
    try:
        start_prev = first[3]
        if not isinstance(start_prev, str):
            return 0, b"", "", ""
    except (TypeError, IndexError, KeyError):
        return 0, b"", "", ""
    got, last = scan_range(items, chain, lo, hi, start_prev, want_digests)
    if isinstance(got, int):
        return got, b"", start_prev, last
    return len(got), b"".join(got), start_prev, last


def scanner(workers: int | None = None, *, min_entries: int = 20_000) -> Scanner:
    """A scanner for :func:`verify` that uses ``workers`` processes (default: the CPUs this process may use)."""
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = workers

    def scan(items: Sequence[Any], chain: str, want_digests: bool = True) -> list[bytes] | int:
        global _SHARED
        n = len(items)
        if n_workers < 2 or n < min_entries or "fork" not in multiprocessing.get_all_start_methods():
            return serial_scan(items, chain, want_digests)
        step = -(-n // n_workers)
        bounds = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
        _SHARED = (items, chain, want_digests)
        try:
            with multiprocessing.get_context("fork").Pool(len(bounds)) as pool:
                results = pool.map(_work, bounds, chunksize=1)
        finally:
            _SHARED = None
        digests: list[bytes] = []
        valid = 0
        prev = GENESIS_PREV_HASH
        for (lo, hi), (ok, joined, start_prev, last) in zip(bounds, results, strict=True):
            if start_prev != prev:
                break  # this range does not link to the previous one: the prefix ends at lo
            if want_digests:
                digests += [joined[i:i + 32] for i in range(0, 32 * ok, 32)]
            valid += ok
            if ok < hi - lo:
                break
            prev = last
        return digests if want_digests else valid

    return scan

"""Hash-chain verification on several cores with the pure-Python reference (``ledger verify --processes N``; the
default, the compiled scanner of :mod:`pilothouse.ledger.native`, uses threads instead): the chain is cut into
contiguous ranges, the first range is checked in this process and each other one in a forked child (the entries are
inherited copy-on-write, never pickled), and the ranges are stitched in order: range k is accepted only if range
k-1 was entirely valid and range k's first entry links to range k-1's last hash.

The result is exactly :func:`pilothouse.ledger.domain.serial_scan`'s (same valid prefix, last hash, leaf hashes and
agreeing prefix of the secondary source): anything short of a fully valid range ends the prefix there, and
:func:`~pilothouse.ledger.domain.verify` diagnoses the first failure serially, as always. Each range also hashes the
Merkle levels of its own complete subtrees (range starts are aligned to ``align`` entries of the chain), so the
Merkle tree is built in parallel too.

Why fork and not a pool: the entries are Python objects already in memory; pickling them to a pool costs more than
hashing them. A forked child only pays copy-on-write for the pages whose reference counts it touches, and
``gc.freeze()`` keeps the collector from touching (and so copying) everything else. Worth it from tens of thousands of
entries; below ``min_entries`` it runs serially, as it does where ``fork`` does not exist (Windows). The child runs
only hashing code and exits with ``os._exit``: no lock of another thread (the Kafka client's) is ever taken in it.

Measured limit: every page a process touches while the other lives is a copy-on-write fault, about 0.75 per 1 KB
entry (entry and row objects). On our 2-vCPU machine class (a Firecracker VM with nested paging) one fault costs about
3 µs — more than checking the entry (about 3 µs in all) — so two processes are *slower* there than one, and
``ledger verify`` defaults to one (``--processes N`` to choose). On a host where a fault costs well under 1 µs it pays.
``pilothouse bench ledger`` reports both rates and the fault cost of the machine it runs on.
"""

from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Sequence
from typing import Any

from pilothouse.ledger.domain import GENESIS_PREV_HASH, Scanner, ScanResult, agreeing_prefix, scan_range
from pilothouse.ledger.merkle import subtree_levels

_MAX_LEVEL = 20  # levels a range hashes itself; the few nodes above are made by MerkleTree.extend_hashes


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _range(items: Sequence[Any], chain: str, lo: int, hi: int, first_seq: int, want_leaves: bool,
           secondary: Sequence[Any] | None, prev: str | None) -> tuple[str | None, ScanResult]:
    """Check items[lo:hi]; ``prev`` None = start from the range's own first prev_hash (the parent checks the link)."""
    if prev is None:
        try:
            prev = items[lo][3]
        except Exception:  # noqa: BLE001 - not an entry (tombstone, junk): the range is invalid from its start
            prev = None
        if not isinstance(prev, str):
            return None, ScanResult(0, "")
    got = scan_range(items, chain, lo, hi, prev, want_leaves, first_seq + lo)
    levels = subtree_levels(got.leaves, _levels_for(first_seq + lo)) if want_leaves else ()
    agree = agreeing_prefix(items, secondary, lo, hi) if secondary is not None else None
    return prev, got._replace(levels=levels, agree=agree)


def _levels_for(start: int) -> int:
    """Merkle levels worth hashing for a range that starts at chain index ``start`` (those aligned to it)."""
    return _MAX_LEVEL if start == 0 else min(_MAX_LEVEL, (start & -start).bit_length() - 1)


def _child(fd: int, args: tuple[Any, ...]) -> None:
    code = 0
    try:
        data = pickle.dumps(_range(*args), protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:  # noqa: BLE001 - the parent sees a short read and treats the range as unverified
        code = 1
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def scanner(workers: int | None = None, *, min_entries: int = 20_000, align: int = 4096) -> Scanner:
    """A scanner for :func:`~pilothouse.ledger.domain.verify` and :class:`~pilothouse.ledger.domain.StreamingVerifier`
    that uses ``workers`` processes (default: the CPUs this process may use), this one included.

    ``align``: range boundaries fall on multiples of it (in chain positions), so each range can hash its Merkle
    subtrees up to that size; chunks shorter than two aligned ranges run serially (tests pass ``align=1``).
    """
    n_workers = usable_cpus() if workers is None else workers

    def scan(items: Sequence[Any], chain: str, first_seq: int = 0, prev: str = GENESIS_PREV_HASH,
             want_leaves: bool = True, secondary: Sequence[Any] | None = None) -> ScanResult:
        n = len(items)
        bounds = _bounds(n, first_seq, n_workers, align) if n >= max(min_entries, 2) else []
        if len(bounds) < 2 or not hasattr(os, "fork"):
            return _range(items, chain, 0, n, first_seq, want_leaves, secondary, prev)[1]
        frozen = gc.isenabled()
        if frozen:
            gc.freeze()  # the children's collector must not walk (and so copy) every object of the parent
        children: list[tuple[int, int]] = []
        try:
            for lo, hi in bounds[1:]:
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child; its coverage is not collected
                    os.close(r)
                    _child(w, (items, chain, lo, hi, first_seq, want_leaves, secondary, None))
                os.close(w)
                children.append((pid, r))
            results = [_range(items, chain, bounds[0][0], bounds[0][1], first_seq, want_leaves, secondary, prev)]
            for pid, r in children:
                try:
                    data = _read_all(r)
                finally:
                    os.close(r)
                    os.waitpid(pid, 0)
                try:
                    results.append(pickle.loads(data))
                except Exception:  # noqa: BLE001 - a child that died: its range counts as unverified from its start
                    results.append((None, ScanResult(0, "")))
        finally:
            if frozen:
                gc.unfreeze()
        return _stitch(bounds, results, prev, want_leaves, secondary is not None)

    return scan


def _bounds(n: int, first_seq: int, workers: int, align: int) -> list[tuple[int, int]]:
    """Contiguous ranges covering [0, n): every start after the first on a multiple of ``align`` in chain positions."""
    if workers < 2:
        return [(0, n)]
    cuts = []
    for k in range(1, workers):
        target = first_seq + -(-n * k // workers)
        cut = -(-target // align) * align - first_seq  # round up to an aligned chain position
        if 0 < cut < n and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    edges = [0, *cuts, n]
    return list(zip(edges, edges[1:], strict=False))


def _stitch(bounds: list[tuple[int, int]], results: list[tuple[str | None, ScanResult]], prev: str,
            want_leaves: bool, compared: bool) -> ScanResult:
    """Join the ranges' results into the one a serial scan would give."""
    accepted: list[ScanResult] = []
    last = prev
    for (lo, hi), (start_prev, got) in zip(bounds, results, strict=True):
        if start_prev != last:
            break  # this range does not link to the previous one's end: the valid prefix ends at lo
        accepted.append(got)
        if got.valid:
            last = got.last_hash
        if got.valid < hi - lo:
            break
    agree: int | None = None
    if compared:
        agree = 0
        for (lo, hi), (_, got) in zip(bounds, results, strict=True):
            agree += got.agree or 0
            if got.agree != hi - lo:
                break
    if not want_leaves:
        return ScanResult(sum(g.valid for g in accepted), last, b"", (), agree)
    levels: list[bytes] = []
    for j in range(1, _MAX_LEVEL + 1):  # level j joins up only if every range before the last ends on a 2**j boundary
        if any(len(g.levels) < j for g in accepted) or any(g.valid % (1 << j) for g in accepted[:-1]):
            break
        levels.append(b"".join(g.levels[j - 1] for g in accepted))
    return ScanResult(sum(g.valid for g in accepted), last, b"".join(g.leaves for g in accepted), tuple(levels), agree)

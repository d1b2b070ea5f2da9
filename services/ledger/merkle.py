"""RFC 9162 (Certificate Transparency v2) Merkle trees: tree heads, inclusion and consistency proofs, verifiers.

Pure computation, no I/O. Hashes are raw 32-byte SHA-256 digests here; the ledger stores them as lowercase hex.

* leaf hash  = SHA-256(0x00 || leaf input)                    (RFC 9162 §2.1.1)
* node hash  = SHA-256(0x01 || left || right)
* MTH(D[n])  splits at k, the largest power of two smaller than n, so the left subtree is always perfect.

The ledger's leaf input is the canonical entry bytes, so a ledger entry's ``entry_hash`` *is* its leaf hash
(see :mod:`pilothouse.ledger.domain`): the tree needs no second hash per entry.

Two builders:

* :class:`CompactRange` keeps only the roots of the perfect subtrees along the right edge (O(log n) memory); it is
  what the verifier uses to recompute a tree head while it streams entries.
* :class:`MerkleTree` keeps every complete level (32 bytes per node, contiguous ``bytearray`` per level) so that any
  perfect subtree hash is an O(1) lookup; proofs then cost O(log n) lookups plus at most O(log n) hashes for the one
  incomplete subtree on the right edge. Appending is amortised O(1) hashes per leaf, so building N leaves is O(N).

The verifiers follow the RFC's iterative algorithms (§2.1.3.2, §2.1.4.2) literally, with explicit guards for the
cases the RFC leaves to the caller (index out of range, sizes out of order, empty proofs, wrong lengths).
Note: a tree head does not commit to its size (a proof for size n can also check out against the same root labelled
n+1). Sizes are trustworthy only as part of a *signed* (size, root) pair — the ledger's checkpoints sign both.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import sha256

HASH_SIZE = 32
_LEAF = b"\x00"
_NODE = b"\x01"
EMPTY_ROOT = sha256(b"").digest()  # MTH({}) per RFC 9162 §2.1.1


class MerkleError(ValueError):
    """A request that has no answer (index outside the tree, sizes out of order)."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash of ``data``."""
    return sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash."""
    return sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _pairs(level: bytes | memoryview) -> bytes:
    """The parent nodes of consecutive pairs of 32-byte hashes (an odd last one is left out), concatenated."""
    node = sha256(_NODE)  # copy a hasher that has taken the prefix: cheaper than concatenating 0x01 to each pair
    out = []
    for i in range(0, len(level) - (2 * HASH_SIZE - 1), 2 * HASH_SIZE):
        h = node.copy()
        h.update(level[i : i + 2 * HASH_SIZE])
        out.append(h.digest())
    return b"".join(out)


def subtree_levels(leaves: bytes, max_level: int = 64) -> tuple[bytes, ...]:
    """Levels 1..max_level of the complete subtrees over ``leaves`` (concatenated 32-byte leaf hashes), each level's
    nodes concatenated; what :meth:`MerkleTree.extend_hashes` accepts as ``levels``."""
    out: list[bytes] = []
    level = leaves
    while len(out) < max_level and len(level) >= 2 * HASH_SIZE:
        level = _pairs(level)
        out.append(level)
    return tuple(out)


def root_from_leaf_hashes(leaves: Sequence[bytes]) -> bytes:
    """Tree head of a whole list of leaf hashes, computed with a compact range (O(n) time, O(log n) memory)."""
    rng = CompactRange()
    for h in leaves:
        rng.append(h)
    return rng.root()


class CompactRange:
    """Right-edge perfect-subtree roots of a growing tree: append a leaf hash, ask for the root at the current size."""

    __slots__ = ("size", "_stack")

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    def append(self, leaf: bytes) -> None:
        stack = self._stack
        stack.append(leaf)
        i = self.size
        # Each trailing 1 bit of the old size is a perfect subtree that the new leaf completes.
        while i & 1:
            right = stack.pop()
            stack[-1] = sha256(_NODE + stack[-1] + right).digest()
            i >>= 1
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        r = stack[-1]
        for s in reversed(stack[:-1]):
            r = sha256(_NODE + s + r).digest()
        return r


class MerkleTree:
    """Append-only Merkle tree that caches every complete level, for fast tree heads and proofs at any size."""

    __slots__ = ("_levels", "_edge")

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        # MTH(lo, size) for the right-edge (incomplete) subtrees of one tree size, computed once per size asked for:
        # with it every subtree hash a proof needs is an O(1) lookup.
        self._edge: tuple[int, dict[int, bytes]] = (-1, {})
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> int:
        """Add one leaf hash; returns its index. Completes the perfect subtrees it closes (amortised O(1))."""
        if len(leaf) != HASH_SIZE:
            raise MerkleError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf)}")
        levels = self._levels
        index = len(levels[0]) // HASH_SIZE
        levels[0] += leaf
        i, level, h = index, 0, leaf
        while i & 1:
            lvl = levels[level]
            left = bytes(lvl[-2 * HASH_SIZE : -HASH_SIZE])
            h = sha256(_NODE + left + h).digest()
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += h
            i >>= 1
        return index

    def extend_hashes(self, leaves: bytes, levels: Sequence[bytes] = ()) -> None:
        """Append many leaf hashes at once (``leaves``: 32-byte digests, concatenated) and complete every subtree they
        close, level by level in bulk (the same nodes :meth:`append` would make, at about half the cost).

        ``levels[j - 1]``, when given, holds the level-``j`` nodes of the complete subtrees over ``leaves`` alone, as
        :func:`subtree_levels` makes them (e.g. in a worker process). They are used only where they are nodes of this
        tree — when the current size is a multiple of 2**j — and are computed here otherwise.
        """
        if len(leaves) % HASH_SIZE:
            raise MerkleError(f"leaf hashes come in {HASH_SIZE}-byte digests, got {len(leaves)} bytes")
        tree = self._levels
        old = len(tree[0]) // HASH_SIZE
        tree[0] += leaves
        j = 1
        while True:
            below = tree[j - 1]
            if j == len(tree):
                if len(below) < 2 * HASH_SIZE:
                    break
                tree.append(bytearray())
            level = tree[j]
            have, complete = len(level) // HASH_SIZE, len(below) // (2 * HASH_SIZE)
            if have >= complete:
                break
            if j <= len(levels) and old % (1 << j) == 0 and have == old >> j:
                level += levels[j - 1]
                have = len(level) // HASH_SIZE
            if have < complete:
                level += _pairs(memoryview(below)[2 * HASH_SIZE * have : 2 * HASH_SIZE * complete])
            j += 1

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise MerkleError(f"leaf {index} is outside a tree of size {self.size}")
        return bytes(self._levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _perfect(self, level: int, index: int) -> bytes:
        lvl = self._levels[level]
        return bytes(lvl[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for a range that the RFC recursion produces (lo aligned to the range's left subtree)."""
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and lo % n == 0:
            return self._perfect(n.bit_length() - 1, lo // n)
        size, edge = self._edge
        if hi != size:
            edge = self._right_edge(hi)
        cached = edge.get(lo)
        if cached is not None:
            return cached
        k = _split(n)
        return node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))

    def _right_edge(self, size: int) -> dict[int, bytes]:
        """MTH(lo, size) for every lo where the RFC recursion over D[0:size] starts a right subtree (O(log n))."""
        starts = []
        lo = 0
        while size - lo > 1 and (size - lo) & (size - lo - 1):  # stop at a perfect remainder
            lo += _split(size - lo)
            starts.append(lo)
        edge: dict[int, bytes] = {}
        h = b""
        for i, lo in enumerate(reversed(starts)):
            n = size - lo
            if i == 0:  # the last remainder is perfect (a single leaf at worst)
                h = self._perfect(n.bit_length() - 1, lo // n)
            else:
                k = _split(n)
                h = node_hash(self._perfect(k.bit_length() - 1, lo // k), h)
            edge[lo] = h
        self._edge = (size, edge)
        return edge

    def root(self, size: int | None = None) -> bytes:
        """Tree head at ``size`` (default: the current size); any earlier size is available."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise MerkleError(f"no tree of size {size}: the tree has {self.size} leaves")
        return self._mth(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[size]) per RFC 9162 §2.1.3.1, ordered from the leaf's sibling up to the root's child."""
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise MerkleError(f"no tree of size {size}: the tree has {self.size} leaves")
        if not 0 <= index < size:
            raise MerkleError(f"leaf {index} is outside a tree of size {size}")
        # Bottom-up: at level k the sibling of the leaf's ancestor is either a complete subtree (an O(1) lookup), a
        # partial one on the right edge (cached per size), or absent (the ancestor is promoted a level unchanged).
        path: list[bytes] = []
        levels = self._levels
        edge = self._edge[1] if self._edge[0] == size else self._right_edge(size)
        for k in range((size - 1).bit_length()):
            sib = (index >> k) ^ 1
            start = sib << k
            if start >= size:
                continue
            if start + (1 << k) <= size:
                path.append(bytes(levels[k][sib * HASH_SIZE : (sib + 1) * HASH_SIZE]))
            else:
                h = edge.get(start)
                path.append(h if h is not None else self._mth(start, size))
        return path

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """PROOF(first, D[second]) per RFC 9162 §2.1.4.1 (empty when first == second or first == 0)."""
        second = self.size if second is None else second
        if not 0 <= second <= self.size:
            raise MerkleError(f"no tree of size {second}: the tree has {self.size} leaves")
        if not 0 <= first <= second:
            raise MerkleError(f"a consistency proof needs 0 <= first <= second, got {first} and {second}")
        if first in (0, second):
            return []
        proof: list[bytes] = []
        lo, hi, m, whole = 0, second, first, True
        while True:
            if m == hi - lo:
                if not whole:
                    proof.append(self._mth(lo, hi))
                break
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        proof.reverse()
        return proof


def _check_hash(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_SIZE:
        raise MerkleError(f"{name} must be {HASH_SIZE} bytes")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: is ``leaf`` (a leaf hash) at ``index`` in the tree of ``size`` leaves with head ``root``?

    Returns False (never raises) for any proof that does not verify, including malformed ones.
    """
    try:
        _check_hash("leaf", leaf)
        _check_hash("root", root)
        for p in proof:
            _check_hash("proof element", p)
    except MerkleError:
        return False
    if size <= 0 or not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, bytes(leaf)
    for p in proof:
        if sn == 0:
            return False  # proof longer than the path
        if fn & 1 or fn == sn:
            r = sha256(_NODE + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(_NODE + r + p).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of ``second`` leaves an append-only extension of the tree of ``first`` leaves?

    ``first == second`` needs an empty proof and equal roots; ``first == 0`` needs an empty proof (every tree extends
    the empty tree). Returns False (never raises) for anything that does not verify.
    """
    try:
        _check_hash("first root", first_root)
        _check_hash("second root", second_root)
        for p in proof:
            _check_hash("proof element", p)
    except MerkleError:
        return False
    if first < 0 or second < 0 or first > second:
        return False
    if first == second:
        return len(proof) == 0 and first_root == second_root
    if first == 0:
        return len(proof) == 0 and first_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # first is a power of two: its root is a node of the second tree
        path.insert(0, bytes(first_root))
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = sha256(_NODE + c + fr).digest()
            sr = sha256(_NODE + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = sha256(_NODE + sr + c).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root

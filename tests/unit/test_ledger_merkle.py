"""RFC 9162 Merkle tree: builders against a literal transcription of the RFC's recursive definitions, and verifiers
against good proofs *and* tampered ones (flipped bits, wrong index/size, dropped/extra/reordered elements)."""

from __future__ import annotations

import hashlib

import pytest

from pilothouse.ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleError,
    MerkleTree,
    leaf_hash,
    root_from_leaf_hashes,
    subtree_levels,
    verify_consistency,
    verify_inclusion,
)


# --- reference: RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1 transcribed recursively, over leaf *inputs* -----------------
def _h(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def ref_mth(d: list[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return _h(b"")
    if n == 1:
        return _h(b"\x00" + d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return _h(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:]))


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


DATA = [f"entry-{i}".encode() for i in range(70)]
LEAVES = [leaf_hash(x) for x in DATA]
TREE = MerkleTree(LEAVES)


def test_rfc6962_known_answer_vectors() -> None:
    # Test vectors published with RFC 6962 implementations (certificate-transparency-go, merkle_tree_test):
    # the eight leaves are the empty string, 0x00, 0x10, 0x2021, 0x3031, 0x40414243, 0x5051525354555657, ...
    inputs = [bytes.fromhex(x) for x in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                          "606162636465666768696a6b6c6d6e6f"]]
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    tree = MerkleTree(leaf_hash(x) for x in inputs)
    for n, expected in enumerate(roots, start=1):
        assert tree.root(n).hex() == expected
    assert tree.root(0) == EMPTY_ROOT == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("n", range(0, 71))
def test_roots_match_reference_at_every_size(n: int) -> None:
    expected = ref_mth(DATA[:n])
    assert TREE.root(n) == expected
    assert root_from_leaf_hashes(LEAVES[:n]) == expected
    rng = CompactRange()
    rng.extend(LEAVES[:n])
    assert rng.size == n and rng.root() == expected


@pytest.mark.parametrize("seed", range(12))
def test_bulk_extension_builds_the_same_tree_with_or_without_precomputed_levels(seed: int) -> None:
    # extend_hashes (what verify uses) against the reference, in random chunks; each chunk brings its own subtree
    # levels (as a worker process hashes them), some, none, or one level short: used where aligned, ignored elsewhere
    import random

    rng = random.Random(seed)
    tree = MerkleTree()
    i = 0
    while i < len(LEAVES):
        k = rng.choice([1, 2, 3, 4, 5, 8, 11, 16, 32])
        chunk = b"".join(LEAVES[i:i + k])
        levels = subtree_levels(chunk, rng.randrange(0, 7)) if rng.random() < 0.8 else ()
        tree.extend_hashes(chunk, levels)
        i += k
        assert tree.size == min(i, len(LEAVES)) and tree.root() == ref_mth(DATA[:tree.size])
    for n in range(len(DATA) + 1):
        assert tree.root(n) == ref_mth(DATA[:n])
    for m in (0, 5, 31, 64, 69):
        assert tree.inclusion_proof(m) == ref_path(m, DATA)


def test_subtree_levels_are_the_complete_subtrees() -> None:
    levels = subtree_levels(b"".join(LEAVES[:11]))  # 11 leaves: 5 pairs, 2 quads, 1 subtree of 8
    assert [len(x) // 32 for x in levels] == [5, 2, 1]
    assert levels[2] == ref_mth(DATA[:8]) and levels[1][32:] == ref_mth(DATA[4:8])
    with pytest.raises(MerkleError):
        MerkleTree().extend_hashes(b"\x00" * 33)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33, 64, 70])
def test_inclusion_proofs_match_reference_and_verify(n: int) -> None:
    root = TREE.root(n)
    for m in range(n):
        proof = TREE.inclusion_proof(m, n)
        assert proof == ref_path(m, DATA[:n])
        assert verify_inclusion(LEAVES[m], m, n, proof, root)


@pytest.mark.parametrize("second", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33, 64, 70])
def test_consistency_proofs_match_reference_and_verify(second: int) -> None:
    r2 = TREE.root(second)
    for first in range(0, second + 1):
        proof = TREE.consistency_proof(first, second)
        if 0 < first < second:
            assert proof == ref_subproof(first, DATA[:second], True)
        else:
            assert proof == []
        assert verify_consistency(first, second, TREE.root(first), r2, proof)


def _flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize("n,m", [(1, 0), (2, 1), (5, 4), (7, 3), (8, 0), (13, 12), (70, 37), (70, 69)])
def test_inclusion_verifier_rejects_tampering(n: int, m: int) -> None:
    root, leaf, proof = TREE.root(n), LEAVES[m], TREE.inclusion_proof(m, n)
    assert verify_inclusion(leaf, m, n, proof, root)
    for bit in (0, 7, 128, 255):
        assert not verify_inclusion(_flip(leaf, bit), m, n, proof, root)
        assert not verify_inclusion(leaf, m, n, proof, _flip(root, bit))
        for i in range(len(proof)):
            bad = list(proof)
            bad[i] = _flip(bad[i], bit)
            assert not verify_inclusion(leaf, m, n, bad, root)
    # another leaf, wrong position, wrong sizes
    assert not verify_inclusion(LEAVES[(m + 1) % 70], m, n, proof, root)
    for other in {m - 1, m + 1, m + n, -1} - {m}:
        assert not verify_inclusion(leaf, other, n, proof, root)
    # The Merkle hash does not commit to the tree size; the signed checkpoint binds (size, root). So a wrong size is
    # tested with the honest root of that size, as a verifier holding signed heads would be asked.
    if n < 70:
        assert not verify_inclusion(leaf, m, n + 1, proof, TREE.root(n + 1))
    if m < n - 1:
        assert not verify_inclusion(leaf, m, n - 1, proof, TREE.root(n - 1))
    assert not verify_inclusion(leaf, m, 0, proof, root)
    assert not verify_inclusion(leaf, m, m, proof, root)  # index == size
    # dropped, extra, duplicated, reordered elements
    if proof:
        assert not verify_inclusion(leaf, m, n, proof[:-1], root)
        assert not verify_inclusion(leaf, m, n, proof[1:], root)
        assert not verify_inclusion(leaf, m, n, proof + [proof[-1]], root)
    assert not verify_inclusion(leaf, m, n, proof + [LEAVES[0]], root)
    if len(proof) > 1 and proof[0] != proof[1]:
        assert not verify_inclusion(leaf, m, n, [proof[1], proof[0], *proof[2:]], root)
    # malformed element lengths never raise
    assert not verify_inclusion(leaf, m, n, [b"\x00" * 31, *proof[1:]], root)
    assert not verify_inclusion(leaf[:31], m, n, proof, root)


def test_single_leaf_tree_needs_empty_proof() -> None:
    root = TREE.root(1)
    assert root == LEAVES[0]
    assert verify_inclusion(LEAVES[0], 0, 1, [], root)
    assert not verify_inclusion(LEAVES[0], 0, 1, [LEAVES[1]], root)


@pytest.mark.parametrize("first,second", [(1, 2), (1, 8), (2, 5), (3, 7), (4, 8), (6, 8), (7, 70), (32, 70), (64, 70)])
def test_consistency_verifier_rejects_tampering(first: int, second: int) -> None:
    r1, r2 = TREE.root(first), TREE.root(second)
    proof = TREE.consistency_proof(first, second)
    assert verify_consistency(first, second, r1, r2, proof)
    for bit in (0, 100, 255):
        assert not verify_consistency(first, second, _flip(r1, bit), r2, proof)
        assert not verify_consistency(first, second, r1, _flip(r2, bit), proof)
        for i in range(len(proof)):
            bad = list(proof)
            bad[i] = _flip(bad[i], bit)
            assert not verify_consistency(first, second, r1, r2, bad)
    # a root of a *different* history of the same size (a rewritten suffix) must not verify
    forked = MerkleTree(LEAVES[: first - 1] + [leaf_hash(b"forged")] + LEAVES[first:second])
    assert not verify_consistency(first, second, forked.root(first), r2, proof)
    assert not verify_consistency(first, second, r1, forked.root(second), proof)
    # sizes out of order / swapped / off by one
    assert not verify_consistency(second, first, r2, r1, proof)
    # sizes off by one, each with the honest root of that size (the signed checkpoint binds size and root)
    assert not verify_consistency(first + 1, second, TREE.root(first + 1), r2, proof)
    assert not verify_consistency(first - 1, second, TREE.root(first - 1), r2, proof)
    if second < 70:
        assert not verify_consistency(first, second + 1, r1, TREE.root(second + 1), proof)
    assert not verify_consistency(first, second - 1, r1, TREE.root(second - 1), proof)
    # empty, truncated, extended proofs
    assert not verify_consistency(first, second, r1, r2, [])
    assert not verify_consistency(first, second, r1, r2, proof[:-1])
    assert not verify_consistency(first, second, r1, r2, proof + [LEAVES[0]])
    assert not verify_consistency(first, second, r1, r2, [b"\x01" * 33])


def test_consistency_edge_cases() -> None:
    r5 = TREE.root(5)
    assert verify_consistency(5, 5, r5, r5, [])
    assert not verify_consistency(5, 5, r5, r5, [LEAVES[0]])
    assert not verify_consistency(5, 5, r5, TREE.root(6), [])
    assert verify_consistency(0, 5, EMPTY_ROOT, r5, [])
    assert not verify_consistency(0, 5, r5, r5, [])
    assert not verify_consistency(-1, 5, r5, r5, [])


def test_builder_refuses_impossible_requests() -> None:
    with pytest.raises(MerkleError):
        TREE.inclusion_proof(70, 70)
    with pytest.raises(MerkleError):
        TREE.inclusion_proof(0, 71)
    with pytest.raises(MerkleError):
        TREE.consistency_proof(6, 5)
    with pytest.raises(MerkleError):
        TREE.root(71)
    with pytest.raises(MerkleError):
        MerkleTree().append(b"short")

"""verify(): the first bad sequence number and what is wrong, for each kind of tampering, on entry lists as they would
be read from Kafka and rows as they would be read from Postgres (tuples). Good data passes; every alteration fails."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import pytest

from pilothouse.ledger.domain import (
    CheckpointSigner,
    KafkaTombstone,
    LedgerChain,
    LedgerEntry,
    ProblemKind,
    VerifyResult,
    compute_entry_hash,
    serial_scan,
    verify,
)
from pilothouse.ledger.merkle import MerkleTree

WEBHOOK = json.loads((Path(__file__).parent.parent / "fixtures" / "ledger" / "alertmanager_webhook_12_alerts.json")
                     .read_text())
SIGNER = CheckpointSigner.from_seed("pilothouse-ledger", bytes(range(32)))
KEYS = {SIGNER.key_id: SIGNER.public_key}
N = 40


def _ledger(n: int = N, chain_name: str = "main", checkpoint_every: int = 10):
    chain = LedgerChain(chain_name)
    entries, cps = [], []
    for i in range(n):
        ev = {"event_id": f"{chain_name}-ev-{i}", "incident_id": f"inc-{i % 3}", "alert": WEBHOOK["alerts"][i % 12]}
        entries.append(chain.record(ev, event_id=f"{chain_name}-le-{i}", occurred_at=1_764_000_000_000 + i,
                                    producer="ledger", recorded_topic="pilothouse.sensing.alerts.v1",
                                    recorded_type="pilothouse.sensing.AlertReceived", recorded_offset=i))
        if (i + 1) % checkpoint_every == 0:
            cps.append(chain.checkpoint(SIGNER, 1_764_000_100_000 + i))
    return entries, cps


ENTRIES, CPS = _ledger()
ROWS = [tuple(e) for e in ENTRIES]  # what psycopg returns


def _rehash(entries: list[LedgerEntry], start: int, change) -> list[LedgerEntry]:
    """Rewrite entries from ``start`` on, recomputing every hash so the chain is internally valid (what an attacker
    with superuser rights and the code does)."""
    out = list(entries[:start])
    prev = out[-1].entry_hash if out else "0" * 64
    for e in entries[start:]:
        e = change(e) if e.sequence == start else e
        e = e._replace(prev_hash=prev)
        e = e._replace(entry_hash=compute_entry_hash(e))
        out.append(e)
        prev = e.entry_hash
    return out


def _first(result: VerifyResult):
    assert not result.ok, "tampering was not detected"
    return result.first


def test_good_ledger_passes_every_way() -> None:
    for kafka, rows in [(ENTRIES, ROWS), (ENTRIES, None), (None, ROWS), (ENTRIES, ROWS[:35])]:
        cps = CPS[:3] if len(rows or ROWS) < N else CPS
        result = verify(kafka, rows, cps, KEYS, mirror_may_lag=True)
        assert result.ok, result.problems
        assert result.entries == {"main": N} and result.checkpoints_verified == len(cps)
    assert verify(ENTRIES, ROWS, CPS, KEYS, recompute_roots=False).ok
    assert verify([], [], [], KEYS).ok  # an empty ledger with no checkpoint


def test_tombstone_in_kafka() -> None:
    kafka = list(ENTRIES)
    kafka[17] = KafkaTombstone(ENTRIES[17].entry_key, offset=17)
    p = _first(verify(kafka, ROWS, CPS, KEYS))
    assert (p.kind, p.sequence, p.source) == (ProblemKind.TOMBSTONE, 17, "kafka")
    kafka[17] = None  # a tombstone whose key the reader did not keep
    assert _first(verify(kafka, None, CPS, KEYS)).kind is ProblemKind.TOMBSTONE


def test_gap_in_kafka() -> None:
    kafka = ENTRIES[:12] + ENTRIES[13:]
    p = _first(verify(kafka, None, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.GAP, 12)


def test_gap_at_the_start_and_missing_head() -> None:
    p = _first(verify(ENTRIES[1:], None, [], KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.GAP, 0)


def test_duplicate_and_fork_in_kafka() -> None:
    p = _first(verify(ENTRIES[:8] + [ENTRIES[7]] + ENTRIES[8:], None, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.DUPLICATE, 7) and "exact duplicate" in p.detail
    other, _ = _ledger(10, checkpoint_every=100)
    forked = other[5]._replace(event_id="evil")
    p = _first(verify(ENTRIES[:8] + [forked] + ENTRIES[8:], None, [], KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.DUPLICATE, 5) and "fork" in p.detail


def test_reorder_in_kafka() -> None:
    kafka = list(ENTRIES)
    kafka[20], kafka[21] = kafka[21], kafka[20]
    p = _first(verify(kafka, None, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.REORDER, 20)


def test_chain_break_and_hash_mismatch() -> None:
    kafka = list(ENTRIES)
    kafka[9] = kafka[9]._replace(prev_hash="f" * 64)
    p = _first(verify(kafka, None, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.CHAIN_BREAK, 9)
    kafka = list(ENTRIES)
    kafka[9] = kafka[9]._replace(payload_json=kafka[9].payload_json.replace("inc-0", "inc-9"))
    p = _first(verify(kafka, None, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.HASH_MISMATCH, 9)
    # content altered and its own hash recomputed, next link left alone: the break shows at the next entry
    kafka = list(ENTRIES)
    altered = kafka[9]._replace(incident_id="inc-evil")
    kafka[9] = altered._replace(entry_hash=compute_entry_hash(altered))
    p = _first(verify(kafka, None, [], KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.CHAIN_BREAK, 10) and "entry 9 or 10" in p.detail
    # the checkpoint over [0, 10) also fails; it bounds the damage to a range (its sequence is the range start)
    result = verify(kafka, None, CPS, KEYS)
    assert {(p.kind, p.sequence) for p in result.problems} == {(ProblemKind.CHAIN_BREAK, 10),
                                                               (ProblemKind.CHECKPOINT_ROOT_MISMATCH, 0)}


@pytest.mark.parametrize("field", [f for f in LedgerEntry._fields if f != "entry_hash"])
def test_any_single_field_change_in_postgres_is_caught(field: str) -> None:
    rows = list(ROWS)
    row = ENTRIES[25]
    value = getattr(row, field)
    changed = value + 1 if isinstance(value, int) else ("x" if value is None else value + "x")
    rows[25] = tuple(row._replace(**{field: changed}))
    for kafka in (ENTRIES, None):  # with Kafka to compare against, and Postgres alone
        result = verify(kafka, rows, CPS, KEYS)
        assert not result.ok
        if field == "chain":  # the row moved to another chain: chain "main" misses it, "mainx" has a stray entry
            assert any(p.chain == "main" and p.sequence == 25 for p in result.problems), result.problems
            assert any(p.chain == "mainx" for p in result.problems)
        else:
            assert result.first.sequence == 25, result.first
        assert all(p.kind is not ProblemKind.REHASHED_SUFFIX for p in result.problems)


def test_postgres_delete_is_a_gap() -> None:
    rows = ROWS[:30] + ROWS[31:]
    p = _first(verify(ENTRIES, rows, CPS, KEYS))
    assert (p.kind, p.sequence, p.source) == (ProblemKind.GAP, 30, "postgres")
    p = _first(verify(None, rows, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.GAP, 30)


def test_postgres_row_reorder() -> None:
    rows = list(ROWS)
    rows[3], rows[4] = rows[4], rows[3]
    p = _first(verify(ENTRIES, rows, CPS, KEYS))
    assert (p.kind, p.sequence, p.source) == (ProblemKind.REORDER, 3, "postgres")


def test_rehashed_suffix_in_postgres() -> None:
    def change(e: LedgerEntry) -> LedgerEntry:
        payload = e.payload_json.replace("inc-1", "inc-X")
        return e._replace(payload_json=payload, payload_sha256=sha256(payload.encode()).hexdigest())

    rewritten = _rehash(ENTRIES, 22, change)
    assert rewritten[22].payload_json != ENTRIES[22].payload_json
    rows = [tuple(e) for e in rewritten]
    # Postgres alone: internally consistent; only the signed checkpoints catch it
    assert verify(None, rows, [], KEYS).ok
    p = _first(verify(None, rows, CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.CHECKPOINT_ROOT_MISMATCH, 20) and "[20, 30)" in p.detail
    p = _first(verify(None, rows, CPS, KEYS, recompute_roots=False))  # the signed head hash catches it too
    assert (p.kind, p.sequence) == (ProblemKind.CHECKPOINT_ROOT_MISMATCH, 20)
    # with Kafka: pinpointed
    p = _first(verify(ENTRIES, rows, CPS, KEYS))
    assert (p.kind, p.sequence, p.source) == (ProblemKind.REHASHED_SUFFIX, 22, "postgres")


def test_tail_truncation_and_truncate() -> None:
    p = _first(verify(None, ROWS[:33], CPS, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.TRUNCATED, 33)
    p = _first(verify(ENTRIES, ROWS[:33], CPS, KEYS, mirror_may_lag=True))
    assert (p.kind, p.sequence, p.source) == (ProblemKind.TRUNCATED, 33, "postgres")
    p = _first(verify(None, [], CPS, KEYS))  # TRUNCATE TABLE
    assert (p.kind, p.sequence, p.chain) == (ProblemKind.TRUNCATED, 0, "main")
    # no checkpoint covers the tail: lag is fine when allowed, a disagreement otherwise
    assert verify(ENTRIES, ROWS[:35], CPS[:3], KEYS, mirror_may_lag=True).ok
    p = _first(verify(ENTRIES, ROWS[:35], CPS[:3], KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.SOURCE_MISMATCH, 35)
    # Kafka lost its tail while Postgres kept it
    p = _first(verify(ENTRIES[:38], ROWS, [], KEYS))
    assert (p.kind, p.sequence, p.source) == (ProblemKind.SOURCE_MISMATCH, 38, "kafka")


def test_forged_checkpoint() -> None:
    forger = CheckpointSigner.from_seed("pilothouse-ledger", b"\x07" * 32)
    rewritten = _rehash(ENTRIES, 5, lambda e: e._replace(incident_id="inc-hidden"))
    honest_tree = LedgerChain("main", rewritten)
    forged = honest_tree.checkpoint(forger, 1)  # matches the rewritten rows, signed by the wrong key
    p = _first(verify(None, [tuple(e) for e in rewritten], [forged], KEYS))
    assert p.kind is ProblemKind.BAD_SIGNATURE and "not a trusted key" in p.detail
    # the forger reuses the trusted key id
    relabelled = type(forged)(**{**forged.to_dict(), "key_id": SIGNER.key_id})
    p = _first(verify(None, [tuple(e) for e in rewritten], [relabelled], KEYS))
    assert p.kind is ProblemKind.BAD_SIGNATURE and "does not verify" in p.detail
    # an honest checkpoint whose numbers were edited
    edited = type(CPS[0])(**{**CPS[0].to_dict(), "tree_size": 5})
    assert _first(verify(ENTRIES, ROWS, [edited], KEYS)).kind is ProblemKind.BAD_SIGNATURE
    assert _first(verify(ENTRIES, ROWS, CPS, {})).kind is ProblemKind.BAD_SIGNATURE  # nobody trusted


def test_checkpoint_without_head_hash_is_checked_by_root() -> None:
    rewritten = _rehash(ENTRIES, 15, lambda e: e._replace(producer="evil"))
    root_only = [SIGNER.sign("main", cp.tree_size, cp.root_hash, cp.signed_at) for cp in CPS]
    assert verify(ENTRIES, ROWS, root_only, KEYS, recompute_roots=False).ok
    p = _first(verify(None, [tuple(e) for e in rewritten], root_only, KEYS, recompute_roots=False))
    assert (p.kind, p.sequence) == (ProblemKind.CHECKPOINT_ROOT_MISMATCH, 10)
    wrong_root = SIGNER.sign("main", 20, "ab" * 32, 1, ENTRIES[19].entry_hash)  # signer bug: head fine, root wrong
    assert _first(verify(ENTRIES, None, [wrong_root], KEYS)).kind is ProblemKind.CHECKPOINT_ROOT_MISMATCH
    assert verify(ENTRIES, None, [wrong_root], KEYS, recompute_roots=False).ok  # documented: the head alone


def test_several_chains_are_verified_independently() -> None:
    other, other_cps = _ledger(15, "audit", checkpoint_every=5)
    interleaved = [x for pair in zip(ENTRIES, other, strict=False) for x in pair] + ENTRIES[15:]
    assert verify(interleaved, None, CPS + other_cps, KEYS).ok
    broken = list(interleaved)
    broken[7] = broken[7]._replace(recorded_offset=999)  # audit seq 3
    result = verify(broken, None, CPS + other_cps, KEYS)
    assert (result.first.chain, result.first.sequence, result.first.kind) == ("audit", 3, ProblemKind.HASH_MISMATCH)
    assert result.entries == {"audit": 3, "main": N}


@pytest.mark.parametrize("junk", [None, "text", 42, ("short", "tuple"), {"chain": "main"}])
def test_junk_in_the_input_is_reported_not_raised(junk) -> None:
    kafka = list(ENTRIES)
    kafka[11] = junk
    p = _first(verify(kafka, None, CPS, KEYS))
    assert p.sequence == 11 and p.kind in (ProblemKind.MALFORMED, ProblemKind.TOMBSTONE)


def test_wrong_types_in_a_row_are_reported() -> None:
    rows = list(ROWS)
    rows[6] = tuple(ENTRIES[6]._replace(sequence="6"))
    p = _first(verify(None, rows, CPS, KEYS))
    assert p.sequence == 6 and p.kind is ProblemKind.MALFORMED


def test_checkpoints_at_every_size_verify_and_catch_a_late_change() -> None:
    chain = LedgerChain("main")
    cps = []
    for e in ENTRIES[:37]:
        chain.append(e)
        cps.append(chain.checkpoint(SIGNER, e.sequence))
    result = verify(ENTRIES[:37], None, cps, KEYS)
    assert result.ok and result.checkpoints_verified == 37
    rows = [tuple(e) for e in _rehash(ENTRIES[:37], 36, lambda e: e._replace(producer="x"))]
    p = _first(verify(None, rows, cps, KEYS))
    assert (p.kind, p.sequence) == (ProblemKind.CHECKPOINT_ROOT_MISMATCH, 36)  # pinpointed: checkpoint 36 held


def test_a_topic_of_only_tombstones() -> None:
    kafka = [KafkaTombstone(e.entry_key, i) for i, e in enumerate(ENTRIES[:3])]
    p = _first(verify(kafka, None, CPS, KEYS))
    assert (p.kind, p.chain, p.sequence) == (ProblemKind.TOMBSTONE, "main", 0)


# ---- the parallel scanner gives exactly the serial result ------------------------------------------------------------
@pytest.mark.parametrize("damage", [None, "boundary_link", "inside", "tombstone_at_boundary", "reorder", "junk"])
@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_scan_equals_serial(damage, workers) -> None:
    from pilothouse.ledger.parallel import scanner

    items: list = list(ENTRIES)
    n = len(items)
    cut = -(-n // workers)  # the first range boundary
    if damage == "boundary_link":
        items[cut] = items[cut]._replace(prev_hash="f" * 64)
    elif damage == "inside":
        items[cut + 1] = items[cut + 1]._replace(recorded_offset=10**6)
    elif damage == "tombstone_at_boundary":
        items[cut] = KafkaTombstone(items[cut].entry_key, cut)
    elif damage == "reorder":
        items[cut - 1], items[cut] = items[cut], items[cut - 1]
    elif damage == "junk":
        items[cut] = "junk"
    scan = scanner(workers, min_entries=0, align=1)
    par, ser = scan(items, "main"), serial_scan(items, "main")
    assert par.same_as(ser) and len(par.leaves) == 32 * par.valid
    # the Merkle levels the ranges hashed themselves give exactly the tree of the leaves
    t_par, t_ser = MerkleTree(), MerkleTree()
    t_par.extend_hashes(par.leaves, par.levels)
    t_ser.extend_hashes(ser.leaves)
    assert [t_par.root(s) for s in range(par.valid + 1)] == [t_ser.root(s) for s in range(ser.valid + 1)]
    assert scan(items, "main", want_leaves=False).valid == serial_scan(items, "main", want_leaves=False).valid \
        == ser.valid
    for rows in (ROWS, ROWS[:cut + 2], [*ROWS[:cut], tuple(ENTRIES[cut]._replace(producer="x")), *ROWS[cut + 1:]]):
        assert scan(items, "main", secondary=rows).agree == serial_scan(items, "main", secondary=rows).agree
    for roots in (True, False):
        parallel = verify(items, None, CPS, KEYS, scanner=scan, recompute_roots=roots)
        serial = verify(items, None, CPS, KEYS, recompute_roots=roots)
        assert parallel == serial and (damage is None) == parallel.ok


# ---- the streaming verifier: same verdict on a healthy ledger, "cannot" on anything else ----------------------------
def _stream(items, rows, cps, *, chunk: int, roots: bool = True, lag: bool = False, scanner=None):
    from pilothouse.ledger.domain import StreamingVerifier

    sv = StreamingVerifier("main", cps, KEYS, recompute_roots=roots, mirror_may_lag=lag, scanner=scanner)
    for i in range(0, max(len(items), 1), chunk):
        if not sv.feed(items[i:i + chunk], None if rows is None else rows[i:i + chunk]):
            break
    return sv.finish(secondary_has_more=rows is not None and len(rows) > len(items)), sv


def _forked(workers: int = 2):
    from pilothouse.ledger.parallel import scanner

    return scanner(workers, min_entries=0, align=1)  # forks even for a few entries, cuts anywhere


@pytest.mark.parametrize("chunk", [1, 7, 10, 64])
@pytest.mark.parametrize("roots", [True, False])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_streaming_verifier_agrees_with_verify_on_a_healthy_ledger(chunk: int, roots: bool, workers: int) -> None:
    for rows in (ROWS, None, ROWS[:35]):
        lag = rows is not None and len(rows) < len(ENTRIES)
        cps = [cp for cp in CPS if cp.tree_size <= 30] if lag else CPS  # a lagging mirror under no checkpoint
        got, sv = _stream(ENTRIES, rows, cps, chunk=chunk, roots=roots, lag=lag,
                          scanner=_forked(workers) if workers > 1 and chunk > 1 else None)
        assert got == verify(ENTRIES, rows, cps, KEYS, recompute_roots=roots, mirror_may_lag=lag), sv.failed
        assert got is not None and got.ok


@pytest.mark.parametrize("damage", ["tombstone", "gap", "postgres_row", "postgres_short", "postgres_long",
                                    "forged_cp", "cp_beyond_end", "rehashed_under_cp"])
@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_verifier_hands_any_problem_to_verify(damage: str, workers: int) -> None:
    items: list = list(ENTRIES)
    rows: list = list(ROWS)
    cps = list(CPS)
    if damage == "tombstone":
        items[13] = KafkaTombstone(items[13].entry_key, 13)
    elif damage == "gap":
        del items[21]
    elif damage == "postgres_row":
        rows[5] = tuple(ENTRIES[5]._replace(producer="x"))
    elif damage == "postgres_short":
        rows = rows[:25]  # a checkpoint covers 30 and 40
    elif damage == "postgres_long":
        items = items[:30]
        cps = cps[:3]
    elif damage == "forged_cp":
        cps[1] = type(cps[1])(**{**cps[1].to_dict(), "root_hash": "ab" * 32})
    elif damage == "cp_beyond_end":
        items, rows = items[:35], rows[:35]
    else:  # another, internally consistent chain under the original checkpoints
        chain = LedgerChain("main")
        items = [chain.record({"event_id": f"x-{i}"}, event_id=f"x{i}", occurred_at=i, producer="ledger",
                              recorded_topic="t", recorded_type="t") for i in range(N)]
        rows = [tuple(e) for e in items]
    got, sv = _stream(items, rows, cps, chunk=8, scanner=_forked() if workers > 1 else None)
    assert got is None and sv.failed
    assert not verify(items, rows, cps, KEYS).ok  # ... and verify names it
    if workers > 1:
        assert verify(items, rows, cps, KEYS, scanner=_forked()) == verify(items, rows, cps, KEYS)

"""Ledger entries, canonical bytes, checkpoints and the mirror's batch check (pure, no I/O)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus.errors import PermanentError
from pilothouse.ledger import merkle
from pilothouse.ledger.domain import (
    GENESIS_PREV_HASH,
    ChainHead,
    Checkpoint,
    CheckpointSigner,
    EntryInvalid,
    KafkaTombstone,
    LedgerChain,
    LedgerEntry,
    LedgerIntegrityError,
    ProblemKind,
    build_entry,
    canonical_entry_bytes,
    check_batch,
    check_checkpoint_signature,
    check_entry,
    compute_entry_hash,
    key_id_for,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ledger"
WEBHOOK = json.loads((FIXTURES / "alertmanager_webhook_2_alerts.json").read_text())


def _event(i: int) -> dict:
    return {"event_id": f"ev-{i}", "incident_id": "inc-7", "correlation_id": "corr-7", "body": WEBHOOK, "n": i}


def _record(chain: LedgerChain, i: int) -> LedgerEntry:
    return chain.record(_event(i), event_id=f"le-{i}", occurred_at=1_764_000_000_000 + i, producer="ledger",
                        recorded_topic="pilothouse.sensing.alerts.v1", recorded_type="pilothouse.sensing.AlertReceived",
                        recorded_partition=2, recorded_offset=100 + i)


def test_entry_fields_and_links() -> None:
    chain = LedgerChain("main")
    e0, e1 = _record(chain, 0), _record(chain, 1)
    assert e0.sequence == 0 and e0.prev_hash == GENESIS_PREV_HASH
    assert e1.sequence == 1 and e1.prev_hash == e0.entry_hash
    assert e1.entry_key == "main:00000000000000000001"
    assert e0.recorded_event_id == "ev-0" == e0.causation_id
    assert e0.incident_id == "inc-7" and e0.correlation_id == "corr-7"
    assert e0.payload_sha256 == sha256(e0.payload_json.encode()).hexdigest()
    # payload is the canonical JSON of the recorded event
    assert e0.payload_json == json.dumps(_event(0), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert chain.head == ChainHead("main", 2, e1.entry_hash)


def test_entry_hash_is_the_rfc9162_leaf_hash_of_the_documented_bytes() -> None:
    e = _record(LedgerChain("main"), 0)
    pre = canonical_entry_bytes(e)
    header_line, payload = pre.split(b"\n", 2)[1:]
    assert pre.startswith(b"pilothouse.ledger.entry.v1\n")
    assert json.loads(header_line) == list(e[:16])
    assert header_line == orjson.dumps(list(e[:16]))  # compact: no whitespace
    assert payload == e.payload_json.encode()
    assert e.entry_hash == merkle.leaf_hash(pre).hex() == compute_entry_hash(e)
    assert LedgerEntry._fields[:16] == ("chain", "sequence", "entry_key", "prev_hash", "event_id", "incident_id",
                                        "correlation_id", "causation_id", "occurred_at", "producer",
                                        "recorded_event_id", "recorded_topic", "recorded_partition", "recorded_offset",
                                        "recorded_type", "payload_sha256")


def test_every_field_is_bound_by_the_entry_hash() -> None:
    e = _record(LedgerChain("main"), 0)
    for i, name in enumerate(LedgerEntry._fields):
        if name == "entry_hash":
            continue
        value = e[i]
        changed = (value + 1) if isinstance(value, int) else ("x" if value is None else value + "x")
        assert compute_entry_hash(e._replace(**{name: changed})) != e.entry_hash, name


def test_avro_record_round_trip_with_datetime() -> None:
    e = _record(LedgerChain("main"), 0)
    rec = e.to_record()
    rec["occurred_at"] = datetime.fromtimestamp(e.occurred_at / 1000, tz=UTC)
    assert LedgerEntry.from_record(rec) == e
    del rec["payload_json"]
    with pytest.raises(EntryInvalid, match="payload_json"):
        LedgerEntry.from_record(rec)


@pytest.mark.parametrize(
    "event,match",
    [
        ({"incident_id": "x"}, "no event_id"),
        ({"event_id": "e", "v": float("nan")}, "NaN|nan"),
        ({"event_id": "e", "v": [1, float("inf")]}, "inf"),
        ({"event_id": "e", "v": {1: "a"}}, "non-string key"),
        ({"event_id": "e", "v": b"raw"}, "canonical JSON"),
        ({"event_id": "e", "v": 2**70}, "canonical JSON"),
        ({"event_id": "e", "incident_id": 5}, "incident_id"),
    ],
)
def test_bad_events_are_refused_with_a_reason(event: dict, match: str) -> None:
    chain = LedgerChain("main")
    with pytest.raises(EntryInvalid, match=match):
        chain.record(event, event_id="le", occurred_at=1, producer="ledger", recorded_topic="t", recorded_type="T")
    assert chain.head.next_sequence == 0  # nothing recorded
    assert issubclass(EntryInvalid, PermanentError)


@pytest.mark.parametrize("name", ["", "has space", "new\nline", "a:b", "é", "x" * 200, "+plus"])
def test_chain_names_are_restricted(name: str) -> None:
    with pytest.raises(EntryInvalid):
        LedgerChain(name)


def test_naive_datetime_refused() -> None:
    with pytest.raises(EntryInvalid, match="timezone"):
        build_entry(ChainHead.genesis("main"), {"event_id": "e"}, event_id="le", occurred_at=datetime(2026, 1, 1),
                    producer="p", recorded_topic="t", recorded_type="T")


def test_ledger_chain_refuses_a_foreign_or_forged_entry() -> None:
    a, b = LedgerChain("main"), LedgerChain("main")
    e0 = _record(a, 0)
    _record(a, 1)
    b.append(e0)
    with pytest.raises(LedgerIntegrityError) as err:
        b.append(e0)  # same entry again
    assert err.value.problem.kind is ProblemKind.DUPLICATE
    forged = build_entry(b.head, _event(9), event_id="x", occurred_at=1, producer="p", recorded_topic="t",
                         recorded_type="T")._replace(payload_json='{"event_id":"ev-9","forged":true}')
    with pytest.raises(LedgerIntegrityError) as err:
        b.append(forged)
    assert err.value.problem.kind is ProblemKind.HASH_MISMATCH


# ------------------------------------------------------------------------------------------------- checkpoints ---
SIGNER = CheckpointSigner.from_seed("pilothouse-ledger", bytes(range(32)))
KEYS = {SIGNER.key_id: SIGNER.public_key}


def test_checkpoint_signs_a_c2sp_style_note() -> None:
    chain = LedgerChain("main")
    for i in range(5):
        _record(chain, i)
    cp = chain.checkpoint(SIGNER, 1_764_000_000_123)
    assert cp.tree_size == 5 and cp.root_hash == chain.tree.root().hex() and cp.head_hash == chain.head.last_hash
    body = cp.body()
    lines = body.split("\n")
    assert lines[:4] == ["pilothouse.ledger/main", "5", base64.b64encode(chain.tree.root()).decode(),
                         "signed_at 1764000000123"]
    assert lines[4] == f"head {cp.head_hash}" and body.endswith("\n")
    # The key id is the C2SP key hash; the note's signature line carries it.
    assert SIGNER.key_id.startswith("pilothouse-ledger+") and len(SIGNER.key_id.split("+")[1]) == 8
    note = cp.note()
    assert note.startswith(body + "\n\u2014 pilothouse-ledger ")
    blob = base64.b64decode(note.rstrip("\n").rsplit(" ", 1)[1])
    assert blob[:4].hex() == SIGNER.key_id.split("+")[1] and blob[4:] == base64.b64decode(cp.signature)
    SIGNER.public_key.verify(base64.b64decode(cp.signature), body.encode())
    assert check_checkpoint_signature(cp, KEYS) is None
    assert Checkpoint.from_dict(json.loads(json.dumps(cp.to_dict()))) == cp


def test_forged_and_altered_checkpoints_fail_signature_check() -> None:
    chain = LedgerChain("main")
    for i in range(3):
        _record(chain, i)
    cp = chain.checkpoint(SIGNER, 10)
    other = CheckpointSigner("pilothouse-ledger", Ed25519PrivateKey.generate())  # same name, different key
    assert other.key_id != SIGNER.key_id
    forged = other.sign("main", 3, cp.root_hash, 10, cp.head_hash)
    assert "not a trusted key" in check_checkpoint_signature(forged, KEYS)
    # a forgery claiming the trusted key id
    assert "does not verify" in check_checkpoint_signature(
        Checkpoint("main", 3, cp.root_hash, 10, SIGNER.key_id, forged.signature, cp.head_hash), KEYS)
    for field, value in [("tree_size", 2), ("root_hash", "ab" * 32), ("signed_at", 11), ("chain", "other"),
                         ("head_hash", "cd" * 32), ("head_hash", ""), ("signature", "!!notbase64")]:
        altered = Checkpoint(**{**cp.to_dict(), field: value})
        assert check_checkpoint_signature(altered, KEYS) is not None, field


@pytest.mark.parametrize(
    "bad",
    [{"tree_size": -1}, {"tree_size": "5"}, {"tree_size": True}, {"root_hash": "AB" * 32}, {"root_hash": "ab"},
     {"head_hash": "zz" * 32}, {"chain": 5}],
)
def test_checkpoint_from_dict_refuses_bad_input(bad: dict) -> None:
    cp = SIGNER.sign("main", 1, "ab" * 32, 1)
    with pytest.raises(EntryInvalid):
        Checkpoint.from_dict({**cp.to_dict(), **bad})
    with pytest.raises(EntryInvalid, match="lacks"):
        Checkpoint.from_dict({k: v for k, v in cp.to_dict().items() if k != "signature"})


def test_key_id_depends_on_name_and_key() -> None:
    k = Ed25519PrivateKey.generate().public_key()
    assert key_id_for("a", k) != key_id_for("b", k)


def test_proofs_from_the_ledger_chain_verify_against_a_checkpoint() -> None:
    chain = LedgerChain("main")
    entries = [_record(chain, i) for i in range(11)]
    cp = chain.checkpoint(SIGNER, 1)
    root = bytes.fromhex(cp.root_hash)
    for e in entries:
        proof = chain.tree.inclusion_proof(e.sequence, cp.tree_size)
        assert merkle.verify_inclusion(bytes.fromhex(e.entry_hash), e.sequence, cp.tree_size, proof, root)
    old = chain.root_hash(6)
    assert merkle.verify_consistency(6, 11, bytes.fromhex(old), root, chain.tree.consistency_proof(6, 11))


# ------------------------------------------------------------------------------------------- the mirror's check ---
def test_check_batch_accepts_a_continuation_and_stops_at_the_first_problem() -> None:
    chain = LedgerChain("main")
    entries = [_record(chain, i) for i in range(6)]
    n, problem, heads = check_batch({}, entries[:3])
    assert (n, problem) == (3, None) and heads["main"] == ChainHead("main", 3, entries[2].entry_hash)
    n, problem, heads2 = check_batch(heads, entries[3:])
    assert (n, problem) == (3, None) and heads2["main"].next_sequence == 6
    # gap
    n, problem, _ = check_batch(heads, [entries[4], entries[5]])
    assert n == 0 and problem.kind is ProblemKind.GAP and problem.sequence == 3
    # replayed entry (already written)
    n, problem, _ = check_batch(heads, [entries[2]])
    assert n == 0 and problem.kind is ProblemKind.DUPLICATE
    # tombstone mid-batch: the prefix before it is accepted, nothing after
    n, problem, _ = check_batch(heads, [entries[3], KafkaTombstone("main:00000000000000000004", 77), entries[5]])
    assert n == 1 and problem.kind is ProblemKind.TOMBSTONE and problem.sequence == 4
    # wrong types never raise, they are reported
    n, problem, _ = check_batch(heads, [entries[3]._replace(sequence="3")])
    assert n == 0 and problem.kind is ProblemKind.MALFORMED
    n, problem, _ = check_batch(heads, [("not", "an", "entry")])
    assert n == 0 and problem.kind is ProblemKind.MALFORMED


def test_check_entry_names_payload_and_key_tampering() -> None:
    chain = LedgerChain("main")
    e = _record(chain, 0)
    head = ChainHead.genesis("main")
    assert check_entry(e, head) is None
    assert check_entry(e._replace(payload_json=e.payload_json.replace("ev-0", "ev-X")), head).detail.startswith(
        "payload_json does not match")
    assert check_entry(e._replace(entry_key="main:0"), head).kind is ProblemKind.MALFORMED
    assert check_entry(e._replace(prev_hash="1" * 64), head).kind is ProblemKind.CHAIN_BREAK
    assert check_entry(e, ChainHead.genesis("other")).kind is ProblemKind.MALFORMED

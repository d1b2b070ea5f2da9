"""The ledger's handlers without a broker: the appender (head recovery, idempotence, transaction bookkeeping), the
chain follower of the checkpointer, the Avro round trip of entries and checkpoints, and the settings' refusals."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.records import KillSwitchChanged
from pilothouse.bus.serde import Serde
from pilothouse.ledger.config import Settings
from pilothouse.ledger.domain import (
    ChainHead,
    Checkpoint,
    CheckpointSigner,
    KafkaTombstone,
    LedgerChain,
    LedgerEntry,
    LedgerIntegrityError,
    ProblemKind,
    check_checkpoint_signature,
    verify,
)
from pilothouse.ledger.handlers import Appender, ChainFollower, to_checkpoint_record, to_entry_record
from pilothouse.ledger.merkle import MerkleTree

TOPIC = "pilothouse.console.kill-switch.v1"
SIGNER = CheckpointSigner.from_seed("unit", bytes(32))


def _event(i: int, event_id: str | None = None) -> KillSwitchChanged:
    return KillSwitchChanged(event_id=event_id or f"ev-{i}", correlation_id="c", scope="global", engaged=bool(i % 2),
                             changed_by="alice", occurred_at=datetime(2026, 1, 1, 0, 0, i % 60, 123000, tzinfo=UTC))


def _ctx(offset: int) -> MessageContext:
    return MessageContext(TOPIC, 0, offset, b"global")


def _appender(**kw) -> Appender:
    return Appender(ChainHead.genesis("main"), topic_entries="ledger.t", clock=lambda: 1_764_000_000_000, **kw)


def _entries(outputs) -> list[LedgerEntry]:
    return [LedgerEntry.from_record(o.record.model_dump()) for o in outputs]


def test_each_event_becomes_the_next_entry_and_a_redelivery_none() -> None:
    a = _appender()
    a.begin_batch()
    out = [o for i in range(5) for o in a.on_event(_event(i), _ctx(i))]
    again = a.on_event(_event(9, event_id="ev-2"), _ctx(7))  # same event id, published twice
    a.commit()
    assert again == [] and a.duplicates_skipped == 1
    entries = _entries(out)
    assert [e.sequence for e in entries] == list(range(5))
    assert [o.key for o in out] == [e.entry_key for e in entries] and {o.topic for o in out} == {"ledger.t"}
    assert verify(entries, None).ok
    e = entries[3]
    assert (e.recorded_event_id, e.causation_id, e.recorded_topic, e.recorded_offset) == ("ev-3", "ev-3", TOPIC, 3)
    assert e.recorded_type == "pilothouse.console.KillSwitchChanged" and '"changed_by":"alice"' in e.payload_json


def test_a_retried_transaction_produces_the_same_entries_and_an_aborted_one_none() -> None:
    a = _appender()
    a.begin_batch()
    first = [a.on_event(_event(i), _ctx(i)) for i in range(3)]
    # The processor retries the same batch after an aborted attempt: identical outputs, the head does not move on.
    assert [a.on_event(_event(i), _ctx(i)) for i in range(3)] == first
    assert a.head.next_sequence == 3
    a.rollback()  # gave up for good: the entries never existed
    assert a.head == ChainHead.genesis("main") and a.seen("ev-1") is None
    a.begin_batch()
    redo = [a.on_event(_event(i), _ctx(i)) for i in range(3)]
    a.commit()
    assert _entries([o for outs in redo for o in outs]) == _entries([o for outs in first for o in outs])


def test_recover_continues_the_chain_from_its_tail() -> None:
    chain = LedgerChain("main")
    entries = [chain.record({"event_id": f"ev-{i}"}, event_id=f"x{i}", occurred_at=i, producer="ledger",
                            recorded_topic=TOPIC, recorded_type="t") for i in range(10)]
    a = Appender.recover("main", entries[6:], from_start=False, topic_entries="t", window=100)
    assert a.head == ChainHead("main", 10, entries[-1].entry_hash)
    assert a.seen("ev-8") == 8 and a.seen("ev-2") is None  # only the tail window is remembered
    b = Appender.recover("main", entries, from_start=True, topic_entries="t", window=3)
    assert b.head.next_sequence == 10 and b.seen("ev-6") is None and b.seen("ev-7") == 7  # window bounds memory
    assert Appender.recover("main", [], from_start=True, topic_entries="t").head == ChainHead.genesis("main")


@pytest.mark.parametrize("damage", ["tombstone", "gap", "not_from_zero", "rewritten"])
def test_recover_refuses_a_tampered_tail(damage: str) -> None:
    chain = LedgerChain("main")
    entries: list = [chain.record({"event_id": f"ev-{i}"}, event_id=f"x{i}", occurred_at=i, producer="ledger",
                                  recorded_topic=TOPIC, recorded_type="t") for i in range(6)]
    kind = {"tombstone": ProblemKind.TOMBSTONE, "gap": ProblemKind.GAP, "not_from_zero": ProblemKind.GAP,
            "rewritten": ProblemKind.HASH_MISMATCH}[damage]
    from_start = True
    if damage == "tombstone":
        entries.append(KafkaTombstone("main:00000000000000000002", 6))
    elif damage == "gap":
        del entries[3]
    elif damage == "not_from_zero":
        entries = entries[2:]
    else:
        entries[4] = entries[4]._replace(recorded_offset=99)
    with pytest.raises(LedgerIntegrityError) as info:
        Appender.recover("main", entries, from_start=from_start, topic_entries="t")
    assert info.value.problem.kind is kind


def test_follower_signs_tree_heads_that_verify_and_stops_at_tamper_evidence() -> None:
    chain = LedgerChain("main")
    entries = [chain.record({"event_id": f"ev-{i}"}, event_id=f"x{i}", occurred_at=i, producer="ledger",
                            recorded_topic=TOPIC, recorded_type="t") for i in range(37)]
    f = ChainFollower("main")
    for e in entries[:20]:
        assert f.follow(e)
    assert not f.follow(entries[0]._replace(chain="other"))  # another chain's entry is not ours
    assert f.due(every=20, last_signed_at_ms=0, now=1, interval_ms=10**9)
    cp = f.sign(SIGNER, 1000)
    f.signed_size = cp.tree_size
    assert not f.due(every=20, last_signed_at_ms=1000, now=2000, interval_ms=10**9)  # nothing new
    assert cp.root_hash == MerkleTree(bytes.fromhex(e.entry_hash) for e in entries[:20]).root().hex()
    assert cp.head_hash == entries[19].entry_hash
    assert check_checkpoint_signature(cp, {SIGNER.key_id: SIGNER.public_key}) is None
    f.follow(entries[20])
    assert not f.due(every=20, last_signed_at_ms=1000, now=1500, interval_ms=1000)
    assert f.due(every=20, last_signed_at_ms=1000, now=2000, interval_ms=1000)  # time-based, one new entry
    with pytest.raises(LedgerIntegrityError) as info:
        f.follow(KafkaTombstone("main:00000000000000000021", 99))
    assert info.value.problem.kind is ProblemKind.TOMBSTONE and info.value.problem.sequence == 21
    with pytest.raises(LedgerIntegrityError) as info:
        f.follow(entries[22])
    assert info.value.problem.kind is ProblemKind.GAP


def test_entry_and_checkpoint_survive_the_avro_round_trip() -> None:
    a = _appender()
    a.begin_batch()
    (out,) = a.on_event(_event(1), _ctx(1))
    serde = Serde()
    data = serde.decode(serde.encode(out.record), expected="pilothouse.ledger.LedgerEntry").data
    entry = LedgerEntry.from_record(data)
    assert verify([entry], None).ok and entry == _entries([out])[0]
    cp = LedgerChain("main", [entry]).checkpoint(SIGNER, 1_764_000_000_123)
    rec = to_checkpoint_record(cp)
    back = Checkpoint.from_dict(serde.decode(serde.encode(rec)).data)
    assert back == cp and rec.note == cp.note()
    assert to_entry_record(entry).occurred_at == datetime(2025, 11, 24, 16, 0, tzinfo=UTC)


def test_settings_refuse_bad_keys_and_foreign_group_prefixes(monkeypatch) -> None:
    for k in ("PILOTHOUSE_LEDGER_SIGNING_KEY", "PILOTHOUSE_LEDGER_GROUP_PREFIX"):
        monkeypatch.delenv(k, raising=False)
    assert Settings().group("mirror") == "pilothouse.ledger.mirror"
    with pytest.raises(ValidationError, match="32-byte"):
        Settings(signing_key=base64.b64encode(b"short").decode())
    with pytest.raises(ValidationError, match="base64"):
        Settings(signing_key="not base64!")
    with pytest.raises(ValidationError):
        Settings(group_prefix="pilothouse.policy")
    with pytest.raises(ValidationError, match="32-byte"):
        Settings(trusted_keys={"k": base64.b64encode(b"x" * 31).decode()})
    s = Settings(signing_key=base64.b64encode(bytes(32)).decode())
    assert "AAAA" not in repr(s)  # the seed never shows in a repr


def test_a_dead_lettered_record_is_recorded_once_with_its_hash_not_its_bytes() -> None:
    a = _appender()
    a.begin_batch()
    (first,) = a.on_event(_event(0), _ctx(0))
    (out,) = a.on_dead_letter(_ctx(1), reason="unknown framing (first bytes 6e6f)", value=b"not avro")
    assert a.on_dead_letter(_ctx(1), reason="again", value=b"not avro") == [out]  # the retried batch: same entry
    a.commit()
    assert a.on_dead_letter(_ctx(1), reason="redelivered", value=b"not avro") == []  # recorded already
    entry = _entries([out])[0]
    assert entry.sequence == 1 and entry.recorded_type == "pilothouse.ledger.DeadLettered"
    assert entry.recorded_event_id == f"dead-letter:{TOPIC}:0:1" and verify(_entries([first, out]), None).ok
    assert "not avro" not in entry.payload_json and '"dead_lettered_to":"' + TOPIC + '.dlq"' in entry.payload_json

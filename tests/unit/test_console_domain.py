"""The console's read model, action states and pre-checks (pure: no broker, no HTTP)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.records import CheckpointSigned, HypothesisValidated, LedgerEntry
from pilothouse.console.auth import Account
from pilothouse.console.config import DEFAULT_TOPICS
from pilothouse.console.domain import (
    DecisionRefused,
    ReadModel,
    action_status,
    Signature,
    approval_statement,
    build_approval,
    check_can_decide,
    check_can_validate,
    clean_comment,
)
from pilothouse.console.handlers import WrongRecord, build_handlers
from tests.e2e.console_world import World

ALICE = Account(id="alice", display="Alice", roles=("approver",))
RITA = Account(id="rita", display="Rita", roles=("responder",))


def built(w: World) -> ReadModel:
    m = ReadModel()
    for r in w.upstream():
        assert m.apply(r)
    return m


def ledger_entry(record, seq: int, topic: str) -> LedgerEntry:
    payload = json.dumps(record.model_dump(mode="json"), sort_keys=True)
    return LedgerEntry(event_id=f"le-{seq}-{record.event_id}", correlation_id="c", occurred_at=record.occurred_at,
                       chain="main", sequence=seq, entry_key=f"main:{seq}", prev_hash="0" * 64,
                       entry_hash=f"{seq:064x}", recorded_event_id=record.event_id, recorded_topic=topic,
                       recorded_type=type(record).AVRO_NAME, payload_json=payload, payload_sha256="0" * 64)


def test_replayed_records_change_nothing():
    w = World()
    records = w.upstream()
    m = ReadModel()
    assert all(m.apply(r) for r in records)
    v, timeline = m.version, m.timeline(w.incident_id)
    assert not any(m.apply(r) for r in records)  # a replay after a crash
    assert m.version == v and m.timeline(w.incident_id) == timeline


def test_latest_incident_version_and_pending_request_win_whatever_the_order():
    w = World()
    m = ReadModel()
    v2, v1 = w.incident(2, title="second"), w.incident(1, title="first")
    m.apply(v2)
    m.apply(v1)  # an older version arriving late does not replace the newer one
    assert m.incidents[w.incident_id].title == "second"
    newer, older = w.pending(approved_by=["alice"], minutes=1), w.pending(minutes=-1)
    m.apply(newer)
    m.apply(older)
    assert m.pending[w.action_id].approved_by == ["alice"]


def test_action_moves_through_its_states():
    w = World()
    m = built(w)
    now = w.now
    assert action_status(m, w.action_id, now).text.startswith("waiting for 2 more")
    m.apply(w.pending(approved_by=["alice"], minutes=0))
    assert action_status(m, w.action_id, now).text.startswith("waiting for 1 more")
    m.apply(w.authorized(["a", "b"]))
    assert action_status(m, w.action_id, now).state == "authorized"
    m.apply(w.executed())
    assert action_status(m, w.action_id, now).state == "executed"
    m.apply(w.verified())
    st = action_status(m, w.action_id, now)
    assert (st.state, st.final) == ("verified", True)
    assert action_status(m, w.action_id, now + timedelta(hours=1)).state == "verified"  # final states do not expire


def test_expiry():
    w = World()
    m = built(w)
    assert action_status(m, w.action_id, w.now + w.expires_in).state == "expired"
    assert m.pending_list(w.now + w.expires_in) == []
    assert [p.action_id for p in m.pending_list(w.now)] == [w.action_id]


def test_ledger_entries_tell_the_console_what_people_decided_and_where_the_chain_is():
    w = World()
    m = built(w)
    val = HypothesisValidated(event_id="v1", incident_id=w.incident_id, correlation_id="c", occurred_at=w.now,
                              hypothesis_id=w.h1, verdict="validated", validator_id="ALICE")
    st = approval_statement(RITA, w.pending(), "reject", w.now, timedelta(minutes=5))
    appr = build_approval(RITA, w.pending(), st, Signature(st.statement_id, "ed25519:x", "sig"), "no", w.now)
    m.apply(ledger_entry(val, 0, "pilothouse.console.hypothesis-validations.v1"))
    m.apply(ledger_entry(appr, 1, "pilothouse.console.approvals.v1"))
    garbage = ledger_entry(appr, 2, "pilothouse.console.approvals.v1").model_copy(update={"payload_json": "{oops"})
    m.apply(garbage)
    assert m.validators_of(w.h1) == {"alice": "validated"}
    assert action_status(m, w.action_id, w.now).state == "rejected"
    assert (m.ledger.last_sequence, m.ledger.entries_seen) == (2, 3)
    m.apply(CheckpointSigned(event_id="cp", correlation_id="c", occurred_at=w.now, chain="main", tree_size=2,
                             root_hash="ab" * 32, signed_at=w.now, key_id="k1", signature="s", note="n"))
    assert m.ledger.uncheckpointed == 1
    # Alice validated: she may not approve the action built on that hypothesis.
    with pytest.raises(DecisionRefused) as e:
        check_can_decide(m, ALICE, w.action_id, w.hash, "approve", w.now)
    assert e.value.code in ("approver_is_validator", "not_pending")


def test_validator_of_the_hypothesis_named_by_policy_cannot_approve():
    w = World()
    m = built(w)
    m.apply(w.pending(validated_by="Alice", minutes=0))
    with pytest.raises(DecisionRefused) as e:
        check_can_decide(m, ALICE, w.action_id, w.hash, "approve", w.now)
    assert e.value.code == "approver_is_validator"


def test_validation_checks():
    w = World()
    m = built(w)
    with pytest.raises(DecisionRefused) as e:
        check_can_validate(m, RITA, "no-such")
    assert e.value.status == 404
    assert check_can_validate(m, RITA, w.h1)[1].hypothesis_id == w.h1
    m.record_own(HypothesisValidated(event_id="x", incident_id=w.incident_id, correlation_id="c", occurred_at=w.now,
                                     hypothesis_id=w.h1, verdict="rejected", validator_id="rita"))
    with pytest.raises(DecisionRefused, match="already rejected"):
        check_can_validate(m, RITA, w.h1)


def test_timeline_is_in_time_order_and_finds_alerts_by_fingerprint():
    w = World()
    m = built(w)
    items = m.timeline(w.incident_id)
    assert [i.at for i in items] == sorted(i.at for i in items)
    kinds = {i.kind for i in items}
    assert {"alert", "incident", "evidence", "hypotheses", "proposal", "shadow"} <= kinds


@pytest.mark.parametrize("text, ok", [("fine", True), ("two\nlines\tok", True), ("bidi\u202eevil", False),
                                      ("bell\x07", False), ("x" * 11, False)])
def test_comments(text, ok):
    if ok:
        assert clean_comment(text, 10 if len(text) <= 10 else 100)
    else:
        with pytest.raises(DecisionRefused):
            clean_comment(text, 10)


def test_handlers_refuse_a_record_of_the_wrong_type():
    w = World()
    m = ReadModel()
    handlers, expected = build_handlers(m, dict(DEFAULT_TOPICS))
    assert set(handlers) == set(DEFAULT_TOPICS.values())
    ctx = MessageContext(topic=DEFAULT_TOPICS["pending"], partition=0, offset=0, key=None)
    with pytest.raises(WrongRecord):
        handlers[DEFAULT_TOPICS["pending"]](w.shadow(), ctx)
    handlers[DEFAULT_TOPICS["pending"]](w.pending(), ctx)
    assert w.action_id in m.pending

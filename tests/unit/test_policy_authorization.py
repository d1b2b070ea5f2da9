"""From an allowed decision to a signed ActionAuthorized the actuator accepts (bus contract), and nothing else."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus import authorization as bus_auth
from pilothouse.bus.records import ActionAuthorized
from pilothouse.policy.domain import (
    Decision,
    NotAuthorizable,
    PolicyInput,
    authorization_terms,
    parse_policy_input,
    record_decision,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = json.loads((REPO / "policies/pilothouse/fixtures/data.json").read_text(encoding="utf-8"))
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def approved_input(expires_at: str = "2026-11-25T12:15:00Z") -> PolicyInput:
    doc = copy.deepcopy(FIXTURES["base_input"])
    del doc["action"]["action_hash"]
    policy_input = parse_policy_input(doc)
    approval = {**FIXTURES["alice"], "action_hash": policy_input.action.action_hash, "expires_at": expires_at}
    doc["approvals"] = [approval]
    return parse_policy_input(doc)


def decision(policy_input: PolicyInput, outcome: str = "allow", accepted: tuple[str, ...] = ("ap-alice",)) -> Decision:
    return Decision.model_validate({
        "entrypoint": "approvals", "outcome": outcome, "allow": outcome == "allow",
        "requires_approval": outcome == "pending_approval", "approvers_needed": 1, "approvals_still_needed": 0,
        "approver_roles": ["admin", "approver"], "risk": {}, "reasons": ["approvals_sufficient: 1 of 1"],
        "reason_codes": ["approvals_sufficient"], "accepted_approvals": list(accepted), "refused_approvals": [],
        "action_hash": policy_input.action.action_hash, "bundle_revision": "2026.11.25-1",
    })


def signed_authorization(policy_input: PolicyInput, ttl: timedelta = timedelta(minutes=5)) -> ActionAuthorized:
    record = record_decision(policy_input, decision(policy_input))
    terms = authorization_terms(policy_input, record, ttl=ttl)
    a = policy_input.action
    unsigned = ActionAuthorized(
        event_id="ev-1", incident_id="inc-1", correlation_id="corr-1", occurred_at=terms.issued_at,
        authorization_id="auth-1", action_type=a.action_type, target_kind=a.target.kind, target=a.target.name,
        params_json=json.dumps(a.params), key_id="", signature="", **terms.model_dump(),
    )
    return bus_auth.sign(KEY, unsigned)


def keys() -> dict:
    return {bus_auth.key_id(KEY.public_key()): KEY.public_key()}


def test_terms_from_an_allowed_decision_sign_and_verify_with_the_bus_contract() -> None:
    policy_input = approved_input()
    signed = signed_authorization(policy_input)
    bus_auth.verify(keys(), signed, now=NOW, expected_action_hash=policy_input.action.computed_hash())
    assert signed.approval_ids == ["ap-alice"]
    assert signed.input_sha256 == policy_input.digest()
    assert signed.decision_id.startswith("dec-")


def test_authorization_never_outlives_the_approval() -> None:
    policy_input = approved_input(expires_at="2026-11-25T12:02:00Z")
    signed = signed_authorization(policy_input, ttl=timedelta(minutes=10))
    assert signed.expires_at == datetime(2026, 11, 25, 12, 2, tzinfo=UTC)
    with pytest.raises(bus_auth.AuthorizationInvalid, match="expired"):
        bus_auth.verify(keys(), signed, now=NOW + timedelta(minutes=2), expected_action_hash=signed.action_hash)


def test_ttl_bounds_the_authorization() -> None:
    signed = signed_authorization(approved_input(), ttl=timedelta(seconds=30))
    assert signed.expires_at == NOW + timedelta(seconds=30)


def test_altered_authorization_is_refused_by_the_actuator_side() -> None:
    policy_input = approved_input()
    signed = signed_authorization(policy_input)
    tampered = signed.model_copy(update={"params_json": '{"grace_seconds": 0}'})
    with pytest.raises(bus_auth.AuthorizationInvalid, match="does not match"):
        bus_auth.verify(keys(), tampered, now=NOW, expected_action_hash=signed.action_hash)


@pytest.mark.parametrize("outcome", ["pending_approval", "deny"])
def test_no_terms_without_allow(outcome: str) -> None:
    policy_input = approved_input()
    record = record_decision(policy_input, decision(policy_input, outcome=outcome, accepted=()))
    with pytest.raises(NotAuthorizable, match=outcome):
        authorization_terms(policy_input, record)


def test_no_terms_for_a_decision_on_another_input() -> None:
    policy_input = approved_input()
    record = record_decision(policy_input, decision(policy_input))
    other = approved_input(expires_at="2026-11-25T12:14:00Z")
    with pytest.raises(NotAuthorizable, match="another input"):
        authorization_terms(other, record)


def test_no_terms_with_non_positive_ttl() -> None:
    policy_input = approved_input()
    record = record_decision(policy_input, decision(policy_input))
    with pytest.raises(NotAuthorizable, match="ttl"):
        authorization_terms(policy_input, record, ttl=timedelta(0))

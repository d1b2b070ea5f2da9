"""Pure tests of pilothouse.policy.domain: identities, canonical hashes, the input and decision documents."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pilothouse.bus.errors import PermanentError
from pilothouse.policy import domain
from pilothouse.policy.domain import (
    Decision,
    IdentityInvalid,
    PolicyEvaluationFailed,
    PolicyInputInvalid,
    action_hash,
    canonical_json,
    normalise_identity,
    parse_policy_input,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = json.loads((REPO / "policies/pilothouse/fixtures/data.json").read_text(encoding="utf-8"))


def base_document() -> dict:
    """The Rego tests' base input, with the placeholder hash removed so the model computes the real one."""
    doc = copy.deepcopy(FIXTURES["base_input"])
    del doc["action"]["action_hash"]
    return doc


# -- identities -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        "oncall-7",
        "ONCALL-7",
        " OnCall-7\t",
        "on\u200bcall-7",  # zero-width space
        "oncall\u2060-7\ufeff",  # word joiner, BOM
        "\uff4f\uff4e\uff43\uff41\uff4c\uff4c-\uff17",  # full-width letters and digit
        "oncall-7\U000e0041\U000e007f",  # tag characters
        "onc\u034fall-7\ufe0f",  # combining grapheme joiner, variation selector
        "ONCALL\u20117".replace("\u2011", "-"),
    ],
)
def test_identity_variants_normalise_to_one_id(variant: str) -> None:
    assert normalise_identity(variant) == "oncall-7"


def test_distinct_people_stay_distinct() -> None:
    assert normalise_identity("oncall-7") != normalise_identity("oncall-1")
    # Casefold folds the German sharp s like case-insensitive comparison would, by design.
    assert normalise_identity("STRASSE") == normalise_identity("straße")


@pytest.mark.parametrize("bad", ["", "   ", "\u200b\u200d", "ali\nce", "a\x00b", "x" * 300])
def test_unusable_identity_refused(bad: str) -> None:
    with pytest.raises(IdentityInvalid):
        normalise_identity(bad)


def test_identity_errors_are_permanent() -> None:
    with pytest.raises(PermanentError):
        normalise_identity(42)  # type: ignore[arg-type]


def test_principal_ids_and_roles_normalised_in_model() -> None:
    p = domain.Principal(id="ＡＬＩＣＥ\u200b", kind="human", roles=[" Approver", "approver", "ADMIN"])
    assert p.id == "alice"
    assert p.roles == ["admin", "approver"]


# -- canonical JSON and hashes ------------------------------------------------------------------------------------


def test_canonical_json_sorts_keys_and_is_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": None, "c": "é"}]}) == '{"a":[1,{"c":"é","d":null}],"b":1}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {"x": [float("-inf")]}, {1: "non-string key"}])
def test_canonical_json_refuses_values_without_a_canonical_form(bad: object) -> None:
    with pytest.raises(PolicyInputInvalid):
        canonical_json(bad)


def test_action_hash_ignores_key_order_but_not_values() -> None:
    h1 = action_hash("scale_replicas", "service", "checkout", {"replicas": 3, "max_surge": 1})
    assert h1 == action_hash("scale_replicas", "service", "checkout", {"max_surge": 1, "replicas": 3})
    assert len(h1) == 64
    assert action_hash("scale_replicas", "service", "checkout", {"replicas": 4, "max_surge": 1}) != h1
    assert action_hash("restart_service", "service", "checkout", {"replicas": 3, "max_surge": 1}) != h1
    assert action_hash("scale_replicas", "instance", "checkout", {"replicas": 3, "max_surge": 1}) != h1
    assert action_hash("scale_replicas", "service", "payments", {"replicas": 3, "max_surge": 1}) != h1


def test_action_hash_is_the_bus_contract() -> None:
    """Policy, console and actuator must agree on the hash: it is the bus's, over the documented canonical form."""
    import hashlib

    from pilothouse.bus.actions import action_hash as bus_action_hash

    expected_bytes = b'{"action_type":"restart_service","params":{},"target":"s","target_kind":"service"}'
    assert action_hash("restart_service", "service", "s", {}) == hashlib.sha256(expected_bytes).hexdigest()
    assert action_hash("restart_service", "service", "s", {"a": 1}) == bus_action_hash("restart_service", "service", "s", {"a": 1})


def test_action_hash_refuses_non_finite_params() -> None:
    with pytest.raises(PolicyInputInvalid):
        action_hash("shift_traffic", "service", "s", {"percent": float("nan")})


# -- the input document -------------------------------------------------------------------------------------------


def test_input_computes_the_action_hash_and_normalises() -> None:
    doc = base_document()
    doc["proposal"]["hypothesis"]["validations"][0]["validator"]["id"] = "ONCALL-1\u200b"
    doc["now"] = "2026-11-25T13:00:00+01:00"
    policy_input = parse_policy_input(doc)
    sent = policy_input.to_opa()
    a = doc["action"]
    assert sent["action"]["action_hash"] == action_hash(a["action_type"], "service", "checkout", a["params"])
    assert sent["proposal"]["hypothesis"]["validations"][0]["validator"]["id"] == "oncall-1"
    assert sent["now"] == "2026-11-25T12:00:00Z"
    assert sent["controls"]["kill_switch"] == {"global": False, "services": []}


def test_input_refuses_a_hash_that_does_not_match_the_action() -> None:
    doc = base_document()
    doc["action"]["action_hash"] = FIXTURES["other_hash"]
    with pytest.raises(PolicyInputInvalid, match="does not match the action"):
        parse_policy_input(doc)


def test_canonical_text_hashes_to_the_digest() -> None:
    import hashlib

    policy_input = parse_policy_input(base_document())
    assert hashlib.sha256(policy_input.canonical_text().encode()).hexdigest() == policy_input.digest()
    assert parse_policy_input(policy_input.canonical_text()) == policy_input  # the recorded input replays


def test_input_digest_is_stable_and_sensitive() -> None:
    a = parse_policy_input(base_document())
    b = parse_policy_input(json.dumps(base_document()))
    assert a.digest() == b.digest()
    changed = base_document()
    changed["budget"]["consumed"] = 1
    assert parse_policy_input(changed).digest() != a.digest()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("now",), "2026-11-25T12:00:00", "timezone"),
        (("action", "action_type"), "rm_rf", "action_type"),
        (("action", "facts", "blast_radius"), "galactic", "blast_radius"),
        (("action", "target", "service"), "check\u200bout", "invisible"),
        (("action", "target", "name"), "", "name"),
        (("action", "params"), {"ratio": float("nan")}, "params"),
        (("proposal", "proposed_by", "id"), "\u200b", "empty after normalisation"),
        (("budget", "consumed"), -1, "consumed"),
        (("budget", "window_end"), "2026-11-24T00:00:00Z", "window_end"),
        (("incident", "severity"), "sev0", "severity"),
        (("approvals",), [{"approval_id": "x"}] * 33, "approvals"),
        (("approvals",), [FIXTURES["alice"] | {"action_hash": "0" * 64}] * 2, "unique"),
        (("unexpected",), True, "unexpected"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(path: tuple[str, ...], value: object, message: str) -> None:
    doc = base_document()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(PolicyInputInvalid, match=message):
        parse_policy_input(doc)


def test_oversized_params_refused() -> None:
    doc = base_document()
    doc["action"]["params"] = {"blob": "x" * (domain.MAX_PARAMS_BYTES + 1)}
    with pytest.raises(PolicyInputInvalid, match="bytes of canonical JSON"):
        parse_policy_input(doc)


# -- the decision document ----------------------------------------------------------------------------------------


def decision_document(**overrides: object) -> dict:
    doc = {
        "entrypoint": "proposal",
        "outcome": "pending_approval",
        "allow": False,
        "requires_approval": True,
        "approvers_needed": 1,
        "approvals_still_needed": 1,
        "approver_roles": ["admin", "approver"],
        "risk": {
            "tier": "medium",
            "score": 4,
            "cost": 4,
            "budget_scope": "checkout",
            "budget_limit": 40,
            "budget_remaining": 40,
            "budget_low": False,
            "frozen_by": [],
        },
        "reasons": ["approval_required: medium risk needs 1 approver"],
        "reason_codes": ["approval_required"],
        "accepted_approvals": [],
        "refused_approvals": [],
        "action_hash": "a" * 64,
        "bundle_revision": "r1",
    }
    doc.update(overrides)
    return doc


def test_decision_parses_and_empty_risk_becomes_none() -> None:
    assert Decision.model_validate(decision_document()).risk.tier == "medium"
    assert Decision.model_validate(decision_document(risk={})).risk is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"allow": True},  # allow contradicts outcome
        {"outcome": "allow", "allow": True},  # requires_approval still true
        {"reasons": []},
        {"reasons": ["no code here"]},
        {"refused_approvals": [{"approval_id": "a", "approver_id": "b", "codes": [], "reasons": []}]},
        {"extra_field": 1},
    ],
)
def test_inconsistent_decision_rejected(overrides: dict) -> None:
    with pytest.raises(ValueError):
        Decision.model_validate(decision_document(**overrides))


def test_decision_record_is_deterministic_and_bound_to_the_input() -> None:
    policy_input = parse_policy_input(base_document())
    decision = Decision.model_validate(decision_document(action_hash=policy_input.action.action_hash))
    first = domain.record_decision(policy_input, decision)
    again = domain.record_decision(parse_policy_input(base_document()), decision)
    assert first == again
    assert first.decision_id.startswith("dec-")
    assert first.input_hash == policy_input.digest()
    other_revision = Decision.model_validate(decision_document(action_hash=policy_input.action.action_hash, bundle_revision="r2"))
    assert domain.record_decision(policy_input, other_revision).decision_id != first.decision_id
    with pytest.raises(PolicyEvaluationFailed):
        domain.record_decision(policy_input, Decision.model_validate(decision_document()))


@pytest.mark.parametrize(
    ("entrypoint", "outcome", "expected"),
    [
        ("proposal", "deny", ("proposal", "denied")),
        ("proposal", "pending_approval", ("proposal", "pending_approval")),
        ("proposal", "allow", ("proposal", "auto_allowed")),
        ("approvals", "deny", ("approval", "denied")),
        ("approvals", "pending_approval", ("approval", "waiting")),
        ("approvals", "allow", ("approval", "authorized")),
    ],
)
def test_bus_stage_and_outcome(entrypoint: str, outcome: str, expected: tuple[str, str]) -> None:
    from typing import get_args

    from pilothouse.bus.records import PolicyDecided

    d = Decision.model_validate(
        decision_document(entrypoint=entrypoint, outcome=outcome, allow=outcome == "allow",
                          requires_approval=outcome == "pending_approval")
    )
    stage, bus_outcome = domain.bus_stage_and_outcome(d)
    assert (stage, bus_outcome) == expected
    assert stage in get_args(PolicyDecided.model_fields["stage"].annotation)
    assert bus_outcome in get_args(PolicyDecided.model_fields["outcome"].annotation)


# -- bus records -> input parts -----------------------------------------------------------------------------------

ENVELOPE = {"event_id": "ev-1", "incident_id": "inc-1", "correlation_id": "c-1", "occurred_at": "2026-11-25T11:55:00Z"}


def proposed(**overrides: object):
    from pilothouse.bus.records import ActionProposed

    fields = {
        **ENVELOPE, "action_id": "act-1", "hypothesis_id": "hyp-1", "action_type": "scale_replicas",
        "target_kind": "service", "target": "checkout", "params_json": '{"replicas": 4}',
        "action_hash": action_hash("scale_replicas", "service", "checkout", {"replicas": 4}),
        "proposed_by": "reasoning", "catalogue_version": "v1", "reversible": True, "blast_radius": "medium",
        "read_only": False,
    }
    fields.update(overrides)
    return ActionProposed.model_validate(fields)


def test_action_from_record() -> None:
    action = domain.action_from_record(proposed(), service="checkout", environment="production")
    assert action.params == {"replicas": 4}
    assert action.target.kind == "service" and action.target.environment == "production"
    assert action.facts.blast_radius == "medium"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"params_json": '{"replicas": 40}'}, "does not match"),  # params changed after hashing
        ({"target": "payments"}, "does not match"),
        ({"params_json": "{not json"}, "not JSON"),
        ({"blast_radius": "cosmic"}, "blast_radius"),
        ({"action_type": "drop_database"}, "action_type"),
    ],
)
def test_action_from_record_refuses_inconsistent_records(overrides: dict, message: str) -> None:
    with pytest.raises(PolicyInputInvalid, match=message):
        domain.action_from_record(proposed(**overrides), service="checkout", environment="production")


def test_validation_and_approval_from_records() -> None:
    from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated

    validated = HypothesisValidated.model_validate({
        **ENVELOPE, "hypothesis_id": "hyp-1", "verdict": "validated", "validator_id": "ONCALL-1\u200b",
        "validator_roles": ["Responder"],
    })
    v = domain.validation_from_record(validated)
    assert v.validator.id == "oncall-1" and v.validator.kind == "human" and v.validator.roles == ["responder"]
    assert domain.validation_from_record(validated.model_copy(update={"verdict": "rejected"})) is None

    recorded = ApprovalRecorded.model_validate({
        **ENVELOPE, "approval_id": "ap-1", "action_id": "act-1", "action_hash": "a" * 64, "decision": "approve",
        "approver_id": "Alice", "approver_roles": ["approver"], "expires_at": "2026-11-25T12:10:00Z",
    })
    a = domain.approval_from_record(recorded)
    assert a.approver.id == "alice" and a.granted_at.isoformat() == "2026-11-25T11:55:00+00:00"
    assert domain.approval_from_record(recorded.model_copy(update={"decision": "reject"})) is None
    with pytest.raises(PolicyInputInvalid):
        domain.approval_from_record(recorded.model_copy(update={"approver_id": "\u200b"}))

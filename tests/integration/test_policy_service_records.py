"""Builders of the bus records the policy service consumes (no tests here: shared by test_policy_service_*.py)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus import attestation
from pilothouse.bus.actions import action_hash, load_actions
from pilothouse.bus.identity import normalise_identity
from pilothouse.bus.records import (
    ActionExecuted,
    ActionProposed,
    ApprovalRecorded,
    HypothesisValidated,
    IncidentUpdated,
    KillSwitchChanged,
    RedactionManifest,
)


# Every person the tests act as has an enrolled key (service ids too: the Rego must still refuse them as humans).
# Roles are enrolled only for the kill-switch admin; the others act with the roles their records claim.
HUMAN_KEYS: dict[str, Ed25519PrivateKey] = {
    u: Ed25519PrivateKey.generate() for u in ("alice", "bob", "carol", "dave", "vera", "e", "f", "root-admin",
                                              "reasoning", "svc:deployer")}
ENROLLED_ROLES = {"root-admin": ["admin"]}


def human_key(person: str) -> Ed25519PrivateKey:
    return HUMAN_KEYS.setdefault(normalise_identity(person), Ed25519PrivateKey.generate())


def registry() -> attestation.HumanKeyRegistry:
    """The enrolled keys of every test person (what PILOTHOUSE_POLICY_HUMAN_KEYS points at)."""
    return attestation.HumanKeyRegistry.from_document({"humans": {
        u: {"roles": ENROLLED_ROLES.get(u, []), "keys": [{"public_key": attestation.public_key_b64(k.public_key())}]}
        for u, k in HUMAN_KEYS.items()}})


def registry_file(directory: Path) -> Path:
    path = directory / "human-keys.json"
    path.write_text(json.dumps(registry().document()))
    return path


def now() -> datetime:
    return datetime.now(UTC)


def eid() -> str:
    return str(uuid.uuid4())


def incident(incident_id: str, severity: str = "error", service: str = "checkout") -> IncidentUpdated:
    t = now()
    return IncidentUpdated(
        event_id=eid(), incident_id=incident_id, correlation_id=incident_id, occurred_at=t, producer="sensing",
        version=1, change="opened", state="open", title="errors up", severity=severity, primary_service=service,
        first_seen=t, last_seen=t, redaction=RedactionManifest(ruleset_version="test", scanned=True))


def proposal(incident_id: str, hypothesis_id: str, *, action_type: str = "restart_service", service: str = "checkout",
             params: dict | None = None, proposed_by: str = "reasoning", action_id: str | None = None,
             target_kind: str = "service", target: str | None = None, tamper_hash: bool = False) -> ActionProposed:
    params = params if params is not None else {"service": service}
    target = target or service
    spec = load_actions().get(action_type)
    digest = action_hash(action_type, target_kind, target, params)
    if tamper_hash:
        digest = "0" * 64
    return ActionProposed(
        event_id=eid(), incident_id=incident_id, correlation_id=incident_id, occurred_at=now(), producer="reasoning",
        action_id=action_id or f"act-{uuid.uuid4().hex[:10]}", hypothesis_id=hypothesis_id, action_type=action_type,
        target_kind=target_kind, target=target, params_json=orjson.dumps(params).decode(), action_hash=digest,
        proposed_by=proposed_by, catalogue_version="3", reversible=spec.reversible, blast_radius=spec.blast_radius,
        read_only=spec.read_only)


def validation(incident_id: str, hypothesis_id: str, validator: str = "vera", roles: tuple[str, ...] = ("responder",),
               verdict: str = "validated", signed: bool = True) -> HypothesisValidated:
    rec = HypothesisValidated(
        event_id=eid(), incident_id=incident_id, correlation_id=incident_id, occurred_at=now(), producer="console",
        hypothesis_id=hypothesis_id, verdict=verdict, validator_id=validator, validator_display=validator,
        validator_roles=list(roles))
    return attestation.sign_record(human_key(validator), rec) if signed else rec


def approval(p: ActionProposed, approver: str, *, roles: tuple[str, ...] = ("approver",), decision: str = "approve",
             action_hash_: str | None = None, expires_in: timedelta = timedelta(minutes=10),
             granted_ago: timedelta = timedelta(0), comment: str = "", signed: bool = True) -> ApprovalRecorded:
    t = now() - granted_ago
    rec = ApprovalRecorded(
        event_id=eid(), incident_id=p.incident_id, correlation_id=p.correlation_id, occurred_at=t, producer="console",
        approval_id=eid(), action_id=p.action_id, action_hash=action_hash_ or p.action_hash, decision=decision,
        approver_id=approver, approver_display=approver, approver_roles=list(roles), comment=comment,
        expires_at=t + expires_in)
    return attestation.sign_record(human_key(approver), rec) if signed else rec


def kill_switch(scope: str, engaged: bool = True, signed: bool = True) -> KillSwitchChanged:
    e = eid()
    rec = KillSwitchChanged(event_id=e, correlation_id=e, occurred_at=now(), producer="console", scope=scope,
                            engaged=engaged, changed_by="root-admin", reason="test")
    return attestation.sign_record(human_key("root-admin"), rec) if signed else rec


def executed(p: ActionProposed, authorization_id: str, outcome: str = "executed") -> ActionExecuted:
    t = now()
    return ActionExecuted(
        event_id=eid(), incident_id=p.incident_id, correlation_id=p.correlation_id, occurred_at=t, producer="actuator",
        execution_id=eid(), action_id=p.action_id, authorization_id=authorization_id, action_hash=p.action_hash,
        outcome=outcome, started_at=t, finished_at=t)

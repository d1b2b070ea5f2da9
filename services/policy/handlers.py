"""One handler per consumed record type: record in, output records out (inside the service's Kafka transaction).

Each handler runs ONE Postgres transaction: it checks the input event id in ``processed`` (a redelivered record
re-emits the outputs stored the first time, same event ids), changes state, asks OPA where a decision is due, and
stores its outputs with the event id before commit. The TransactionalProcessor then commits those outputs together
with the input offset in one Kafka transaction. Order: Postgres commit, then Kafka commit; a crash between them
redelivers the input, which re-emits the stored outputs (README: "exactly-once design").
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import Counter

from pilothouse.bus import authorization
from pilothouse.bus.attestation import AttestationInvalid, HumanKeyRegistry
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.identity import IdentityInvalid, normalise_identity
from pilothouse.bus.records import (
    RECORDS,
    ActionAuthorized,
    ActionExecuted,
    ActionProposed,
    ActionVerified,
    ApprovalRecorded,
    ApprovalRequested,
    AvroRecord,
    HypothesesProposed,
    HypothesisValidated,
    IncidentUpdated,
    KillSwitchChanged,
    PolicyDecided,
    ShadowRunCompleted,
)
from pilothouse.bus.transactions import Output
from pilothouse.policy.adapters.postgres import Store, Tx
from pilothouse.policy.domain import (
    SEVERITY_FROM_INCIDENT,
    UNKNOWN_INCIDENT_SEVERITY,
    DecisionRecord,
    FreezeWindow,
    NotAuthorizable,
    PolicyInput,
    PolicyInputInvalid,
    action_from_record,
    approval_from_record,
    authorization_terms,
    check_kill_switch_change,
    ignored_note,
    roles_of,
    verified_signer,
    budget_window,
    held_at_gate1,
    service_stage_and_outcome,
    kill_switch_from_scopes,
    parse_policy_input,
    rejection_from_record,
    relevant_freezes,
    target_service,
    validation_from_record,
)

log = logging.getLogger("pilothouse.policy")
PRODUCER = "policy"

DECISIONS = Counter("pilothouse_policy_decisions_total", "Policy decisions published", ["stage", "outcome"])
AUTHORIZATIONS = Counter("pilothouse_policy_authorizations_total", "Signed ActionAuthorized records published")
UNSIGNED = Counter("pilothouse_policy_human_statements_ignored_total",
                   "Approvals, validations and kill-switch releases ignored: no valid human signature", ["kind"])


class UnknownAction(PermanentError):
    """An approval or execution names an action this service never decided (dead-lettered with this reason)."""


class UnknownKillSwitchScope(PermanentError):
    """A kill-switch record whose scope is neither ``global`` nor ``service:<name>``: it cannot be applied."""


class Engine:
    """The port the handlers need from the OPA adapter (``OpaPolicyEngine`` implements it)."""

    def decide(self, entrypoint: str, policy_input: PolicyInput) -> DecisionRecord:  # pragma: no cover - protocol
        raise NotImplementedError


@dataclass(frozen=True)
class Topics:
    decisions: str
    pending: str
    authorized: str


@dataclass(frozen=True)
class Limits:
    environment: str = "production"
    budget_window: timedelta = timedelta(hours=24)
    authorization_ttl: timedelta = timedelta(minutes=5)
    approval_request_ttl: timedelta = timedelta(minutes=30)


def _now() -> datetime:
    return datetime.now(UTC)


def _no_humans() -> HumanKeyRegistry:
    return HumanKeyRegistry({}, source="<none configured>")


class PolicyHandlers:
    """The policy service's handlers, one per consumed record type (see :meth:`table`)."""

    def __init__(self, *, store: Store, engine: Engine, signing_key: Ed25519PrivateKey, topics: Topics,
                 limits: Limits = Limits(), freezes: Callable[[], list[FreezeWindow]] = list,
                 clock: Callable[[], datetime] = _now, humans: Callable[[], HumanKeyRegistry] = _no_humans):
        self.store = store
        self.humans = humans  # enrolled human keys; with none, no approval or validation counts (fail closed)
        self.engine = engine
        self.key = signing_key
        self.key_id = authorization.key_id(signing_key.public_key())
        self.topics = topics
        self.limits = limits
        self.freezes = freezes
        self.clock = clock

    def table(self, topics: dict[str, str]) -> dict[str, Callable[[AvroRecord, MessageContext], Sequence[Output]]]:
        """topic -> handler, for TransactionalProcessor; ``topics`` maps a purpose to its topic name."""
        by_purpose = {
            "incidents": self.on_incident, "hypotheses": self.on_hypotheses, "proposals": self.on_proposal,
            "validations": self.on_validation, "shadow": self.on_shadow, "approvals": self.on_approval,
            "executions": self.on_execution, "verifications": self.on_verification,
            "kill_switch": self.on_kill_switch,
        }
        return {topics[p]: h for p, h in by_purpose.items()}

    # ---- the idempotent unit of work ------------------------------------------------------------------------

    def _once(self, event_id: str, ctx: MessageContext, work: Callable[[Tx], list[Output]]) -> list[Output]:
        with self.store.transaction() as tx:
            stored = tx.processed(event_id)
            if stored is not None:
                return [_output_from_json(o) for o in stored]
            outputs = work(tx)
            tx.mark_processed(event_id, ctx.topic, [_output_to_json(o) for o in outputs])
        for o in outputs:
            if isinstance(o.record, PolicyDecided):
                DECISIONS.labels(o.record.stage, o.record.outcome).inc()
            elif isinstance(o.record, ActionAuthorized):
                AUTHORIZATIONS.inc()
        return outputs

    # ---- facts ----------------------------------------------------------------------------------------------

    def on_incident(self, rec: IncidentUpdated, ctx: MessageContext) -> list[Output]:
        def work(tx: Tx) -> list[Output]:
            tx.upsert_incident(rec.incident_id, SEVERITY_FROM_INCIDENT.get(rec.severity, UNKNOWN_INCIDENT_SEVERITY),
                               rec.primary_service, rec.version)
            return []
        return self._once(rec.event_id, ctx, work)

    def on_hypotheses(self, rec: HypothesesProposed, ctx: MessageContext) -> list[Output]:
        # Nothing to decide: a proposal names its hypothesis, and Gate 1 is the console's HypothesisValidated.
        return self._once(rec.event_id, ctx, lambda tx: [])

    def on_shadow(self, rec: ShadowRunCompleted, ctx: MessageContext) -> list[Output]:
        # Shown to approvers by the console; policy does not decide on predictions (yet).
        return self._once(rec.event_id, ctx, lambda tx: [])

    def on_kill_switch(self, rec: KillSwitchChanged, ctx: MessageContext) -> list[Output]:
        scope = rec.scope.strip()
        if not (scope == "global" or (scope.startswith("service:") and len(scope) > len("service:"))):
            raise UnknownKillSwitchScope(f"kill-switch scope {scope[:100]!r} is neither 'global' nor 'service:<name>'")

        def work(tx: Tx) -> list[Output]:
            if scope.startswith("service:"):
                try:
                    name = "service:" + normalise_identity(scope.split(":", 1)[1])
                except IdentityInvalid as e:
                    raise UnknownKillSwitchScope(f"kill-switch scope {scope[:100]!r}: {e}") from e
            else:
                name = scope
            refused = check_kill_switch_change(self.humans(), rec, self.clock())
            if refused is not None:
                UNSIGNED.labels("kill_switch").inc()
                log.error("kill switch change ignored", extra={"scope": name, "event_id": rec.event_id,
                                                               "reason": refused[:500]})
                return []
            tx.set_kill_switch(name, rec.engaged, rec.changed_by, rec.reason, rec.event_id, rec.occurred_at)
            log.warning("kill switch changed", extra={"scope": name, "engaged": rec.engaged})
            return []
        return self._once(rec.event_id, ctx, work)

    def on_execution(self, rec: ActionExecuted, ctx: MessageContext) -> list[Output]:
        """Executed actions consume their reserved budget (and are in flight until verified); refused ones release
        it; failed ones consume it (they may have changed something)."""
        def work(tx: Tx) -> list[Output]:
            row = tx.proposal(rec.action_id, lock=True)
            if row is None:
                log.error("execution of an action policy never decided", extra={"action_id": rec.action_id})
                return []
            if rec.outcome == "executed":
                tx.settle(rec.action_id, "consumed")
                tx.update_proposal(rec.action_id, status="executing")
            elif rec.outcome == "refused":
                tx.settle(rec.action_id, "released")
                tx.update_proposal(rec.action_id, status="failed")
            else:
                tx.settle(rec.action_id, "consumed")
                tx.update_proposal(rec.action_id, status="failed")
            return []
        return self._once(rec.event_id, ctx, work)

    def on_verification(self, rec: ActionVerified, ctx: MessageContext) -> list[Output]:
        def work(tx: Tx) -> list[Output]:
            if tx.proposal(rec.action_id, lock=True) is not None:
                tx.update_proposal(rec.action_id, status="done")
            return []
        return self._once(rec.event_id, ctx, work)

    # ---- Gate 1 and the proposal decision ----------------------------------------------------------------------

    def on_proposal(self, rec: ActionProposed, ctx: MessageContext) -> list[Output]:
        def work(tx: Tx) -> list[Output]:
            incident = tx.incident(rec.incident_id)
            service = target_service(rec.target_kind, rec.target, incident["primary_service"] if incident else None)
            # Refuse a malformed or re-bound proposal before storing anything (PolicyInputInvalid -> DLQ).
            action_from_record(rec, service=service, environment=self.limits.environment)
            inserted = tx.insert_proposal({
                "action_id": rec.action_id, "incident_id": rec.incident_id, "hypothesis_id": rec.hypothesis_id,
                "event_id": rec.event_id, "record": rec.model_dump(mode="json"), "service": service,
                "environment": self.limits.environment, "target_key": f"{rec.target_kind}:{rec.target}",
                "status": "held_gate1"})
            if not inserted:
                log.warning("action id proposed again: not decided twice", extra={"action_id": rec.action_id})
                return []
            return self._decide_proposal(tx, rec.action_id, causation=rec.event_id)
        return self._once(rec.event_id, ctx, work)

    def on_validation(self, rec: HypothesisValidated, ctx: MessageContext) -> list[Output]:
        """Record the verdict, then re-decide every proposal held at Gate 1 for this hypothesis."""
        def work(tx: Tx) -> list[Output]:
            validation_from_record(rec)  # refuses an unusable validator id (-> DLQ) before anything is stored
            notes: list[str] = []
            try:
                signer = verified_signer(self.humans(), rec)
            except AttestationInvalid as e:
                # Not counted, not stored; the held proposals are decided again so the reason is on record.
                UNSIGNED.labels("validation").inc()
                notes.append(ignored_note(rec, str(e)))
                log.warning("validation ignored", extra={"event_id": rec.event_id, "reason": notes[0][:500]})
            else:
                tx.add_validation(rec.hypothesis_id, rec.event_id, signer.signer, rec.validator_display,
                                  roles_of(signer, list(rec.validator_roles)), rec.verdict, rec.occurred_at)
            outputs: list[Output] = []
            for action_id in tx.held_for_hypothesis(rec.hypothesis_id):
                outputs += self._decide_proposal(tx, action_id, causation=rec.event_id, notes=notes)
            return outputs
        return self._once(rec.event_id, ctx, work)

    def _decide_proposal(self, tx: Tx, action_id: str, *, causation: str, notes: Sequence[str] = ()) -> list[Output]:
        row = tx.proposal(action_id, lock=True)
        assert row is not None
        proposed = ActionProposed.model_validate(row["record"])
        now = self.clock()
        tx.lock_scope(row["service"])
        tx.lock_scope("target:" + row["target_key"])  # the in-flight cap, even when two scopes share a target
        policy_input = self._input(tx, row, proposed, now, approvals=False)
        record = self.engine.decide("proposal", policy_input)
        decision = record.decision
        outputs: list[Output] = []
        if held_at_gate1(decision):
            # Only Gate 1 is missing: keep the proposal and decide again when a validation arrives.
            tx.update_proposal(action_id, status="held_gate1", decision_id=record.decision_id)
            outputs.append(self._decided(proposed, policy_input, record, causation, notes))
            return outputs
        if decision.outcome == "deny":
            tx.update_proposal(action_id, status="denied", decision_id=record.decision_id)
            outputs.append(self._decided(proposed, policy_input, record, causation, notes))
            return outputs
        if decision.outcome == "allow":  # read-only within budget: authorized without people
            outputs.append(self._decided(proposed, policy_input, record, causation, notes))
            outputs.append(self._authorize(tx, row, proposed, policy_input, record, causation))
            return outputs
        expires_at = now + self.limits.approval_request_ttl
        request_event = str(uuid.uuid4())
        tx.update_proposal(action_id, status="pending_approval", decision_id=record.decision_id,
                           request_expires_at=expires_at, request_event_id=request_event)
        outputs.append(self._decided(proposed, policy_input, record, causation, notes))
        outputs.append(self._requested(proposed, policy_input, record, causation, expires_at, event_id=request_event))
        return outputs

    # ---- Gate 2: approvals, re-evaluated at approval time -------------------------------------------------------

    def on_approval(self, rec: ApprovalRecorded, ctx: MessageContext) -> list[Output]:
        def work(tx: Tx) -> list[Output]:
            row = tx.proposal(rec.action_id, lock=True)
            if row is None:
                raise UnknownAction(f"approval {rec.approval_id} is for action {rec.action_id}, which policy never "
                                    "received: nothing to approve")
            # Validate (identity, times, hash format) before storing: a malformed approval goes to the DLQ.
            if rec.decision == "approve":
                approval_from_record(rec)
            else:
                rejection_from_record(rec)
            try:
                signer = verified_signer(self.humans(), rec)
            except AttestationInvalid as e:
                # Neither an approval nor a veto: the console (or whoever wrote it) cannot speak for this person.
                UNSIGNED.labels("approval").inc()
                note = ignored_note(rec, str(e))
                log.warning("approval ignored", extra={"action_id": rec.action_id, "reason": note[:500]})
                if row["status"] != "pending_approval":
                    return []
                return self._decide_approvals(tx, row, causation=rec.event_id, notes=[note])
            tx.add_approval({
                "approval_id": rec.approval_id, "action_id": rec.action_id, "event_id": rec.event_id,
                "decision": rec.decision, "approver_id": signer.signer, "approver_display": rec.approver_display,
                "roles": roles_of(signer, list(rec.approver_roles)), "action_hash": rec.action_hash,
                "granted_at": rec.occurred_at, "expires_at": rec.expires_at, "comment": rec.comment})
            if row["status"] != "pending_approval":
                log.warning("approval for an action that is not pending: recorded, nothing decided",
                            extra={"action_id": rec.action_id, "status": row["status"], "approval_id": rec.approval_id})
                return []
            return self._decide_approvals(tx, row, causation=rec.event_id)
        return self._once(rec.event_id, ctx, work)

    def _decide_approvals(self, tx: Tx, row: dict[str, Any], *, causation: str,
                          notes: Sequence[str] = ()) -> list[Output]:
        proposed = ActionProposed.model_validate(row["record"])
        now = self.clock()
        tx.lock_scope(row["service"])
        tx.lock_scope("target:" + row["target_key"])  # the in-flight cap, even when two scopes share a target
        policy_input = self._input(tx, row, proposed, now, approvals=True)
        record = self.engine.decide("approvals", policy_input)
        decision = record.decision
        outputs = [self._decided(proposed, policy_input, record, causation, notes)]
        if decision.outcome == "deny":
            status = "rejected" if "rejected_by_human" in decision.reason_codes else "denied"
            tx.update_proposal(row["action_id"], status=status, decision_id=record.decision_id)
            return outputs
        # The console shows who has approved so far (accepted approvals only, by stable id).
        outputs.append(self._requested(proposed, policy_input, record, causation, row["request_expires_at"]))
        if decision.outcome == "allow":
            outputs.append(self._authorize(tx, row, proposed, policy_input, record, causation))
        else:
            tx.update_proposal(row["action_id"], decision_id=record.decision_id)
        return outputs

    # ---- building the input and the outputs --------------------------------------------------------------------

    def _input(self, tx: Tx, row: dict[str, Any], proposed: ActionProposed, now: datetime, *,
               approvals: bool) -> PolicyInput:
        incident = tx.incident(proposed.incident_id)
        start, end = budget_window(now, self.limits.budget_window)
        validations = []
        for v in tx.validations(proposed.hypothesis_id):
            if v["verdict"] != "validated":
                continue
            validations.append({"validator": {"id": v["validator_id"], "kind": "human", "roles": v["roles"],
                                              "display_name": v["validator_display"]},
                                "validated_at": v["validated_at"]})
        approvals_doc: list[dict[str, Any]] = []
        rejections_doc: list[dict[str, Any]] = []
        if approvals:
            for a in tx.approvals(row["action_id"]):
                principal = {"id": a["approver_id"], "kind": "human", "roles": a["roles"],
                             "display_name": a["approver_display"]}
                if a["decision"] == "approve":
                    approvals_doc.append({"approval_id": a["approval_id"], "approver": principal,
                                          "action_hash": a["action_hash"], "granted_at": a["granted_at"],
                                          "expires_at": a["expires_at"]})
                else:
                    rejections_doc.append({"rejection_id": a["approval_id"], "rejecter": principal,
                                           "action_hash": a["action_hash"], "rejected_at": a["granted_at"],
                                           "comment": a["comment"][:2000]})
        action = action_from_record(proposed, service=row["service"], environment=row["environment"])
        return parse_policy_input({
            "now": now,
            "incident": {"incident_id": proposed.incident_id,
                         "severity": incident["severity"] if incident else UNKNOWN_INCIDENT_SEVERITY},
            "action": action.model_dump(mode="json"),
            "proposal": {"proposal_id": proposed.action_id,
                         "proposed_by": {"id": proposed.proposed_by, "kind": _proposer_kind(proposed.proposed_by)},
                         "hypothesis": {"hypothesis_id": proposed.hypothesis_id, "validations": validations[-32:]}},
            "budget": {"scope": row["service"], "window_start": start, "window_end": end,
                       "consumed": tx.budget_consumed(row["service"], start, now)},
            "controls": {"kill_switch": kill_switch_from_scopes(tx.engaged_scopes()).model_dump(by_alias=True),
                         "freeze_windows": [w.model_dump() for w in relevant_freezes(self.freezes(), now)],
                         "in_flight_on_target": tx.in_flight(row["target_key"], row["action_id"], now)},
            # Bounded: the oldest 32 approvals count; later ones can only be duplicates of people already counted
            # or people who could not be heard anyway.
            "approvals": approvals_doc[:32],
            "rejections": rejections_doc[:32],
        })

    def _decided(self, proposed: ActionProposed, policy_input: PolicyInput, record: DecisionRecord,
                 causation: str, notes: Sequence[str] = ()) -> Output:
        d = record.decision
        stage, outcome = service_stage_and_outcome(d)
        reasons = list(d.reasons) + [
            f"approval_refused: {r.approval_id} by {r.approver_id}: {'; '.join(r.reasons)}" for r in d.refused_approvals
        ] + list(notes)
        rec = PolicyDecided(
            event_id=str(uuid.uuid4()), incident_id=proposed.incident_id, correlation_id=proposed.correlation_id,
            causation_id=causation, occurred_at=policy_input.now, producer=PRODUCER, decision_id=record.decision_id,
            action_id=proposed.action_id, action_hash=d.action_hash, stage=stage, outcome=outcome, allow=d.allow,
            requires_approval=d.requires_approval, approvers_needed=d.approvers_needed,
            approver_roles=list(d.approver_roles), reasons=reasons, bundle_revision=d.bundle_revision,
            input_sha256=record.input_hash, input_json=policy_input.canonical_text())
        return Output(rec, key=proposed.incident_id, topic=self.topics.decisions)

    def _requested(self, proposed: ActionProposed, policy_input: PolicyInput, record: DecisionRecord, causation: str,
                   expires_at: datetime, *, event_id: str | None = None) -> Output:
        d = record.decision
        accepted = set(d.accepted_approvals)
        approved_by = [a.approver.id for a in policy_input.approvals if a.approval_id in accepted]
        validators = sorted({v.validator.id for v in policy_input.proposal.hypothesis.validations})
        budget = policy_input.budget
        rec = ApprovalRequested(
            event_id=event_id or str(uuid.uuid4()), incident_id=proposed.incident_id,
            correlation_id=proposed.correlation_id, causation_id=causation, occurred_at=policy_input.now,
            producer=PRODUCER, action_id=proposed.action_id, decision_id=record.decision_id,
            hypothesis_id=proposed.hypothesis_id, action_type=proposed.action_type, target_kind=proposed.target_kind,
            target=proposed.target, params_json=proposed.params_json, action_hash=policy_input.action.action_hash,
            proposed_by=proposed.proposed_by, validated_by=",".join(validators),
            approvers_needed=d.approvers_needed, approver_roles=list(d.approver_roles), approved_by=approved_by,
            reasons=list(d.reasons), risk_score=d.risk.score if d.risk else 0.0,
            budget_remaining=d.risk.budget_remaining if d.risk else 0.0,
            budget_window=f"{budget.scope}@{budget.window_start.isoformat()}/{budget.window_end.isoformat()}",
            expires_at=expires_at, bundle_revision=d.bundle_revision)
        return Output(rec, key=proposed.action_id, topic=self.topics.pending)

    def _authorize(self, tx: Tx, row: dict[str, Any], proposed: ActionProposed, policy_input: PolicyInput,
                   record: DecisionRecord, causation: str) -> Output:
        try:
            terms = authorization_terms(policy_input, record, ttl=self.limits.authorization_ttl)
        except NotAuthorizable as e:
            raise PolicyInputInvalid(f"action {proposed.action_id} cannot be authorized: {e}") from e
        cost = record.decision.risk.cost if record.decision.risk else 0.0
        tx.reserve(proposed.action_id, row["service"], cost, policy_input.budget.window_start, terms.expires_at)
        unsigned = ActionAuthorized(
            event_id=str(uuid.uuid4()), incident_id=proposed.incident_id, correlation_id=proposed.correlation_id,
            causation_id=causation, occurred_at=policy_input.now, producer=PRODUCER,
            authorization_id=str(uuid.uuid4()), action_id=proposed.action_id, action_hash=terms.action_hash,
            action_type=proposed.action_type, target_kind=proposed.target_kind, target=proposed.target,
            params_json=proposed.params_json, decision_id=terms.decision_id, bundle_revision=terms.bundle_revision,
            input_sha256=terms.input_sha256, approval_ids=terms.approval_ids, issued_at=terms.issued_at,
            expires_at=terms.expires_at, key_id=self.key_id, signature="")
        signed = authorization.sign(self.key, unsigned)
        tx.update_proposal(proposed.action_id, status="authorized", decision_id=record.decision_id,
                           authorization_id=signed.authorization_id, authorization_expires_at=signed.expires_at)
        log.info("authorized", extra={"action_id": proposed.action_id, "decision_id": record.decision_id,
                                      "approvals": terms.approval_ids})
        return Output(signed, key=proposed.action_id, topic=self.topics.authorized)


def _proposer_kind(proposed_by: str) -> str:
    lowered = proposed_by.strip().lower()
    return "model" if lowered.startswith("model") else "service"


def _output_to_json(o: Output) -> dict[str, Any]:
    return {"type": type(o.record).AVRO_NAME, "topic": o.topic,
            "key": o.key.decode() if isinstance(o.key, bytes) else o.key,
            "record": orjson.loads(o.record.model_dump_json())}


def _output_from_json(d: dict[str, Any]) -> Output:
    return Output(RECORDS[d["type"]].model_validate(d["record"]), key=d["key"], topic=d["topic"])

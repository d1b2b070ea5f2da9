"""The console's pure logic: the read model built from the topics, the views the pages show, the checks that mirror
policy (who may validate, approve or flip a kill switch) and the records a decision becomes. No I/O here.

Policy stays the authority: it re-evaluates every approval and validation. The console refuses early, with a clear
message, what policy would refuse anyway (self-approval, approving twice, approving what you validated, a missing
role, an expired or changed action), so people learn why at the moment they click.
"""

from __future__ import annotations

import base64
import json
import threading
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from pilothouse.bus import attestation
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.identity import IdentityInvalid, normalise_identity
from pilothouse.bus.records import (
    ActionAuthorized,
    ActionExecuted,
    ActionProposed,
    ActionVerified,
    AlertReceived,
    AlertsReceived,
    ApprovalRecorded,
    ApprovalRequested,
    AvroRecord,
    CheckpointSigned,
    Evidence,
    HypothesesProposed,
    Hypothesis,
    HypothesisValidated,
    IncidentUpdated,
    KillSwitchChanged,
    LedgerEntry,
    PolicyDecided,
    ShadowRunCompleted,
)

from pilothouse.console.auth import Account

PRODUCER = "console"
VALIDATOR_ROLES = ("responder", "admin")  # policies/pilothouse/config/data.json: validator_roles
KILL_SWITCH_ROLES = ("admin",)
MAX_TIMELINE_ITEMS = 500
GLOBAL_SCOPE = "global"
STATEMENT_TTL = timedelta(minutes=10)  # sign within this after asking for the statement
MAX_SIGNATURE_CHARS = 200


class DecisionRefused(PermanentError):
    """The console refuses a decision before it reaches the bus. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 409, code: str = "refused", extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra or {}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _ms(dt: datetime | None) -> int | None:
    return None if dt is None else int(dt.timestamp() * 1000)


def _stable(raw: str) -> str | None:
    try:
        return normalise_identity(raw)
    except IdentityInvalid:
        return None


def clean_comment(text: object, max_chars: int) -> str:
    """A comment as recorded: NFC, trimmed; refuses (400) non-strings, over-long text and control characters."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DecisionRefused("comment must be text", status=400, code="bad_comment")
    text = unicodedata.normalize("NFC", text).strip()
    if len(text) > max_chars:
        raise DecisionRefused(f"comment is {len(text)} characters; the limit is {max_chars}", status=400,
                              code="bad_comment")
    bad = [ch for ch in text if ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")]
    if bad:
        raise DecisionRefused(f"comment contains {len(bad)} control or invisible character(s) "
                              f"(first U+{ord(bad[0]):04X}); remove them and send again", status=400,
                              code="bad_comment")
    return text


# --------------------------------------------------------------------------------------------------------------------
# What the console has seen people decide (from its own acknowledged sends and from ledger entries).


@dataclass(frozen=True)
class SeenApproval:
    approval_id: str
    action_id: str
    approver_id: str
    decision: str
    action_hash: str
    at: datetime
    comment: str = ""


@dataclass(frozen=True)
class SeenValidation:
    event_id: str
    hypothesis_id: str
    validator_id: str
    verdict: str
    at: datetime
    comment: str = ""


@dataclass(frozen=True)
class TimelineItem:
    at: datetime
    kind: str
    title: str
    detail: str = ""
    link: str | None = None


@dataclass
class LedgerStatus:
    last_sequence: int | None = None
    last_entry_hash: str = ""
    last_entry_at: datetime | None = None
    entries_seen: int = 0
    checkpoint_tree_size: int | None = None
    checkpoint_root: str = ""
    checkpoint_signed_at: datetime | None = None
    checkpoint_key_id: str = ""

    @property
    def uncheckpointed(self) -> int | None:
        """Entries after the last signed checkpoint (None until both are known)."""
        if self.last_sequence is None or self.checkpoint_tree_size is None:
            return None
        return max(0, self.last_sequence + 1 - self.checkpoint_tree_size)


ActionState = Literal["proposed", "waiting", "rejected", "expired", "denied", "authorized", "executed", "refused",
                      "failed", "verified", "verification_failed", "rolled_back", "rollback_failed", "skipped"]


@dataclass(frozen=True)
class ActionStatus:
    state: ActionState
    text: str
    final: bool


class ReadModel:
    """Everything the pages show, keyed by ids; built by the handlers, read by the web layer.

    Handlers are idempotent on ``event_id`` (a replay after a crash changes nothing). ``version`` increases with
    every change, which is what the live updates (server-sent events) watch.
    """

    def __init__(self, *, max_seen_events: int = 200_000):
        self._lock = threading.RLock()
        self.version = 0
        self._seen: dict[str, None] = {}
        self._max_seen = max_seen_events
        self.incidents: dict[str, IncidentUpdated] = {}
        self.alerts: dict[str, AlertReceived] = {}  # by event_id
        self.hypotheses: dict[str, list[HypothesesProposed]] = {}  # incident_id -> all proposals, oldest first
        self.proposals: dict[str, ActionProposed] = {}
        self.decisions: dict[str, list[PolicyDecided]] = {}  # action_id -> decisions
        self.pending: dict[str, ApprovalRequested] = {}
        self.shadow: dict[str, ShadowRunCompleted] = {}
        self.authorized: dict[str, ActionAuthorized] = {}
        self.executions: dict[str, ActionExecuted] = {}
        self.verifications: dict[str, ActionVerified] = {}
        self.approvals: dict[str, dict[str, SeenApproval]] = {}  # action_id -> approval_id -> approval
        self.validations: dict[str, dict[str, SeenValidation]] = {}  # hypothesis_id -> event_id -> validation
        self.kill_switches: dict[str, KillSwitchChanged] = {}
        self.ledger = LedgerStatus()

    # ---- applying records ------------------------------------------------------------------------------------

    def _fresh(self, event_id: str) -> bool:
        if event_id in self._seen:
            return False
        self._seen[event_id] = None
        if len(self._seen) > self._max_seen:  # bounded: forget the oldest ids (dict keeps insertion order)
            for old in list(self._seen)[: self._max_seen // 10]:
                del self._seen[old]
        return True

    def _changed(self) -> None:
        self.version += 1

    def apply(self, record: AvroRecord) -> bool:
        """Fold one record into the model; returns False for a duplicate or an unknown type."""
        method = _APPLY.get(type(record))
        if method is None:
            return False
        with self._lock:
            if not self._fresh(record.event_id):
                return False
            method(self, record)
            self._changed()
            return True

    def _incident(self, r: IncidentUpdated) -> None:
        cur = self.incidents.get(r.incident_id)
        if cur is None or (r.version, r.occurred_at) >= (cur.version, cur.occurred_at):
            self.incidents[r.incident_id] = r

    def _alert(self, r: AlertReceived) -> None:
        self.alerts[r.event_id] = r

    def _alerts(self, r: AlertsReceived) -> None:
        for a in r.alerts:
            self._alert(a)

    def _hypotheses(self, r: HypothesesProposed) -> None:
        items = self.hypotheses.setdefault(r.incident_id, [])
        items.append(r)
        items.sort(key=lambda x: (x.incident_version, x.occurred_at))

    def _proposal(self, r: ActionProposed) -> None:
        self.proposals[r.action_id] = r

    def _decision(self, r: PolicyDecided) -> None:
        self.decisions.setdefault(r.action_id, []).append(r)

    def _pending(self, r: ApprovalRequested) -> None:
        cur = self.pending.get(r.action_id)
        if cur is None or r.occurred_at >= cur.occurred_at:
            self.pending[r.action_id] = r

    def _shadow(self, r: ShadowRunCompleted) -> None:
        self.shadow[r.action_id] = r

    def _authorized(self, r: ActionAuthorized) -> None:
        self.authorized[r.action_id] = r

    def _executed(self, r: ActionExecuted) -> None:
        self.executions[r.action_id] = r

    def _verified(self, r: ActionVerified) -> None:
        self.verifications[r.action_id] = r

    def _approval(self, r: ApprovalRecorded) -> None:
        self.approvals.setdefault(r.action_id, {})[r.approval_id] = SeenApproval(
            r.approval_id, r.action_id, _stable(r.approver_id) or r.approver_id, r.decision, r.action_hash,
            r.occurred_at, r.comment)

    def _validation(self, r: HypothesisValidated) -> None:
        self.validations.setdefault(r.hypothesis_id, {})[r.event_id] = SeenValidation(
            r.event_id, r.hypothesis_id, _stable(r.validator_id) or r.validator_id, r.verdict, r.occurred_at,
            r.comment)

    def _kill_switch(self, r: KillSwitchChanged) -> None:
        cur = self.kill_switches.get(r.scope)
        if cur is None or r.occurred_at >= cur.occurred_at:
            self.kill_switches[r.scope] = r

    def _ledger_entry(self, r: LedgerEntry) -> None:
        st = self.ledger
        st.entries_seen += 1
        if st.last_sequence is None or r.sequence > st.last_sequence:
            st.last_sequence, st.last_entry_hash, st.last_entry_at = r.sequence, r.entry_hash, r.occurred_at
        # The console does not consume its own output topics; the ledger's copy of them tells it what was decided
        # (also by other console replicas, and before a restart).
        recorded = _CONSOLE_RECORDS.get(r.recorded_type.rsplit(".", 1)[-1])
        if recorded is None:
            return
        try:
            inner = recorded.model_validate(json.loads(r.payload_json))
        except (ValueError, TypeError):
            return  # a payload the console cannot read is the ledger verifier's business, not a page's
        if self._fresh(inner.event_id):
            _APPLY[recorded](self, inner)

    def _checkpoint(self, r: CheckpointSigned) -> None:
        st = self.ledger
        if st.checkpoint_tree_size is None or r.tree_size >= st.checkpoint_tree_size:
            st.checkpoint_tree_size, st.checkpoint_root = r.tree_size, r.root_hash
            st.checkpoint_signed_at, st.checkpoint_key_id = r.signed_at, r.key_id

    def record_own(self, record: ApprovalRecorded | HypothesisValidated | KillSwitchChanged) -> None:
        """Remember a decision this console sent (after the broker acknowledged it)."""
        self.apply(record)

    # ---- queries ---------------------------------------------------------------------------------------------

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def incident_list(self) -> list[IncidentUpdated]:
        with self._lock:
            return sorted(self.incidents.values(), key=lambda i: (i.state != "open", -i.last_seen.timestamp()))

    def latest_hypotheses(self, incident_id: str) -> HypothesesProposed | None:
        with self._lock:
            items = self.hypotheses.get(incident_id)
            return items[-1] if items else None

    def find_hypothesis(self, hypothesis_id: str) -> tuple[HypothesesProposed, Hypothesis] | None:
        with self._lock:
            for proposals in self.hypotheses.values():
                for p in reversed(proposals):
                    for h in p.hypotheses:
                        if h.hypothesis_id == hypothesis_id:
                            return p, h
        return None

    def evidence(self, incident_id: str) -> dict[str, Evidence]:
        with self._lock:
            inc = self.incidents.get(incident_id)
            return {e.evidence_id: e for e in inc.evidence} if inc else {}

    def validators_of(self, hypothesis_id: str) -> dict[str, str]:
        """Stable id -> verdict of everyone seen validating or rejecting a hypothesis."""
        with self._lock:
            return {v.validator_id: v.verdict for v in self.validations.get(hypothesis_id, {}).values()}

    def approvals_of(self, action_id: str) -> list[SeenApproval]:
        with self._lock:
            return sorted(self.approvals.get(action_id, {}).values(), key=lambda a: a.at)

    def actions_of(self, incident_id: str) -> list[str]:
        with self._lock:
            ids = {a for a, p in self.proposals.items() if p.incident_id == incident_id}
            ids |= {a for a, p in self.pending.items() if p.incident_id == incident_id}
            return sorted(ids)

    def pending_list(self, now: datetime) -> list[ApprovalRequested]:
        """Pending actions still waiting for people, soonest expiry first."""
        with self._lock:
            out = [p for p in self.pending.values() if action_status(self, p.action_id, now).state == "waiting"]
        return sorted(out, key=lambda p: p.expires_at)

    def kill_switch(self, scope: str = GLOBAL_SCOPE) -> KillSwitchChanged | None:
        with self._lock:
            return self.kill_switches.get(scope)

    def budgets(self) -> dict[str, ApprovalRequested]:
        """The latest risk-budget state per budget window, as policy last reported it on a pending action."""
        with self._lock:
            out: dict[str, ApprovalRequested] = {}
            for p in self.pending.values():
                key = p.budget_window or "default"
                if key not in out or p.occurred_at > out[key].occurred_at:
                    out[key] = p
            return out

    def timeline(self, incident_id: str) -> list[TimelineItem]:
        """Everything that happened to an incident, oldest first (alerts, evidence, hypotheses, actions...)."""
        with self._lock:
            inc = self.incidents.get(incident_id)
            items: list[TimelineItem] = []
            fps = set(inc.alert_fingerprints) if inc else set()
            for a in self.alerts.values():
                if a.incident_id == incident_id or (a.incident_id is None and a.fingerprint in fps):
                    items.append(TimelineItem(a.starts_at, "alert", f"{a.status} {a.severity} alert: {a.service}",
                                              a.summary, None))
            if inc:
                items.append(TimelineItem(inc.first_seen, "incident", f"incident opened: {inc.title}",
                                          f"version {inc.version}, {inc.alert_count} alert(s)"))
                for e in inc.evidence:
                    at = datetime.fromtimestamp(e.onset_ms / 1000, timezone.utc) if e.onset_ms else inc.first_seen
                    items.append(TimelineItem(at, "evidence", f"evidence {e.kind}: {e.service} {e.signal}",
                                              e.summary, f"#ev-{e.evidence_id}"))
                if inc.resolved_at:
                    items.append(TimelineItem(inc.resolved_at, "incident", "incident resolved"))
            for hp in self.hypotheses.get(incident_id, []):
                top = hp.hypotheses[0].root_cause_service if hp.hypotheses else "none"
                items.append(TimelineItem(hp.occurred_at, "hypotheses",
                                          f"{len(hp.hypotheses)} hypotheses ({hp.outcome}); top: {top}",
                                          f"LLM {hp.llm_status}", "#hypotheses"))
                for h in hp.hypotheses:
                    for v in self.validations.get(h.hypothesis_id, {}).values():
                        items.append(TimelineItem(v.at, "validation", f"hypothesis {v.verdict} by {v.validator_id}",
                                                  v.comment, f"#hyp-{h.hypothesis_id}"))
            for action_id in self.actions_of(incident_id):
                link = f"/actions/{action_id}"
                p = self.proposals.get(action_id)
                if p:
                    items.append(TimelineItem(p.occurred_at, "proposal", f"proposed {p.action_type} on {p.target}",
                                              p.rationale, link))
                for d in self.decisions.get(action_id, []):
                    items.append(TimelineItem(d.occurred_at, "decision", f"policy {d.stage}: {d.outcome}",
                                              "; ".join(d.reasons), link))
                s = self.shadow.get(action_id)
                if s:
                    items.append(TimelineItem(s.occurred_at, "shadow", f"shadow run {s.outcome}", s.summary, link))
                for ap in self.approvals.get(action_id, {}).values():
                    items.append(TimelineItem(ap.at, "approval", f"{ap.decision} by {ap.approver_id}", ap.comment,
                                              link))
                au = self.authorized.get(action_id)
                if au:
                    items.append(TimelineItem(au.occurred_at, "authorized", "action authorized by policy",
                                              f"{len(au.approval_ids)} approval(s)", link))
                ex = self.executions.get(action_id)
                if ex:
                    items.append(TimelineItem(ex.occurred_at, "execution", f"execution {ex.outcome}", ex.reason, link))
                ve = self.verifications.get(action_id)
                if ve:
                    items.append(TimelineItem(ve.occurred_at, "verification", f"verification {ve.outcome}",
                                              ve.detail, link))
        items.sort(key=lambda t: t.at)
        return items[-MAX_TIMELINE_ITEMS:]


_APPLY = {
    IncidentUpdated: ReadModel._incident,
    AlertsReceived: ReadModel._alerts,
    HypothesesProposed: ReadModel._hypotheses,
    ActionProposed: ReadModel._proposal,
    PolicyDecided: ReadModel._decision,
    ApprovalRequested: ReadModel._pending,
    ShadowRunCompleted: ReadModel._shadow,
    ActionAuthorized: ReadModel._authorized,
    ActionExecuted: ReadModel._executed,
    ActionVerified: ReadModel._verified,
    ApprovalRecorded: ReadModel._approval,
    HypothesisValidated: ReadModel._validation,
    KillSwitchChanged: ReadModel._kill_switch,
    LedgerEntry: ReadModel._ledger_entry,
    CheckpointSigned: ReadModel._checkpoint,
}
_CONSOLE_RECORDS = {"ApprovalRecorded": ApprovalRecorded, "HypothesisValidated": HypothesisValidated,
                    "KillSwitchChanged": KillSwitchChanged}


# --------------------------------------------------------------------------------------------------------------------
# Views


def action_status(model: ReadModel, action_id: str, now: datetime) -> ActionStatus:
    """Where an action stands, from the most advanced record seen."""
    with model.lock:
        ve = model.verifications.get(action_id)
        ex = model.executions.get(action_id)
        au = model.authorized.get(action_id)
        pend = model.pending.get(action_id)
        decs = model.decisions.get(action_id, [])
        rejects = [a for a in model.approvals.get(action_id, {}).values() if a.decision == "reject"]
    if ve is not None:
        state = {"verified": "verified", "failed": "verification_failed", "rolled_back": "rolled_back",
                 "rollback_failed": "rollback_failed", "skipped": "skipped"}[ve.outcome]
        return ActionStatus(state, f"executed and {ve.outcome.replace('_', ' ')}"
                            + (f": {ve.detail}" if ve.detail else ""), True)
    if ex is not None:
        return ActionStatus(ex.outcome, f"execution {ex.outcome}" + (f": {ex.reason}" if ex.reason else "")
                            + ("; waiting for verification" if ex.outcome == "executed" else ""),
                            ex.outcome != "executed")
    if au is not None:
        return ActionStatus("authorized", "authorized by policy; waiting for the actuator", False)
    if decs and decs[-1].outcome == "denied":
        return ActionStatus("denied", "denied by policy: " + "; ".join(decs[-1].reasons), True)
    if rejects:
        return ActionStatus("rejected", f"rejected by {rejects[0].approver_id}", True)
    if pend is not None:
        if pend.expires_at <= now:
            return ActionStatus("expired", "the approval request expired", True)
        missing = max(0, pend.approvers_needed - len(pend.approved_by))
        if missing == 0:
            return ActionStatus("waiting", "approvals complete; waiting for policy to authorize", False)
        return ActionStatus("waiting", f"waiting for {missing} more approval(s) from "
                            f"{' or '.join(pend.approver_roles) or 'any approver'}", False)
    return ActionStatus("proposed", "proposed; waiting for policy", False)


def parse_json_object(text: str) -> dict | None:
    """``params_json`` / ``prediction_json`` as a dict for display; None if it is not a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def confidence_pct(value: float) -> str:
    return f"{max(0.0, min(1.0, value)) * 100:.0f}%"


# --------------------------------------------------------------------------------------------------------------------
# Checks that mirror policy, and the records a decision becomes.


def check_can_validate(model: ReadModel, account: Account, hypothesis_id: str) -> tuple[HypothesesProposed, Hypothesis]:
    """Gate 1 pre-check: the hypothesis exists, the person has a validator role and has not decided it already."""
    found = model.find_hypothesis(hypothesis_id)
    if found is None:
        raise DecisionRefused(f"no hypothesis {hypothesis_id!r} is known to the console", status=404, code="unknown")
    if not account.has_any_role(VALIDATOR_ROLES):
        raise DecisionRefused(f"validating a hypothesis needs role {' or '.join(VALIDATOR_ROLES)}; "
                              f"{account.id} has {', '.join(account.roles) or 'no roles'}", status=403,
                              code="missing_role")
    previous = model.validators_of(hypothesis_id).get(account.id)
    if previous is not None:
        raise DecisionRefused(f"{account.id} already {previous} this hypothesis", code="duplicate")
    return found


def check_can_decide(model: ReadModel, account: Account, action_id: str, action_hash: str, decision: str,
                     now: datetime) -> ApprovalRequested:
    """Gate 2 pre-check for approve/reject of one pending action, in the order a person can act on the answer."""
    if decision not in ("approve", "reject"):
        raise DecisionRefused("decision must be 'approve' or 'reject'", status=400, code="bad_decision")
    with model.lock:
        pending = model.pending.get(action_id)
    if pending is None:
        raise DecisionRefused(f"no pending action {action_id!r} is known to the console", status=404, code="unknown")
    if not isinstance(action_hash, str) or not action_hash:
        raise DecisionRefused("action_hash is required: an approval is bound to the exact action you saw",
                              status=400, code="hash_missing")
    if action_hash != pending.action_hash:
        raise DecisionRefused(f"the action changed since you saw it (you saw {action_hash[:12]}…, it is now "
                              f"{pending.action_hash[:12]}…); reload and check it again", code="hash_mismatch")
    status = action_status(model, action_id, now)
    if status.state != "waiting":
        raise DecisionRefused(f"this action is no longer waiting for approval ({status.text})", code="not_pending")
    if not account.has_any_role(pending.approver_roles or ("approver", "admin")):
        raise DecisionRefused(f"this action needs an approver with role {' or '.join(pending.approver_roles)}; "
                              f"{account.id} has {', '.join(account.roles) or 'no roles'}", status=403,
                              code="missing_role")
    if decision == "approve":
        if _stable(pending.proposed_by) == account.id:
            raise DecisionRefused(f"{account.id} proposed this action and cannot approve it (four eyes)",
                                  status=403, code="self_approval")
        with model.lock:
            proposal = model.proposals.get(action_id)
        if proposal is not None and _stable(proposal.proposed_by) == account.id:
            raise DecisionRefused(f"{account.id} proposed this action and cannot approve it (four eyes)",
                                  status=403, code="self_approval")
        validators = {_stable(v) for v in pending.validated_by.split(",") if v.strip()}
        validators |= {vid for vid, verdict in model.validators_of(pending.hypothesis_id).items()
                       if verdict == "validated"}
        if account.id in validators:
            raise DecisionRefused(f"{account.id} validated the hypothesis behind this action and cannot also "
                                  "approve it (four eyes)", status=403, code="approver_is_validator")
    already = {_stable(a) for a in pending.approved_by} | {a.approver_id for a in model.approvals_of(action_id)}
    if account.id in already:
        raise DecisionRefused(f"{account.id} already decided this action; the same person counts once",
                              code="duplicate_approver")
    return pending


def check_can_switch(account: Account, scope: str, reason: str) -> None:
    if not account.has_any_role(KILL_SWITCH_ROLES):
        raise DecisionRefused("only admins may engage or release a kill switch", status=403, code="missing_role")
    if not isinstance(scope, str) or not scope or len(scope) > 100 or not all(c.isalnum() or c in "-_.:" for c in scope):
        raise DecisionRefused("scope must be 1-100 characters of letters, digits, - _ . :", status=400,
                              code="bad_scope")
    if not reason:
        raise DecisionRefused("say why (reason) when you flip a kill switch", status=400, code="reason_missing")


# --------------------------------------------------------------------------------------------------------------------
# Signed statements: the console prepares the exact statement, the person signs it with their own key, the console
# forwards the signature unchanged. It cannot sign for anyone: it never holds a person's private key.


@dataclass(frozen=True)
class Statement:
    """What a person is asked to sign: the record's bound fields (chosen here: ids, expiry, time) and the bytes."""

    statement_id: str
    kind: Literal["approval", "validation", "kill_switch"]
    subject: str  # the action id, hypothesis id or kill-switch scope it is about
    fields: dict
    signing_input: bytes
    made_at: datetime

    def public(self) -> dict:
        """The API's view: the fields, the exact bytes to sign (base64) and the same bytes as text."""
        return {"statement_id": self.statement_id, "kind": self.kind, "subject": self.subject,
                "statement": {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.fields.items()},
                "signing_input": base64.b64encode(self.signing_input).decode("ascii"),
                "text": self.signing_input.decode("utf-8"),
                "sign_by": (self.made_at + STATEMENT_TTL).isoformat()}


def approval_statement(account: Account, pending: ApprovalRequested, decision: str, now: datetime,
                       ttl: timedelta) -> Statement:
    """The approval a person is asked to sign: a fresh approval id, bound to the hash they saw, expiring with the
    request or after ``ttl``."""
    expires_at = attestation.to_ms(min(pending.expires_at, now + ttl))
    fields = {"approval_id": str(uuid.uuid4()), "action_id": pending.action_id, "action_hash": pending.action_hash,
              "decision": decision, "approver_id": account.id, "expires_at": expires_at}
    return Statement(fields["approval_id"], "approval", pending.action_id, fields,
                     attestation.approval_statement(**fields), now)


def validation_statement(account: Account, proposal: HypothesesProposed, hypothesis: Hypothesis, verdict: str,
                         now: datetime) -> Statement:
    if verdict not in ("validated", "rejected"):
        raise DecisionRefused("verdict must be 'validated' or 'rejected'", status=400, code="bad_verdict")
    fields = {"hypothesis_id": hypothesis.hypothesis_id, "incident_id": proposal.incident_id, "verdict": verdict,
              "validator_id": account.id, "signed_at": attestation.to_ms(now)}
    return Statement(str(uuid.uuid4()), "validation", hypothesis.hypothesis_id, fields,
                     attestation.validation_statement(**fields), now)


def kill_switch_statement(account: Account, scope: str, engaged: bool, now: datetime) -> Statement:
    fields = {"scope": scope, "engaged": engaged, "actor": account.id, "at": attestation.to_ms(now)}
    return Statement(str(uuid.uuid4()), "kill_switch", scope, fields, attestation.kill_switch_statement(**fields),
                     now)


@dataclass(frozen=True)
class Signature:
    statement_id: str
    key_id: str
    signature: str


def signature_from(data: dict) -> Signature | None:
    """The signature fields of a request (None when it carries none); refuses (400) malformed ones."""
    values = [data.get("statement_id"), data.get("key_id"), data.get("signature")]
    if all(v in (None, "") for v in values):
        return None
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_SIGNATURE_CHARS for v in values):
        raise DecisionRefused("statement_id, key_id and signature must all be given (text, at most "
                              f"{MAX_SIGNATURE_CHARS} characters)", status=400, code="bad_signature")
    return Signature(*values)


def take_statement(statements: dict[str, Statement], sig: Signature, kind: str, subject: str,
                   now: datetime) -> Statement:
    """The statement a signature answers (each is used once); refuses one never issued to this session, for
    another decision, or too old."""
    st = statements.pop(sig.statement_id, None)
    if st is None or st.kind != kind or st.subject != subject:
        raise DecisionRefused("this signature answers no statement the console gave you for this decision; ask for "
                              "the statement again and sign it", status=400, code="unknown_statement")
    if now - st.made_at > STATEMENT_TTL:
        raise DecisionRefused(f"the statement was issued more than {int(STATEMENT_TTL.total_seconds() // 60)} minutes "
                              "ago; ask for a fresh one and sign again", status=400, code="statement_expired")
    return st


def verify_signed(registry: attestation.HumanKeyRegistry | None, record) -> None:
    """Refuse (400) what policy would ignore, with its reason; without a registry, policy alone checks."""
    if registry is None:
        return
    try:
        registry.verify(record)
    except attestation.AttestationInvalid as e:
        raise DecisionRefused(f"not recorded: {e} (sign with the key enrolled for your account)", status=400,
                              code="bad_signature") from e


def build_validation(account: Account, proposal: HypothesesProposed, hypothesis: Hypothesis, statement: Statement,
                     sig: Signature, comment: str) -> HypothesisValidated:
    f = statement.fields
    return HypothesisValidated(
        event_id=str(uuid.uuid4()), incident_id=proposal.incident_id, correlation_id=proposal.correlation_id,
        causation_id=proposal.event_id, occurred_at=f["signed_at"], producer=PRODUCER,
        hypothesis_id=hypothesis.hypothesis_id, verdict=f["verdict"], validator_id=account.id,
        validator_display=account.display, validator_roles=list(account.roles), comment=comment,
        key_id=sig.key_id, signature=sig.signature)


def build_approval(account: Account, pending: ApprovalRequested, statement: Statement, sig: Signature, comment: str,
                   now: datetime) -> ApprovalRecorded:
    """The approval record: exactly the signed statement's fields, plus the signature, forwarded unchanged."""
    f = statement.fields
    return ApprovalRecorded(
        event_id=str(uuid.uuid4()), incident_id=pending.incident_id, correlation_id=pending.correlation_id,
        causation_id=pending.event_id, occurred_at=now, producer=PRODUCER, approval_id=f["approval_id"],
        action_id=f["action_id"], action_hash=f["action_hash"], decision=f["decision"], approver_id=account.id,
        approver_display=account.display, approver_roles=list(account.roles), comment=comment,
        expires_at=f["expires_at"], key_id=sig.key_id, signature=sig.signature)


def build_kill_switch(account: Account, scope: str, engaged: bool, reason: str, now: datetime,
                      statement: Statement | None = None, sig: Signature | None = None) -> KillSwitchChanged:
    eid = str(uuid.uuid4())
    at = statement.fields["at"] if statement is not None else now
    return KillSwitchChanged(event_id=eid, incident_id=None, correlation_id=eid, occurred_at=at, producer=PRODUCER,
                             scope=scope, engaged=engaged, changed_by=account.id, reason=reason,
                             key_id=sig.key_id if sig else None, signature=sig.signature if sig else None)


def epoch_ms(dt: datetime | None) -> int | None:
    """For the page's countdown script."""
    return _ms(dt)

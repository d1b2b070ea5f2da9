"""Pure policy logic: the OPA input and decision documents, and the terms of a signed authorization.

Nothing here performs I/O. The OPA server is reached through :mod:`pilothouse.policy.adapters.opa`.

The shared contracts live in the bus package so that every service computes them identically: identity
normalisation (:mod:`pilothouse.bus.identity`), canonical JSON and the action hash (:mod:`pilothouse.bus.actions`),
and Ed25519 signing/verification of ``ActionAuthorized`` (:mod:`pilothouse.bus.authorization`, which the actuator
verifies with). This module re-exports the first two and computes the terms the third signs.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from pilothouse.bus import actions as bus_actions
from pilothouse.bus.attestation import HumanKeyRegistry, Verified, kill_switch_refusal
from pilothouse.bus.errors import PermanentError, RetryableError
from pilothouse.bus.identity import IdentityInvalid, normalise_identity, strip_invisible
from pilothouse.bus.records import ActionProposed, ApprovalRecorded, HypothesisValidated, KillSwitchChanged

INPUT_SCHEMA_VERSION = "1"

#: Entrypoints of the policy bundle, as OPA data paths (POST /v1/data/<path>).
ENTRYPOINTS: dict[str, str] = {
    "proposal": "pilothouse/proposal/decision",
    "approvals": "pilothouse/approvals/decision",
}

#: Bounds on container sizes: a proposal never legitimately carries more, and unbounded lists are a memory risk.
MAX_APPROVALS = 32
MAX_VALIDATIONS = 32
MAX_FREEZE_WINDOWS = 64
MAX_KILLED_SERVICES = 256
MAX_PARAMS_BYTES = 16 * 1024
MAX_ID_CHARS = 256


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


class PolicyInputInvalid(PermanentError):
    """The policy input document is malformed; no decision can be taken on it (the record goes to the DLQ)."""


class NotAuthorizable(PermanentError):
    """Authorization terms were asked for a decision that does not allow the action."""


class PolicyEngineUnavailable(RetryableError):
    """OPA could not be reached or answered with a transient error (5xx, timeout); retry with backoff."""


class PolicyEvaluationFailed(PermanentError):
    """OPA answered, but not with a valid decision (undefined entrypoint, 4xx, a decision that fails validation)."""


# ----------------------------------------------------------------------------------------------------------------
# Identities: normalise_identity / strip_invisible / IdentityInvalid come from pilothouse.bus.identity (re-exported)
# ----------------------------------------------------------------------------------------------------------------

def _is_invisible(ch: str) -> bool:
    return strip_invisible(ch) == ""


def _reject_invisible(value: str) -> str:
    if any(_is_invisible(ch) or unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError("must not contain invisible or control characters")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Canonical JSON and hashes (the bus's canonical form; errors translated to PolicyInputInvalid)
# ----------------------------------------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of a JSON value (:func:`pilothouse.bus.actions.canonical_json`): sorted keys, compact, UTF-8,
    finite numbers only. Raises PolicyInputInvalid for values without a canonical form."""
    try:
        return bus_actions.canonical_json(value)
    except bus_actions.ActionRejected as e:
        raise PolicyInputInvalid(f"no canonical JSON form: {e}") from e
    except TypeError as e:  # orjson: non-string keys, unsupported types
        raise PolicyInputInvalid(f"no canonical JSON form: {e}") from e


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def action_hash(action_type: str, target_kind: str, target: str, params: dict[str, Any]) -> str:
    """The bus's action hash (:func:`pilothouse.bus.actions.action_hash`) over exactly what will execute.

    An approval is bound to this hash; if any parameter changes afterwards, the approval no longer counts
    (``hash_mismatch``), and the actuator recomputes it before executing.
    """
    try:
        return bus_actions.action_hash(action_type, target_kind, target, params)
    except (bus_actions.ActionRejected, TypeError) as e:
        raise PolicyInputInvalid(f"action has no canonical hash: {e}") from e


def decision_id(entrypoint: str, input_digest: str, bundle_revision: str) -> str:
    """Deterministic id of a decision: the same input under the same bundle revision always yields the same id."""
    return "dec-" + sha256_hex(canonical_json([entrypoint, input_digest, bundle_revision]))[:32]


# ----------------------------------------------------------------------------------------------------------------
# The INPUT document (what the Rego reads as `input`)
# ----------------------------------------------------------------------------------------------------------------

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="lower-case hex SHA-256")]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_reject_invisible)]
Role = Annotated[str, Field(min_length=1, max_length=64)]
ActionType = Literal[
    "restart_service", "scale_replicas", "rollback_deploy", "toggle_feature_flag", "shift_traffic", "collect_diagnostics"
]
Environment = Literal["production", "staging", "development"]
Severity = Literal["sev1", "sev2", "sev3", "sev4"]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcTime = Annotated[AwareDatetime, AfterValidator(_utc)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Principal(_Model):
    """Someone or something that proposes, validates or approves. ``id`` is the identity provider's stable subject."""

    id: str = Field(description="stable id, normalised: NFKC + casefold + invisible characters removed")
    kind: Literal["human", "service", "model"]
    roles: list[Role] = Field(default_factory=list, max_length=32, description="responder | approver | admin | ...")
    display_name: str = Field(default="", max_length=256, description="shown to people; never compared")

    @field_validator("id", mode="before")
    @classmethod
    def _normalise_id(cls, value: Any) -> str:
        try:
            return normalise_identity(value)
        except IdentityInvalid as e:
            raise ValueError(str(e)) from e

    @field_validator("roles")
    @classmethod
    def _normalise_roles(cls, value: list[str]) -> list[str]:
        return sorted({strip_invisible(r).strip().lower() for r in value} - {""})


class Validation(_Model):
    validator: Principal
    validated_at: UtcTime


class Hypothesis(_Model):
    hypothesis_id: Id
    validations: list[Validation] = Field(default_factory=list, max_length=MAX_VALIDATIONS)


class Proposal(_Model):
    proposal_id: Id
    proposed_by: Principal
    hypothesis: Hypothesis


class Target(_Model):
    """What the action runs on. ``kind`` + ``name`` are the catalogue's target (hashed); ``service`` and
    ``environment`` place it for risk, kill switches, freezes and budgets."""

    kind: Id = Field(description="catalogue target kind, e.g. service | instance")
    name: Id = Field(description="the target itself, as in ActionProposed.target")
    service: Id = Field(description="the service the target belongs to (== name when kind is service)")
    environment: Environment


class ActionFacts(_Model):
    """Risk facts from the action catalogue (schemas/actions.yaml)."""

    reversible: bool
    blast_radius: Literal["low", "medium", "high"]
    read_only: bool


class Action(_Model):
    action_id: Id
    action_type: ActionType
    target: Target
    params: dict[str, JsonValue] = Field(default_factory=dict)
    facts: ActionFacts
    action_hash: Hex64 = Field(description="computed from action_type + target + params when omitted; checked if given")

    @model_validator(mode="before")
    @classmethod
    def _fill_hash(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("action_hash"):
            try:
                target = Target.model_validate(data["target"])
                digest = action_hash(data["action_type"], target.kind, target.name, data.get("params") or {})
                data = {**data, "action_hash": digest}
            except PolicyInputInvalid as e:
                raise ValueError(f"params: {e}") from e
            except (KeyError, TypeError, ValidationError):
                pass  # the field validators report what is missing or wrong
        return data

    def computed_hash(self) -> str:
        return action_hash(self.action_type, self.target.kind, self.target.name, self.params)

    @model_validator(mode="after")
    def _check_hash(self) -> Action:
        size = len(canonical_json(self.params))
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"params are {size} bytes of canonical JSON, more than {MAX_PARAMS_BYTES}")
        expected = self.computed_hash()
        if self.action_hash != expected:
            raise ValueError(f"action_hash {self.action_hash} does not match the action (expected {expected})")
        return self


class Incident(_Model):
    incident_id: Id
    severity: Severity


class Budget(_Model):
    """Risk consumed in the current window by executed actions in this scope (summed from the ledger)."""

    scope: Id = Field(description="service or team whose budget applies; limits live in the bundle data")
    window_start: UtcTime
    window_end: UtcTime
    consumed: float = Field(ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _window_order(self) -> Budget:
        if self.window_end <= self.window_start:
            raise ValueError("window_end must be after window_start")
        return self


class KillSwitch(_Model):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    global_: bool = Field(default=False, alias="global")
    services: list[Id] = Field(default_factory=list, max_length=MAX_KILLED_SERVICES)


class FreezeWindow(_Model):
    name: Id
    start: UtcTime
    end: UtcTime
    environments: list[str] = Field(default_factory=lambda: ["*"], max_length=16)
    services: list[str] = Field(default_factory=lambda: ["*"], max_length=256)


class Controls(_Model):
    kill_switch: KillSwitch = Field(default_factory=KillSwitch)
    freeze_windows: list[FreezeWindow] = Field(default_factory=list, max_length=MAX_FREEZE_WINDOWS)
    in_flight_on_target: int = Field(default=0, ge=0, description="actions executing now on the same target")


class Approval(_Model):
    approval_id: Id
    approver: Principal
    action_hash: Hex64 = Field(description="hash of the action the approver saw; must equal action.action_hash")
    granted_at: UtcTime
    expires_at: UtcTime


class Rejection(_Model):
    """A human's "reject" of the action: a veto (``rejected_by_human``) whatever approvals exist."""

    rejection_id: Id
    rejecter: Principal
    action_hash: Hex64 = Field(description="hash of the action the person rejected")
    rejected_at: UtcTime
    comment: str = Field(default="", max_length=2000)


class PolicyInput(_Model):
    """The ``input`` document of both entrypoints. Time comes from ``now`` only, so decisions replay exactly."""

    schema_version: Literal["1"] = INPUT_SCHEMA_VERSION
    now: UtcTime
    incident: Incident
    action: Action
    proposal: Proposal
    budget: Budget
    controls: Controls = Field(default_factory=Controls)
    approvals: list[Approval] = Field(default_factory=list, max_length=MAX_APPROVALS)
    rejections: list[Rejection] = Field(default_factory=list, max_length=MAX_APPROVALS)

    @model_validator(mode="after")
    def _unique_approval_ids(self) -> PolicyInput:
        ids = [a.approval_id for a in self.approvals]
        if len(set(ids)) != len(ids):
            raise ValueError("approvals: approval_id values must be unique")
        return self

    def to_opa(self) -> dict[str, Any]:
        """The JSON document sent to OPA as ``input``."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """SHA-256 of the canonical input document: recorded with the decision so it can be replayed."""
        return input_digest(self.to_opa())

    def canonical_text(self) -> str:
        """The canonical input document as text (PolicyDecided.input_json); its SHA-256 is :meth:`digest`."""
        return canonical_json(self.to_opa()).decode("utf-8")


def input_digest(document: dict[str, Any]) -> str:
    """SHA-256 of a canonical input document (the output of :meth:`PolicyInput.to_opa`)."""
    return sha256_hex(canonical_json(document))


def parse_policy_input(data: Any) -> PolicyInput:
    """Validate a raw document into a :class:`PolicyInput`, turning validation errors into PolicyInputInvalid."""
    try:
        if isinstance(data, (bytes, str)):
            return PolicyInput.model_validate_json(data)
        return PolicyInput.model_validate(data)
    except ValidationError as e:
        raise PolicyInputInvalid(f"policy input refused: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# The DECISION document (what both entrypoints return)
# ----------------------------------------------------------------------------------------------------------------

_REASON = re.compile(r"^[a-z][a-z0-9_]*: .+", re.DOTALL)


class RiskAssessment(_Model):
    tier: Literal["read_only", "low", "medium", "high"]
    score: float
    cost: float
    budget_scope: str
    budget_limit: float
    budget_remaining: float
    budget_low: bool
    frozen_by: list[str]


class RefusedApproval(_Model):
    approval_id: str
    approver_id: str
    codes: list[str] = Field(min_length=1)
    reasons: list[str] = Field(min_length=1)


class Decision(_Model):
    """What an entrypoint answers. ``reasons`` are ``"<stable_code>: <human text>"``; ``reason_codes`` the codes."""

    entrypoint: Literal["proposal", "approvals"]
    outcome: Literal["allow", "pending_approval", "deny"]
    allow: bool
    requires_approval: bool
    approvers_needed: int = Field(ge=0)
    approvals_still_needed: int = Field(ge=0)
    approver_roles: list[str]
    risk: RiskAssessment | None = Field(description="absent ({} from OPA) when the input could not be assessed")
    reasons: list[str] = Field(min_length=1)
    reason_codes: list[str] = Field(min_length=1)
    accepted_approvals: list[str]
    refused_approvals: list[RefusedApproval]
    action_hash: str
    bundle_revision: str = Field(min_length=1)

    @field_validator("risk", mode="before")
    @classmethod
    def _empty_risk(cls, value: Any) -> Any:
        return None if value == {} else value

    @model_validator(mode="after")
    def _consistent(self) -> Decision:
        if self.allow != (self.outcome == "allow") or self.requires_approval != (self.outcome == "pending_approval"):
            raise ValueError(f"allow/requires_approval disagree with outcome {self.outcome!r}")
        bad = [r for r in self.reasons if not _REASON.match(r)]
        if bad:
            raise ValueError(f"reasons must read '<code>: <text>': {bad[:3]}")
        return self


class DecisionRecord(_Model):
    """A decision with what makes it replayable: the input digest, the bundle revision and a deterministic id."""

    decision_id: str
    input_hash: Hex64
    decision: Decision


def record_decision(policy_input: PolicyInput, decision: Decision, *, digest: str | None = None) -> DecisionRecord:
    """Bind a decision to its input. ``digest`` may be passed when the caller already hashed ``to_opa()``."""
    digest = digest or policy_input.digest()
    if decision.action_hash != policy_input.action.action_hash:
        raise PolicyEvaluationFailed("decision is about another action than the input (action_hash differs)")
    return DecisionRecord(
        decision_id=decision_id(decision.entrypoint, digest, decision.bundle_revision),
        input_hash=digest,
        decision=decision,
    )


# ----------------------------------------------------------------------------------------------------------------
# From bus records to parts of the input document
# ----------------------------------------------------------------------------------------------------------------


def action_from_record(proposed: ActionProposed, *, service: str, environment: str) -> Action:
    """The input's ``action`` from an ``ActionProposed`` record; ``service``/``environment`` place the target.

    The hash is recomputed from the record's fields: a record whose ``action_hash`` does not match what it would
    execute is refused (PolicyInputInvalid), so an approval can never be collected for one action and spent on another.
    """
    try:
        params = orjson.loads(proposed.params_json or "{}")
    except orjson.JSONDecodeError as e:
        raise PolicyInputInvalid(f"ActionProposed {proposed.action_id}: params_json is not JSON: {e}") from e
    try:
        return Action.model_validate({
            "action_id": proposed.action_id,
            "action_type": proposed.action_type,
            "target": {"kind": proposed.target_kind, "name": proposed.target, "service": service,
                       "environment": environment},
            "params": params,
            "facts": {"reversible": proposed.reversible, "blast_radius": proposed.blast_radius,
                      "read_only": proposed.read_only},
            "action_hash": proposed.action_hash,
        })
    except ValidationError as e:
        raise PolicyInputInvalid(f"ActionProposed {proposed.action_id} refused: {e}") from e


def validation_from_record(validated: HypothesisValidated) -> Validation | None:
    """A Gate 1 validation from the console's record; None for a rejection (it validates nothing).

    The console only records what a logged-in human account did, so the principal is ``human``; the Rego still
    refuses ids that belong to service or model principals."""
    if validated.verdict != "validated":
        return None
    principal = {"id": validated.validator_id, "kind": "human", "roles": validated.validator_roles,
                 "display_name": validated.validator_display}
    try:
        return Validation.model_validate({"validator": principal, "validated_at": validated.occurred_at})
    except ValidationError as e:
        raise PolicyInputInvalid(f"HypothesisValidated {validated.event_id} refused: {e}") from e


def approval_from_record(recorded: ApprovalRecorded) -> Approval | None:
    """An approval from the console's record (granted at ``occurred_at``); None for a rejection."""
    if recorded.decision != "approve":
        return None
    principal = {"id": recorded.approver_id, "kind": "human", "roles": recorded.approver_roles,
                 "display_name": recorded.approver_display}
    try:
        return Approval.model_validate({
            "approval_id": recorded.approval_id, "approver": principal, "action_hash": recorded.action_hash,
            "granted_at": recorded.occurred_at, "expires_at": recorded.expires_at,
        })
    except ValidationError as e:
        raise PolicyInputInvalid(f"ApprovalRecorded {recorded.approval_id} refused: {e}") from e


def rejection_from_record(recorded: ApprovalRecorded) -> Rejection | None:
    """A veto from the console's record (``decision == "reject"``); None for an approval."""
    if recorded.decision != "reject":
        return None
    principal = {"id": recorded.approver_id, "kind": "human", "roles": recorded.approver_roles,
                 "display_name": recorded.approver_display}
    try:
        return Rejection.model_validate({
            "rejection_id": recorded.approval_id, "rejecter": principal, "action_hash": recorded.action_hash,
            "rejected_at": recorded.occurred_at, "comment": recorded.comment[:2000],
        })
    except ValidationError as e:
        raise PolicyInputInvalid(f"ApprovalRecorded {recorded.approval_id} refused: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Human signatures: what the console forwards counts only if the named person signed it
# ----------------------------------------------------------------------------------------------------------------

def verified_signer(registry: HumanKeyRegistry, record: ApprovalRecorded | HypothesisValidated) -> Verified:
    """The person who signed an approval or validation, or AttestationInvalid saying why it does not count.

    The console principal carries the statement but cannot make one: the signature must verify with a key enrolled
    for the stable id the record names, over the statement its own fields make (action id and hash, decision,
    approval id and expiry; or hypothesis, incident, verdict and time)."""
    return registry.verify(record)


def ignored_note(record: ApprovalRecorded | HypothesisValidated, why: str) -> str:
    """The decision reason for a statement policy does not count (``approval appr-.. by approver-1 ignored: ...``)."""
    if isinstance(record, ApprovalRecorded):
        return f"approval {record.approval_id} by {record.approver_id[:MAX_ID_CHARS]} ignored: {why}"
    return f"validation {record.event_id} by {record.validator_id[:MAX_ID_CHARS]} ignored: {why}"


def roles_of(verified: Verified, claimed: list[str]) -> list[str]:
    """The roles a verified signer acts with: the registry's when it lists any, else those the record claims."""
    return list(verified.roles) if verified.roles else list(claimed)


def check_kill_switch_change(registry: HumanKeyRegistry, record: KillSwitchChanged, now: datetime) -> str | None:
    """None when the change may apply, else why it is refused (see :func:`pilothouse.bus.attestation.kill_switch_refusal`:
    engaging needs no signature, releasing needs an enrolled admin's)."""
    return kill_switch_refusal(registry, record, now)


#: IncidentUpdated.severity -> the input's severity. Unknown is scored like sev1: fail towards caution.
SEVERITY_FROM_INCIDENT: dict[str, str] = {
    "critical": "sev1", "error": "sev2", "warning": "sev3", "info": "sev4", "unknown": "sev1",
}
UNKNOWN_INCIDENT_SEVERITY = "sev1"


def budget_window(now: datetime, length: timedelta) -> tuple[datetime, datetime]:
    """The budget window containing ``now``: fixed windows of ``length`` aligned to the Unix epoch (UTC)."""
    if length <= timedelta(0):
        raise PolicyInputInvalid("budget window length must be positive")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    n = (now.astimezone(UTC) - epoch) // length
    start = epoch + n * length
    return start, start + length


def target_service(target_kind: str, target: str, incident_primary_service: str | None) -> str:
    """The service an action's target belongs to: the target itself for ``service`` targets, otherwise the
    incident's primary service (an instance of it), or the target name when the incident is not known yet."""
    if target_kind == "service" or not incident_primary_service:
        return target
    return incident_primary_service


def kill_switch_from_scopes(engaged: frozenset[str] | set[str]) -> KillSwitch:
    """The input's kill-switch state from engaged scopes (``global``, ``service:<name>``)."""
    services = sorted({s.split(":", 1)[1] for s in engaged if s.startswith("service:") and len(s) > len("service:")})
    return KillSwitch.model_validate({"global": "global" in engaged, "services": services[:MAX_KILLED_SERVICES]})


def parse_freeze_windows(data: Any) -> list[FreezeWindow]:
    """Freeze windows from a settings document: a list, or ``{"freeze_windows": [...]}``."""
    if isinstance(data, dict):
        data = data.get("freeze_windows", [])
    if data is None:
        return []
    if not isinstance(data, list):
        raise PolicyInputInvalid("freeze windows must be a list of {name, start, end, environments, services}")
    try:
        return [FreezeWindow.model_validate(w) for w in data]
    except ValidationError as e:
        raise PolicyInputInvalid(f"freeze window refused: {e}") from e


def relevant_freezes(windows: list[FreezeWindow], now: datetime) -> list[FreezeWindow]:
    """Windows that have not ended yet, soonest first, bounded to what the input accepts."""
    return sorted((w for w in windows if w.end > now), key=lambda w: (w.start, w.name))[:MAX_FREEZE_WINDOWS]


# ----------------------------------------------------------------------------------------------------------------
# What an allow turns into on the bus
# ----------------------------------------------------------------------------------------------------------------

#: (stage, outcome) of the bus's PolicyDecided record for each (entrypoint, outcome) of a decision.
_BUS_OUTCOMES: dict[tuple[str, str], tuple[str, str]] = {
    ("proposal", "deny"): ("proposal", "denied"),
    ("proposal", "pending_approval"): ("proposal", "pending_approval"),
    ("proposal", "allow"): ("proposal", "auto_allowed"),
    ("approvals", "deny"): ("approval", "denied"),
    ("approvals", "pending_approval"): ("approval", "waiting"),
    ("approvals", "allow"): ("approval", "authorized"),
}


def bus_stage_and_outcome(decision: Decision) -> tuple[str, str]:
    """``(stage, outcome)`` for ``pilothouse.bus.records.PolicyDecided``."""
    return _BUS_OUTCOMES[(decision.entrypoint, decision.outcome)]


#: Reason codes that annotate a decision without blocking it (policies/README.md, "Reason codes").
NOTE_CODES = frozenset({"read_only_auto_allowed", "approval_required", "budget_low", "freeze_window_active",
                        "approvals_sufficient", "approvals_pending", "approvals_refused"})


def held_at_gate1(decision: Decision) -> bool:
    """A proposal denied only because no human validated its hypothesis yet: the service holds it (``waiting``)
    and decides again when a validation arrives, instead of denying it for good."""
    return (decision.entrypoint == "proposal" and decision.outcome == "deny"
            and set(decision.reason_codes) - NOTE_CODES == {"hypothesis_not_validated"})


def service_stage_and_outcome(decision: Decision) -> tuple[str, str]:
    """What the policy service publishes for a decision: :func:`bus_stage_and_outcome`, except that a proposal
    held at Gate 1 is ``("proposal", "waiting")``."""
    return ("proposal", "waiting") if held_at_gate1(decision) else bus_stage_and_outcome(decision)


class AuthorizationTerms(_Model):
    """The policy-owned fields of an ``ActionAuthorized`` record; the handler adds the envelope and the action, then
    signs with :func:`pilothouse.bus.authorization.sign` (the actuator verifies with its ``verify``)."""

    action_id: str
    action_hash: Hex64
    decision_id: str
    bundle_revision: str
    input_sha256: Hex64
    approval_ids: list[str]
    issued_at: UtcTime
    expires_at: UtcTime


def authorization_terms(
    policy_input: PolicyInput, record: DecisionRecord, *, ttl: timedelta = timedelta(minutes=5)
) -> AuthorizationTerms:
    """Terms of the authorization for an allowed decision, issued at ``policy_input.now``.

    It expires at ``now + ttl`` or when the first accepted approval expires, whichever is sooner: an authorization
    never outlives the human consent it rests on. Raises NotAuthorizable unless the decision allows the action.
    """
    decision = record.decision
    if not decision.allow:
        raise NotAuthorizable(f"decision {record.decision_id} is {decision.outcome}: nothing to authorize")
    if decision.action_hash != policy_input.action.action_hash or record.input_hash != policy_input.digest():
        raise NotAuthorizable(f"decision {record.decision_id} was taken on another input")
    if ttl <= timedelta(0):
        raise NotAuthorizable("ttl must be positive")
    accepted = set(decision.accepted_approvals)
    expiries = [a.expires_at for a in policy_input.approvals if a.approval_id in accepted]
    expires_at = min([policy_input.now + ttl, *expiries])
    if expires_at <= policy_input.now:
        raise NotAuthorizable("an accepted approval expires now: ask for a fresh approval")
    return AuthorizationTerms(
        action_id=policy_input.action.action_id,
        action_hash=policy_input.action.action_hash,
        decision_id=record.decision_id,
        bundle_revision=decision.bundle_revision,
        input_sha256=record.input_hash,
        approval_ids=sorted(accepted),
        issued_at=policy_input.now,
        expires_at=expires_at,
    )


# ----------------------------------------------------------------------------------------------------------------
# Documentation: the README's embedded schemas are generated from these models
# ----------------------------------------------------------------------------------------------------------------

_BEGIN = "<!-- generated:{name}:begin -->"
_END = "<!-- generated:{name}:end -->"


def document_schemas() -> dict[str, dict[str, Any]]:
    """JSON schemas of the input (as sent to OPA) and of the decision (as OPA returns it)."""
    return {
        "input-schema": PolicyInput.model_json_schema(mode="serialization", by_alias=True),
        "decision-schema": Decision.model_json_schema(mode="validation"),
    }


def render_readme(readme: str) -> str:
    """Return ``readme`` with every generated block replaced by the current schema (a fenced JSON block)."""
    for name, schema in document_schemas().items():
        begin, end = _BEGIN.format(name=name), _END.format(name=name)
        start, stop = readme.find(begin), readme.find(end)
        if start < 0 or stop < start:
            raise PolicyInputInvalid(f"README has no {begin} ... {end} block")
        body = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
        readme = readme[: start + len(begin)] + "\n```json\n" + body + "\n```\n" + readme[stop:]
    return readme

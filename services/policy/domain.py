"""Pure policy logic: the OPA input and decision documents, identities, action hashes and signed authorizations.

Nothing here performs I/O. The OPA server is reached through :mod:`pilothouse.policy.adapters.opa`; the actuator
verifies authorizations with :func:`verify_authorization` from this module, so both sides share one canonical form.

Canonical JSON (used for every hash and signature) is UTF-8 JSON with keys sorted by code point, no insignificant
whitespace, and finite numbers only; it is produced by :func:`canonical_json`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
import unicodedata
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
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

from pilothouse.bus.errors import PermanentError, RetryableError

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


class IdentityInvalid(PolicyInputInvalid):
    """A principal id is empty after normalisation or contains control characters."""


class AuthorizationInvalid(PermanentError):
    """A signed authorization failed verification: bad signature, expired, or bound to another action."""


class PolicyEngineUnavailable(RetryableError):
    """OPA could not be reached or answered with a transient error (5xx, timeout); retry with backoff."""


class PolicyEvaluationFailed(PermanentError):
    """OPA answered, but not with a valid decision (undefined entrypoint, 4xx, a decision that fails validation)."""


# ----------------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------------

# Code points that render as nothing but make two ids differ. Unicode category Cf (format characters: zero-width
# space/joiners, bidi controls, BOM, tag characters) is removed wholesale; these are the invisible ones outside Cf.
_INVISIBLE_RANGES = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0100, 0xE01EF),  # variation selectors supplement
)


def _is_invisible(ch: str) -> bool:
    if unicodedata.category(ch) == "Cf":
        return True
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _INVISIBLE_RANGES)


def strip_invisible(text: str) -> str:
    """Remove zero-width, bidi, tag-block and other invisible code points."""
    return "".join(ch for ch in text if not _is_invisible(ch))


def normalise_identity(raw: str) -> str:
    """Return the stable, comparable form of a principal id.

    NFKC (full-width and compatibility forms fold to their plain letters), casefold (``ONCALL-7`` == ``oncall-7``),
    invisible characters removed, surrounding whitespace trimmed. Raises :class:`IdentityInvalid` when nothing is
    left or when control characters remain: such an id cannot be compared safely, so it is refused, not repaired.
    """
    if not isinstance(raw, str):
        raise IdentityInvalid(f"identity must be a string, got {type(raw).__name__}")
    text = strip_invisible(raw)
    # casefold can produce non-NFKC sequences, so normalise again afterwards (the Unicode NFKC_Casefold recipe).
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    text = strip_invisible(text).strip()
    if not text:
        raise IdentityInvalid(f"identity {raw!r} is empty after normalisation")
    if len(text) > MAX_ID_CHARS:
        raise IdentityInvalid(f"identity longer than {MAX_ID_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text):
        raise IdentityInvalid(f"identity {raw!r} contains control characters")
    return text


def _reject_invisible(value: str) -> str:
    if any(_is_invisible(ch) or unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError("must not contain invisible or control characters")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Canonical JSON and hashes
# ----------------------------------------------------------------------------------------------------------------


def _check_finite(value: Any, path: str = "$") -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise PolicyInputInvalid(f"{path}: NaN and infinities have no canonical JSON form")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PolicyInputInvalid(f"{path}: object keys must be strings, got {type(key).__name__}")
            _check_finite(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]")


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of a JSON value: sorted keys, compact, UTF-8, finite numbers only."""
    _check_finite(value)
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as e:
        raise PolicyInputInvalid(f"value has no canonical JSON form: {e}") from e


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def action_hash(action_type: str, target: dict[str, Any] | BaseModel, params: dict[str, Any]) -> str:
    """SHA-256 (hex) over the canonical JSON of ``{"action_type", "target", "params"}``.

    The hash is taken over exactly what will execute: nothing is normalised here. An approval is bound to this hash;
    if any parameter changes afterwards, the approval no longer counts (``hash_mismatch``).
    """
    if isinstance(target, BaseModel):
        target = target.model_dump(mode="json")
    return sha256_hex(canonical_json({"action_type": action_type, "target": target, "params": params}))


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
    service: Id
    environment: Environment
    resource: str = Field(default="", max_length=512)


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
                target = Target.model_validate(data["target"]).model_dump(mode="json")
                data = {**data, "action_hash": action_hash(data["action_type"], target, data.get("params") or {})}
            except PolicyInputInvalid as e:
                raise ValueError(f"params: {e}") from e
            except (KeyError, TypeError, ValidationError):
                pass  # the field validators report what is missing or wrong
        return data

    @model_validator(mode="after")
    def _check_hash(self) -> Action:
        size = len(canonical_json(self.params))
        if size > MAX_PARAMS_BYTES:
            raise ValueError(f"params are {size} bytes of canonical JSON, more than {MAX_PARAMS_BYTES}")
        expected = action_hash(self.action_type, self.target, self.params)
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

    def to_opa(self) -> dict[str, Any]:
        """The JSON document sent to OPA as ``input``."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """SHA-256 of the canonical input document: recorded with the decision so it can be replayed."""
        return input_digest(self.to_opa())


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
# Signed authorizations (policy signs, actuator verifies)
# ----------------------------------------------------------------------------------------------------------------

_AUTHORIZATION_CONTEXT = b"pilothouse.authorization.v1\n"


class AuthorizationPayload(_Model):
    """What the policy service signs when approvals are sufficient, and what the actuator checks before executing."""

    action_id: Id
    action_hash: Hex64
    decision_id: Id
    bundle_revision: Id
    input_hash: Hex64
    approval_ids: list[Id] = Field(max_length=MAX_APPROVALS)
    expires_at: UtcTime

    @field_validator("approval_ids")
    @classmethod
    def _sorted_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("approval_ids must be unique")
        return sorted(value)

    def canonical_bytes(self) -> bytes:
        """Domain-separated canonical bytes: a signature over them cannot be replayed as another kind of message."""
        return _AUTHORIZATION_CONTEXT + canonical_json(self.model_dump(mode="json"))


def sign_authorization(private_key: Ed25519PrivateKey, payload: AuthorizationPayload) -> str:
    """Ed25519 signature over the payload's canonical bytes, base64url without padding."""
    signature = private_key.sign(payload.canonical_bytes())
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")


def verify_authorization(
    public_key: Ed25519PublicKey,
    payload: AuthorizationPayload,
    signature: str,
    *,
    now: datetime,
    action_hash: str | None = None,
) -> None:
    """Raise :class:`AuthorizationInvalid` unless the signature is valid, unexpired at ``now``, and (when given)
    bound to ``action_hash`` — the hash the verifier computed itself from the action it is about to run."""
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (binascii.Error, ValueError, TypeError) as e:
        raise AuthorizationInvalid("signature is not base64url") from e
    if len(raw) != 64:
        raise AuthorizationInvalid(f"an Ed25519 signature has 64 bytes, got {len(raw)}")
    try:
        public_key.verify(raw, payload.canonical_bytes())
    except InvalidSignature as e:
        raise AuthorizationInvalid("signature does not match the payload (forged or altered)") from e
    if now.tzinfo is None:
        raise AuthorizationInvalid("now must be timezone-aware")
    if now >= payload.expires_at:
        raise AuthorizationInvalid(f"authorization expired at {payload.expires_at.isoformat()}")
    if action_hash is not None and action_hash != payload.action_hash:
        raise AuthorizationInvalid("authorization is bound to another action (action_hash differs)")


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

"""Pure decisions of the actuator (no I/O): may this authorization run, is the clock trustworthy, did the action
work, and how is it undone. Every function here takes its facts as arguments (time included), so each decision can be
replayed and unit-tested with a fake clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pilothouse.bus.actions import ActionCatalogue, ActionRejected, ActionType, VerifySpec, action_hash
from pilothouse.bus.authorization import AuthorizationInvalid, verify
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.records import ActionAuthorized

MAX_PARAMS_JSON = 16_384


class ActuatorError(PermanentError):
    """Root of the actuator's own permanent errors."""


class Refused(ActuatorError):
    """An authorization failed a check: it is recorded as ActionExecuted(outcome=refused) and never retried."""

    def __init__(self, check: str, reason: str):
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


# ---- clock skew ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClockReading:
    """Our clock read just before and just after asking an independent clock (Postgres ``clock_timestamp()``)."""

    local_before: datetime
    reference: datetime
    local_after: datetime

    @property
    def skew_s(self) -> float:
        """Local minus reference, taking the reference as read at the midpoint of the round trip."""
        mid = self.local_before + (self.local_after - self.local_before) / 2
        return (mid - self.reference).total_seconds()

    @property
    def uncertainty_s(self) -> float:
        return max(0.0, (self.local_after - self.local_before).total_seconds() / 2)


def check_clock(reading: ClockReading, max_skew_s: float) -> None:
    """Refuse when our clock may be off by more than ``max_skew_s`` (expiry checks would be meaningless).

    The round-trip uncertainty counts against us: a reference we cannot read precisely cannot vouch for our clock.
    """
    if reading.local_before.tzinfo is None or reading.reference.tzinfo is None:
        raise Refused("clock_skew", "clock readings must be timezone-aware")
    if reading.local_after < reading.local_before:
        raise Refused("clock_skew", "local clock went backwards during the measurement")
    worst = abs(reading.skew_s) + reading.uncertainty_s
    if not math.isfinite(worst) or worst > max_skew_s:
        raise Refused("clock_skew", f"local clock is {reading.skew_s:+.3f}s off the reference clock "
                                    f"(±{reading.uncertainty_s:.3f}s), more than the {max_skew_s:g}s bound")


# ---- kill switch -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillSwitches:
    """Engaged kill-switch scopes: ``global`` or ``service:<name>``."""

    engaged: frozenset[str] = frozenset()

    def blocking(self, services: set[str]) -> str | None:
        """The scope that forbids touching any of ``services``, or None."""
        if "global" in self.engaged:
            return "global"
        for s in sorted(services):
            if f"service:{s}" in self.engaged:
                return f"service:{s}"
        return None


# ---- authorization checks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """An authorization that passed every check the actuator can make without the target."""

    action: ActionType
    params: dict[str, Any]
    services: frozenset[str]


def parse_params(params_json: str) -> dict[str, Any]:
    """The params object of a record; Refused if it is not a JSON object of bounded size."""
    if len(params_json) > MAX_PARAMS_JSON:
        raise Refused("params", f"params_json is {len(params_json)} bytes, more than {MAX_PARAMS_JSON}")
    try:
        params = orjson.loads(params_json)
    except orjson.JSONDecodeError as e:
        raise Refused("params", f"params_json is not JSON: {e}") from None
    if not isinstance(params, dict):
        raise Refused("params", f"params_json must be an object, not {type(params).__name__}")
    return params


def touched_services(action: ActionType, target_kind: str, target: str, params: dict[str, Any]) -> frozenset[str]:
    """The services an action touches (for kill switches), checking that ``target`` names what params act on."""
    service = params.get("service")
    if not isinstance(service, str):
        raise Refused("target", f"{action.name} params name no service")
    if target_kind == "service" and target != service:
        raise Refused("target", f"target {target!r} differs from params.service {service!r}")
    if target_kind == "instance":
        instance = params.get("instance")
        if target not in (instance, f"{service}/{instance}"):
            raise Refused("target", f"target {target!r} differs from params.instance {instance!r}")
    return frozenset({service})


def check_authorization(
    rec: ActionAuthorized,
    *,
    catalogue: ActionCatalogue,
    keys: dict[str, Ed25519PublicKey],
    now: datetime,
    clock: ClockReading,
    max_skew_s: float,
    kill_switches: KillSwitches,
) -> Accepted:
    """Every check an authorization must pass before the target is even asked; raises Refused naming the first
    failure. Order: clock first (expiry means nothing otherwise), then the signature over what the actuator
    recomputed itself, then what the catalogue and the kill switches say."""
    check_clock(clock, max_skew_s)
    if not rec.decision_id.strip():
        raise Refused("decision_id", "authorization carries no policy decision id")
    if not rec.authorization_id.strip() or not rec.action_id.strip():
        raise Refused("ids", "authorization_id and action_id are required")
    params = parse_params(rec.params_json)
    try:
        action = catalogue.check(rec.action_type, rec.target_kind, params)
        recomputed = action_hash(rec.action_type, rec.target_kind, rec.target, params)
    except ActionRejected as e:
        raise Refused("catalogue", str(e)) from None
    try:
        verify(keys, rec, now=now, expected_action_hash=recomputed)
    except AuthorizationInvalid as e:
        check = "expired" if "expired" in str(e) else "action_hash" if "another action" in str(e) else "signature"
        raise Refused(check, str(e)) from None
    if rec.issued_at > rec.expires_at:
        raise Refused("expired", "issued after it expires")
    if not action.read_only and not [a for a in rec.approval_ids if a.strip()]:
        raise Refused("approvals", f"{action.name} changes the target but the authorization carries no approval ids")
    services = touched_services(action, rec.target_kind, rec.target, params)
    scope = kill_switches.blocking(set(services))
    if scope is not None:
        raise Refused("kill_switch", f"kill switch {scope!r} is engaged")
    return Accepted(action=action, params=params, services=services)


# ---- verification and rollback ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    observed: float | None
    threshold: float | None
    detail: str = ""


_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def _lookup(doc: dict[str, Any], path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def evaluate_checks(spec: VerifySpec, service_state: dict[str, Any] | None) -> list[CheckResult]:
    """Evaluate the catalogue's checks against one observed service (``/state``'s ``services[name]`` shape).

    A metric or threshold that cannot be read fails its check (unknown is not healthy)."""
    out = []
    for c in spec.checks:
        if service_state is None:
            out.append(CheckResult(c.name, False, None, None, "service not observed"))
            continue
        observed = _number(service_state.get(c.metric))
        threshold = _number(_lookup(service_state, c.threshold_from))
        if observed is None or threshold is None:
            out.append(CheckResult(c.name, False, observed, threshold,
                                   f"cannot read {c.metric if observed is None else c.threshold_from}"))
            continue
        ok = _OPS[c.op](observed, threshold)
        out.append(CheckResult(c.name, ok, observed, threshold, f"{c.metric} {observed:g} {c.op} {threshold:g}"
                                                                 f" is {'true' if ok else 'false'}"))
    return out


def evaluate_window(spec: VerifySpec, samples: list[dict[str, Any] | None]) -> list[CheckResult]:
    """Evaluate the checks on the mean of the samples taken over the second half of the window (one sample when the
    window passed between two looks, e.g. with a manual clock). Threshold from the latest sample. One unreadable
    sample fails the check: unknown is not healthy."""
    if not samples or len(samples) == 1:
        return evaluate_checks(spec, samples[0] if samples else None)
    out = []
    for c in spec.checks:
        values = [_number(s.get(c.metric)) if s is not None else None for s in samples]
        threshold = _number(_lookup(samples[-1], c.threshold_from)) if samples[-1] is not None else None
        if any(v is None for v in values) or threshold is None:
            out.append(CheckResult(c.name, False, None, threshold, f"cannot read {c.metric} in every sample"))
            continue
        mean = sum(values) / len(values)  # type: ignore[arg-type]
        ok = _OPS[c.op](mean, threshold)
        out.append(CheckResult(c.name, ok, mean, threshold, f"mean {c.metric} over {len(values)} samples {mean:g} "
                                                            f"{c.op} {threshold:g} is {'true' if ok else 'false'}"))
    return out


def in_sampling_half(executed_at_s: float, window_s: int, now_s: float) -> bool:
    """True in the second half of the window: the action's own transient is over, samples count."""
    return executed_at_s + window_s / 2 <= now_s < executed_at_s + window_s


@dataclass(frozen=True)
class RollbackPlan:
    action: str
    params: dict[str, Any]


def rollback_plan(action: ActionType, params: dict[str, Any], before: dict[str, Any]) -> RollbackPlan | None:
    """The undo of an executed action from the catalogue's ``rollback.params_from`` (``params.*`` / ``before.*``).

    None when the action is not reversible or has no rollback spec; Refused("rollback") when a value it needs is
    missing (the target did not report the ``before`` state)."""
    if not action.reversible or not action.rollback:
        return None
    sources = {"params": params, "before": before}
    out: dict[str, Any] = {}
    for name, ref in action.rollback.get("params_from", {}).items():
        src, _, key = str(ref).partition(".")
        if src not in sources or key not in sources[src]:
            raise Refused("rollback", f"rollback of {action.name} needs {ref}, which the execution did not report")
        out[name] = sources[src][key]
    return RollbackPlan(action=action.rollback["action"], params=out)


@dataclass(frozen=True)
class VerificationDecision:
    outcome: str  # verified | failed | skipped | roll_back
    checks: list[CheckResult] = field(default_factory=list)
    detail: str = ""
    rollback: RollbackPlan | None = None


def decide_verification(action: ActionType, params: dict[str, Any], before: dict[str, Any],
                        checks: list[CheckResult], kill_switches: KillSwitches) -> VerificationDecision:
    """What to do once the window has passed: verified, skipped (nothing to check), roll back, or failed."""
    if not action.verify.checks:
        return VerificationDecision("skipped", checks, "the catalogue defines no checks for this action")
    failed = [c.name for c in checks if not c.passed]
    if not failed:
        return VerificationDecision("verified", checks, "every check passed")
    detail = f"failed: {', '.join(failed)}"
    try:
        plan = rollback_plan(action, params, before)
    except Refused as e:
        return VerificationDecision("failed", checks, f"{detail}; no automatic rollback: {e.reason}")
    if plan is None:
        return VerificationDecision("failed", checks, f"{detail}; {action.name} is not reversible, no rollback")
    scope = kill_switches.blocking({str(params.get("service"))})
    if scope is not None:
        return VerificationDecision("failed", checks, f"{detail}; rollback withheld: kill switch {scope!r} engaged")
    return VerificationDecision("roll_back", checks, detail, plan)


def verification_due(executed_at_s: float, window_s: int, now_s: float) -> bool:
    """True once ``window_s`` seconds of target time have passed since execution."""
    return now_s >= executed_at_s + window_s


# ---- shadow runs -----------------------------------------------------------------------------------------------


def summarise_prediction(prediction: dict[str, Any]) -> tuple[str, bool | None]:
    """A one-line summary and ``slo_met_after`` of a fleet ``/shadow`` prediction."""
    s = prediction.get("summary") or {}
    verdict = s.get("verdict", "unknown")
    after = s.get("slo_met_with_action")
    viol = s.get("violations_with_action")
    text = (f"verdict {verdict}: SLO violations now {s.get('violations_before', '?')}, in "
            f"{prediction.get('horizon_s', '?')}s without the action {s.get('violations_without_action', '?')}, "
            f"with it {viol if viol is not None else '?'}")
    return text, after if isinstance(after, bool) else None

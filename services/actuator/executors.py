"""Executors: how a catalogue action is shadow-run, re-checked, executed and observed on one kind of target.

Each executor declares which catalogue actions it runs (``supports``) and implements four steps:

* ``shadow`` — what the action would do, before approval (the fleet simulates a fork forward; an HTTP target
  answers a dry-run call if it offers one; a Kubernetes executor would use a server-side dry-run);
* ``precheck`` — re-check the catalogue preconditions against the *live* target just before executing (state may
  have changed since approval); for the fleet and HTTP targets this is the dry-run call;
* ``execute`` — apply it with an idempotency key (the action id): a retry after a crash is deduplicated by the target;
* ``observe`` — the target's state for verification, with the target's own clock.

Executors raise RetryableError when the target cannot be reached (nothing is known), and return answers otherwise.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from pilothouse.actuator.adapters.http import HttpAnswer, JsonHttpClient
from pilothouse.actuator.config import HttpTarget
from pilothouse.actuator.domain import summarise_prediction
from pilothouse.bus.actions import ActionType
from pilothouse.bus.errors import PermanentError


class TargetRefusedCall(PermanentError):
    """The target refused the request itself (bad key reuse, unknown action, invalid params): not retryable."""


@dataclass(frozen=True)
class ShadowResult:
    outcome: str  # predicted | dry_run_ok | dry_run_failed | unsupported | error
    summary: str
    prediction: dict[str, Any] = field(default_factory=dict)
    slo_met_after: bool | None = None
    dry_run_response: str = ""


@dataclass(frozen=True)
class Precheck:
    ok: bool
    check: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Execution:
    """The target's answer to an execution (a stored answer when ``replayed``)."""

    applied: bool
    ok: bool
    replayed: bool
    response: dict[str, Any]
    reason: str = ""
    target_time_s: float = 0.0

    @property
    def before(self) -> dict[str, Any]:
        b = self.response.get("before")
        return b if isinstance(b, dict) else {}


@dataclass(frozen=True)
class Observation:
    time_s: float
    services: dict[str, dict[str, Any]]


class Executor(ABC):
    """The interface every executor implements (fleet, generic HTTP; Kubernetes would fit the same four steps)."""

    name: str

    @abstractmethod
    def supports(self, action_type: str) -> bool:
        """True if this executor can run the catalogue action ``action_type``."""

    @abstractmethod
    def shadow(self, action: ActionType, params: dict[str, Any], horizon_s: int) -> ShadowResult:
        """Predict the effect without changing the target."""

    @abstractmethod
    def precheck(self, action: ActionType, params: dict[str, Any], key: str) -> Precheck:
        """Re-check the preconditions against the live target (changes nothing)."""

    @abstractmethod
    def execute(self, action: ActionType, params: dict[str, Any], key: str) -> Execution:
        """Apply the action once per ``key`` (the target deduplicates repeated keys)."""

    @abstractmethod
    def observe(self) -> Observation | None:
        """The target's current state per service, or None if this target cannot be observed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


def _time_of(body: dict[str, Any]) -> float:
    tick = body.get("tick")
    return float(tick) if isinstance(tick, (int, float)) and not isinstance(tick, bool) else time.time()


def _interpret(answer: HttpAnswer, what: str) -> Execution:
    body = answer.body
    if answer.status == 200:
        return Execution(applied=bool(body.get("applied", True)), ok=True, replayed=answer.replayed, response=body,
                         target_time_s=_time_of(body))
    if answer.status in (404, 409):
        # A failed precondition or missing object: the target's stored, final answer for this key.
        reason = f"{body.get('error', answer.status)}: {body.get('reason', '')}".strip()
        if body.get("check"):
            reason += f" (check {body['check']})"
        return Execution(applied=False, ok=False, replayed=answer.replayed, response=body, reason=reason,
                         target_time_s=_time_of(body))
    raise TargetRefusedCall(f"{what}: HTTP {answer.status}: {body.get('reason') or answer.text[:300]}")


class FleetExecutor(Executor):
    """The sandbox fleet (``pilothouse.fleet``): ``/shadow`` simulation, dry-run precheck, ``/actions`` with keys."""

    name = "fleet"

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 30.0,
                 actions: tuple[str, ...] | None = None):
        self.client = JsonHttpClient(base_url, token=token, timeout_s=timeout_s)
        # The fleet runs every catalogue action (toggle_feature_flag is its alias of set_feature_flag).
        self._actions = set(actions) if actions is not None else None

    def supports(self, action_type: str) -> bool:
        return self._actions is None or action_type in self._actions

    def shadow(self, action: ActionType, params: dict[str, Any], horizon_s: int) -> ShadowResult:
        if action.shadow == "none" or action.read_only:
            return ShadowResult("unsupported", f"{action.name} is read-only: nothing to simulate")
        a = self.client.request("POST", "/shadow", json={"action": action.name, "params": params,
                                                         "horizon_s": horizon_s})
        if a.status == 200:
            summary, after = summarise_prediction(a.body)
            return ShadowResult("predicted", summary, a.body, after)
        reason = f"{a.body.get('error', a.status)}: {a.body.get('reason', a.text[:300])}"
        if a.body.get("check"):
            reason += f" (check {a.body['check']})"
        if a.status in (404, 409):
            return ShadowResult("dry_run_failed", f"precondition failed: {reason}", a.body, None, a.text[:4000])
        return ShadowResult("error", f"shadow refused: {reason}", a.body, None, a.text[:4000])

    def precheck(self, action: ActionType, params: dict[str, Any], key: str) -> Precheck:
        a = self.client.request("POST", f"/actions/{action.name}", json=params, params={"dry_run": "true"},
                                headers={"Idempotency-Key": key})
        if a.status == 200:
            return Precheck(True)
        if a.status in (404, 409):
            return Precheck(False, str(a.body.get("check", a.body.get("error", ""))), str(a.body.get("reason", "")))
        raise TargetRefusedCall(f"dry run of {action.name}: HTTP {a.status}: {a.body.get('reason') or a.text[:300]}")

    def execute(self, action: ActionType, params: dict[str, Any], key: str) -> Execution:
        a = self.client.request("POST", f"/actions/{action.name}", json=params, params={"dry_run": "false"},
                                headers={"Idempotency-Key": key})
        return _interpret(a, f"{action.name} on the fleet")

    def observe(self) -> Observation:
        a = self.client.request("GET", "/state")
        if a.status != 200:
            raise TargetRefusedCall(f"GET /state: HTTP {a.status}")
        return Observation(_time_of(a.body), a.body.get("services") or {})

    def executions_of(self, key: str) -> int:
        """How many times the fleet applied the action behind ``key`` (its journal; 0 if unknown)."""
        a = self.client.request("GET", "/actions/log", params={"key": key})
        return sum(int(e.get("executions", 0)) for e in a.body.get("entries", []) if e.get("key") == key)

    def close(self) -> None:
        self.client.close()


class HttpExecutor(Executor):
    """A configured HTTP endpoint (a feature-flag or deploy service): POST params as JSON with an idempotency header;
    the same call with the target's dry-run parameter is the shadow run and the precheck, when the target has one."""

    def __init__(self, target: HttpTarget):
        self.target = target
        self.name = f"http:{target.name}"
        base, _, _ = target.url.partition("/{action}")
        self._path_template = target.url[len(base):] or ""
        self.client = JsonHttpClient(base, token=target.token.get_secret_value() if target.token else None,
                                     timeout_s=target.timeout_s)
        self._state = JsonHttpClient(target.state_url, timeout_s=target.timeout_s) if target.state_url else None

    def supports(self, action_type: str) -> bool:
        return action_type in self.target.actions

    def _call(self, action: ActionType, params: dict[str, Any], key: str, dry_run: bool) -> HttpAnswer:
        path = self._path_template.replace("{action}", action.name)
        q = {self.target.dry_run_param: "true" if dry_run else "false"} if self.target.dry_run_param else None
        return self.client.request("POST", path, json=params, params=q, headers={self.target.idempotency_header: key})

    def shadow(self, action: ActionType, params: dict[str, Any], horizon_s: int) -> ShadowResult:
        if not self.target.dry_run_param:
            return ShadowResult("unsupported", f"{self.name} offers no dry run: no shadow result")
        # The shadow's key never equals an action id, so the real call later is not answered from a dry run.
        a = self._call(action, params, f"shadow-{uuid.uuid4().hex}", dry_run=True)
        text = a.text[:4000]
        if a.status == 200:
            return ShadowResult("dry_run_ok", f"dry run accepted by {self.name}", a.body, None, text)
        return ShadowResult("dry_run_failed", f"dry run refused by {self.name}: HTTP {a.status} "
                                              f"{a.body.get('reason', '')}".strip(), a.body, None, text)

    def precheck(self, action: ActionType, params: dict[str, Any], key: str) -> Precheck:
        if not self.target.dry_run_param:
            return Precheck(True, "", "target offers no dry run; preconditions checked by the target on execution")
        a = self._call(action, params, key, dry_run=True)
        if a.status == 200:
            return Precheck(True)
        if a.status in (404, 409, 412):
            return Precheck(False, str(a.body.get("check", a.status)), str(a.body.get("reason", a.text[:300])))
        raise TargetRefusedCall(f"dry run on {self.name}: HTTP {a.status}: {a.text[:300]}")

    def execute(self, action: ActionType, params: dict[str, Any], key: str) -> Execution:
        return _interpret(self._call(action, params, key, dry_run=False), f"{action.name} on {self.name}")

    def observe(self) -> Observation | None:
        if self._state is None:
            return None
        a = self._state.request("GET", "")
        return Observation(_time_of(a.body), a.body.get("services") or {})

    def close(self) -> None:
        self.client.close()
        if self._state is not None:
            self._state.close()


class ExecutorRegistry:
    """Picks the executor of an action: configured HTTP targets first, then the fleet."""

    def __init__(self, executors: list[Executor]):
        self.executors = list(executors)

    def for_action(self, action_type: str) -> Executor | None:
        for e in self.executors:
            if e.supports(action_type):
                return e
        return None

    def by_name(self, name: str) -> Executor | None:
        return next((e for e in self.executors if e.name == name), None)

    def close(self) -> None:
        for e in self.executors:
            e.close()

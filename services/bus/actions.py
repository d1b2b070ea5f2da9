"""The typed action catalogue (``schemas/actions.yaml``): the only mitigations that can be proposed or executed.

Reasoning validates the model's picks against it, policy reads its facts, the console shows it, the actuator maps it
to executors. ``action_hash`` binds approvals and authorizations to one exact action.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import orjson
import yaml
from pydantic import BaseModel, ConfigDict

from pilothouse.bus.errors import ConfigurationError, PermanentError
from pilothouse.bus.schemas import SCHEMAS_DIR

ACTIONS_PATH = SCHEMAS_DIR / "actions.yaml"


class ActionRejected(PermanentError):
    """A proposed action is not in the catalogue, targets the wrong kind, or its params do not validate."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VerifyCheck(_Frozen):
    name: str
    metric: str
    op: Literal["<=", ">=", "<", ">"]
    threshold_from: str


class VerifySpec(_Frozen):
    window_s: int
    checks: tuple[VerifyCheck, ...]


class ActionType(_Frozen):
    """One catalogue entry."""

    name: str
    summary: str
    target_kinds: tuple[str, ...]
    read_only: bool
    reversible: bool
    blast_radius: Literal["low", "medium", "high"]
    shadow: Literal["simulate", "dry_run", "none"]
    params: dict[str, Any]
    preconditions: tuple[dict[str, str], ...]
    verify: VerifySpec
    rollback: dict[str, Any] | None

    def validate_params(self, params: Any) -> dict[str, Any]:
        """Return ``params`` if valid (JSON Schema), else raise ActionRejected naming the first problem."""
        if not isinstance(params, dict):
            raise ActionRejected(f"{self.name}: params must be an object, not {type(params).__name__}")
        errors = sorted(jsonschema.Draft202012Validator(self.params).iter_errors(params), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = ".".join(str(p) for p in e.path) or "params"
            raise ActionRejected(f"{self.name}: {where}: {e.message}")
        return params


class ActionCatalogue(_Frozen):
    """Every action type, by name."""

    version: int
    actions: dict[str, ActionType]

    def get(self, name: str) -> ActionType:
        """The action type ``name``; ActionRejected if it is not in the catalogue."""
        try:
            return self.actions[name]
        except KeyError:
            raise ActionRejected(f"{name!r} is not a catalogue action (known: {', '.join(sorted(self.actions))})") from None

    def check(self, name: str, target_kind: str, params: Any) -> ActionType:
        """Validate a whole proposal: known action, supported target kind, valid params."""
        action = self.get(name)
        if target_kind not in action.target_kinds:
            raise ActionRejected(f"{name}: target kind {target_kind!r} not in {list(action.target_kinds)}")
        action.validate_params(params)
        return action

    @property
    def revision(self) -> str:
        """A stable id of this catalogue (version + content hash)."""
        digest = hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()[:12]
        return f"v{self.version}-{digest}"


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, finite numbers only (the hashing form)."""
    _refuse_non_finite(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _refuse_non_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ActionRejected("NaN/Infinity cannot be hashed canonically")
    if isinstance(value, dict):
        for v in value.values():
            _refuse_non_finite(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _refuse_non_finite(v)


def action_hash(action_type: str, target_kind: str, target: str, params: dict[str, Any]) -> str:
    """SHA-256 (hex) over the canonical (action_type, target_kind, target, params): what approvals bind to."""
    doc = {"action_type": action_type, "target_kind": target_kind, "target": target, "params": params}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


@lru_cache(maxsize=4)
def load_actions(path: Path = ACTIONS_PATH) -> ActionCatalogue:
    """Load and validate the catalogue (params schemas must themselves be valid JSON Schema)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        actions = {n: ActionType(name=n, **spec) for n, spec in data["actions"].items()}
        for a in actions.values():
            jsonschema.Draft202012Validator.check_schema(a.params)
            if a.params.get("additionalProperties") is not False:
                raise ValueError(f"{a.name}: params schema must be closed (additionalProperties: false)")
            if a.rollback and a.rollback["action"] not in actions:
                raise ValueError(f"{a.name}: rollback action {a.rollback['action']!r} is not in the catalogue")
        return ActionCatalogue(version=data["version"], actions=actions)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, jsonschema.SchemaError) as e:
        raise ConfigurationError(f"invalid action catalogue {path}: {e}") from e

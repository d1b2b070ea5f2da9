"""Settings of the policy service (environment ``PILOTHOUSE_POLICY_*``; Kafka from BusSettings, ``PILOTHOUSE_KAFKA_*``).

Read once, in ``__main__``. The signing key and the database URI are SecretStr: never in a repr or a log line.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pilothouse.bus.watched import WatchedFile
from pilothouse.policy.domain import FreezeWindow, PolicyInputInvalid, parse_freeze_windows

TOPIC_INCIDENTS = "pilothouse.sensing.incidents.v1"
TOPIC_HYPOTHESES = "pilothouse.reasoning.hypotheses.v1"
TOPIC_PROPOSALS = "pilothouse.reasoning.proposals.v1"
TOPIC_VALIDATIONS = "pilothouse.console.hypothesis-validations.v1"
TOPIC_SHADOW = "pilothouse.actuator.shadow-results.v1"
TOPIC_APPROVALS = "pilothouse.console.approvals.v1"
TOPIC_EXECUTIONS = "pilothouse.actuator.executions.v1"
TOPIC_VERIFICATIONS = "pilothouse.actuator.verifications.v1"
TOPIC_KILL_SWITCH = "pilothouse.console.kill-switch.v1"
TOPIC_DECISIONS = "pilothouse.policy.decisions.v1"
TOPIC_PENDING = "pilothouse.policy.pending-actions.v1"
TOPIC_AUTHORIZED = "pilothouse.policy.authorized-actions.v1"

_PREFIX = r"^(pilothouse\.policy(\.[A-Za-z0-9_-]+)*|test\.[A-Za-z0-9._-]+)$"


class Settings(BaseSettings):
    """How the policy service reaches OPA and Postgres, how it signs, and the bounds it applies."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_POLICY_", frozen=True, extra="ignore")

    opa_url: str = Field(default="http://127.0.0.1:18181", description="OPA server serving policies/ (--watch)")
    opa_timeout_s: float = Field(default=2.0, gt=0)
    postgres_dsn: SecretStr = Field(description="libpq URI of the database holding proposals, approvals, budgets")
    postgres_schema: str = Field(default="policy", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    signing_key: SecretStr = Field(description="base64 of the 32 raw bytes of the Ed25519 private key that signs "
                                               "ActionAuthorized (its public key goes to the actuator's trusted_keys)")
    human_keys: Path | None = Field(
        default=None, description="JSON/YAML registry of enrolled human public keys (stable id -> roles, keys); "
                                  "approvals, validations and kill-switch releases count only when signed by one. "
                                  "Unset: none counts (fail closed). Re-read when its modification time changes")

    environment: str = Field(default="production", pattern=r"^(production|staging|development)$",
                             description="the environment whose actions this instance decides")
    freeze_windows_file: Path | None = Field(
        default=None, description="YAML/JSON list of change-freeze windows {name,start,end,environments,services}; "
                                  "re-read when its modification time changes")
    budget_window_h: int = Field(default=24, ge=1, le=24 * 31, description="risk budget windows, aligned to the epoch")
    authorization_ttl_s: int = Field(default=300, ge=5, le=3600, description="an ActionAuthorized expires after this")
    approval_request_ttl_s: int = Field(default=1800, ge=30, le=86400,
                                        description="how long a pending action waits for approvers")

    group_prefix: str = Field(default="pilothouse.policy", pattern=_PREFIX,
                              description="consumer group <prefix>.decide; the broker's ACLs allow pilothouse.policy.*")
    instance_id: str = Field(default="policy-0", pattern=r"^[A-Za-z0-9._-]{1,100}$",
                             description="part of the transactional id <prefix>.decide.<instance_id>")
    max_retries: int = Field(default=60, ge=1, description="attempts of one batch while OPA/Postgres are down")
    batch_size: int = Field(default=50, ge=1, le=1000)

    topic_incidents: str = TOPIC_INCIDENTS
    topic_hypotheses: str = TOPIC_HYPOTHESES
    topic_proposals: str = TOPIC_PROPOSALS
    topic_validations: str = TOPIC_VALIDATIONS
    topic_shadow: str = TOPIC_SHADOW
    topic_approvals: str = TOPIC_APPROVALS
    topic_executions: str = TOPIC_EXECUTIONS
    topic_verifications: str = TOPIC_VERIFICATIONS
    topic_kill_switch: str = TOPIC_KILL_SWITCH
    topic_decisions: str = TOPIC_DECISIONS
    topic_pending: str = TOPIC_PENDING
    topic_authorized: str = TOPIC_AUTHORIZED

    observability_port: int = 19135
    log_level: str = "INFO"

    @field_validator("signing_key")
    @classmethod
    def _key_not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("PILOTHOUSE_POLICY_SIGNING_KEY is empty")
        return v

    @property
    def authorization_ttl(self) -> timedelta:
        return timedelta(seconds=self.authorization_ttl_s)

    @property
    def approval_request_ttl(self) -> timedelta:
        return timedelta(seconds=self.approval_request_ttl_s)

    @property
    def budget_window(self) -> timedelta:
        return timedelta(hours=self.budget_window_h)

    @property
    def group_id(self) -> str:
        return f"{self.group_prefix}.decide"

    @property
    def transactional_id(self) -> str:
        return f"{self.group_prefix}.decide.{self.instance_id}"


class FreezeCalendar:
    """Change-freeze windows from a settings file, re-read whenever its modification time changes.

    The first load raises on an unreadable or invalid file (the service must not start without its calendar); a
    later bad edit keeps the last good windows, logs an error and sets :attr:`last_error`.
    """

    def __init__(self, path: Path | None):
        self._file = WatchedFile(path, parse_freeze_windows, empty=[], what="freeze windows",
                                 error=PolicyInputInvalid, logger="pilothouse.policy")

    @property
    def last_error(self) -> str | None:
        return self._file.last_error

    def windows(self) -> list[FreezeWindow]:
        return list(self._file.current())

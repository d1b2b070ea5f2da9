"""Settings of the actuator (environment ``PILOTHOUSE_ACTUATOR_*``; Kafka: BusSettings, ``PILOTHOUSE_KAFKA_*``).

Read once, in ``__main__``. Credentials are SecretStr so they never appear in a repr or a log line.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_PENDING = "pilothouse.policy.pending-actions.v1"
TOPIC_AUTHORIZED = "pilothouse.policy.authorized-actions.v1"
TOPIC_KILL_SWITCH = "pilothouse.console.kill-switch.v1"
TOPIC_SHADOW = "pilothouse.actuator.shadow-results.v1"
TOPIC_EXECUTIONS = "pilothouse.actuator.executions.v1"
TOPIC_VERIFICATIONS = "pilothouse.actuator.verifications.v1"


class HttpTarget(BaseModel):
    """A generic HTTP target (a feature-flag or deploy service) that runs some catalogue actions.

    The actuator POSTs the action's params as JSON to ``url`` (``{action}`` is replaced by the action name) with
    the idempotency header. If ``dry_run_param`` is set, the same call with ``?<dry_run_param>=true`` is the
    shadow run and the precondition re-check; otherwise shadow runs report ``unsupported``. ``state_url``, when
    set, answers like the fleet's ``GET /state`` and feeds verification.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    url: str
    actions: tuple[str, ...]
    dry_run_param: str | None = None
    idempotency_header: str = "Idempotency-Key"
    state_url: str | None = None
    token: SecretStr | None = None
    timeout_s: float = 10.0


class Settings(BaseSettings):
    """How the actuator reaches Postgres, the fleet and any HTTP targets, and the bounds it enforces."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_ACTUATOR_", frozen=True, extra="ignore")

    postgres_dsn: SecretStr = Field(description="libpq URI of the database that holds the idempotency records")
    postgres_schema: str = Field(default="actuator", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    trusted_keys: dict[str, str] = Field(
        default_factory=dict, description="key_id -> base64 raw Ed25519 public key of the policy service")
    human_keys: Path | None = Field(
        default=None, description="JSON/YAML registry of enrolled human public keys (bus.attestation): a kill-switch "
                                  "release counts only when an enrolled admin signed it. Unset: releases are refused")
    fleet_url: str | None = "http://127.0.0.1:19100"
    fleet_token: SecretStr | None = None
    fleet_timeout_s: float = 30.0
    http_targets: tuple[HttpTarget, ...] = ()

    max_clock_skew_s: float = Field(default=5.0, gt=0, description="refuse to execute beyond this skew vs Postgres")
    shadow_horizon_s: int = Field(default=120, ge=1, le=1800)
    recovery_poll_s: float = Field(default=1.0, gt=0, description="follow-up pass: recovery, then verification")
    relay_poll_s: float = Field(default=0.2, gt=0)

    group_prefix: str = Field(default="pilothouse.actuator",
                              pattern=r"^(pilothouse\.actuator(\.[A-Za-z0-9_-]+)*|test\.[A-Za-z0-9._-]+)$",
                              description="consumer groups are <prefix>.<purpose>; the broker's ACLs allow the "
                                          "actuator pilothouse.actuator.* only (test.* is for tests as admin)")
    instance_id: str = Field(default="actuator-0", pattern=r"^[A-Za-z0-9._-]{1,100}$",
                             description="static group membership: a restarted process takes its partitions back "
                                         "at once instead of waiting for the session timeout")
    topic_pending: str = TOPIC_PENDING
    topic_authorized: str = TOPIC_AUTHORIZED
    topic_kill_switch: str = TOPIC_KILL_SWITCH
    topic_shadow: str = TOPIC_SHADOW
    topic_executions: str = TOPIC_EXECUTIONS
    topic_verifications: str = TOPIC_VERIFICATIONS

    observability_port: int = 19140
    log_level: str = "INFO"

    @field_validator("trusted_keys")
    @classmethod
    def _keys_look_like_ids(cls, v: dict[str, str]) -> dict[str, str]:
        for kid in v:
            if not kid.startswith("ed25519:"):
                raise ValueError(f"trusted key id {kid!r} must look like 'ed25519:<hex>' (bus.authorization.key_id)")
        return v

"""Settings of the approval console, read once in ``__main__`` (environment ``PILOTHOUSE_CONSOLE_*`` or a .env file).

Kafka credentials are not here: they come from :class:`pilothouse.bus.config.BusSettings` (``PILOTHOUSE_KAFKA_*``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Read-model role -> the catalogue topic the console consumes for it. Overridable (tests use ``test.<uuid>`` topics).
DEFAULT_TOPICS: dict[str, str] = {
    "alerts": "pilothouse.sensing.alerts.v2",
    "incidents": "pilothouse.sensing.incidents.v1",
    "hypotheses": "pilothouse.reasoning.hypotheses.v1",
    "proposals": "pilothouse.reasoning.proposals.v1",
    "decisions": "pilothouse.policy.decisions.v1",
    "pending": "pilothouse.policy.pending-actions.v1",
    "shadow": "pilothouse.actuator.shadow-results.v1",
    "authorized": "pilothouse.policy.authorized-actions.v1",
    "executions": "pilothouse.actuator.executions.v1",
    "verifications": "pilothouse.actuator.verifications.v1",
    "ledger_entries": "pilothouse.ledger.entries.v1",
    "ledger_checkpoints": "pilothouse.ledger.checkpoints.v1",
}

# Topics the console writes; the broker lets the console principal write nowhere else.
DEFAULT_OUTPUT_TOPICS: dict[str, str] = {
    "validations": "pilothouse.console.hypothesis-validations.v1",
    "approvals": "pilothouse.console.approvals.v1",
    "kill_switch": "pilothouse.console.kill-switch.v1",
}


class ConsoleSettings(BaseSettings):
    """Environment variables ``PILOTHOUSE_CONSOLE_<FIELD>`` (e.g. ``PILOTHOUSE_CONSOLE_USERS_FILE``)."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_CONSOLE_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8420, ge=0, le=65535)
    observability_port: int = Field(default=9420, ge=0, le=65535)
    users_file: Path = Field(description="YAML or TOML file of local accounts (id, display, roles, argon2id hash)")
    human_keys: Path | None = Field(
        default=None, description="the registry of enrolled human public keys policy reads (read-only here): when "
                                  "set, a badly signed decision is refused at once with the reason instead of being "
                                  "ignored later by policy")
    session_secret: SecretStr = Field(min_length=32, description="HMAC key that signs session cookies")
    session_ttl_s: int = Field(default=8 * 3600, ge=60, le=7 * 24 * 3600, description="server-side session expiry")
    approval_ttl_s: int = Field(default=900, ge=30, le=24 * 3600, description="an approval expires after this, "
                                "or with the pending action, whichever is first")
    secure_cookies: bool = Field(default=True, description="set the Secure flag (turn off only for plain-HTTP tests)")
    consumer_group: str = "pilothouse.console.read-model"
    auto_offset_reset: str = "earliest"
    topics: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_TOPICS))
    output_topics: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_OUTPUT_TOPICS))
    max_comment_chars: int = Field(default=2000, ge=1, le=20000)
    log_level: str = "INFO"

    @field_validator("topics")
    @classmethod
    def _known_topic_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - set(DEFAULT_TOPICS)
        if unknown:
            raise ValueError(f"unknown topic roles {sorted(unknown)}; known: {sorted(DEFAULT_TOPICS)}")
        return {**DEFAULT_TOPICS, **value}

    @field_validator("output_topics")
    @classmethod
    def _known_output_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - set(DEFAULT_OUTPUT_TOPICS)
        if unknown:
            raise ValueError(f"unknown output topic roles {sorted(unknown)}; known: {sorted(DEFAULT_OUTPUT_TOPICS)}")
        return {**DEFAULT_OUTPUT_TOPICS, **value}

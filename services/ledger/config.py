"""Settings of the ledger (environment ``PILOTHOUSE_LEDGER_*``; Kafka comes from BusSettings, ``PILOTHOUSE_KAFKA_*``).

Read once, in ``__main__`` (or by the ``pilothouse ledger`` CLI). Credentials and the signing key are SecretStr, so
they never appear in a repr or a log line. Topic names are settings so that tests can run the whole service against
uuid-named topics; in production they stay at the catalogue's names.
"""

from __future__ import annotations

import base64
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_ENTRIES = "pilothouse.ledger.entries.v1"
TOPIC_CHECKPOINTS = "pilothouse.ledger.checkpoints.v1"
# Every decision topic the ledger records (catalogue: the ledger principal consumes them all).
DECISION_TOPICS: tuple[str, ...] = (
    "pilothouse.sensing.incidents.v1",
    "pilothouse.reasoning.hypotheses.v1",
    "pilothouse.reasoning.proposals.v1",
    "pilothouse.console.hypothesis-validations.v1",
    "pilothouse.policy.decisions.v1",
    "pilothouse.policy.pending-actions.v1",
    "pilothouse.actuator.shadow-results.v1",
    "pilothouse.console.approvals.v1",
    "pilothouse.policy.authorized-actions.v1",
    "pilothouse.actuator.executions.v1",
    "pilothouse.actuator.verifications.v1",
    "pilothouse.console.kill-switch.v1",
)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Settings(BaseSettings):
    """How the ledger reaches Postgres, where it keeps checkpoints, how it signs them, and what it records."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_LEDGER_", frozen=True, extra="ignore")

    postgres_dsn: SecretStr | None = Field(
        default=None, description="libpq URI of the mirror database (the mirror worker and `ledger verify` need it)")
    postgres_schema: str = Field(default="pilothouse_ledger", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    postgres_admin_dsn: SecretStr | None = Field(
        default=None, description="owner/superuser DSN used only to migrate the schema at start-up (default: "
                                  "postgres_dsn); lets the workers run as a writer role that cannot touch triggers")
    postgres_writer_role: str | None = Field(
        default=None, description="grant the append-only privileges to this role at migration (if not the owner), "
                                  "e.g. the stack's pilothouse_ledger_writer")

    chain: str = Field(default="main", pattern=_NAME)
    signing_key: SecretStr | None = Field(
        default=None, description="base64 of the 32-byte Ed25519 private key seed that signs checkpoints")
    signing_key_name: str = Field(default="pilothouse-ledger", pattern=_NAME)
    trusted_keys: dict[str, str] = Field(
        default_factory=dict,
        description="key name -> base64 raw Ed25519 public key, trusted by `ledger verify`/`prove` "
                    "(the signer's own key is trusted too when a signing key is configured)")
    checkpoint_dir: Path = Field(default=Path(".stack/ledger"),
                                 description="directory of checkpoints.jsonl, outside Postgres")
    checkpoint_every_entries: int = Field(default=1000, ge=1)
    checkpoint_interval_s: float = Field(default=60.0, gt=0)

    topic_entries: str = TOPIC_ENTRIES
    topic_checkpoints: str = TOPIC_CHECKPOINTS
    decision_topics: tuple[str, ...] = DECISION_TOPICS
    group_prefix: str = Field(default="pilothouse.ledger", pattern=r"^pilothouse\.ledger(\.|$)|^test\.")
    transactional_id: str = Field(default="pilothouse.ledger.appender",
                                  pattern=r"^pilothouse\.ledger\.|^test\.")
    batch_size: int = Field(default=200, ge=1, le=10_000)
    mirror_batch_size: int = Field(default=500, ge=1, le=50_000)
    recover_window: int = Field(
        default=100_000, ge=1,
        description="entries read back from the ledger topic's tail at start-up: the chain head, and the recorded "
                    "event ids a redelivered event is checked against")
    startup_timeout_s: float = Field(default=60.0, gt=0)

    observability_port: int = 19150
    log_level: str = "INFO"

    @field_validator("signing_key")
    @classmethod
    def _seed_is_32_bytes(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            try:
                raw = base64.b64decode(v.get_secret_value(), validate=True)
            except ValueError:
                raise ValueError("signing_key must be base64") from None
            if len(raw) != 32:
                raise ValueError(f"signing_key must be a 32-byte Ed25519 seed, got {len(raw)} bytes")
        return v

    @field_validator("trusted_keys")
    @classmethod
    def _public_keys_are_32_bytes(cls, v: dict[str, str]) -> dict[str, str]:
        for name, b64 in v.items():
            try:
                raw = base64.b64decode(b64, validate=True)
            except ValueError:
                raise ValueError(f"trusted key {name!r} must be base64") from None
            if len(raw) != 32:
                raise ValueError(f"trusted key {name!r} must be a raw 32-byte Ed25519 public key")
        return v

    def group(self, purpose: str) -> str:
        return f"{self.group_prefix}.{purpose}"

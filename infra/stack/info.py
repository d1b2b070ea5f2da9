"""`<data>/stack.json`: how to reach the running stack, with the generated credentials (file mode 0600).

Services' settings and the integration tests read it through `StackInfo.load()`; `pilothouse stack env` prints it as
`export PILOTHOUSE_...=...` lines.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from pilothouse.stack.config import Settings
from pilothouse.stack.errors import NotProvisioned, StackError

FORMAT_VERSION = 1


def new_password() -> str:
    """A generated password: 32 url-safe characters (safe inside JAAS quotes, DSNs and shell words)."""
    return secrets.token_urlsafe(24)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaInfo(_Model):
    bootstrap_servers: str
    security_protocol: str = "SASL_PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-256"
    cluster_id: str
    users: dict[str, SecretStr]  # "admin" (super user) and one per catalogue principal


class PostgresInfo(_Model):
    host: str
    port: int
    database: str
    user: str  # the cluster's bootstrap role (initdb -U): a superuser, owner of the database
    password: SecretStr
    # Non-superuser login roles the stack creates (e.g. the ledger mirror's writer) -> their passwords.
    roles: dict[str, SecretStr] = {}


class OpaInfo(_Model):
    url: str


class LlmInfo(_Model):
    base_url: str
    model: str
    external: bool = False


class StackInfo(_Model):
    """Connection details of a provisioned stack.

    Secrets are SecretStr (hidden in reprs and logs); the accessors reveal them where a client needs them.
    """

    version: int = FORMAT_VERSION
    data_dir: Path
    kafka: KafkaInfo
    postgres: PostgresInfo
    opa: OpaInfo
    llm: LlmInfo

    # ---- loading and saving -------------------------------------------------------------------------------------
    @classmethod
    def path_for(cls, data_dir: Path | str | None = None) -> Path:
        """Where stack.json lives for `data_dir` (default: Settings().data_dir, i.e. PILOTHOUSE_DATA_DIR or .stack)."""
        base = Path(data_dir) if data_dir is not None else Settings().data_dir
        return base / "stack.json"

    @classmethod
    def load(cls, data_dir: Path | str | None = None) -> "StackInfo":
        """Read stack.json; NotProvisioned if absent, StackError if unreadable or malformed."""
        path = cls.path_for(data_dir)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotProvisioned(f"{path} does not exist: run `pilothouse stack up` first") from None
        except OSError as e:
            raise StackError(f"cannot read {path}: {e}") from e
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            raise StackError(f"{path} is malformed ({e.error_count()} errors, first: {e.errors()[0]['msg']})") from e

    def save(self) -> Path:
        """Write stack.json atomically with mode 0600 (it holds every password of the stack)."""
        path = self.path_for(self.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_plain(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        os.chmod(path, 0o600)
        return path

    def to_plain(self) -> dict:
        """JSON-ready dict with secrets revealed (for the 0600 file only)."""
        data = self.model_dump(mode="json")
        data["kafka"]["users"] = {u: p.get_secret_value() for u, p in self.kafka.users.items()}
        data["postgres"]["password"] = self.postgres.password.get_secret_value()
        data["postgres"]["roles"] = {r: p.get_secret_value() for r, p in self.postgres.roles.items()}
        return data

    # ---- accessors ----------------------------------------------------------------------------------------------
    @property
    def principals(self) -> list[str]:
        """Kafka users known to the stack (admin first)."""
        return sorted(self.kafka.users, key=lambda u: (u != "admin", u))

    def password(self, principal: str) -> str:
        """The SCRAM password of `principal`; StackError naming the known principals if unknown."""
        try:
            return self.kafka.users[principal].get_secret_value()
        except KeyError:
            raise StackError(
                f"unknown Kafka principal {principal!r}; known: {', '.join(self.principals)}"
            ) from None

    def kafka_base_config(self) -> dict[str, str]:
        """librdkafka settings without credentials (a client using only these is refused by the broker)."""
        return {
            "bootstrap.servers": self.kafka.bootstrap_servers,
            "security.protocol": self.kafka.security_protocol,
            "sasl.mechanism": self.kafka.sasl_mechanism,
        }

    def kafka_config(self, principal: str) -> dict[str, str]:
        """librdkafka (confluent-kafka) settings for `principal`, credentials included."""
        return {**self.kafka_base_config(), "sasl.username": principal, "sasl.password": self.password(principal)}

    def aiokafka_config(self, principal: str) -> dict[str, str]:
        """aiokafka keyword arguments for `principal` (faust: build SASLCredentials from the same values)."""
        return {
            "bootstrap_servers": self.kafka.bootstrap_servers,
            "security_protocol": self.kafka.security_protocol,
            "sasl_mechanism": self.kafka.sasl_mechanism,
            "sasl_plain_username": principal,
            "sasl_plain_password": self.password(principal),
        }

    @property
    def postgres_dsn(self) -> str:
        """libpq URI for the stack's database (its owner role)."""
        pg = self.postgres
        return (
            f"postgresql://{quote(pg.user, safe='')}:{quote(pg.password.get_secret_value(), safe='')}"
            f"@{pg.host}:{pg.port}/{quote(pg.database, safe='')}"
        )

    @property
    def postgres_admin_dsn(self) -> str:
        """libpq URI as the cluster's superuser (migrations, tamper tests); the same role as `postgres_dsn`."""
        return self.postgres_dsn

    def postgres_dsn_for(self, role: str) -> str:
        """libpq URI for one of the stack's non-superuser roles; StackError naming the known roles if unknown."""
        pg = self.postgres
        try:
            password = pg.roles[role].get_secret_value()
        except KeyError:
            raise StackError(
                f"unknown Postgres role {role!r}; known: {', '.join(sorted(pg.roles)) or 'none'} "
                "(run `pilothouse stack up` to create the stack's roles)"
            ) from None
        return (
            f"postgresql://{quote(role, safe='')}:{quote(password, safe='')}"
            f"@{pg.host}:{pg.port}/{quote(pg.database, safe='')}"
        )

    @property
    def opa_url(self) -> str:
        return self.opa.url

    @property
    def llm_base_url(self) -> str:
        return self.llm.base_url

    @property
    def llm_model(self) -> str:
        return self.llm.model

    def env(self, principal: str | None = None) -> dict[str, str]:
        """Environment variables for a service; Kafka credentials only when `principal` is given."""
        env = {
            "PILOTHOUSE_DATA_DIR": str(self.data_dir),
            "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "PILOTHOUSE_KAFKA_SECURITY_PROTOCOL": self.kafka.security_protocol,
            "PILOTHOUSE_KAFKA_SASL_MECHANISM": self.kafka.sasl_mechanism,
        }
        if principal is not None:
            env["PILOTHOUSE_KAFKA_USERNAME"] = principal
            env["PILOTHOUSE_KAFKA_PASSWORD"] = self.password(principal)
        env.update(
            {
                "PILOTHOUSE_POSTGRES_DSN": self.postgres_dsn,
                "PILOTHOUSE_OPA_URL": self.opa_url,
                "PILOTHOUSE_LLM_BASE_URL": self.llm_base_url,
                "PILOTHOUSE_LLM_MODEL": self.llm_model,
            }
        )
        return env

    def export_lines(self, principal: str | None = None) -> list[str]:
        """`export NAME=value` lines, shell-quoted."""
        return [f"export {k}={shlex.quote(v)}" for k, v in self.env(principal).items()]

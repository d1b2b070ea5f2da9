"""Connection settings of the bus, read once (from the environment or a .env file) in each service's ``__main__``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusSettings(BaseSettings):
    """How a service reaches Kafka (and, optionally, a Confluent-compatible schema registry).

    Environment variables: ``PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS``, ``PILOTHOUSE_KAFKA_USERNAME``,
    ``PILOTHOUSE_KAFKA_PASSWORD``, ``PILOTHOUSE_KAFKA_SECURITY_PROTOCOL``, ``PILOTHOUSE_KAFKA_SASL_MECHANISM``,
    ``PILOTHOUSE_KAFKA_SCHEMA_REGISTRY_URL``, ``PILOTHOUSE_KAFKA_MAX_MESSAGE_BYTES``.
    """

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_KAFKA_", frozen=True, extra="ignore")

    bootstrap_servers: str = "127.0.0.1:19092"
    username: str | None = None
    password: SecretStr | None = None
    security_protocol: str = "SASL_PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-256"
    schema_registry_url: str | None = Field(default=None, description="e.g. http://registry:8081, or mock://x in tests")
    max_message_bytes: int = 1_048_576
    client_id: str = "pilothouse"

    def librdkafka(self) -> dict[str, str | int]:
        """The librdkafka configuration common to producers, consumers and admin clients."""
        conf: dict[str, str | int] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        if self.security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.sasl_mechanism
            if self.username is not None:
                conf["sasl.username"] = self.username
            if self.password is not None:
                conf["sasl.password"] = self.password.get_secret_value()
        return conf

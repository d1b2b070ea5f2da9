"""The topic catalogue: every topic, its record, layout and owners, from ``catalogue.yaml`` beside this module.

``pilothouse stack up`` applies it (topics, SCRAM users, ACLs) and the producer checks record types against it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pilothouse.bus.errors import ConfigurationError

CATALOGUE_PATH = Path(__file__).with_name("catalogue.yaml")
DLQ_SUFFIX = ".dlq"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrincipalSpec(_Frozen):
    """A service principal (a SCRAM user on the broker)."""

    name: str
    internal_topic_prefix: str | None = None


class TopicSpec(_Frozen):
    """One topic of the system."""

    name: str
    record: str = Field(description="Full Avro name of the one record type this topic carries.")
    key: str = Field(description="The record field the message key holds ('none': no key, the producer picks the "
                                 "partition).")
    partitions: int
    cleanup_policy: Literal["delete", "compact"]
    retention_ms: int
    max_message_bytes: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    dlq_retention_ms: int

    @property
    def dlq(self) -> str:
        """Name of this topic's dead-letter topic (written by its consumers)."""
        return self.name + DLQ_SUFFIX

    def broker_config(self) -> dict[str, str]:
        """Topic-level broker configuration."""
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            "max.message.bytes": str(self.max_message_bytes),
        }

    def dlq_broker_config(self) -> dict[str, str]:
        """Broker configuration of the dead-letter topic (always delete-policy)."""
        return {
            "cleanup.policy": "delete",
            "retention.ms": str(self.dlq_retention_ms),
            "max.message.bytes": str(self.max_message_bytes),
        }


class Catalogue(_Frozen):
    """All principals and topics."""

    version: int
    principals: dict[str, PrincipalSpec]
    topics: dict[str, TopicSpec]

    @model_validator(mode="after")
    def _owners_are_principals(self) -> "Catalogue":
        for t in self.topics.values():
            unknown = set(t.producers) | set(t.consumers)
            unknown -= set(self.principals)
            if unknown:
                raise ValueError(f"topic {t.name}: unknown principals {sorted(unknown)}")
            if not t.name.startswith("pilothouse.") or not t.name.rsplit(".", 1)[-1].startswith("v"):
                raise ValueError(f"topic {t.name}: names are pilothouse.<domain>.<event>.v<major>")
        return self

    def topic(self, name: str) -> TopicSpec:
        """The spec of topic ``name``; raises ConfigurationError if it is not in the catalogue."""
        try:
            return self.topics[name]
        except KeyError:
            raise ConfigurationError(f"topic {name!r} is not in the catalogue") from None

    def record_of(self, topic: str) -> str | None:
        """The Avro record name ``topic`` carries, or None for a topic outside the catalogue (tests' own topics)."""
        spec = self.topics.get(topic)
        return spec.record if spec is not None else None

    def topic_for_record(self, record: str) -> TopicSpec:
        """The topic that carries the Avro record ``record`` (each record type has exactly one topic)."""
        for t in self.topics.values():
            if t.record == record:
                return t
        raise ConfigurationError(f"no topic carries record {record!r}")

    def produced_by(self, principal: str) -> list[TopicSpec]:
        """Topics ``principal`` may write."""
        return [t for t in self.topics.values() if principal in t.producers]

    def consumed_by(self, principal: str) -> list[TopicSpec]:
        """Topics ``principal`` may read."""
        return [t for t in self.topics.values() if principal in t.consumers]

    def all_topic_names(self) -> list[str]:
        """Every topic and its dead-letter topic."""
        return [n for t in self.topics.values() for n in (t.name, t.dlq)]


def parse_catalogue(data: dict) -> Catalogue:
    """Build a Catalogue from the YAML document (defaults applied); raises ConfigurationError when invalid."""
    try:
        defaults = data.get("defaults", {})
        principals = {n: PrincipalSpec(name=n, **(p or {})) for n, p in data["principals"].items()}
        topics = {}
        for name, spec in data["topics"].items():
            merged = {
                "partitions": defaults.get("partitions", 3),
                "cleanup_policy": defaults.get("cleanup_policy", "delete"),
                "retention_ms": defaults.get("retention_ms", 604800000),
                "max_message_bytes": defaults.get("max_message_bytes", 1048576),
                "dlq_retention_ms": defaults.get("dlq_retention_ms", 2419200000),
                **spec,
            }
            topics[name] = TopicSpec(name=name, **merged)
        return Catalogue(version=data["version"], principals=principals, topics=topics)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigurationError(f"invalid topic catalogue: {e}") from e


@lru_cache(maxsize=None)
def load_catalogue(path: Path = CATALOGUE_PATH) -> Catalogue:
    """Load and validate the catalogue (cached; it is read-only data)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigurationError(f"cannot read topic catalogue {path}: {e}") from e
    return parse_catalogue(data)

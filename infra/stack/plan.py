"""Pure derivation of the broker's desired state from the topic catalogue (`pilothouse.bus.catalogue`).

`derive_plan` turns a validated Catalogue into plain dataclasses — the topics to create, the SCRAM principals and the
ACL grants — which `pilothouse.bus.admin.apply_catalogue` then applies. No I/O here, so the unit tests check the
security model (who may read or write where) without a broker.

ACL model (deny by default: the broker runs with allow.everyone.if.no.acl.found=false):
- producers of a topic: WRITE + DESCRIBE on the topic;
- consumers of a topic: READ + DESCRIBE on the topic, WRITE + DESCRIBE on `<topic>.dlq` (consumers dead-letter);
- every principal: READ on consumer groups prefixed `pilothouse.<principal>.`, WRITE + DESCRIBE on transactional ids
  prefixed `pilothouse.<principal>.`, IDEMPOTENT_WRITE on the cluster;
- a principal with `internal_topic_prefix` (Faust): ALL on topics and groups prefixed with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pilothouse.bus.catalogue import Catalogue
from pilothouse.bus.errors import ConfigurationError

CLUSTER_RESOURCE_NAME = "kafka-cluster"  # the only name Kafka accepts for the CLUSTER resource
RESERVED_PRINCIPALS = frozenset({"admin"})  # the stack's super user (super.users=User:admin)
CATALOGUE_NAMESPACE = "pilothouse."
# No dots in principal names: principal "a" owns groups "pilothouse.a.*", which must not cover principal "a.b".
_PRINCIPAL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


@dataclass(frozen=True, order=True)
class AclGrant:
    """One ALLOW ACL binding, in Kafka's vocabulary (strings, so this module needs no Kafka client)."""

    principal: str  # bare name, e.g. "sensing"; the broker principal is "User:<principal>"
    resource_type: str  # TOPIC | GROUP | TRANSACTIONAL_ID | CLUSTER
    resource_name: str
    pattern_type: str  # LITERAL | PREFIXED
    operation: str  # READ | WRITE | DESCRIBE | IDEMPOTENT_WRITE | ALL
    host: str = "*"


@dataclass(frozen=True)
class TopicPlan:
    """A topic that must exist on the broker with these settings."""

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)  # cleanup.policy, retention.ms, max.message.bytes
    is_dlq: bool = False


@dataclass(frozen=True)
class BrokerPlan:
    """Everything `stack up` makes true on the broker, derived from the catalogue."""

    principals: tuple[str, ...]
    topics: tuple[TopicPlan, ...]
    grants: tuple[AclGrant, ...]

    def grants_for(self, principal: str) -> tuple[AclGrant, ...]:
        """The grants of one principal."""
        return tuple(g for g in self.grants if g.principal == principal)


def derive_plan(catalogue: Catalogue) -> BrokerPlan:
    """Turn a validated catalogue into topics, principals and ACL grants. Pure; raises ConfigurationError."""
    for name, spec in catalogue.principals.items():
        if not _PRINCIPAL_NAME.match(name):
            raise ConfigurationError(f"principal name {name!r} must match {_PRINCIPAL_NAME.pattern}")
        if name in RESERVED_PRINCIPALS:
            raise ConfigurationError(f"principal {name!r} is reserved for the stack's super user")
        prefix = spec.internal_topic_prefix
        if prefix is not None and (not prefix or prefix.startswith(CATALOGUE_NAMESPACE)):
            # An empty prefix, or one inside the catalogue's namespace, would grant ALL on other services' topics.
            raise ConfigurationError(
                f"principal {name!r}: internal_topic_prefix {prefix!r} must be non-empty and outside "
                f"{CATALOGUE_NAMESPACE}*"
            )

    topics: list[TopicPlan] = []
    grants: set[AclGrant] = set()
    for t in catalogue.topics.values():
        if t.partitions < 1:
            raise ConfigurationError(f"topic {t.name}: partitions must be >= 1, got {t.partitions}")
        if not t.producers:
            raise ConfigurationError(f"topic {t.name}: at least one producer is required")
        topics.append(TopicPlan(t.name, t.partitions, t.broker_config()))
        topics.append(TopicPlan(t.dlq, t.partitions, t.dlq_broker_config(), is_dlq=True))
        for p in t.producers:
            grants.add(AclGrant(p, "TOPIC", t.name, "LITERAL", "WRITE"))
            grants.add(AclGrant(p, "TOPIC", t.name, "LITERAL", "DESCRIBE"))
        for c in t.consumers:
            grants.add(AclGrant(c, "TOPIC", t.name, "LITERAL", "READ"))
            grants.add(AclGrant(c, "TOPIC", t.name, "LITERAL", "DESCRIBE"))
            grants.add(AclGrant(c, "TOPIC", t.dlq, "LITERAL", "WRITE"))
            grants.add(AclGrant(c, "TOPIC", t.dlq, "LITERAL", "DESCRIBE"))

    for name, spec in catalogue.principals.items():
        own = f"{CATALOGUE_NAMESPACE}{name}."
        grants.add(AclGrant(name, "GROUP", own, "PREFIXED", "READ"))
        grants.add(AclGrant(name, "TRANSACTIONAL_ID", own, "PREFIXED", "WRITE"))
        grants.add(AclGrant(name, "TRANSACTIONAL_ID", own, "PREFIXED", "DESCRIBE"))
        grants.add(AclGrant(name, "CLUSTER", CLUSTER_RESOURCE_NAME, "LITERAL", "IDEMPOTENT_WRITE"))
        if spec.internal_topic_prefix:
            grants.add(AclGrant(name, "TOPIC", spec.internal_topic_prefix, "PREFIXED", "ALL"))
            grants.add(AclGrant(name, "GROUP", spec.internal_topic_prefix, "PREFIXED", "ALL"))

    return BrokerPlan(
        principals=tuple(sorted(catalogue.principals)), topics=tuple(topics), grants=tuple(sorted(grants))
    )

"""Kafka administration for pilothouse: readiness probes and idempotent application of the topic catalogue.

This module is part of the bus package because it is one of the only places allowed to import confluent_kafka. It
knows nothing about where the desired state comes from: callers (the local stack, `pilothouse.stack.plan`) pass
topic specs and ACL grants as plain objects with the attributes described by `TopicSpecLike` and `AclGrantLike`.

Every `apply_*` function is idempotent: it reads what the broker has, creates only what is missing, and reports the
rest (drift it will not silently "fix", such as a partition count that differs) in an `ApplyReport`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from pilothouse.bus.errors import PilothouseError, RetryableError

# SCRAM iteration count for service users: Kafka accepts 4096..16384; each authentication costs this many HMACs.
SCRAM_ITERATIONS = 8192

# confluent-kafka has no ResourceType.CLUSTER: the cluster resource is BROKER named "kafka-cluster".
_RESOURCE_TYPES = {
    "TOPIC": ResourceType.TOPIC,
    "GROUP": ResourceType.GROUP,
    "TRANSACTIONAL_ID": ResourceType.TRANSACTIONAL_ID,
    "CLUSTER": ResourceType.BROKER,
}
_RESOURCE_NAMES = {v: k for k, v in _RESOURCE_TYPES.items()}
_PATTERNS = {"LITERAL": ResourcePatternType.LITERAL, "PREFIXED": ResourcePatternType.PREFIXED}
_PATTERN_NAMES = {v: k for k, v in _PATTERNS.items()}


class KafkaAdminError(PilothouseError):
    """An admin operation failed; the message says which and why."""


class BrokerNotReady(KafkaAdminError, RetryableError):
    """The broker did not answer an authenticated metadata request in time."""


class AuthenticationFailed(KafkaAdminError):
    """The broker refused the SASL login (unknown user or wrong password)."""


class TopicSpecLike(Protocol):
    name: str
    partitions: int
    config: Mapping[str, str]


class AclGrantLike(Protocol):
    principal: str
    resource_type: str
    resource_name: str
    pattern_type: str
    operation: str
    host: str


@dataclass
class ApplyReport:
    """What an apply did (created/reset/revoked) and what it found but left alone (drift)."""

    created_topics: list[str] = field(default_factory=list)
    created_users: list[str] = field(default_factory=list)
    reset_users: list[str] = field(default_factory=list)
    created_acls: list[str] = field(default_factory=list)
    revoked_acls: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when the broker was modified."""
        return bool(
            self.created_topics or self.created_users or self.reset_users or self.created_acls or self.revoked_acls
        )

    def as_dict(self) -> dict[str, list[str]]:
        """Plain-data view (for JSON output)."""
        return {
            "created_topics": self.created_topics,
            "created_users": self.created_users,
            "reset_users": self.reset_users,
            "created_acls": self.created_acls,
            "revoked_acls": self.revoked_acls,
            "drift": self.drift,
        }


def new_admin_client(config: Mapping[str, str]) -> AdminClient:
    """Create an AdminClient from librdkafka settings (e.g. `StackInfo.kafka_config("admin")`)."""
    return AdminClient(dict(config))


def probe_metadata(config: Mapping[str, str], timeout_s: float = 5.0) -> dict[str, object]:
    """One authenticated metadata request. Returns cluster id, broker and topic counts.

    Raises KafkaAdminError on failure; a refused login is reported as such (`AuthenticationFailed`), not as the
    generic transport timeout librdkafka returns for it.
    """
    errors: list[KafkaError] = []
    settings = {
        **config,
        "socket.timeout.ms": str(int(timeout_s * 1000)),
        "log_level": "0",  # connection errors come back through error_cb and the exception, not stderr
        "error_cb": errors.append,
    }
    client = None
    try:
        client = AdminClient(settings)
        md = client.list_topics(timeout=timeout_s)
    except KafkaException as e:
        if client is not None:
            client.poll(0.2)  # serve error_cb: the reason (e.g. a failed SASL login) arrives there
        auth = [err for err in errors if err.code() == KafkaError._AUTHENTICATION]
        if auth:
            raise AuthenticationFailed(f"broker refused the login: {auth[-1].str()}") from e
        detail = f" (last client error: {errors[-1].str()})" if errors else ""
        raise KafkaAdminError(f"metadata request failed: {e.args[0].str()}{detail}") from e
    return {"cluster_id": md.cluster_id, "brokers": len(md.brokers), "topics": len(md.topics)}


def wait_until_ready(config: Mapping[str, str], timeout_s: float, is_alive=lambda: True) -> dict[str, object]:
    """Poll `probe_metadata` until it succeeds, `is_alive()` turns false, or `timeout_s` passes (BrokerNotReady)."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if not is_alive():
            raise BrokerNotReady(f"broker process exited before it was ready (last probe: {last})")
        try:
            return probe_metadata(config, timeout_s=min(3.0, max(0.5, deadline - time.monotonic())))
        except KafkaAdminError as e:
            last = str(e)
        time.sleep(0.3)
    raise BrokerNotReady(f"broker not ready after {timeout_s:.0f}s (last probe: {last})")


def _result(future, what: str):
    try:
        return future.result()
    except KafkaException as e:
        raise KafkaAdminError(f"{what}: {e.args[0]}") from e


def apply_topics(
    client: AdminClient,
    topics: Iterable[TopicSpecLike],
    report: ApplyReport,
    *,
    replication_factor: int = -1,
    timeout_s: float = 30.0,
) -> None:
    """Create missing topics with their config; report partition or config drift on existing ones.

    `replication_factor=-1` uses the broker's default.replication.factor (1 on the local single-node stack).
    """
    wanted = {t.name: t for t in topics}
    try:
        existing = client.list_topics(timeout=timeout_s).topics
    except KafkaException as e:
        raise KafkaAdminError(f"listing topics failed: {e.args[0]}") from e
    missing = [t for name, t in wanted.items() if name not in existing]
    if missing:
        futures = client.create_topics(
            [NewTopic(t.name, t.partitions, replication_factor, config=dict(t.config)) for t in missing],
            request_timeout=timeout_s,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                report.created_topics.append(name)
            except KafkaException as e:
                if e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:  # created concurrently: fine
                    continue
                raise KafkaAdminError(f"creating topic {name}: {e.args[0]}") from e
    present = [t for name, t in wanted.items() if name in existing]
    for t in present:
        have = len(existing[t.name].partitions)
        if have != t.partitions:
            report.drift.append(f"topic {t.name}: {have} partitions on the broker, catalogue says {t.partitions}")
    if present:
        futures = client.describe_configs(
            [ConfigResource(ResourceType.TOPIC, t.name) for t in present], request_timeout=timeout_s
        )
        by_name = {t.name: t for t in present}
        for resource, fut in futures.items():
            entries = _result(fut, f"describing config of topic {resource.name}")
            for key, value in by_name[resource.name].config.items():
                actual = entries[key].value if key in entries else None
                if actual != value:
                    report.drift.append(f"topic {resource.name}: {key}={actual} on the broker, catalogue says {value}")


def apply_scram_users(
    client: AdminClient,
    passwords: Mapping[str, str],
    report: ApplyReport,
    *,
    verify_config: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Ensure a SCRAM-SHA-256 credential exists for each user in `passwords`.

    Missing users are created. Existing users are left alone unless `verify_config` (base librdkafka settings
    without credentials) is given, in which case each one is test-authenticated and its password reset if the
    stored one no longer works (e.g. the credentials file was regenerated).
    """
    try:
        described = client.describe_user_scram_credentials(request_timeout=timeout_s).result()
    except KafkaException as e:
        raise KafkaAdminError(f"describing SCRAM users failed: {e.args[0]}") from e
    have = {
        user
        for user, desc in described.items()
        if any(info.mechanism == ScramMechanism.SCRAM_SHA_256 for info in desc.scram_credential_infos)
    }
    to_set: list[str] = [u for u in passwords if u not in have]
    stale: list[str] = []
    if verify_config is not None:
        for user in sorted(set(passwords) & have):
            cfg = {**verify_config, "sasl.username": user, "sasl.password": passwords[user]}
            try:
                probe_metadata(cfg, timeout_s=5.0)
            except AuthenticationFailed:
                stale.append(user)
    if not to_set and not stale:
        return
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, SCRAM_ITERATIONS)
    alterations = [
        UserScramCredentialUpsertion(u, info, passwords[u].encode("utf-8")) for u in [*to_set, *stale]
    ]
    futures = client.alter_user_scram_credentials(alterations, request_timeout=timeout_s)
    for user, fut in futures.items():
        _result(fut, f"setting SCRAM credential of {user}")
    report.created_users.extend(to_set)
    report.reset_users.extend(stale)


def _binding(g: AclGrantLike) -> AclBinding:
    return AclBinding(
        _RESOURCE_TYPES[g.resource_type],
        g.resource_name,
        _PATTERNS[g.pattern_type],
        f"User:{g.principal}",
        g.host,
        AclOperation[g.operation],
        AclPermissionType.ALLOW,
    )


def _key(b: AclBinding) -> tuple[str, str, str, str, str, str]:
    return (
        b.principal,
        _RESOURCE_NAMES.get(b.restype, b.restype.name),
        b.name,
        _PATTERN_NAMES.get(b.resource_pattern_type, b.resource_pattern_type.name),
        b.operation.name,
        b.host,
    )


def _describe(key: tuple[str, str, str, str, str, str]) -> str:
    principal, rtype, name, pattern, op, host = key
    return f"{principal} {op} on {rtype}:{name}" + (" (prefixed)" if pattern == "PREFIXED" else "") + (
        f" from {host}" if host != "*" else ""
    )


def apply_acls(
    client: AdminClient,
    grants: Iterable[AclGrantLike],
    managed_principals: Iterable[str],
    report: ApplyReport,
    *,
    timeout_s: float = 30.0,
) -> None:
    """Make the ALLOW ACLs of `managed_principals` exactly `grants`.

    Missing grants are created; ALLOW ACLs of a managed principal that the catalogue no longer derives are revoked
    (the catalogue is the source of truth for who may write where). DENY ACLs and other principals are untouched.
    """
    wanted = {_key(b): b for b in (_binding(g) for g in grants)}
    managed = {f"User:{p}" for p in managed_principals}
    everything = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None, AclOperation.ANY, AclPermissionType.ALLOW
    )
    try:
        current = client.describe_acls(everything, request_timeout=timeout_s).result()
    except KafkaException as e:
        raise KafkaAdminError(f"describing ACLs failed: {e.args[0]}") from e
    have = {_key(b): b for b in current if b.principal in managed}
    missing = [b for k, b in wanted.items() if k not in have]
    extra = [b for k, b in have.items() if k not in wanted]
    if missing:
        for binding, fut in client.create_acls(missing, request_timeout=timeout_s).items():
            _result(fut, f"creating ACL {_describe(_key(binding))}")
        report.created_acls.extend(sorted(_describe(_key(b)) for b in missing))
    if extra:
        filters = [
            AclBindingFilter(
                b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, AclPermissionType.ALLOW
            )
            for b in extra
        ]
        for flt, fut in client.delete_acls(filters, request_timeout=timeout_s).items():
            _result(fut, f"revoking ACL {_describe(_key(flt))}")
        report.revoked_acls.extend(sorted(_describe(_key(b)) for b in extra))


def apply_catalogue(
    admin_config: Mapping[str, str],
    *,
    topics: Iterable[TopicSpecLike],
    grants: Iterable[AclGrantLike],
    passwords: Mapping[str, str],
    verify_passwords: bool = True,
    replication_factor: int = -1,
    timeout_s: float = 30.0,
) -> ApplyReport:
    """Apply users, ACLs and topics and report the changes (users first is safe: ACLs deny by default).

    `passwords` maps each catalogue principal to its SCRAM password; its keys are the managed principals.
    """
    report = ApplyReport()
    client = new_admin_client(admin_config)
    verify = None
    if verify_passwords:
        verify = {k: v for k, v in admin_config.items() if k not in ("sasl.username", "sasl.password")}
    apply_scram_users(client, passwords, report, verify_config=verify, timeout_s=timeout_s)
    apply_acls(client, grants, passwords.keys(), report, timeout_s=timeout_s)
    apply_topics(client, topics, report, replication_factor=replication_factor, timeout_s=timeout_s)
    return report


def delete_principal(admin_config: Mapping[str, str], principal: str, *, timeout_s: float = 30.0) -> int:
    """Remove every ACL of `principal` and its SCRAM-SHA-256 credential (for tests' temporary principals).

    Returns the number of ACL bindings deleted. A principal without a credential is not an error.
    """
    client = new_admin_client(admin_config)
    flt = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, f"User:{principal}", None, AclOperation.ANY,
        AclPermissionType.ANY,
    )  # fmt: skip
    deleted = 0
    for _flt, fut in client.delete_acls([flt], request_timeout=timeout_s).items():
        deleted += len(_result(fut, f"deleting ACLs of {principal}"))
    futures = client.alter_user_scram_credentials(
        [UserScramCredentialDeletion(principal, ScramMechanism.SCRAM_SHA_256)], request_timeout=timeout_s
    )
    for user, fut in futures.items():
        try:
            fut.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.RESOURCE_NOT_FOUND:
                raise KafkaAdminError(f"deleting SCRAM credential of {user}: {e.args[0]}") from e
    return deleted


def topic_names(admin_config: Mapping[str, str], *, prefix: str = "", timeout_s: float = 10.0) -> list[str]:
    """Names of the topics on the cluster that start with ``prefix`` (sorted)."""
    client = new_admin_client(admin_config)
    return sorted(t for t in client.list_topics(timeout=timeout_s).topics if t.startswith(prefix))


def delete_topics(admin_config: Mapping[str, str], names: Iterable[str], *, timeout_s: float = 30.0) -> list[str]:
    """Delete topics (for tests' uuid-named topics); returns those deleted, ignoring ones that do not exist."""
    names = list(names)
    if not names:
        return []
    client = new_admin_client(admin_config)
    deleted = []
    for name, fut in client.delete_topics(names, request_timeout=timeout_s).items():
        try:
            fut.result()
            deleted.append(name)
        except KafkaException as e:
            if e.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise KafkaAdminError(f"deleting topic {name}: {e.args[0]}") from e
    return deleted

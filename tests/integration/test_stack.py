"""The local stack as started by `pilothouse stack up`: health, authentication, and the catalogue's ACLs enforced by
the real broker. Each test that writes uses a temporary uuid-named principal and topic (removed afterwards), so no
record lands on a catalogue topic that services consume.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from pilothouse.bus import admin as bus_admin
from pilothouse.bus.catalogue import load_catalogue, parse_catalogue
from pilothouse.stack import lifecycle
from pilothouse.stack.info import new_password
from pilothouse.stack.plan import AclGrant, derive_plan

pytestmark = pytest.mark.integration


def produce(config: dict, topic: str, value: bytes) -> KafkaError | None:
    """Produce one record idempotently; the delivery error (None when written)."""
    outcome: list[KafkaError | None] = []
    producer = Producer({**config, "enable.idempotence": True, "message.timeout.ms": 15000, "log_level": 0})
    producer.produce(topic, value=value, key=b"k", on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(20)
    assert outcome, "no delivery report within 20 s"
    return outcome[0]


@pytest.fixture
def temp_principal(stack_info):
    """A throwaway principal owning one throwaway topic, applied through the same plan + admin path as `stack up`."""
    name = f"t{uuid.uuid4().hex[:12]}"
    topic = f"pilothouse.{name}.events.v1"
    catalogue = parse_catalogue(
        {
            "version": 1,
            "principals": {name: {}},
            "defaults": {"partitions": 1},
            "topics": {
                topic: {"record": f"pilothouse.{name}.EventHappened", "key": "id", "producers": [name], "consumers": [name]}
            },
        }
    )
    plan = derive_plan(catalogue)
    password = new_password()
    admin_cfg = stack_info.kafka_config("admin")
    report = bus_admin.apply_catalogue(admin_cfg, topics=plan.topics, grants=plan.grants, passwords={name: password})
    assert report.created_users == [name]
    assert sorted(report.created_topics) == sorted([topic, topic + ".dlq"])
    cfg = {**stack_info.kafka_base_config(), "sasl.username": name, "sasl.password": password}
    try:
        yield {"name": name, "topic": topic, "config": cfg, "plan": plan, "password": password}
    finally:
        bus_admin.delete_principal(admin_cfg, name)
        bus_admin.delete_topics(admin_cfg, [topic, topic + ".dlq"])


def test_all_four_components_are_healthy(stack_info):
    health = lifecycle.status()
    assert set(health) == {"kafka", "postgres", "opa", "llm"}
    unhealthy = {name: h.get("error") for name, h in health.items() if not h["healthy"]}
    assert not unhealthy
    assert health["kafka"]["cluster_id"] == stack_info.kafka.cluster_id
    assert health["postgres"]["database"] == "pilothouse"


def test_a_client_without_sasl_is_refused(stack_info):
    plaintext = {**stack_info.kafka_base_config(), "security.protocol": "PLAINTEXT"}
    with pytest.raises(bus_admin.KafkaAdminError):
        bus_admin.probe_metadata(plaintext, timeout_s=3)


@pytest.mark.parametrize("who", ["unknown user", "wrong password"])
def test_a_client_with_bad_credentials_is_refused(stack_info, who):
    if who == "unknown user":
        cfg = {**stack_info.kafka_base_config(), "sasl.username": f"nobody-{uuid.uuid4().hex}", "sasl.password": "x"}
    else:
        cfg = {**stack_info.kafka_config("ledger"), "sasl.password": new_password()}
    with pytest.raises(bus_admin.AuthenticationFailed, match="invalid credentials"):
        bus_admin.probe_metadata(cfg, timeout_s=5)


def test_every_catalogue_principal_can_log_in_but_not_write_a_topic_it_does_not_produce(stack_info):
    catalogue = load_catalogue()
    for principal in catalogue.principals:
        cfg = stack_info.kafka_config(principal)
        bus_admin.probe_metadata(cfg, timeout_s=5)  # authenticates
        foreign = next(t for t in catalogue.topics.values() if principal not in t.producers)
        err = produce(cfg, foreign.name, b"must not be written")
        assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (principal, foreign.name, err)


def test_a_principal_writes_and_reads_its_own_topic(temp_principal):
    marker = uuid.uuid4().hex.encode()
    assert produce(temp_principal["config"], temp_principal["topic"], marker) is None
    consumer = Consumer(
        {
            **temp_principal["config"],
            "group.id": f"pilothouse.{temp_principal['name']}.test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    try:
        consumer.subscribe([temp_principal["topic"]])
        got = None
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got = msg.value()
            break
        assert got == marker
    finally:
        consumer.close()


def test_a_principal_cannot_write_another_topic_or_read_it(temp_principal):
    err = produce(temp_principal["config"], "pilothouse.ledger.entries.v1", b"forged ledger entry")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    consumer = Consumer(
        {
            **temp_principal["config"],
            "group.id": f"pilothouse.{temp_principal['name']}.snoop",
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )
    try:
        consumer.subscribe(["pilothouse.ledger.entries.v1"])
        errors = []
        for _ in range(40):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is not None:
                errors.append(msg.error().code())
                break
            assert msg is None, "read a record from a topic the principal does not consume"
        assert KafkaError.TOPIC_AUTHORIZATION_FAILED in errors
    finally:
        consumer.close()


def test_a_group_outside_the_principals_prefix_is_refused(temp_principal):
    consumer = Consumer(
        {**temp_principal["config"], "group.id": "pilothouse.ledger.mirror", "auto.offset.reset": "earliest", "log_level": 0}
    )
    try:
        consumer.subscribe([temp_principal["topic"]])
        codes = []
        for _ in range(40):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is not None:
                codes.append(msg.error().code())
                break
        assert KafkaError.GROUP_AUTHORIZATION_FAILED in codes
    finally:
        consumer.close()


def test_applying_the_catalogue_twice_changes_nothing(stack_info):
    lifecycle.apply_catalogue(stack_info)  # converge whatever state the broker is in
    again = lifecycle.apply_catalogue(stack_info)
    assert not again.changed, again.as_dict()
    assert again.drift == []


def test_a_grant_outside_the_catalogue_is_revoked_on_apply(stack_info, temp_principal):
    admin_cfg = stack_info.kafka_config("admin")
    plan = temp_principal["plan"]
    name = temp_principal["name"]
    extra = AclGrant(name, "TOPIC", "pilothouse.ledger.entries.v1", "LITERAL", "WRITE")
    widened = bus_admin.apply_catalogue(
        admin_cfg, topics=plan.topics, grants=[*plan.grants, extra], passwords={name: temp_principal["password"]}
    )
    assert widened.created_acls == [f"User:{name} WRITE on TOPIC:pilothouse.ledger.entries.v1"]
    restored = bus_admin.apply_catalogue(
        admin_cfg, topics=plan.topics, grants=plan.grants, passwords={name: temp_principal["password"]}
    )
    assert restored.revoked_acls == [f"User:{name} WRITE on TOPIC:pilothouse.ledger.entries.v1"]
    assert not restored.created_acls and not restored.created_users and not restored.created_topics
    err = produce(temp_principal["config"], "pilothouse.ledger.entries.v1", b"after revocation")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_topics_exist_with_the_catalogue_settings(stack_info):
    report = bus_admin.ApplyReport()
    client = bus_admin.new_admin_client(stack_info.kafka_config("admin"))
    plan = lifecycle.broker_plan()
    bus_admin.apply_topics(client, plan.topics, report)
    assert report.created_topics == [] and report.drift == []

"""The catalogue → broker plan derivation (pure): who may read and write where, and how topics are laid out."""

from __future__ import annotations

import pytest

from pilothouse.bus.catalogue import load_catalogue, parse_catalogue
from pilothouse.bus.errors import ConfigurationError
from pilothouse.stack.plan import AclGrant, derive_plan


def small_catalogue(**principal_opts) -> dict:
    return {
        "version": 1,
        "principals": {"alpha": principal_opts.get("alpha", {}), "beta": principal_opts.get("beta", {})},
        "defaults": {
            "partitions": 3,
            "cleanup_policy": "delete",
            "retention_ms": 1000,
            "dlq_retention_ms": 5000,
            "max_message_bytes": 2048,
        },
        "topics": {
            "pilothouse.alpha.events.v1": {
                "record": "pilothouse.alpha.EventHappened",
                "key": "id",
                "producers": ["alpha"],
                "consumers": ["beta"],
            },
            "pilothouse.alpha.state.v1": {
                "record": "pilothouse.alpha.StateChanged",
                "key": "id",
                "partitions": 1,
                "cleanup_policy": "compact",
                "retention_ms": -1,
                "producers": ["alpha"],
                "consumers": [],
            },
        },
    }


def test_small_catalogue_gives_exactly_the_expected_grants():
    plan = derive_plan(parse_catalogue(small_catalogue()))
    ev, st = "pilothouse.alpha.events.v1", "pilothouse.alpha.state.v1"
    expected = {
        # alpha produces both topics
        AclGrant("alpha", "TOPIC", ev, "LITERAL", "WRITE"),
        AclGrant("alpha", "TOPIC", ev, "LITERAL", "DESCRIBE"),
        AclGrant("alpha", "TOPIC", st, "LITERAL", "WRITE"),
        AclGrant("alpha", "TOPIC", st, "LITERAL", "DESCRIBE"),
        # beta consumes events and may dead-letter them
        AclGrant("beta", "TOPIC", ev, "LITERAL", "READ"),
        AclGrant("beta", "TOPIC", ev, "LITERAL", "DESCRIBE"),
        AclGrant("beta", "TOPIC", ev + ".dlq", "LITERAL", "WRITE"),
        AclGrant("beta", "TOPIC", ev + ".dlq", "LITERAL", "DESCRIBE"),
    }
    for p in ("alpha", "beta"):
        expected |= {
            AclGrant(p, "GROUP", f"pilothouse.{p}.", "PREFIXED", "READ"),
            AclGrant(p, "TRANSACTIONAL_ID", f"pilothouse.{p}.", "PREFIXED", "WRITE"),
            AclGrant(p, "TRANSACTIONAL_ID", f"pilothouse.{p}.", "PREFIXED", "DESCRIBE"),
            AclGrant(p, "CLUSTER", "kafka-cluster", "LITERAL", "IDEMPOTENT_WRITE"),
        }
    assert set(plan.grants) == expected
    assert len(plan.grants) == len(expected)  # no duplicates
    assert plan.principals == ("alpha", "beta")


def test_small_catalogue_topics_and_dead_letter_topics():
    plan = derive_plan(parse_catalogue(small_catalogue()))
    topics = {t.name: t for t in plan.topics}
    assert set(topics) == {
        "pilothouse.alpha.events.v1",
        "pilothouse.alpha.events.v1.dlq",
        "pilothouse.alpha.state.v1",
        "pilothouse.alpha.state.v1.dlq",
    }
    ev = topics["pilothouse.alpha.events.v1"]
    assert (ev.partitions, ev.is_dlq) == (3, False)
    assert dict(ev.config) == {"cleanup.policy": "delete", "retention.ms": "1000", "max.message.bytes": "2048"}
    st = topics["pilothouse.alpha.state.v1"]
    assert st.partitions == 1
    assert dict(st.config) == {"cleanup.policy": "compact", "retention.ms": "-1", "max.message.bytes": "2048"}
    # A dead-letter topic is always delete-policy with the DLQ retention, even for a compacted topic.
    st_dlq = topics["pilothouse.alpha.state.v1.dlq"]
    assert st_dlq.is_dlq and st_dlq.partitions == 1
    assert dict(st_dlq.config) == {"cleanup.policy": "delete", "retention.ms": "5000", "max.message.bytes": "2048"}


def test_internal_topic_prefix_grants_all_on_prefixed_topics_and_groups_only_to_its_owner():
    plan = derive_plan(parse_catalogue(small_catalogue(alpha={"internal_topic_prefix": "alpha-worker-"})))
    all_grants = {g for g in plan.grants if g.operation == "ALL"}
    assert all_grants == {
        AclGrant("alpha", "TOPIC", "alpha-worker-", "PREFIXED", "ALL"),
        AclGrant("alpha", "GROUP", "alpha-worker-", "PREFIXED", "ALL"),
    }


@pytest.fixture(scope="module")
def real_plan():
    return load_catalogue(), derive_plan(load_catalogue())


def test_real_catalogue_write_access_is_exactly_the_producers(real_plan):
    catalogue, plan = real_plan
    for topic in catalogue.topics.values():
        writers = {g.principal for g in plan.grants if g.resource_name == topic.name and g.operation == "WRITE"}
        assert writers == set(topic.producers), topic.name
        readers = {g.principal for g in plan.grants if g.resource_name == topic.name and g.operation == "READ"}
        assert readers == set(topic.consumers), topic.name
        dlq_writers = {g.principal for g in plan.grants if g.resource_name == topic.dlq and g.operation == "WRITE"}
        assert dlq_writers == set(topic.consumers), topic.dlq
        # Nobody is granted READ on a dead-letter topic by the catalogue (admin reads them).
        assert not [g for g in plan.grants if g.resource_name == topic.dlq and g.operation == "READ"]


def test_real_catalogue_no_prefixed_grant_reaches_into_another_principals_namespace(real_plan):
    catalogue, plan = real_plan
    for g in plan.grants:
        if g.pattern_type != "PREFIXED":
            continue
        for topic in catalogue.all_topic_names():
            # a prefixed grant must never cover a catalogue topic (those are granted literally, per role)
            assert not topic.startswith(g.resource_name) or g.resource_type != "TOPIC", (g, topic)
        for other in catalogue.principals:
            if other != g.principal:
                assert not f"pilothouse.{other}.".startswith(g.resource_name), (g, other)


def test_real_catalogue_every_topic_has_a_dlq_with_the_same_partitions(real_plan):
    catalogue, plan = real_plan
    topics = {t.name: t for t in plan.topics}
    assert set(topics) == set(catalogue.all_topic_names())
    for spec in catalogue.topics.values():
        assert topics[spec.name].partitions == spec.partitions
        assert topics[spec.dlq].partitions == spec.partitions
        assert topics[spec.dlq].config["cleanup.policy"] == "delete"
        assert topics[spec.name].config["cleanup.policy"] == spec.cleanup_policy


def test_derivation_is_deterministic_and_sorted(real_plan):
    catalogue, plan = real_plan
    again = derive_plan(catalogue)
    assert again == plan
    assert list(plan.grants) == sorted(plan.grants)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["principals"].update({"admin": {}}), "reserved"),
        (lambda c: c["principals"].update({"a.b": {}}), "principal name"),
        (lambda c: c["principals"].update({"Alpha2": {}}), "principal name"),
        (lambda c: c["principals"]["alpha"].update({"internal_topic_prefix": "pilothouse."}), "internal_topic_prefix"),
        (lambda c: c["principals"]["alpha"].update({"internal_topic_prefix": ""}), "internal_topic_prefix"),
        (lambda c: c["topics"]["pilothouse.alpha.events.v1"].update({"partitions": 0}), "partitions"),
        (lambda c: c["topics"]["pilothouse.alpha.events.v1"].update({"producers": []}), "producer"),
    ],
)
def test_unsafe_or_invalid_catalogues_are_refused_with_a_clear_message(mutate, message):
    raw = small_catalogue()
    raw["principals"] = {k: dict(v) for k, v in raw["principals"].items()}
    mutate(raw)
    with pytest.raises(ConfigurationError, match=message):
        derive_plan(parse_catalogue(raw))

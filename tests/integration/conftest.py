"""Integration fixtures: the real stack started by ``pilothouse stack up`` (Kafka, Postgres, OPA, LLM server).

Every test gets its own uuid-named topics (``test.<uuid>``, created by the admin principal) and consumer groups, so
tests never see each other's records. If the stack is not up the tests fail with the command to run, not skip: a
skipped integration suite would look green while testing nothing.
"""

from __future__ import annotations

import uuid

import pytest

from pilothouse.bus.config import BusSettings


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack_info():
    from pilothouse.stack.errors import StackError
    from pilothouse.stack.info import StackInfo

    try:
        return StackInfo.load()
    except StackError as e:
        pytest.fail(f"the local stack is not provisioned ({e}); run `pilothouse stack up` first", pytrace=False)


@pytest.fixture(scope="session")
def bus_settings(stack_info):
    """BusSettings for a principal of the stack (default: the admin super user)."""

    def make(principal: str = "admin", **overrides) -> BusSettings:
        return BusSettings(
            bootstrap_servers=stack_info.kafka.bootstrap_servers,
            username=principal,
            password=stack_info.password(principal),
            security_protocol=stack_info.kafka.security_protocol,
            sasl_mechanism=stack_info.kafka.sasl_mechanism,
            client_id=f"test-{principal}",
            **overrides,
        )

    return make


@pytest.fixture
def new_topic(stack_info):
    """Create ``test.<uuid>`` (and its .dlq) as admin; deleted after the test."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(stack_info.kafka_config("admin"))
    created: list[str] = []

    def make(partitions: int = 1, **config: str) -> str:
        name = f"test.{uuid.uuid4().hex[:12]}"
        fs = admin.create_topics([NewTopic(n, partitions, 1, config=dict(config)) for n in (name, name + ".dlq")])
        for f in fs.values():
            f.result(30)
        created.extend([name, name + ".dlq"])
        return name

    yield make
    if created:
        for f in admin.delete_topics(created).values():
            try:
                f.result(30)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass


@pytest.fixture
def group_id():
    return f"test.{uuid.uuid4().hex[:12]}"

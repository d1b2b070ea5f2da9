"""The actuator service as a process (``python -m pilothouse.actuator``) on the real broker, Postgres and a fleet.

Records go in on uuid-named test topics (admin principal) and come out through the outbox relay.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pilothouse.actuator.adapters.postgres import Store
from pilothouse.bus.authorization import key_id
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import KillSwitchChanged
from pilothouse.bus.serde import Serde
from tests.integration.test_actuator_handlers import Fleet, approval_request, authorization, free_port

ROOT = Path(__file__).resolve().parents[2]


class Topics:
    def __init__(self, new_topic, partitions: int = 1):
        self.pending = new_topic(1)
        self.authorized = new_topic(partitions)
        self.kill_switch = new_topic(1)
        self.shadow = new_topic(1)
        self.executions = new_topic(1)
        self.verifications = new_topic(1)


class ActuatorProcess:
    """The service in a subprocess, configured only through its environment."""

    def __init__(self, *, stack_info, topics: Topics, fleet: Fleet, key: Ed25519PrivateKey, schema: str,
                 log_path: Path, principal: str = "admin"):
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.port = free_port()
        self.env = {
            **os.environ,
            "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": stack_info.kafka.bootstrap_servers,
            "PILOTHOUSE_KAFKA_USERNAME": principal,
            "PILOTHOUSE_KAFKA_PASSWORD": stack_info.password(principal),
            "PILOTHOUSE_KAFKA_SECURITY_PROTOCOL": stack_info.kafka.security_protocol,
            "PILOTHOUSE_KAFKA_SASL_MECHANISM": stack_info.kafka.sasl_mechanism,
            "PILOTHOUSE_ACTUATOR_POSTGRES_DSN": stack_info.postgres_dsn,
            "PILOTHOUSE_ACTUATOR_POSTGRES_SCHEMA": schema,
            "PILOTHOUSE_ACTUATOR_TRUSTED_KEYS": json.dumps({key_id(key.public_key()): base64.b64encode(raw).decode()}),
            "PILOTHOUSE_ACTUATOR_FLEET_URL": fleet.url,
            "PILOTHOUSE_ACTUATOR_GROUP_PREFIX": f"test.{uuid.uuid4().hex[:8]}",
            "PILOTHOUSE_ACTUATOR_INSTANCE_ID": "actuator-test",
            "PILOTHOUSE_ACTUATOR_OBSERVABILITY_PORT": str(self.port),
            "PILOTHOUSE_ACTUATOR_RECOVERY_POLL_S": "0.5",
            **{f"PILOTHOUSE_ACTUATOR_TOPIC_{k.upper()}": v for k, v in vars(topics).items()},
        }
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> ActuatorProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "pilothouse.actuator"], env=self.env, cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.starts += 1
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None


def read_topic(settings, topic: str, until, timeout_s: float = 60.0) -> list:
    """Records of ``topic`` from the start, until ``until(records)`` is true or the timeout."""
    c = Consumer({**settings.librdkafka(), "group.id": f"test.{uuid.uuid4().hex}", "auto.offset.reset": "earliest",
                  "isolation.level": "read_committed"})
    c.subscribe([topic])
    serde, got = Serde(), []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(got):
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            got.append(serde.decode(m.value()).record)
    finally:
        c.close()
    return got


@pytest.fixture
def fleet(tmp_path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet").start()
    yield f
    f.stop()


@pytest.fixture
def schema(stack_info) -> Iterator[str]:
    name = f"act_{uuid.uuid4().hex[:12]}"
    yield name
    s = Store(stack_info.postgres_dsn, name)
    s.drop()
    s.close()


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_service_shadows_pending_actions_and_executes_authorized_ones(stack_info, bus_settings, new_topic, fleet,
                                                                      schema, tmp_path):
    key = Ed25519PrivateKey.generate()
    topics = Topics(new_topic)
    act = ActuatorProcess(stack_info=stack_info, topics=topics, fleet=fleet, key=key, schema=schema,
                          log_path=tmp_path / "actuator.log").start()
    admin = bus_settings("admin")
    producer = BusProducer(admin)
    try:
        wait_for(act.healthy, 60, "the actuator's /health")
        fleet.post("/faults", {"kind": "bad_deploy", "service": "checkout"})
        fleet.post("/advance", {"seconds": 30})
        pending = approval_request("rollback_deploy", {"service": "checkout"})
        producer.send(pending, key=pending.action_id, topic=topics.pending)
        shadows = read_topic(admin, topics.shadow, lambda got: len(got) >= 1)
        assert [(s.action_id, s.outcome, s.slo_met_after) for s in shadows] == [(pending.action_id, "predicted", True)]
        assert json.loads(shadows[0].prediction_json)["summary"]["verdict"] == "recovers"

        good = authorization(key, "rollback_deploy", {"service": "checkout"}, action_id=pending.action_id)
        forged = authorization(key, sign_with=Ed25519PrivateKey.generate())
        now = datetime.now(timezone.utc)
        producer.send(KillSwitchChanged(event_id=str(uuid.uuid4()), correlation_id="c", occurred_at=now,
                                        scope="service:payment", engaged=True, changed_by="oncall-1"),
                      key="service:payment", topic=topics.kill_switch)
        killed = authorization(key, params={"service": "payment", "replicas": 3})
        time.sleep(2)  # let the kill switch loop apply the switch first (its own consumer)
        for rec in (good, forged, killed, good.model_copy(update={"event_id": str(uuid.uuid4())})):
            producer.send(rec, key=rec.action_id, topic=topics.authorized)
        out = read_topic(admin, topics.executions, lambda got: len(got) >= 4)
        by = {(r.authorization_id, r.outcome): r for r in out}
        assert (good.authorization_id, "executed") in by
        assert by[(forged.authorization_id, "refused")].reason.startswith("signature")
        assert by[(killed.authorization_id, "refused")].reason.startswith("kill_switch")
        assert by[(good.authorization_id, "refused")].reason.startswith("replay")
        assert fleet.executions(good.action_id) == 1 and fleet.get("/actions/log")["total_executions"] == 1
        history = fleet.get("/state")["services"]["checkout"]["deploy_history"]
        assert history[-1]["kind"] == "rollback", history

        fleet.post("/advance", {"seconds": 61})
        verified = read_topic(admin, topics.verifications, lambda got: len(got) >= 1)
        assert [(v.action_id, v.outcome) for v in verified] == [(good.action_id, "verified")]
        metrics = httpx.get(f"http://127.0.0.1:{act.port}/metrics", timeout=5).text
        assert 'pilothouse_actuator_executions_total{outcome="executed"} 1.0' in metrics
    finally:
        code = act.stop()
        producer.flush(5)
    assert code == 0, (tmp_path / "actuator.log").read_text()[-3000:]


def test_kill_switch_engaged_before_start_is_honoured_from_the_first_record(stack_info, bus_settings, new_topic,
                                                                            fleet, schema, tmp_path):
    """A fresh actuator (empty database) must not execute before it has read the kill-switch topic to its end."""
    key = Ed25519PrivateKey.generate()
    topics = Topics(new_topic)
    admin = bus_settings("admin")
    producer = BusProducer(admin)
    now = datetime.now(timezone.utc)
    for i in range(50):  # some history before the switch that matters
        producer.produce(KillSwitchChanged(event_id=str(uuid.uuid4()), correlation_id="c", occurred_at=now,
                                           scope=f"service:svc-{i}", engaged=i % 2 == 0, changed_by="oncall-1"),
                         key=f"service:svc-{i}", topic=topics.kill_switch)
    producer.produce(KillSwitchChanged(event_id=str(uuid.uuid4()), correlation_id="c", occurred_at=now,
                                       scope="global", engaged=True, changed_by="oncall-1", reason="drill"),
                     key="global", topic=topics.kill_switch)
    recs = [authorization(key, params={"service": s, "replicas": 4}) for s in ("cart", "payment", "shipping")]
    for r in recs:  # already waiting when the actuator starts
        producer.produce(r, key=r.action_id, topic=topics.authorized)
    producer.flush(30)
    act = ActuatorProcess(stack_info=stack_info, topics=topics, fleet=fleet, key=key, schema=schema,
                          log_path=tmp_path / "actuator.log").start()
    try:
        out = read_topic(admin, topics.executions, lambda got: len(got) >= 3)
    finally:
        assert act.stop() == 0, (tmp_path / "actuator.log").read_text()[-3000:]
    assert sorted((r.action_id, r.outcome, r.reason.split(":")[0]) for r in out) == sorted(
        (r.action_id, "refused", "kill_switch") for r in recs)
    assert fleet.get("/actions/log")["total_executions"] == 0


def test_outbox_relay_publishes_in_order_and_sets_aside_what_cannot_be_published(stack_info, bus_settings,
                                                                                   new_topic, schema):
    from pilothouse.actuator.outbox import OutboxRelay
    from pilothouse.bus.records import ActionExecuted

    topic = new_topic(1)
    store = Store(stack_info.postgres_dsn, schema)
    store.migrate()
    now = datetime.now(timezone.utc)

    def executed(i: int) -> ActionExecuted:
        return ActionExecuted(event_id=f"ev-{i}-{uuid.uuid4().hex[:6]}", incident_id="i", correlation_id="i",
                              occurred_at=now, execution_id=f"x-{i}", action_id=f"a-{i}", authorization_id="au",
                              action_hash="h", outcome="executed", started_at=now, finished_at=now)

    recs = [executed(i) for i in range(5)]
    with store.transaction() as tx:
        for i, r in enumerate(recs):
            # Row 2 names a topic outside the catalogue (a misconfiguration): it must not block rows 3 and 4.
            target = "pilothouse.nowhere.v1" if i == 2 else topic
            tx.enqueue(target, r.action_id, type(r).AVRO_NAME, r.event_id, r.model_dump(mode="json"))
    relay = OutboxRelay(store, BusProducer(bus_settings("admin")))
    assert relay.run_once() == 5 and relay.sent == 4
    assert relay.run_once() == 0
    got = read_topic(bus_settings("admin"), topic, lambda g: len(g) >= 4, timeout_s=30)
    assert [g.event_id for g in got] == [r.event_id for i, r in enumerate(recs) if i != 2]
    with store.transaction() as tx:
        aside = tx._all("SELECT event_id, error FROM {s}.outbox WHERE error IS NOT NULL")
    assert [a["event_id"] for a in aside] == [recs[2].event_id] and "catalogue" in aside[0]["error"]
    store.close()

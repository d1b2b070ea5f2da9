"""The policy service end to end through the real broker: records in on uuid-named topics, the service's
TransactionalProcessor (real OPA, real Postgres), decisions / requests / signed authorizations out, read back with
``read_committed``. Also: the broker lets no other principal write signed authorizations.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from pilothouse.bus import authorization
from pilothouse.bus.actions import action_hash
from pilothouse.bus.errors import NotAuthorized
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import ActionAuthorized, ApprovalRequested, PolicyDecided
from pilothouse.bus.serde import Serde
from pilothouse.policy.__main__ import RECORDS, build_handlers, build_processor
from pilothouse.policy.adapters.opa import local_opa_server
from pilothouse.policy.adapters.postgres import Store, StoreError
from pilothouse.policy.config import Settings

from tests.integration import test_policy_service_records as r

POLICIES = Path(__file__).resolve().parents[2] / "policies"

pytestmark = pytest.mark.integration


def read_all(bus, topics: list[str], want: int, timeout_s: float = 40.0) -> list:
    """Read committed records from ``topics`` until ``want`` arrived (or time out); decoded with the bus Serde."""
    consumer = Consumer({**bus.librdkafka(), "group.id": f"test.{uuid.uuid4().hex[:12]}",
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                         "enable.auto.commit": False})
    consumer.subscribe(topics)
    serde, out, deadline = Serde(), [], time.monotonic() + timeout_s
    try:
        while len(out) < want and time.monotonic() < deadline:
            m = consumer.poll(0.5)
            if m is None or m.error():
                continue
            out.append((m.topic(), serde.decode(m.value()).record if not m.topic().endswith(".dlq") else m))
    finally:
        consumer.close()
    return out


@pytest.fixture
def running(stack_info, bus_settings, new_topic, tmp_path) -> Iterator[tuple[Settings, Ed25519PrivateKey, BusProducer]]:
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    topics = {f"topic_{p}": new_topic() for p in [*RECORDS, "decisions", "pending", "authorized"]}
    with local_opa_server(POLICIES) as engine:
        settings = Settings(postgres_dsn=stack_info.postgres_dsn, postgres_schema=f"test_policy_{uuid.uuid4().hex[:10]}",
                            signing_key=base64.b64encode(raw).decode(), opa_url=engine.endpoint,
                            group_prefix=f"test.{uuid.uuid4().hex[:10]}", batch_size=10,
                            human_keys=r.registry_file(tmp_path), **topics)
        store = Store(settings.postgres_dsn.get_secret_value(), settings.postgres_schema)
        store.migrate()
        processor = build_processor(settings, bus_settings("admin"), build_handlers(settings, store, engine))
        thread = threading.Thread(target=processor.run, daemon=True)
        thread.start()
        producer = BusProducer(bus_settings("admin"))
        try:
            yield settings, key, producer
        finally:
            processor.stop()
            thread.join(30)
            processor.close()
            store.drop()
            store.close()


def wait_applied(settings: Settings, check, timeout_s: float = 30.0) -> None:
    """Records on different topics are not ordered: wait until the service's state shows ``check``."""
    store = Store(settings.postgres_dsn.get_secret_value(), settings.postgres_schema)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                with store.transaction() as tx:
                    if check(tx):
                        return
            except StoreError:  # the service has not created its tables yet
                pass
            time.sleep(0.2)
        pytest.fail("the service did not apply the records in time")
    finally:
        store.close()


def send(producer: BusProducer, topic: str, record, key: str) -> None:
    producer.send(record, key=key, topic=topic, timeout=20)


def test_proposal_to_signed_authorization_through_kafka(running, bus_settings):
    settings, key, producer = running
    inc, hyp = f"inc-{uuid.uuid4().hex[:6]}", f"hyp-{uuid.uuid4().hex[:6]}"
    send(producer, settings.topic_incidents, r.incident(inc), inc)
    p = r.proposal(inc, hyp)
    send(producer, settings.topic_proposals, p, inc)  # held at Gate 1 ...
    assert read_all(bus_settings("admin"), [settings.topic_decisions], want=1)
    send(producer, settings.topic_validations, r.validation(inc, hyp), inc)  # ... until a human validates
    outs = read_all(bus_settings("admin"), [settings.topic_decisions, settings.topic_pending], want=3)
    decisions = [rec for t, rec in outs if isinstance(rec, PolicyDecided)]
    assert [d.outcome for d in decisions] == ["waiting", "pending_approval"]
    (req,) = [rec for t, rec in outs if isinstance(rec, ApprovalRequested)]
    assert req.approvers_needed == 2 and req.action_hash == p.action_hash

    # Refused on the way: another action's hash, and the same human twice (case variant).
    send(producer, settings.topic_approvals, r.approval(p, "alice", action_hash_="e" * 64), p.action_id)
    send(producer, settings.topic_approvals, r.approval(p, "alice"), p.action_id)
    send(producer, settings.topic_approvals, r.approval(p, "ALICE"), p.action_id)
    send(producer, settings.topic_approvals, r.approval(p, "bob"), p.action_id)
    outs = read_all(bus_settings("admin"), [settings.topic_decisions, settings.topic_authorized], want=2 + 4 + 1)
    approval_decisions = [rec for t, rec in outs if isinstance(rec, PolicyDecided) and rec.stage == "approval"]
    assert [d.outcome for d in approval_decisions] == ["waiting", "waiting", "waiting", "authorized"]
    assert any("hash_mismatch" in x for x in approval_decisions[0].reasons)
    assert any("duplicate_approver" in x for x in approval_decisions[2].reasons)
    (auth,) = [rec for t, rec in outs if isinstance(rec, ActionAuthorized)]
    assert auth.decision_id == approval_decisions[-1].decision_id and len(auth.approval_ids) == 2
    # The actuator's check: trusted key, unexpired, bound to the action it hashes itself.
    expected = action_hash(auth.action_type, auth.target_kind, auth.target, orjson.loads(auth.params_json))
    authorization.verify({auth.key_id: key.public_key()}, auth, now=r.now(), expected_action_hash=expected)
    forged = auth.model_copy(update={"params_json": '{"service": "payments"}'})
    with pytest.raises(authorization.AuthorizationInvalid):
        authorization.verify({auth.key_id: key.public_key()}, forged, now=r.now(), expected_action_hash=expected)


def test_kill_switch_and_bad_records_through_kafka(running, bus_settings):
    settings, _key, producer = running
    inc, hyp = f"inc-{uuid.uuid4().hex[:6]}", f"hyp-{uuid.uuid4().hex[:6]}"
    send(producer, settings.topic_kill_switch, r.kill_switch("global"), "global")
    send(producer, settings.topic_validations, r.validation(inc, hyp), inc)
    wait_applied(settings, lambda tx: "global" in tx.engaged_scopes() and tx.validations(hyp))
    send(producer, settings.topic_proposals, r.proposal(inc, hyp, action_type="collect_diagnostics"), inc)
    bad = r.proposal(inc, hyp, tamper_hash=True)
    send(producer, settings.topic_proposals, bad, inc)
    producer.produce_bytes(settings.topic_approvals, b"\x00not avro", key=b"x")
    producer.flush(10)
    outs = read_all(bus_settings("admin"), [settings.topic_decisions, settings.topic_authorized,
                                             settings.topic_proposals + ".dlq", settings.topic_approvals + ".dlq"],
                    want=3)
    (d,) = [rec for t, rec in outs if isinstance(rec, PolicyDecided)]
    assert d.outcome == "denied" and any(x.startswith("kill_switch_global:") for x in d.reasons)
    assert not [rec for t, rec in outs if isinstance(rec, ActionAuthorized)]
    dead = {t: dict(m.headers()) for t, m in outs if t.endswith(".dlq")}
    assert b"action_hash" in dead[settings.topic_proposals + ".dlq"]["pilothouse.dlq.reason"]
    assert dead[settings.topic_approvals + ".dlq"]["pilothouse.dlq.error_class"] == b"DecodeError"


def test_only_policy_may_write_authorizations(bus_settings):
    """The first lock: broker ACLs. (The second, signatures, is verified above.)"""
    inc = f"inc-{uuid.uuid4().hex[:6]}"
    p = r.proposal(inc, "hyp-acl")
    t = r.now()
    forged = ActionAuthorized(
        event_id=r.eid(), incident_id=inc, correlation_id=inc, occurred_at=t, producer="reasoning",
        authorization_id=r.eid(), action_id=p.action_id, action_hash=p.action_hash, action_type=p.action_type,
        target_kind=p.target_kind, target=p.target, params_json=p.params_json, decision_id="dec-forged",
        bundle_revision="x", input_sha256="0" * 64, issued_at=t, expires_at=t, key_id="ed25519:forged", signature="x")
    for principal in ("reasoning", "console", "actuator"):
        with pytest.raises(NotAuthorized):
            BusProducer(bus_settings(principal)).send(forged, key=p.action_id, timeout=20)


def test_python_m_pilothouse_policy_starts_decides_and_stops(stack_info, bus_settings, new_topic, tmp_path):
    """The real process: settings from the environment, tables created, OPA checked, one decision, clean SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    from pilothouse.policy.adapters.opa import _free_port

    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    topics = {f"topic_{p}": new_topic() for p in [*RECORDS, "decisions", "pending", "authorized"]}
    bus = bus_settings("admin")
    schema = f"test_policy_{uuid.uuid4().hex[:10]}"
    with local_opa_server(POLICIES) as engine:
        env = {**os.environ, "PILOTHOUSE_POLICY_POSTGRES_DSN": stack_info.postgres_dsn,
               "PILOTHOUSE_POLICY_POSTGRES_SCHEMA": schema, "PILOTHOUSE_POLICY_SIGNING_KEY": base64.b64encode(raw).decode(),
               "PILOTHOUSE_POLICY_OPA_URL": engine.endpoint, "PILOTHOUSE_POLICY_GROUP_PREFIX": f"test.{uuid.uuid4().hex[:8]}",
               "PILOTHOUSE_POLICY_OBSERVABILITY_PORT": str(_free_port()),
               "PILOTHOUSE_POLICY_HUMAN_KEYS": str(r.registry_file(tmp_path)),
               "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": bus.bootstrap_servers, "PILOTHOUSE_KAFKA_USERNAME": bus.username,
               "PILOTHOUSE_KAFKA_PASSWORD": bus.password.get_secret_value(),
               "PILOTHOUSE_KAFKA_SECURITY_PROTOCOL": bus.security_protocol,
               "PILOTHOUSE_KAFKA_SASL_MECHANISM": bus.sasl_mechanism,
               **{f"PILOTHOUSE_POLICY_{k.upper()}": v for k, v in topics.items()}}
        proc = subprocess.Popen([sys.executable, "-m", "pilothouse.policy"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            inc, hyp = f"inc-{uuid.uuid4().hex[:6]}", f"hyp-{uuid.uuid4().hex[:6]}"
            producer = BusProducer(bus)
            send(producer, topics["topic_validations"], r.validation(inc, hyp), inc)
            wait_applied(Settings(postgres_dsn=stack_info.postgres_dsn, postgres_schema=schema,
                                  signing_key=base64.b64encode(raw).decode()), lambda tx: tx.validations(hyp))
            send(producer, topics["topic_proposals"], r.proposal(inc, hyp, action_type="collect_diagnostics"), inc)
            outs = read_all(bus, [topics["topic_authorized"]], want=1)
            assert [type(rec).__name__ for _, rec in outs] == ["ActionAuthorized"]
        finally:
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=60)[0].decode(errors="replace")
            Store(stack_info.postgres_dsn, schema).drop()
        assert proc.returncode == 0, output[-3000:]


def test_python_m_pilothouse_policy_refuses_to_start_without_settings():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PILOTHOUSE_POLICY_")}
    done = subprocess.run([sys.executable, "-m", "pilothouse.policy"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "cannot start" in done.stderr and "signing_key" in done.stderr.lower()

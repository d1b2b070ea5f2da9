"""The console against the real broker: it reads the upstream topics as the console principal, its decisions land on
its own topics only after the broker acknowledged them, and the broker refuses it everything else.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import httpx
import pytest

from pilothouse.bus import attestation
from pilothouse.bus.errors import NotAuthorized
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated, LedgerEntry
from tests.e2e.console_harness import (
    HUMAN_KEYS,
    RunningConsole,
    password_of,
    publish,
    read_topic_until,
    write_human_keys,
    write_users_file,
)
from tests.e2e.console_world import World

APPROVALS = "pilothouse.console.approvals.v1"
VALIDATIONS = "pilothouse.console.hypothesis-validations.v1"


def find_on_topic(bus_settings, topic: str, event_id: str, timeout_s: float = 30.0):
    """Read ``topic`` as admin from the beginning until the record with ``event_id`` shows up."""
    found = read_topic_until(bus_settings("admin"), topic, lambda r: r.event_id == event_id, timeout_s=timeout_s)
    return found[0] if found else None


def post_signed(c: httpx.Client, csrf: str, user: str, path: str, body: dict) -> httpx.Response:
    """The person's client: asked to sign (428), sign the statement with their own key and send again."""
    r = c.post(path, json=body, headers={"X-CSRF-Token": csrf})
    if r.status_code != 428:
        return r
    signed = attestation.answer_statement(HUMAN_KEYS[user], r.json()["statement"], {})
    return c.post(path, json={**body, **signed}, headers={"X-CSRF-Token": csrf})


def login(c: httpx.Client, user: str) -> str:
    r = c.post("/api/session", json={"username": user, "password": password_of(user)})
    assert r.status_code == 200, r.text
    return r.json()["csrf_token"]


@pytest.fixture
def users_file(tmp_path):
    return write_users_file(tmp_path)


def test_console_principal_cannot_write_authorizations(bus_settings):
    w = World()
    console = BusProducer(bus_settings("console"))
    with pytest.raises(NotAuthorized):
        console.send(w.authorized(["a1"]), key=w.action_id, timeout=20)
    with pytest.raises(NotAuthorized):
        console.send(w.pending(), key=w.action_id, timeout=20)  # nor fake a policy request
    # Control: the same credentials may write the console's own topic, so the refusals above are the ACLs at work.
    now = datetime.now(timezone.utc)
    ok = ApprovalRecorded(event_id="ctl-" + w.tag, incident_id=w.incident_id, correlation_id=w.incident_id,
                          occurred_at=now, producer="console", approval_id="ctl-" + w.tag, action_id=w.action_id,
                          action_hash=w.hash, decision="reject", approver_id="control-test",
                          comment="ACL control record from tests/integration/test_console_bus.py", expires_at=now)
    console.send(ok, key=w.action_id, timeout=20)


def test_decisions_over_http_land_on_the_console_topics(bus_settings, users_file, tmp_path):
    w = World()
    registry = write_human_keys(tmp_path)
    with RunningConsole(bus_settings("console"), users_file, human_keys=registry) as rc:
        publish(bus_settings("admin"), w.upstream())
        rc.wait_for(lambda m: w.action_id in m.pending and w.h1 in str(m.hypotheses.get(w.incident_id)),
                    what="the upstream records")
        with httpx.Client(base_url=rc.url) as rita, httpx.Client(base_url=rc.url) as alice:
            r = post_signed(rita, login(rita, "rita"), "rita", f"/api/hypotheses/{w.h1}/decision",
                            {"verdict": "validated", "comment": "deploy"})
            assert r.status_code == 201, r.text
            validation_id = r.json()["event_id"]
            csrf = login(alice, "alice")
            r = post_signed(alice, csrf, "alice", f"/api/actions/{w.action_id}/decision",
                            {"decision": "approve", "action_hash": w.hash, "comment": "shadow looks right"})
            assert r.status_code == 201, r.text
            approval_event = r.json()["event_id"]
            again = alice.post(f"/api/actions/{w.action_id}/decision",
                               json={"decision": "approve", "action_hash": w.hash}, headers={"X-CSRF-Token": csrf})
            assert again.status_code == 409 and again.json()["code"] == "duplicate_approver"

    rec = find_on_topic(bus_settings, APPROVALS, approval_event)
    assert isinstance(rec, ApprovalRecorded)
    assert (rec.approver_id, rec.action_id, rec.action_hash, rec.decision) == ("alice", w.action_id, w.hash,
                                                                               "approve")
    assert rec.producer == "console" and rec.causation_id == w.events["pending-0"]
    val = find_on_topic(bus_settings, VALIDATIONS, validation_id)
    assert isinstance(val, HypothesisValidated) and (val.validator_id, val.verdict) == ("rita", "validated")
    # The signatures survived the broker unchanged: they verify as policy checks them.
    humans = attestation.HumanKeyRegistry.from_file(registry)
    assert humans.verify(rec).signer == "alice" and humans.verify(val).signer == "rita"


def test_a_restarted_console_learns_past_approvals_from_the_ledger(bus_settings, users_file, new_topic):
    """The console does not consume its own topics; the ledger's copy of an approval stops a second one.

    The ledger entry goes to a ``test.<uuid>`` topic, never the real ledger topic (a hand-made entry there would stop
    the ledger's mirror); only the admin principal can read test topics, so this console runs as admin.
    """
    ledger_topic = new_topic()
    w = World()
    now = datetime.now(timezone.utc)
    earlier = ApprovalRecorded(event_id=f"ev-{w.tag}", incident_id=w.incident_id, correlation_id=w.incident_id,
                               occurred_at=now, producer="console", approval_id=f"ap-{w.tag}",
                               action_id=w.action_id, action_hash=w.hash, decision="approve", approver_id="Bob",
                               expires_at=w.now + w.expires_in)
    payload = json.dumps(earlier.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    entry = LedgerEntry(event_id=f"le-{w.tag}", incident_id=w.incident_id, correlation_id=w.incident_id,
                        causation_id=earlier.event_id, occurred_at=now, producer="ledger", chain=f"test-{w.tag}",
                        sequence=0, entry_key=f"test-{w.tag}:0", prev_hash="0" * 64, entry_hash="1" * 64,
                        recorded_event_id=earlier.event_id, recorded_topic=APPROVALS,
                        recorded_type=ApprovalRecorded.AVRO_NAME, payload_json=payload,
                        payload_sha256=hashlib.sha256(payload.encode()).hexdigest())
    admin = BusProducer(bus_settings("admin"))
    publish(bus_settings("admin"), w.upstream(), admin)
    admin.send(entry, key=entry.entry_key, topic=ledger_topic)
    with RunningConsole(bus_settings("admin"), users_file, topics={"ledger_entries": ledger_topic}) as rc:
        rc.wait_for(lambda m: w.action_id in m.pending and m.approvals.get(w.action_id), what="the ledger entry")
        with httpx.Client(base_url=rc.url) as bob:
            r = bob.post(f"/api/actions/{w.action_id}/decision",
                         json={"decision": "approve", "action_hash": w.hash}, headers={"X-CSRF-Token": login(bob, "bob")})
        assert r.status_code == 409 and r.json()["code"] == "duplicate_approver"
        assert rc.model.ledger.last_sequence is not None


def test_the_service_process_serves_and_stops_cleanly_on_sigterm(bus_settings, stack_info, users_file, tmp_path):
    """``python -m pilothouse.console`` as deployed: settings from the environment, /health, login, SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.e2e.console_harness import free_port

    port, obs = free_port(), free_port()
    env = {**os.environ,
           "PILOTHOUSE_CONSOLE_USERS_FILE": str(users_file), "PILOTHOUSE_CONSOLE_SESSION_SECRET": "p" * 40,
           "PILOTHOUSE_CONSOLE_PORT": str(port), "PILOTHOUSE_CONSOLE_OBSERVABILITY_PORT": str(obs),
           "PILOTHOUSE_CONSOLE_SECURE_COOKIES": "false",
           "PILOTHOUSE_CONSOLE_CONSUMER_GROUP": f"pilothouse.console.test-{os.getpid()}-{port}",
           "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": stack_info.kafka.bootstrap_servers,
           "PILOTHOUSE_KAFKA_USERNAME": "console",
           "PILOTHOUSE_KAFKA_PASSWORD": stack_info.password("console")}
    proc = subprocess.Popen([sys.executable, "-m", "pilothouse.console"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{obs}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "console did not become healthy"
            time.sleep(0.2)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert login(c, "ada")
            assert c.get("/api/incidents").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_settings_exit_2_with_the_reason(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTHOUSE_CONSOLE_")}
    env["PILOTHOUSE_CONSOLE_SESSION_SECRET"] = "short"
    r = subprocess.run([sys.executable, "-m", "pilothouse.console"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "bad settings" in r.stderr and "users_file" in r.stderr


def test_missing_kafka_credentials_exit_2(users_file):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PILOTHOUSE_CONSOLE_", "PILOTHOUSE_KAFKA_"))}
    env.update(PILOTHOUSE_CONSOLE_USERS_FILE=str(users_file), PILOTHOUSE_CONSOLE_SESSION_SECRET="p" * 40)
    r = subprocess.run([sys.executable, "-m", "pilothouse.console"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "PILOTHOUSE_KAFKA_USERNAME" in r.stderr

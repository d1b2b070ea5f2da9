"""Policy authoring loop against the real OPA, Postgres and broker: OPA (``--watch``) reloads an edited policy without
a restart, and ``pilothouse policy replay`` reports what the edit changes for past decisions (from the policy
service's Postgres record and from a decisions topic)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import PolicyDecided
from pilothouse.policy.adapters.opa import OpaPolicyEngine, local_opa_server
from pilothouse.policy.adapters.postgres import Store
from pilothouse.policy.handlers import PolicyHandlers, Topics
from pilothouse.policy.replay import main as replay_main

from tests.integration import test_policy_service_records as r

POLICIES = Path(__file__).resolve().parents[2] / "policies"

pytestmark = pytest.mark.integration


@pytest.fixture
def policies_copy(tmp_path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


@pytest.fixture
def watched(policies_copy) -> Iterator[OpaPolicyEngine]:
    with local_opa_server(policies_copy, watch=True) as engine:
        yield engine


@pytest.fixture
def store(stack_info) -> Iterator[Store]:
    s = Store(stack_info.postgres_dsn, f"test_policy_{uuid.uuid4().hex[:10]}")
    s.migrate()
    yield s
    s.drop()
    s.close()


def make_decisions(store: Store, engine: OpaPolicyEngine) -> list[PolicyDecided]:
    """A read-only auto-allowed action and a high-risk one pending two approvers, through the real handlers."""
    h = PolicyHandlers(store=store, engine=engine, signing_key=Ed25519PrivateKey.generate(),
                       topics=Topics("d", "p", "a"), humans=r.registry)
    out: list = []
    for n, rec in enumerate([r.incident("inc-rp"), r.validation("inc-rp", "hyp-rp"),
                             r.proposal("inc-rp", "hyp-rp", action_type="collect_diagnostics"),
                             r.proposal("inc-rp", "hyp-rp")]):
        handler = {"IncidentUpdated": h.on_incident, "HypothesisValidated": h.on_validation,
                   "ActionProposed": h.on_proposal}[type(rec).__name__]
        out += [o.record for o in handler(rec, MessageContext("in", 0, n, None))]
    decided = [o for o in out if isinstance(o, PolicyDecided)]
    assert [d.outcome for d in decided] == ["auto_allowed", "pending_approval"]
    return decided


def edit_policy(policies: Path) -> None:
    """The edit under test: read-only diagnostics now cost more than any budget; high risk needs three approvers."""
    path = policies / "pilothouse/config/data.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["risk"]["read_only_cost"] = 1000
    config["tiers"]["high"]["approvers"] = 3
    path.write_text(json.dumps(config), encoding="utf-8")


def wait_for_reload(engine: OpaPolicyEngine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.evaluate("pilothouse/config/risk/read_only_cost", {}) == 1000:
            return
        time.sleep(0.2)
    pytest.fail("OPA did not reload the edited policy (is --watch on?)")


def test_watch_reloads_edit_and_replay_reports_changes(watched, policies_copy, store, capsys):
    decided = make_decisions(store, watched)
    args = ["--source", "postgres", "--dsn", store.dsn, "--schema", store.schema, "--opa-url", watched.endpoint]
    assert replay_main(args) == 0  # nothing changed yet
    assert "0 would change" in capsys.readouterr().err

    edit_policy(policies_copy)
    wait_for_reload(watched)  # same OPA process, no restart
    from pilothouse.policy.domain import parse_policy_input
    again = watched.decide("proposal", parse_policy_input(decided[0].input_json)).decision
    assert again.outcome == "deny" and "budget_exhausted" in again.reason_codes

    assert replay_main(args) == 1
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2, captured.out
    assert "auto_allowed -> denied (allowed -> denied)" in lines[0] and "+budget_exhausted" in lines[0]
    assert "approvers 2 -> 3" in lines[1] and "pending_approval" not in lines[1].split("]")[1]
    assert "allowed -> denied: 1" in captured.err

    # --since after both decisions: nothing to replay.
    later = (decided[-1].occurred_at.timestamp() + 1)
    from datetime import UTC, datetime
    assert replay_main([*args, "--since", datetime.fromtimestamp(later, UTC).isoformat()]) == 0


def test_replay_from_a_decisions_topic(watched, policies_copy, store, stack_info, bus_settings, new_topic,
                                       monkeypatch, capsys):
    decided = make_decisions(store, watched)
    topic = new_topic()
    producer = BusProducer(bus_settings("admin"))
    for d in decided:
        producer.send(d, key=d.incident_id, topic=topic, timeout=20)
    tampered = decided[1].model_copy(update={"event_id": r.eid(), "input_json": decided[1].input_json.replace(
        '"severity":"sev2"', '"severity":"sev4"')})
    producer.send(tampered, key=tampered.incident_id, topic=topic, timeout=20)
    producer.produce_bytes(topic, b"\x00garbage", key=b"x")
    producer.flush(10)
    bus = bus_settings("admin")
    for name, value in {"BOOTSTRAP_SERVERS": bus.bootstrap_servers, "USERNAME": bus.username,
                        "PASSWORD": bus.password.get_secret_value(), "SECURITY_PROTOCOL": bus.security_protocol,
                        "SASL_MECHANISM": bus.sasl_mechanism}.items():
        monkeypatch.setenv(f"PILOTHOUSE_KAFKA_{name}", value)
    edit_policy(policies_copy)
    wait_for_reload(watched)
    assert replay_main(["--source", "kafka", "--topic", topic, "--opa-url", watched.endpoint]) == 1
    captured = capsys.readouterr()
    assert "auto_allowed -> denied" in captured.out
    assert "NOT REPLAYED: input_json does not hash to input_sha256" in captured.out
    assert "skipped:" in captured.err and "replayed 3 decision(s)" in captured.err

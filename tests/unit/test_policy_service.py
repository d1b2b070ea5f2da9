"""Pure parts of the policy service: settings, the freeze calendar, service-side domain helpers, replay reporting,
and the adapter's HTTP/1.1 keep-alive client against a real (stdlib) HTTP server."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pilothouse.bus.records import ApprovalRecorded, PolicyDecided
from pilothouse.policy.adapters.opa import KeepAliveConnection, OpaPolicyEngine
from pilothouse.policy.config import FreezeCalendar, Settings
from pilothouse.policy.domain import (
    Decision,
    DecisionRecord,
    PolicyEngineUnavailable,
    PolicyInputInvalid,
    budget_window,
    held_at_gate1,
    kill_switch_from_scopes,
    parse_freeze_windows,
    rejection_from_record,
    service_stage_and_outcome,
    target_service,
)
from pilothouse.policy.replay import Replayed, replay

KEY = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="  # RFC 8032 test vector 1 secret key, base64


def settings(**kw) -> Settings:
    return Settings(**{"postgres_dsn": "postgresql://u:pw@h/db", "signing_key": KEY, **kw})


# -- settings ---------------------------------------------------------------------------------------------------


def test_settings_from_environment_hide_secrets(monkeypatch):
    monkeypatch.setenv("PILOTHOUSE_POLICY_POSTGRES_DSN", "postgresql://u:hunter2@h/db")
    monkeypatch.setenv("PILOTHOUSE_POLICY_SIGNING_KEY", KEY)
    monkeypatch.setenv("PILOTHOUSE_POLICY_INSTANCE_ID", "policy-2")
    s = Settings()
    assert "hunter2" not in repr(s) and KEY not in repr(s)
    assert s.group_id == "pilothouse.policy.decide"
    assert s.transactional_id == "pilothouse.policy.decide.policy-2"
    assert s.topic_authorized == "pilothouse.policy.authorized-actions.v1"


@pytest.mark.parametrize("bad", [{"group_prefix": "pilothouse.actuator"}, {"signing_key": " "},
                                 {"environment": "prod"}, {"authorization_ttl_s": 0}])
def test_settings_refuse_what_the_broker_or_the_policy_would_refuse(bad):
    with pytest.raises(ValueError):
        settings(**bad)


def test_settings_topics_match_the_catalogue_acls():
    from pilothouse.bus.catalogue import load_catalogue
    from pilothouse.policy.__main__ import RECORDS, consumed_topics

    cat = load_catalogue()
    s = settings()
    for purpose, topic in consumed_topics(s).items():
        assert "policy" in cat.topics[topic].consumers, topic
        assert cat.topics[topic].record == RECORDS[purpose]
    for topic in (s.topic_decisions, s.topic_pending, s.topic_authorized):
        assert list(cat.topics[topic].producers) == ["policy"], topic


# -- freeze calendar --------------------------------------------------------------------------------------------


def test_freeze_calendar_reloads_on_change_and_keeps_last_good(tmp_path: Path):
    path = tmp_path / "freezes.yaml"
    path.write_text("- {name: a, start: '2026-12-01T00:00:00Z', end: '2026-12-02T00:00:00Z'}\n")
    cal = FreezeCalendar(path)
    assert [w.name for w in cal.windows()] == ["a"]
    path.write_text("freeze_windows:\n- {name: b, start: '2026-12-01T00:00:00Z', end: '2026-12-02T00:00:00Z'}\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert [w.name for w in cal.windows()] == ["b"]
    path.write_text("- {name: c, start: 'not a time'}\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert [w.name for w in cal.windows()] == ["b"] and "start" in (cal.last_error or "")


def test_freeze_calendar_refuses_a_bad_file_at_start(tmp_path: Path):
    path = tmp_path / "freezes.json"
    path.write_text('{"freeze_windows": 3}')
    with pytest.raises(PolicyInputInvalid):
        FreezeCalendar(path)
    assert FreezeCalendar(None).windows() == []


# -- domain helpers ----------------------------------------------------------------------------------------------


def test_budget_window_is_aligned_and_contains_now():
    now = datetime(2026, 11, 25, 21, 7, 3, tzinfo=UTC)
    assert budget_window(now, timedelta(hours=24)) == (datetime(2026, 11, 25, tzinfo=UTC),
                                                      datetime(2026, 11, 26, tzinfo=UTC))
    start, end = budget_window(now, timedelta(hours=7))
    assert start <= now < end and end - start == timedelta(hours=7)
    with pytest.raises(PolicyInputInvalid):
        budget_window(now, timedelta(0))


def test_target_service_and_kill_switch_scopes():
    assert target_service("service", "checkout", "payments") == "checkout"
    assert target_service("instance", "checkout-7", "checkout") == "checkout"
    assert target_service("instance", "checkout-7", None) == "checkout-7"
    ks = kill_switch_from_scopes({"service:checkout", "service:", "global", "team:x"})
    assert ks.global_ is True and ks.services == ["checkout"]
    assert kill_switch_from_scopes(set()).global_ is False


def test_parse_freeze_windows_refuses_garbage():
    assert parse_freeze_windows(None) == []
    with pytest.raises(PolicyInputInvalid):
        parse_freeze_windows("black friday")
    with pytest.raises(PolicyInputInvalid):
        parse_freeze_windows([{"name": "x", "start": "2026-12-01T00:00:00"}])  # naive time, no end


def _decision(entrypoint: str, outcome: str, codes: list[str]) -> Decision:
    return Decision(entrypoint=entrypoint, outcome=outcome, allow=outcome == "allow",
                    requires_approval=outcome == "pending_approval", approvers_needed=0, approvals_still_needed=0,
                    approver_roles=[], risk=None, reasons=[f"{c}: x" for c in codes], reason_codes=codes,
                    accepted_approvals=[], refused_approvals=[], action_hash="a" * 64, bundle_revision="r")


def test_gate1_hold_only_when_validation_is_the_only_block():
    held = _decision("proposal", "deny", ["approval_required", "hypothesis_not_validated"])
    assert held_at_gate1(held) and service_stage_and_outcome(held) == ("proposal", "waiting")
    killed = _decision("proposal", "deny", ["hypothesis_not_validated", "kill_switch_global"])
    assert not held_at_gate1(killed) and service_stage_and_outcome(killed) == ("proposal", "denied")
    assert service_stage_and_outcome(_decision("approvals", "pending_approval", ["approvals_pending"])) == (
        "approval", "waiting")


def test_rejection_from_record():
    t = datetime(2026, 11, 25, 12, tzinfo=UTC)
    rec = ApprovalRecorded(event_id="e", incident_id="i", correlation_id="i", occurred_at=t, approval_id="ap-1",
                           action_id="a", action_hash="b" * 64, decision="reject", approver_id="ＣＡＲＯＬ",
                           comment="no", expires_at=t)
    rej = rejection_from_record(rec)
    assert rej is not None and rej.rejecter.id == "carol" and rej.comment == "no"
    assert rejection_from_record(rec.model_copy(update={"decision": "approve"})) is None
    with pytest.raises(PolicyInputInvalid):
        rejection_from_record(rec.model_copy(update={"approver_id": "\u200b"}))


# -- replay reporting (a fake engine: replay's own logic, OPA is covered by the integration tests) -----------------


class _FakeEngine:
    def __init__(self, decision: Decision):
        self.decision = decision

    def decide(self, entrypoint, policy_input):
        return DecisionRecord(decision_id="dec-x", input_hash="c" * 64, decision=self.decision)


def _past(input_json: str, digest: str, outcome: str = "auto_allowed") -> PolicyDecided:
    t = datetime(2026, 11, 25, 12, tzinfo=UTC)
    return PolicyDecided(event_id=f"e-{outcome}-{digest[:4]}", incident_id="i", correlation_id="i", occurred_at=t,
                         decision_id="dec-1", action_id="act-1", action_hash="a" * 64, stage="proposal",
                         outcome=outcome, allow=True, requires_approval=False, reasons=["read_only_auto_allowed: x"],
                         bundle_revision="r1", input_sha256=digest, input_json=input_json)


def test_replay_reports_altered_and_invalid_inputs_without_calling_opa():
    import hashlib

    engine = _FakeEngine(_decision("proposal", "deny", ["budget_exhausted"]))
    altered = _past("{}", "0" * 64)
    invalid = _past("{}", hashlib.sha256(b"{}").hexdigest())
    out = replay(engine, [altered, invalid])
    assert "altered record" in out[0].error and "no longer validates" in out[1].error
    assert all(r.changed for r in out)


def test_replayed_line_reads_like_a_diff():
    r = Replayed("dec-1", "act-1", "2026-11-25T12:00:00+00:00", "proposal", "auto_allowed", "denied", 0, 0,
                 codes_added=["budget_exhausted"], codes_removed=["read_only_auto_allowed"])
    assert r.changed
    assert r.line().endswith("auto_allowed -> denied (allowed -> denied); +budget_exhausted; -read_only_auto_allowed")
    same = Replayed("d", "a", "t", "approval", "waiting", "waiting", 2, 2)
    assert not same.changed and same.line().endswith("unchanged")


# -- the keep-alive HTTP client against a real HTTP server ----------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: list[int] = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.connections.append(id(self.connection))
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"result": ', body, b"}"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/close"):
            payload = b'{"result": "bye"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True
        else:
            payload = b'{"code": "internal_error", "message": "boom"}'
            self.send_response(500)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_keep_alive_connection_reuses_reads_chunked_and_honours_close(server):
    conn = KeepAliveConnection("127.0.0.1", server, timeout_s=2, tls=False, headers=b"Host: x\r\n")
    _Handler.connections.clear()
    for _ in range(3):
        assert conn.post("/chunked", b'{"a":1}') == (200, b'{"result": {"a":1}}')
    assert len(set(_Handler.connections)) == 1  # one TCP connection for all three
    assert conn.post("/close", b"{}") == (200, b'{"result": "bye"}')
    assert conn.post("/chunked", b"2") == (200, b'{"result": 2}')  # reconnected after the server's close
    assert len(set(_Handler.connections)) == 2
    conn.close()


def test_engine_translates_errors(server):
    engine = OpaPolicyEngine("127.0.0.1", server, timeout_s=2)
    from pilothouse.policy.domain import PolicyEvaluationFailed

    with pytest.raises(PolicyEvaluationFailed, match="boom"):
        engine.evaluate("x/y", {})
    engine.close()
    with pytest.raises(PolicyEngineUnavailable):
        OpaPolicyEngine("127.0.0.1", 1, timeout_s=0.5).evaluate("x/y", {})


def test_keygen_prints_a_key_pair_the_actuator_settings_accept(capsys):
    import json

    from pilothouse.bus.authorization import key_id, load_private_key, load_public_key
    from pilothouse.policy.cli import main as cli_main

    assert cli_main(["keygen"]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    private = load_private_key(lines["PILOTHOUSE_POLICY_SIGNING_KEY"])
    (kid, public), = json.loads(lines["PILOTHOUSE_ACTUATOR_TRUSTED_KEYS"]).items()
    assert kid == key_id(private.public_key()) == key_id(load_public_key(public))
    assert cli_main(["nope"]) == 2

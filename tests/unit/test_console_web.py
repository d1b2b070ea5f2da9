"""The console's HTTP side in process (starlette TestClient), with a recording sink in place of Kafka.

The same decisions go through the real broker in tests/integration/test_console_bus.py and a real browser in
tests/e2e/test_console_browser.py. Here: sessions, CSRF, four-eyes refusals, hash binding, what the pages show.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

from pilothouse.bus import attestation
from pilothouse.bus.errors import DeliveryFailed
from pilothouse.bus.records import ApprovalRecorded, HypothesisValidated, KillSwitchChanged
from pilothouse.console.auth import LocalAccounts, _UserEntry
from pilothouse.console.config import ConsoleSettings
from pilothouse.console.domain import ReadModel
from pilothouse.console.web import COOKIE, Console
from tests.e2e.console_world import World

# Cheap argon2id parameters keep the unit tests fast; production hashes use argon2-cffi's defaults.
_fast = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
USERS = {
    "alice": ("approver",), "bob": ("approver",), "rita": ("responder",), "ada": ("admin",),
    "oncall-7": ("approver", "responder"),
}
# Each person's own signing key (the console never sees these; only the public halves, in the registry).
KEYS = {u: Ed25519PrivateKey.generate() for u in USERS}


class RecordingSink:
    def __init__(self) -> None:
        self.sent: list = []
        self.fail: Exception | None = None

    def send(self, record) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(record)


@pytest.fixture
def world():
    return World()


@pytest.fixture
def env(tmp_path, world):
    accounts = LocalAccounts([_UserEntry(id=u, display=u.title(), roles=r, password_hash=_fast.hash(f"pw-{u}"))
                              for u, r in USERS.items()])
    registry = tmp_path / "human-keys.json"
    registry.write_text(json.dumps({"humans": {
        u: {"roles": list(r), "keys": [{"public_key": attestation.public_key_b64(KEYS[u].public_key())}]}
        for u, r in USERS.items()}}))
    settings = ConsoleSettings(users_file=tmp_path / "unused.yaml", session_secret="s" * 40, secure_cookies=False,
                               human_keys=registry)
    model = ReadModel()
    for r in world.upstream():
        model.apply(r)
    sink = RecordingSink()
    console = Console(settings, model, sink, accounts)
    return console, model, sink


def login(console: Console, user: str) -> tuple[TestClient, str]:
    c = TestClient(console.app, base_url="http://testserver")
    r = c.post("/api/session", json={"username": user, "password": f"pw-{user}"})
    assert r.status_code == 200, r.text
    c.user = user  # whose key signs in post_signed
    return c, r.json()["csrf_token"]


def post_signed(c: TestClient, csrf: str, path: str, body: dict, key: Ed25519PrivateKey | None = None):
    """What a client does: send the decision; asked to sign (428), sign the statement with the person's own key
    and send it again. Any other answer is returned as is."""
    r = c.post(path, json=body, headers={"X-CSRF-Token": csrf})
    if r.status_code != 428:
        return r
    statement = r.json()["statement"]
    signed = attestation.answer_statement(key or KEYS[getattr(c, "user", "alice")], statement, {})
    return c.post(path, json={**body, **signed}, headers={"X-CSRF-Token": csrf})


def approve(c: TestClient, csrf: str, w: World, decision: str = "approve", **extra):
    body = {"decision": decision, "action_hash": w.hash, "comment": "ok", **extra}
    return post_signed(c, csrf, f"/api/actions/{w.action_id}/decision", body)


def test_login_sets_hardened_cookie_and_wrong_password_is_refused(env):
    console, _, _ = env
    c = TestClient(console.app)
    bad = c.post("/api/session", json={"username": "alice", "password": "nope"})
    assert bad.status_code == 401 and "wrong password" in bad.json()["error"]
    r = c.post("/api/session", json={"username": "ALICE", "password": "pw-alice"})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert r.json()["account"]["id"] == "alice"


def test_login_refuses_form_encoded_json_api(env):
    console, _, _ = env
    r = TestClient(console.app).post("/api/session", data={"username": "alice", "password": "pw-alice"})
    assert r.status_code == 415


def test_repeated_failed_logins_are_throttled(env):
    console, _, _ = env
    c = TestClient(console.app)
    for _ in range(5):
        assert c.post("/api/session", json={"username": "bob", "password": "x"}).status_code == 401
    r = c.post("/api/session", json={"username": "bob", "password": "pw-bob"})
    assert r.status_code == 429


def test_approval_is_attributed_to_the_session_and_bound_to_the_hash(env, world):
    console, _, sink = env
    c, csrf = login(console, "alice")
    r = approve(c, csrf, world, approver_id="bob")  # an approver id in the body is ignored: the session decides
    assert r.status_code == 201, r.text
    rec = sink.sent[-1]
    assert isinstance(rec, ApprovalRecorded)
    assert (rec.approver_id, rec.action_hash, rec.decision) == ("alice", world.hash, "approve")
    assert rec.expires_at <= world.now + world.expires_in
    assert rec.causation_id == world.events["pending-0"]


def test_no_session_no_decision(env, world):
    console, _, sink = env
    c = TestClient(console.app)
    r = approve(c, "whatever", world)
    assert r.status_code == 401 and sink.sent == []


def test_forged_cookie_is_not_a_session(env, world):
    console, _, sink = env
    c, csrf = login(console, "alice")
    sid = c.cookies.get(COOKIE).split(".")[0]
    c.cookies.clear()
    c.cookies.set(COOKIE, f"{sid}.{'0' * 64}")
    assert approve(c, csrf, world).status_code == 401
    assert sink.sent == []


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_missing_or_wrong_csrf_token_is_refused(env, world, token):
    console, _, sink = env
    c, _ = login(console, "alice")
    headers = {} if token is None else {"X-CSRF-Token": token}
    r = c.post(f"/api/actions/{world.action_id}/decision", json={"decision": "approve", "action_hash": world.hash},
               headers=headers)
    assert r.status_code == 403 and r.json()["code"] == "csrf"
    assert sink.sent == []


def test_csrf_token_of_another_session_is_refused(env, world):
    console, _, sink = env
    _, bob_csrf = login(console, "bob")
    c, _ = login(console, "alice")
    assert approve(c, bob_csrf, world).status_code == 403
    assert sink.sent == []


def test_cannot_approve_twice(env, world):
    console, _, sink = env
    c, csrf = login(console, "alice")
    assert approve(c, csrf, world).status_code == 201
    again = approve(c, csrf, world)
    assert again.status_code == 409 and again.json()["code"] == "duplicate_approver"
    assert len(sink.sent) == 1


def test_cannot_approve_twice_under_another_spelling_once_policy_counted_it(env, world):
    console, model, sink = env
    model.apply(world.pending(approved_by=["ONCALL-7"]))
    c, csrf = login(console, "oncall-7")
    r = approve(c, csrf, world)
    assert r.status_code == 409 and r.json()["code"] == "duplicate_approver"
    assert sink.sent == []


def test_cannot_approve_own_proposal(env):
    console, model, sink = env
    w = World(proposed_by="Alice")  # a human proposed it; stable ids compare normalised
    for r in w.upstream():
        model.apply(r)
    c, csrf = login(console, "alice")
    r = approve(c, csrf, w)
    assert r.status_code == 403 and r.json()["code"] == "self_approval"
    assert "proposed this action" in r.json()["error"]
    assert sink.sent == []


def test_validator_cannot_approve_the_action_of_the_hypothesis(env, world):
    console, model, sink = env
    c, csrf = login(console, "oncall-7")
    r = post_signed(c, csrf, f"/api/hypotheses/{world.h1}/decision",
                    {"verdict": "validated", "comment": "deploy it is"})
    assert r.status_code == 201, r.text
    assert isinstance(sink.sent[-1], HypothesisValidated) and sink.sent[-1].validator_id == "oncall-7"
    r = approve(c, csrf, world)
    assert r.status_code == 403 and r.json()["code"] == "approver_is_validator"
    assert len(sink.sent) == 1


def test_role_checks_mirror_policy(env, world):
    console, _, sink = env
    rita, rcsrf = login(console, "rita")  # responder: may validate, may not approve a high-risk action
    assert approve(rita, rcsrf, world).json()["code"] == "missing_role"
    bob, bcsrf = login(console, "bob")  # approver without responder: may not validate
    r = bob.post(f"/api/hypotheses/{world.h1}/decision", json={"verdict": "validated"},
                 headers={"X-CSRF-Token": bcsrf})
    assert r.status_code == 403 and r.json()["code"] == "missing_role"
    r = bob.post("/api/kill-switch", json={"scope": "global", "engaged": True, "reason": "x"},
                 headers={"X-CSRF-Token": bcsrf})
    assert r.status_code == 403
    assert sink.sent == []


def test_admin_flips_the_kill_switch(env):
    console, _, sink = env
    c, csrf = login(console, "ada")
    r = c.post("/api/kill-switch", json={"scope": "global", "engaged": True, "reason": "model misbehaving"},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text  # engaging only stops things: accepted without a signature
    assert isinstance(sink.sent[-1], KillSwitchChanged) and sink.sent[-1].changed_by == "ada"
    page = c.get("/status").text
    assert "ENGAGED" in page and "model misbehaving" in page
    status = c.get("/api/status").json()
    assert status["kill_switches"]["global"]["engaged"] is True
    assert status["budgets"]["checkout/24h"]["remaining"] == 22.0


def test_changed_action_hash_is_refused(env, world):
    console, _, sink = env
    c, csrf = login(console, "alice")
    r = approve(c, csrf, world, action_hash="f" * 64)
    assert r.status_code == 409 and r.json()["code"] == "hash_mismatch"
    r = c.post(f"/api/actions/{world.action_id}/decision", json={"decision": "approve"},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and r.json()["code"] == "hash_missing"
    assert sink.sent == []


def test_expired_request_is_refused(env):
    console, model, sink = env
    w = World(expires_in=timedelta(seconds=-1))
    for r in w.upstream():
        model.apply(r)
    c, csrf = login(console, "alice")
    r = approve(c, csrf, w)
    assert r.status_code == 409 and "expired" in r.json()["error"]


@pytest.mark.parametrize("body, status, code", [
    ({"decision": "maybe"}, 400, "bad_decision"),
    ({"comment": "x" * 2001}, 400, "bad_comment"),
    ({"comment": "looks fine\u200b"}, 400, "bad_comment"),
    ({"comment": 7}, 400, "bad_comment"),
])
def test_bad_input_gets_a_reason(env, world, body, status, code):
    console, _, sink = env
    c, csrf = login(console, "alice")
    r = approve(c, csrf, world, **body)
    assert (r.status_code, r.json()["code"]) == (status, code)
    assert sink.sent == []


def test_unknown_action_and_bad_json(env):
    console, _, _ = env
    c, csrf = login(console, "alice")
    r = c.post("/api/actions/nope/decision", json={"decision": "approve", "action_hash": "a"},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404
    r = c.post("/api/actions/nope/decision", content=b"{not json", headers={"X-CSRF-Token": csrf,
                                                                         "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "bad_json"


def test_broker_not_acknowledging_means_not_recorded(env, world):
    console, model, sink = env
    sink.fail = DeliveryFailed("no delivery report within 15s")
    c, csrf = login(console, "alice")
    r = approve(c, csrf, world)
    assert r.status_code == 503 and "nothing was sent" in r.json()["error"]
    assert model.approvals_of(world.action_id) == []  # not remembered as decided: the person can retry
    sink.fail = None
    assert approve(c, csrf, world).status_code == 201


def test_form_flow_with_csrf_field(env, world):
    console, _, sink = env
    c = TestClient(console.app)
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"username": "bob", "password": "pw-bob", "csrf_token": token},
               follow_redirects=False)
    assert r.status_code == 303
    page = c.get(f"/actions/{world.action_id}").text
    token2 = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert token2 != token  # a fresh session (and token) after login
    assert world.hash in page and "rollback_deploy" in page and "SLO met afterwards" in page
    r = c.post(f"/actions/{world.action_id}/decision", data={"decision": "approve", "action_hash": world.hash,
                                                              "csrf_token": "forged"})
    assert r.status_code == 403 and "CSRF" in r.text
    # The page's script asks for the statement (JSON API), signs it in the browser and submits the form with it.
    form = {"decision": "approve", "action_hash": world.hash, "csrf_token": token2}
    r = c.post(f"/actions/{world.action_id}/decision", data=form)
    assert r.status_code == 428 and "unsigned" in r.text and sink.sent == []
    st = c.post(f"/api/actions/{world.action_id}/statement", json={"decision": "approve", "action_hash": world.hash},
                headers={"X-CSRF-Token": token2}).json()
    assert st["statement"]["approver_id"] == "bob" and st["text"].startswith("pilothouse.approval.v1\n")
    signed = attestation.answer_statement(KEYS["bob"], st, {"action_hash": world.hash, "decision": "approve"})
    r = c.post(f"/actions/{world.action_id}/decision", data={**form, **signed})
    assert r.status_code == 200 and "Recorded: you approved" in r.text
    assert sink.sent[-1].approver_id == "bob" and sink.sent[-1].signature == signed["signature"]


def test_login_form_without_token_is_refused(env):
    console, _, _ = env
    c = TestClient(console.app)
    r = c.post("/login", data={"username": "bob", "password": "pw-bob"}, follow_redirects=False)
    assert r.status_code == 403
    assert c.get("/", follow_redirects=False).status_code == 303  # still not logged in


def test_incident_page_shows_hypotheses_evidence_and_redaction_as_stored(env, world):
    console, _, _ = env
    c, _ = login(console, "rita")
    page = c.get(f"/incidents/{world.incident_id}").text
    assert f'id="hyp-{world.h1}"' in page and f'id="hyp-{world.h2}"' in page
    assert f'href="#ev-{world.ev_deploy}"' in page and f'id="ev-{world.ev_deploy}"' in page
    assert "https://ci.example.test/deploys/checkout/v42" in page
    assert 'href="javascript:' not in page  # a non-web source link is shown as text, never linked
    assert "82%" in page and "inconclusive" in page and "cites evidence that does not exist" in page
    assert "[REDACTED:api_key]" in page and "&lt;PSEUDONYM_ab12&gt;" in page
    assert "Content-Security-Policy" in c.get("/").headers


def test_pages_need_a_session(env, world):
    console, _, _ = env
    c = TestClient(console.app)
    for path in ("/", f"/incidents/{world.incident_id}", f"/actions/{world.action_id}", "/status"):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.get("/api/incidents").status_code == 401
    assert c.get("/events").status_code == 401


def test_logout_ends_the_session(env, world):
    console, _, _ = env
    c, csrf = login(console, "alice")
    assert c.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert approve(c, csrf, world).status_code == 401


# ---- signatures: the console forwards a person's signature, it cannot make one ------------------------------------


def test_unsigned_decision_is_answered_with_the_statement_to_sign(env, world):
    console, _, sink = env
    c, csrf = login(console, "alice")
    r = c.post(f"/api/actions/{world.action_id}/decision", json={"decision": "approve", "action_hash": world.hash},
               headers={"X-CSRF-Token": csrf})
    assert r.status_code == 428 and r.json()["code"] == "signature_required" and "unsigned" in r.json()["error"]
    st = r.json()["statement"]
    assert st["kind"] == "approval" and st["statement"]["action_hash"] == world.hash
    assert sink.sent == []
    signed = attestation.answer_statement(KEYS["alice"], st, {"action_id": world.action_id})
    r = c.post(f"/api/actions/{world.action_id}/decision",
               json={"decision": "approve", "action_hash": world.hash, **signed}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    rec = sink.sent[-1]
    # Forwarded unchanged: the record is exactly the statement alice signed, and it verifies as policy checks it.
    assert (rec.approval_id, rec.signature, rec.key_id) == (st["statement_id"], signed["signature"], signed["key_id"])
    assert attestation.statement_of(rec) == __import__("base64").b64decode(st["signing_input"])
    # The same signature cannot be spent twice (the statement is used up).
    r = c.post(f"/api/actions/{world.action_id}/decision",
               json={"decision": "approve", "action_hash": world.hash, **signed}, headers={"X-CSRF-Token": csrf})
    assert r.status_code in (400, 409) and len(sink.sent) == 1


def test_badly_signed_decisions_are_refused_with_the_reason(env, world):
    console, _, sink = env
    c, csrf = login(console, "alice")
    body = {"decision": "approve", "action_hash": world.hash}
    path = f"/api/actions/{world.action_id}/decision"
    # Signed with bob's key while logged in as alice.
    r = post_signed(c, csrf, path, body, key=KEYS["bob"])
    assert r.status_code == 400 and r.json()["code"] == "bad_signature" and "not enrolled for alice" in r.json()["error"]
    # A key nobody enrolled.
    r = post_signed(c, csrf, path, body, key=Ed25519PrivateKey.generate())
    assert r.status_code == 400 and r.json()["code"] == "bad_signature"
    # Signed statement for "reject", sent as "approve".
    st = c.post(f"/api/actions/{world.action_id}/statement", json={"decision": "reject", "action_hash": world.hash},
                headers={"X-CSRF-Token": csrf}).json()
    signed = attestation.answer_statement(KEYS["alice"], st, {})
    r = c.post(path, json={**body, **signed}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and r.json()["code"] == "statement_mismatch"
    # Garbage and half-filled signature fields.
    r = c.post(path, json={**body, "statement_id": "x", "key_id": "y", "signature": "z"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and r.json()["code"] == "unknown_statement"
    r = c.post(path, json={**body, "signature": "z"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and r.json()["code"] == "bad_signature"
    assert sink.sent == []


def test_a_statement_of_another_session_is_refused(env, world):
    console, _, sink = env
    alice, acsrf = login(console, "alice")
    st = alice.post(f"/api/actions/{world.action_id}/statement",
                    json={"decision": "approve", "action_hash": world.hash}, headers={"X-CSRF-Token": acsrf}).json()
    bob, bcsrf = login(console, "bob")
    signed = attestation.answer_statement(KEYS["bob"], st, {})
    r = bob.post(f"/api/actions/{world.action_id}/decision",
                 json={"decision": "approve", "action_hash": world.hash, **signed}, headers={"X-CSRF-Token": bcsrf})
    assert r.status_code == 400 and r.json()["code"] == "unknown_statement" and sink.sent == []


def test_kill_switch_release_needs_the_admins_signature(env):
    console, _, sink = env
    c, csrf = login(console, "ada")
    body = {"scope": "global", "engaged": False, "reason": "all clear"}
    r = c.post("/api/kill-switch", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 428 and r.json()["statement"]["statement"]["engaged"] is False and sink.sent == []
    r = post_signed(c, csrf, "/api/kill-switch", body)
    assert r.status_code == 201, r.text
    rec = sink.sent[-1]
    assert rec.engaged is False and rec.changed_by == "ada" and rec.signature
    attestation.HumanKeyRegistry.from_file(console.settings.human_keys).verify(rec)


def test_client_refuses_to_sign_a_statement_that_says_something_else(env, world):
    console, _, _ = env
    c, csrf = login(console, "alice")
    st = c.post(f"/api/actions/{world.action_id}/statement", json={"decision": "approve", "action_hash": world.hash},
                headers={"X-CSRF-Token": csrf}).json()
    with pytest.raises(attestation.AttestationInvalid, match="differs"):
        attestation.answer_statement(KEYS["alice"], st, {"action_hash": "f" * 64})
    tampered = {**st, "signing_input": __import__("base64").b64encode(b"pilothouse.approval.v1\n{ }").decode()}
    with pytest.raises(attestation.AttestationInvalid, match="canonical"):
        attestation.answer_statement(KEYS["alice"], tampered, {})

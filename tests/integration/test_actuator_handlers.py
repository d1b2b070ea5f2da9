"""The actuator's handlers against the real Postgres of the stack and a real fleet subprocess (manual clock).

Kafka is left out here (records are handed to the handlers with their topic coordinates, as the consumer loop
does); test_actuator_kafka.py runs the whole service on the broker. Each test gets a uuid-named Postgres schema.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.actuator.adapters.postgres import Store
from pilothouse.actuator.config import HttpTarget
from pilothouse.actuator.executors import ExecutorRegistry, FleetExecutor, HttpExecutor
from pilothouse.actuator.handlers import ActuatorHandlers, Topics
from pilothouse.bus import attestation
from pilothouse.bus.actions import action_hash, canonical_json, load_actions
from pilothouse.bus.authorization import key_id, sign
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.records import ActionAuthorized, ApprovalRequested, KillSwitchChanged

TOPICS = Topics("t.shadow", "t.executions", "t.verifications")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    """``python -m pilothouse.fleet --clock manual`` on a free port."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Fleet:
        self.proc = subprocess.Popen([sys.executable, "-m", "pilothouse.fleet", "--port", str(self.port),
                                      "--state-dir", str(self.state_dir), "--clock", "manual"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "fleet exited"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("fleet did not become healthy in 30 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str, **params) -> dict:
        return httpx.get(self.url + path, params=params, timeout=30).json()

    def post(self, path: str, body: dict) -> dict:
        r = httpx.post(self.url + path, json=body, timeout=30)
        assert r.status_code < 300, r.text
        return r.json()

    def executions(self, key: str) -> int:
        return sum(e["executions"] for e in self.get("/actions/log", key=key)["entries"] if e["key"] == key)

    def replicas(self, service: str) -> int:
        return self.get("/state")["services"][service]["replicas"]


@pytest.fixture
def fleet(tmp_path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet").start()
    yield f
    f.stop()


@pytest.fixture
def store(stack_info) -> Iterator[Store]:
    s = Store(stack_info.postgres_dsn, f"act_{uuid.uuid4().hex[:12]}")
    s.migrate()
    yield s
    s.drop()
    s.close()


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def make_handlers(store, fleet, key, **kw) -> ActuatorHandlers:
    return ActuatorHandlers(store=store, registry=ExecutorRegistry([FleetExecutor(fleet.url)]),
                            catalogue=load_actions(), keys={key_id(key.public_key()): key.public_key()},
                            topics=TOPICS, shadow_horizon_s=60, **kw)


def authorization(key, action_type="scale_replicas", params=None, *, target=None, sign_with=None, **kw):
    params = {"service": "cart", "replicas": 4} if params is None else params
    target = target or params["service"]
    now = datetime.now(timezone.utc)
    aid = kw.pop("action_id", f"act-{uuid.uuid4().hex[:10]}")
    base = dict(event_id=str(uuid.uuid4()), incident_id="inc-1", correlation_id="inc-1", occurred_at=now,
                authorization_id=f"auth-{uuid.uuid4().hex[:10]}", action_id=aid,
                action_hash=action_hash(action_type, "service", target, params), action_type=action_type,
                target_kind="service", target=target, params_json=canonical_json(params).decode(),
                decision_id="dec-1", bundle_revision="r1", input_sha256="0" * 64, approval_ids=["ap-1", "ap-2"],
                issued_at=now, expires_at=now + timedelta(minutes=5), key_id="", signature="")
    base.update(kw)
    return sign(sign_with or key, ActionAuthorized(**base))


class Offsets:
    def __init__(self) -> None:
        self.n = 0

    def ctx(self, topic: str = "t.authorized") -> MessageContext:
        self.n += 1
        return MessageContext(topic=topic, partition=0, offset=self.n, key=None)


def outbox(store: Store, record_type: str | None = None) -> list[dict]:
    with store.transaction() as tx:
        rows = tx._all("SELECT record_type, payload FROM {s}.outbox ORDER BY id")
    return [r["payload"] for r in rows if record_type is None or r["record_type"].endswith(record_type)]


def executed(store: Store, action_id: str) -> list[dict]:
    return [p for p in outbox(store, "ActionExecuted") if p["action_id"] == action_id]


# ---- shadow runs ---------------------------------------------------------------------------------------------------

def approval_request(action_type="rollback_deploy", params=None) -> ApprovalRequested:
    params = params or {"service": "checkout"}
    return ApprovalRequested(
        event_id=str(uuid.uuid4()), incident_id="inc-1", correlation_id="inc-1", occurred_at=datetime.now(timezone.utc),
        action_id=f"act-{uuid.uuid4().hex[:10]}", decision_id="dec-1", hypothesis_id="h-1", action_type=action_type,
        target_kind="service", target=params["service"], params_json=canonical_json(params).decode(),
        action_hash=action_hash(action_type, "service", params["service"], params), proposed_by="reasoning",
        approvers_needed=1, expires_at=datetime.now(timezone.utc) + timedelta(minutes=15), bundle_revision="r1")


def test_shadow_run_predicts_recovery_before_approval(store, fleet, key):
    fleet.post("/faults", {"kind": "bad_deploy", "service": "checkout"})
    fleet.post("/advance", {"seconds": 30})
    h, o = make_handlers(store, fleet, key), Offsets()
    req = approval_request()
    h.on_approval_requested(req, o.ctx("t.pending"))
    h.on_approval_requested(req.model_copy(update={"event_id": "again"}), o.ctx("t.pending"))  # updated request
    shadows = outbox(store, "ShadowRunCompleted")
    assert len(shadows) == 1, "one shadow run per pending action"
    s = shadows[0]
    assert s["action_id"] == req.action_id and s["outcome"] == "predicted" and s["executor"] == "fleet"
    prediction = orjson.loads(s["prediction_json"])
    assert prediction["summary"]["verdict"] == "recovers" and s["slo_met_after"] is True
    assert "recovers" in s["summary"]
    # The live fleet was not touched by the simulation.
    assert fleet.get("/faults")["active"] and fleet.get("/actions/log")["total_executions"] == 0


def test_shadow_of_a_wrong_action_says_so(store, fleet, key):
    h, o = make_handlers(store, fleet, key), Offsets()
    rebound = approval_request("scale_replicas", {"service": "cart", "replicas": 3}).model_copy(
        update={"params_json": '{"replicas":9,"service":"cart"}'})
    h.on_approval_requested(rebound, o.ctx("t.pending"))
    nothing = approval_request("rollback_deploy", {"service": "cart"})  # cart has no previous version
    h.on_approval_requested(nothing, o.ctx("t.pending"))
    outcomes = {p["action_id"]: p for p in outbox(store, "ShadowRunCompleted")}
    assert outcomes[rebound.action_id]["outcome"] == "error" and "action_hash" in outcomes[rebound.action_id]["summary"]
    assert outcomes[nothing.action_id]["outcome"] == "dry_run_failed"
    assert "previous_version_exists" in outcomes[nothing.action_id]["summary"]


def test_http_executor_shadows_with_the_targets_dry_run(store, fleet, key):
    # The fleet's action endpoint stands in for a feature-flag service that offers ?dry_run=true.
    flags = HttpExecutor(HttpTarget(name="flags", url=fleet.url + "/actions/{action}",
                                    actions=("toggle_feature_flag",), dry_run_param="dry_run"))
    blind = HttpExecutor(HttpTarget(name="deploy", url=fleet.url + "/actions/{action}", actions=("rollback_deploy",)))
    h = ActuatorHandlers(store=store, registry=ExecutorRegistry([flags, blind, FleetExecutor(fleet.url)]),
                         catalogue=load_actions(), keys={key_id(key.public_key()): key.public_key()}, topics=TOPICS)
    o = Offsets()
    flag = approval_request("toggle_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": True})
    deploy = approval_request("rollback_deploy", {"service": "checkout"})
    h.on_approval_requested(flag, o.ctx("t.pending"))
    h.on_approval_requested(deploy, o.ctx("t.pending"))
    got = {p["action_id"]: p for p in outbox(store, "ShadowRunCompleted")}
    assert got[flag.action_id]["outcome"] == "dry_run_ok" and got[flag.action_id]["executor"] == "http:flags"
    assert orjson.loads(got[flag.action_id]["dry_run_response"])["changes"][0]["after"] is True
    assert got[deploy.action_id]["outcome"] == "unsupported"
    assert fleet.get("/state")["services"]["cart"]["flags"]["redis_fallback"] is False  # a dry run changes nothing
    # And the HTTP executor executes with the idempotency header: twice delivered, applied once.
    auth = authorization(key, "toggle_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": True})
    h.on_action_authorized(auth, o.ctx())
    assert executed(store, auth.action_id)[0]["executor"] == "http:flags"
    assert fleet.executions(auth.action_id) == 1


# ---- authorizations ------------------------------------------------------------------------------------------------

def test_valid_authorization_executes_once_and_is_recorded(store, fleet, key):
    h, o = make_handlers(store, fleet, key), Offsets()
    rec = authorization(key)
    ctx = o.ctx()
    h.on_action_authorized(rec, ctx)
    h.on_action_authorized(rec, ctx)  # redelivered at the same offset (crash before the Kafka commit): skipped
    assert fleet.executions(rec.action_id) == 1 and fleet.replicas("cart") == 4
    ex = executed(store, rec.action_id)
    assert [e["outcome"] for e in ex] == ["executed"]
    assert orjson.loads(ex[0]["result_json"])["before"] == {"replicas": 2}


def test_forged_expired_rebound_and_replayed_authorizations_are_refused(store, fleet, key):
    h, o = make_handlers(store, fleet, key), Offsets()
    forged = authorization(key, sign_with=Ed25519PrivateKey.generate())
    impostor = forged.model_copy(update={"key_id": key_id(key.public_key())})
    past = datetime.now(timezone.utc) - timedelta(minutes=10)
    expired = authorization(key, issued_at=past, expires_at=past + timedelta(minutes=5))
    rebound = authorization(key, params_json='{"replicas":12,"service":"cart"}')  # hash says replicas=4
    unapproved = authorization(key, approval_ids=[])
    for rec in (forged, impostor, expired, rebound, unapproved):
        h.on_action_authorized(rec, o.ctx())
    good = authorization(key)
    h.on_action_authorized(good, o.ctx())
    replay_same_auth = good.model_copy(update={"event_id": str(uuid.uuid4())})  # the same authorization again
    replay_new_auth = authorization(key, action_id=good.action_id)  # a new authorization for an executed action
    h.on_action_authorized(replay_same_auth, o.ctx())
    h.on_action_authorized(replay_new_auth, o.ctx())
    reasons = {}
    for p in outbox(store, "ActionExecuted"):
        reasons.setdefault(p["authorization_id"], []).append((p["outcome"], p["reason"].split(":")[0]))
    assert reasons[forged.authorization_id] == [("refused", "signature")]
    assert reasons[impostor.authorization_id] == [("refused", "signature")]
    assert reasons[expired.authorization_id] == [("refused", "expired")]
    assert reasons[rebound.authorization_id] == [("refused", "action_hash")]
    assert reasons[unapproved.authorization_id] == [("refused", "approvals")]
    assert reasons[good.authorization_id] == [("executed", ""), ("refused", "replay")]
    assert reasons[replay_new_auth.authorization_id] == [("refused", "replay")]
    log = fleet.get("/actions/log")
    assert [e["key"] for e in log["entries"]] == [good.action_id] and log["total_executions"] == 1


def test_kill_switch_and_stale_preconditions_refuse(store, fleet, key):
    admin = Ed25519PrivateKey.generate()  # oncall-1 is an enrolled admin: only a release signed by them counts
    humans = attestation.HumanKeyRegistry.from_document({"humans": {"oncall-1": {
        "roles": ["admin"], "keys": [{"public_key": attestation.public_key_b64(admin.public_key())}]}}})
    h, o = make_handlers(store, fleet, key, humans=lambda: humans), Offsets()
    now = datetime.now(timezone.utc)
    h.on_kill_switch(KillSwitchChanged(event_id="k1", correlation_id="c", occurred_at=now, scope="service:cart",
                                       engaged=True, changed_by="oncall-1"), o.ctx("t.ks"))
    blocked = authorization(key)
    h.on_action_authorized(blocked, o.ctx())
    other = authorization(key, params={"service": "payment", "replicas": 3})
    h.on_action_authorized(other, o.ctx())
    release = KillSwitchChanged(event_id="k2", correlation_id="c", occurred_at=now, scope="service:cart",
                                engaged=False, changed_by="oncall-1")
    h.on_kill_switch(release, o.ctx("t.ks"))  # unsigned: ignored, the switch stays on
    still_blocked = authorization(key, params={"service": "cart", "replicas": 5})
    h.on_action_authorized(still_blocked, o.ctx())
    h.on_kill_switch(attestation.sign_record(admin, release.model_copy(update={"event_id": "k3"})), o.ctx("t.ks"))
    # State changed since approval: cart already has 2 replicas, so "scale to 2" fails the live re-check.
    stale = authorization(key, params={"service": "cart", "replicas": 2})
    h.on_action_authorized(stale, o.ctx())
    out = {p["action_id"]: p for p in outbox(store, "ActionExecuted")}
    assert out[blocked.action_id]["outcome"] == "refused" and "kill switch 'service:cart'" in out[blocked.action_id][
        "reason"]
    assert out[other.action_id]["outcome"] == "executed"
    assert out[still_blocked.action_id]["outcome"] == "refused" and "kill switch" in out[still_blocked.action_id]["reason"]
    assert out[stale.action_id]["outcome"] == "refused" and "replicas_differ" in out[stale.action_id]["reason"]
    assert fleet.executions(blocked.action_id) == 0 and fleet.executions(stale.action_id) == 0


def test_clock_skew_refuses_execution(store, fleet, key):
    # The actuator's clock runs 30 s ahead of Postgres' clock: it must not trust its own expiry checks.
    h = make_handlers(store, fleet, key, clock=lambda: datetime.now(timezone.utc) + timedelta(seconds=30))
    rec = authorization(key)
    h.on_action_authorized(rec, Offsets().ctx())
    [p] = executed(store, rec.action_id)
    assert p["outcome"] == "refused" and p["reason"].startswith("clock_skew") and fleet.executions(rec.action_id) == 0


def test_execution_interrupted_before_the_answer_is_recorded_is_completed_once(store, fleet, key):
    """Crash between 'call' and 'record': the intent row is left 'started'; recovery calls again with the same key
    and the fleet answers from its journal."""
    h = make_handlers(store, fleet, key)
    rec = authorization(key)
    row = {"action_id": rec.action_id, "execution_id": str(uuid.uuid4()), "authorization_id": rec.authorization_id,
           "event_id": rec.event_id, "incident_id": "inc-1", "correlation_id": "inc-1", "action_hash": rec.action_hash,
           "action_type": rec.action_type, "target_kind": "service", "target": "cart",
           "params": {"service": "cart", "replicas": 4}, "executor": "fleet", "owner": "run-dead",
           "authorized_at": rec.issued_at}
    with store.transaction() as tx:
        assert tx.insert_intent(row)
    # The crashed run had already reached the fleet:
    r = httpx.post(f"{fleet.url}/actions/scale_replicas", json=row["params"],
                   headers={"Idempotency-Key": rec.action_id})
    assert r.status_code == 200
    assert h.recover_once() == 1
    assert h.recover_once() == 0
    [p] = executed(store, rec.action_id)
    assert p["outcome"] == "executed" and "journal" in p["reason"]
    assert fleet.executions(rec.action_id) == 1


# ---- verification and rollback -------------------------------------------------------------------------------------

def test_verification_passes_on_a_healthy_target(store, fleet, key):
    h, o = make_handlers(store, fleet, key), Offsets()
    rec = authorization(key, params={"service": "payment", "replicas": 3})
    h.on_action_authorized(rec, o.ctx())
    assert h.verify_once() == 0, "not before the window has passed on the target's clock"
    fleet.post("/advance", {"seconds": 61})
    assert h.verify_once() == 1
    [v] = outbox(store, "ActionVerified")
    assert v["outcome"] == "verified" and v["window_s"] == 60 and all(c["passed"] for c in v["checks"])


def test_failed_verification_rolls_back_automatically(store, fleet, key):
    # cart fails 30 % of its requests; scaling it up does not help, so the checks fail and the scale is undone.
    fleet.post("/faults", {"kind": "error_rate", "service": "cart", "params": {"rate": 0.3}})
    fleet.post("/advance", {"seconds": 5})
    h, o = make_handlers(store, fleet, key), Offsets()
    rec = authorization(key, params={"service": "cart", "replicas": 5})
    h.on_action_authorized(rec, o.ctx())
    assert fleet.replicas("cart") == 5
    fleet.post("/advance", {"seconds": 61})
    assert h.verify_once() == 1
    [v] = outbox(store, "ActionVerified")
    assert v["outcome"] == "rolled_back" and v["rolled_back"] is True
    failed = [c for c in v["checks"] if not c["passed"]]
    assert failed and failed[0]["name"] == "error_ratio_below_slo" and failed[0]["observed"] > failed[0]["threshold"]
    assert fleet.replicas("cart") == 2
    assert fleet.executions(f"{rec.action_id}/rollback") == 1
    assert h.verify_once() == 0 and fleet.executions(f"{rec.action_id}/rollback") == 1


def test_irreversible_action_that_fails_verification_is_reported_not_undone(store, fleet, key):
    fleet.post("/faults", {"kind": "error_rate", "service": "cart", "params": {"rate": 0.3}})
    h, o = make_handlers(store, fleet, key), Offsets()
    rec = authorization(key, "restart_service", {"service": "cart"})
    h.on_action_authorized(rec, o.ctx())
    fleet.post("/advance", {"seconds": 61})
    assert h.verify_once() == 1
    [v] = outbox(store, "ActionVerified")
    assert v["outcome"] == "failed" and "not reversible" in v["detail"] and not v["rolled_back"]


def test_target_down_during_execution_loses_nothing_and_runs_once(store, fleet, key):
    """The target is unreachable at the moment of the call: the intent stays 'started' and is completed, once,
    when the target is back (with the same idempotency key)."""
    h = make_handlers(store, fleet, key, stale_s=0.0)
    rec = authorization(key)
    row = {"action_id": rec.action_id, "execution_id": str(uuid.uuid4()), "authorization_id": rec.authorization_id,
           "event_id": rec.event_id, "incident_id": "inc-1", "correlation_id": "inc-1", "action_hash": rec.action_hash,
           "action_type": rec.action_type, "target_kind": "service", "target": "cart",
           "params": {"service": "cart", "replicas": 4}, "executor": "fleet", "owner": h.owner,
           "authorized_at": rec.issued_at}
    with store.transaction() as tx:
        assert tx.insert_intent(row)
    fleet.stop()
    assert h.drive(row) is False
    assert h.recover_once() == 0
    with store.transaction() as tx:
        r = tx.execution(rec.action_id)
    assert r["status"] == "started" and r["attempts"] == 2 and "ConnectError" in r["last_error"]
    assert executed(store, rec.action_id) == []
    fleet.start()  # same state directory and port: the fleet resumes from its persisted state
    assert h.recover_once() == 1
    [p] = executed(store, rec.action_id)
    assert p["outcome"] == "executed" and fleet.executions(rec.action_id) == 1 and fleet.replicas("cart") == 4


def test_verification_samples_the_second_half_of_the_window(store, fleet, key):
    h, o = make_handlers(store, fleet, key), Offsets()
    rec = authorization(key, params={"service": "shipping", "replicas": 3})
    h.on_action_authorized(rec, o.ctx())
    fleet.post("/advance", {"seconds": 10})
    assert h.verify_once() == 0  # first half: the action's own transient, not sampled
    for step in (25, 10, 10):  # ticks +35, +45, +55: sampled
        fleet.post("/advance", {"seconds": step})
        assert h.verify_once() == 0
    with store.transaction() as tx:
        assert len(tx.execution(rec.action_id)["verify_samples"]) == 3
    fleet.post("/advance", {"seconds": 6})  # +61: due
    assert h.verify_once() == 1
    [v] = outbox(store, "ActionVerified")
    assert v["outcome"] == "verified" and all("over 4 samples" in c["detail"] for c in v["checks"])

"""The policy service's handlers against the real OPA server (policies/) and the real Postgres of the local stack.

Every test gets its own Postgres schema. Records are handed to the handlers as the TransactionalProcessor would;
the Kafka path itself is covered by test_policy_service_kafka.py.
"""

from __future__ import annotations

import base64
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, NoEncryption

from pilothouse.bus import authorization
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.records import ActionAuthorized, ApprovalRequested, PolicyDecided
from pilothouse.policy.adapters.opa import OpaPolicyEngine, local_opa_server
from pilothouse.policy.adapters.postgres import Store
from pilothouse.policy.config import FreezeCalendar
from pilothouse.policy.domain import PolicyInputInvalid, parse_policy_input
from pilothouse.policy.handlers import Limits, PolicyHandlers, Topics, UnknownAction, UnknownKillSwitchScope

from tests.integration import test_policy_service_records as r

POLICIES = Path(__file__).resolve().parents[2] / "policies"
TOPICS = Topics("t.decisions", "t.pending", "t.authorized")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def opa() -> Iterator[OpaPolicyEngine]:
    with local_opa_server(POLICIES) as engine:
        yield engine


@pytest.fixture
def store(stack_info) -> Iterator[Store]:
    s = Store(stack_info.postgres_dsn, f"test_policy_{uuid.uuid4().hex[:10]}")
    s.migrate()
    yield s
    s.drop()
    s.close()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


class Service:
    """The handlers plus a tiny dispatcher that fakes only the Kafka position of each record."""

    def __init__(self, store: Store, engine: OpaPolicyEngine, key: Ed25519PrivateKey, freezes=list):
        self.h = PolicyHandlers(store=store, engine=engine, signing_key=key, topics=TOPICS, freezes=freezes,
                                limits=Limits(authorization_ttl=timedelta(minutes=5)), humans=r.registry)
        self.offset = 0

    def send(self, record) -> list:
        name = type(record).__name__
        handler = {
            "IncidentUpdated": self.h.on_incident, "ActionProposed": self.h.on_proposal,
            "HypothesisValidated": self.h.on_validation, "ApprovalRecorded": self.h.on_approval,
            "KillSwitchChanged": self.h.on_kill_switch, "ActionExecuted": self.h.on_execution,
        }[name]
        self.offset += 1
        return [o.record for o in handler(record, MessageContext(f"in.{name}", 0, self.offset, None))]


def of(outputs: list, kind: type) -> list:
    return [o for o in outputs if isinstance(o, kind)]


def decided(outputs: list) -> PolicyDecided:
    found = of(outputs, PolicyDecided)
    assert len(found) == 1, outputs
    return found[0]


@pytest.fixture
def svc(store, opa, key) -> Service:
    return Service(store, opa, key)


def pending_action(svc: Service, *, severity: str = "error", **kw):
    """An incident, a validated hypothesis and a proposal waiting for approvals."""
    inc, hyp = f"inc-{uuid.uuid4().hex[:8]}", f"hyp-{uuid.uuid4().hex[:8]}"
    svc.send(r.incident(inc, severity))
    svc.send(r.validation(inc, hyp, "vera"))
    p = r.proposal(inc, hyp, **kw)
    out = svc.send(p)
    d = decided(out)
    assert (d.stage, d.outcome) == ("proposal", "pending_approval"), d.reasons
    return p, out


def test_gate1_holds_then_validation_redecides(svc):
    inc, hyp = "inc-g1", "hyp-g1"
    svc.send(r.incident(inc))
    p = r.proposal(inc, hyp)
    held = decided(svc.send(p))
    assert (held.stage, held.outcome, held.allow) == ("proposal", "waiting", False)
    assert any(x.startswith("hypothesis_not_validated:") for x in held.reasons)
    # The proposer validating its own hypothesis does not open Gate 1.
    assert decided(svc.send(r.validation(inc, hyp, "reasoning"))).outcome == "waiting"
    out = svc.send(r.validation(inc, hyp, "vera"))
    d = decided(out)
    assert (d.stage, d.outcome, d.approvers_needed) == ("proposal", "pending_approval", 2)
    (req,) = of(out, ApprovalRequested)
    assert req.action_hash == p.action_hash and req.validated_by == "reasoning,vera" and req.approved_by == []
    assert set(req.approver_roles) == {"approver", "admin"}
    # The replay data: the input in the record hashes to input_sha256 and validates as a PolicyInput.
    assert parse_policy_input(d.input_json).digest() == d.input_sha256


def test_read_only_auto_allowed_and_signed(svc, key):
    inc, hyp = "inc-ro", "hyp-ro"
    svc.send(r.incident(inc))
    svc.send(r.validation(inc, hyp))
    p = r.proposal(inc, hyp, action_type="collect_diagnostics")
    out = svc.send(p)
    assert decided(out).outcome == "auto_allowed"
    (auth,) = of(out, ActionAuthorized)
    # What the actuator does: recompute the hash from the fields and verify with the trusted public key.
    params = orjson.loads(auth.params_json)
    expected = r.action_hash(auth.action_type, auth.target_kind, auth.target, params)
    authorization.verify({auth.key_id: key.public_key()}, auth, now=r.now(), expected_action_hash=expected)
    assert auth.approval_ids == [] and auth.expires_at <= auth.issued_at + timedelta(minutes=5)


def test_two_approvals_authorize_and_each_approval_updates_the_request(svc, key, store):
    p, _ = pending_action(svc)
    out1 = svc.send(r.approval(p, "alice"))
    assert decided(out1).outcome == "waiting"
    (req1,) = of(out1, ApprovalRequested)
    assert req1.approved_by == ["alice"] and not of(out1, ActionAuthorized)
    out2 = svc.send(r.approval(p, "bob", roles=("admin",)))
    d = decided(out2)
    assert (d.stage, d.outcome, d.allow) == ("approval", "authorized", True)
    (req2,) = of(out2, ApprovalRequested)
    assert sorted(req2.approved_by) == ["alice", "bob"]
    (auth,) = of(out2, ActionAuthorized)
    assert auth.decision_id == d.decision_id and auth.input_sha256 == d.input_sha256
    assert len(auth.approval_ids) == 2
    authorization.verify({auth.key_id: key.public_key()}, auth, now=r.now(), expected_action_hash=p.action_hash)
    with store.transaction() as tx:
        (row,) = tx.budget_rows("checkout")
    assert row["state"] == "reserved" and row["cost"] == 11  # medium blast 3 + irreversible 4 + production 3 + sev2 1


def refused_case(svc, p, approval, code: str) -> None:
    out = svc.send(approval)
    d = decided(out)
    assert d.outcome == "waiting" and not d.allow, d.reasons
    assert any(x.startswith(f"approval_refused: {approval.approval_id}") and code in x for x in d.reasons), d.reasons
    assert not of(out, ActionAuthorized)
    (req,) = of(out, ApprovalRequested)
    assert req.approved_by == [] or approval.approver_id.casefold() not in [a.casefold() for a in req.approved_by]


@pytest.mark.parametrize("make, code", [
    (lambda p: r.approval(p, "reasoning"), "non_human_principal"),          # the proposer is a service principal
    (lambda p: r.approval(p, "svc:deployer"), "non_human_principal"),       # a service principal approving
    (lambda p: r.approval(p, "vera"), "approver_is_validator"),             # validated, so cannot approve
    (lambda p: r.approval(p, "alice", action_hash_="f" * 64), "hash_mismatch"),  # approved another action
    (lambda p: r.approval(p, "alice", granted_ago=timedelta(minutes=20), expires_in=timedelta(minutes=10)),
     "expired"),
    (lambda p: r.approval(p, "dave", roles=("responder",)), "missing_role"),
], ids=["proposer", "service-principal", "validator", "hash-mismatch", "expired", "missing-role"])
def test_refused_approvals_never_count(svc, make, code):
    p, _ = pending_action(svc)
    refused_case(svc, p, make(p), code)


def test_self_approval_refused(svc):
    p, _ = pending_action(svc, proposed_by="alice")  # a human proposed it through reasoning
    refused_case(svc, p, r.approval(p, "ALICE"), "self_approval")


@pytest.mark.parametrize("variant", ["ALICE", "alice\u200b", "\uff41\uff4c\uff49\uff43\uff45", " Alice "])
def test_same_human_twice_counts_once(svc, variant):
    p, _ = pending_action(svc)
    assert decided(svc.send(r.approval(p, "alice"))).outcome == "waiting"
    out = svc.send(r.approval(p, variant))
    d = decided(out)
    assert d.outcome == "waiting" and not of(out, ActionAuthorized), d.reasons
    assert any("duplicate_approver" in x for x in d.reasons), d.reasons
    (req,) = of(out, ApprovalRequested)
    assert req.approved_by == ["alice"]


def test_human_reject_vetoes(svc):
    p, _ = pending_action(svc)
    svc.send(r.approval(p, "alice"))
    out = svc.send(r.approval(p, "carol", decision="reject", comment="not during peak"))
    d = decided(out)
    assert (d.outcome, d.allow) == ("denied", False)
    assert any(x.startswith("rejected_by_human:") and "not during peak" in x for x in d.reasons)
    # A later approval cannot revive a vetoed action.
    assert svc.send(r.approval(p, "bob")) == []


def test_frozen_window_refuses_ordinary_approvers(store, opa, key, tmp_path):
    t = r.now()
    calendar = tmp_path / "freezes.yaml"
    calendar.write_text(f"- name: black-friday\n  start: '{(t - timedelta(hours=1)).isoformat()}'\n"
                        f"  end: '{(t + timedelta(hours=1)).isoformat()}'\n  environments: ['production']\n")
    svc = Service(store, opa, key, freezes=FreezeCalendar(calendar).windows)
    p, out = pending_action(svc)
    assert "freeze_window_active" in " ".join(decided(out).reasons)
    refused_case(svc, p, r.approval(p, "alice"), "frozen_window")


def shift(n: int) -> dict:
    """shift_traffic on instance checkout-<n>: medium risk (low blast, reversible, production, sev2), cost 5, in the
    checkout budget; distinct instances so that the per-target concurrency cap does not interfere."""
    return {"action_type": "shift_traffic", "target_kind": "instance", "target": f"checkout-{n}",
            "params": {"service": "checkout", "instance": f"checkout-{n}", "weight": 0}}


def approve_until_decided(svc: Service, p) -> PolicyDecided:
    out: list = []
    for who in ("alice", "bob", "carol"):  # more approvers are needed once the budget runs low
        out = svc.send(r.approval(p, who))
        if decided(out).outcome != "waiting":
            break
    return decided(out)


def test_exhausted_budget_denies_at_approval_time(svc, store):
    # Eight medium-risk actions (cost 5 each of the default 40) are authorized; the ninth finds the budget spent.
    actions = [pending_action(svc, **shift(n))[0] for n in range(9)]  # all pending before anyone approves
    outcomes = [approve_until_decided(svc, p) for p in actions]
    assert [d.outcome for d in outcomes] == ["authorized"] * 8 + ["denied"]
    assert any(x.startswith("budget_exhausted:") for x in outcomes[-1].reasons)
    assert any(x.startswith("budget_low:") for x in outcomes[-2].reasons)  # the last ones needed a second approver
    with store.transaction() as tx:
        assert sum(row["cost"] for row in tx.budget_rows("checkout")) == 40


def test_kill_switch_denies_pending_action(svc):
    p, _ = pending_action(svc)
    svc.send(r.kill_switch("service:CHECKOUT"))
    d = decided(svc.send(r.approval(p, "alice")))  # re-evaluated at approval time: the switch is on now
    assert (d.outcome, d.allow) == ("denied", False)
    assert any(x.startswith("kill_switch_service:") for x in d.reasons)
    assert svc.send(r.approval(p, "bob")) == []  # denied is final


def test_global_kill_switch_denies_proposal_and_release_lifts_it(svc):
    svc.send(r.kill_switch("global"))
    inc, hyp = "inc-ks", "hyp-ks"
    svc.send(r.incident(inc))
    svc.send(r.validation(inc, hyp))
    d = decided(svc.send(r.proposal(inc, hyp)))
    assert d.outcome == "denied" and any(x.startswith("kill_switch_global:") for x in d.reasons)
    svc.send(r.kill_switch("global", engaged=False))
    assert decided(svc.send(r.proposal(inc, hyp))).outcome == "pending_approval"


def test_concurrency_cap_per_target(svc):
    p1, _ = pending_action(svc, action_type="scale_replicas", params={"service": "checkout", "replicas": 3})
    p2, _ = pending_action(svc, action_type="scale_replicas", params={"service": "checkout", "replicas": 4})
    # scale_replicas in production during a sev2: medium risk, one approver.
    assert decided(svc.send(r.approval(p1, "alice"))).outcome == "authorized"
    d = decided(svc.send(r.approval(p2, "alice")))
    assert d.outcome == "denied" and any(x.startswith("concurrency_cap:") for x in d.reasons)


def test_execution_consumes_and_refusal_releases_budget(svc, store):
    p, _ = pending_action(svc)
    svc.send(r.approval(p, "alice"))
    (auth,) = of(svc.send(r.approval(p, "bob")), ActionAuthorized)
    svc.send(r.executed(p, auth.authorization_id, "refused"))
    with store.transaction() as tx:
        (row,) = tx.budget_rows("checkout")
        assert row["state"] == "released"
        assert tx.budget_consumed("checkout", row["window_start"], r.now()) == 0
        assert tx.proposal(p.action_id)["status"] == "failed"


def test_redelivery_reemits_the_same_outputs(svc):
    inc, hyp = "inc-rd", "hyp-rd"
    svc.send(r.incident(inc))
    svc.send(r.validation(inc, hyp))
    p = r.proposal(inc, hyp)
    first = svc.send(p)
    again = svc.send(p)
    assert [o.event_id for o in again] == [o.event_id for o in first] and again == first


def test_bad_input_is_refused_with_a_reason(svc):
    inc, hyp = "inc-bad", "hyp-bad"
    with pytest.raises(PolicyInputInvalid, match="action_hash"):
        svc.send(r.proposal(inc, hyp, tamper_hash=True))
    with pytest.raises(UnknownAction, match="never received"):
        svc.send(r.approval(r.proposal(inc, hyp), "alice"))
    with pytest.raises(UnknownKillSwitchScope):
        svc.send(r.kill_switch("everything"))


def test_parallel_approvals_never_exceed_the_budget(store, opa, key):
    """12 medium-risk actions (cost 5) race for a 40-point budget: exactly 8 are authorized, never more."""
    setup = Service(store, opa, key)
    actions = [pending_action(setup, **shift(n))[0] for n in range(12)]
    barrier = threading.Barrier(len(actions))
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    host, port = opa.endpoint.rsplit("//", 1)[1].rsplit(":", 1)

    def race(p) -> None:
        try:
            with OpaPolicyEngine(host, int(port)) as eng:  # one HTTP session per thread
                mine = Service(store, eng, key)
                barrier.wait(10)
                results[p.action_id] = approve_until_decided(mine, p).outcome
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=race, args=(p,)) for p in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with store.transaction() as tx:
        rows = tx.budget_rows("checkout")
        statuses = [tx.proposal(p.action_id)["status"] for p in actions]
    assert sum(row["cost"] for row in rows) == 40
    assert statuses.count("authorized") == 8 and len(rows) == 8, (statuses, results)
    assert statuses.count("denied") == 4 and sorted(results.values()) == ["authorized"] * 8 + ["denied"] * 4


def test_settings_signing_key_matches_actuator_format(key):
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    loaded = authorization.load_private_key(base64.b64encode(raw).decode())
    assert authorization.key_id(loaded.public_key()) == authorization.key_id(key.public_key())


# ---- human signatures: the console principal cannot speak for people (red-team finding, issue #8) ----------------


def test_forged_approvals_are_ignored_with_the_reason_and_never_authorize(svc, store):
    """Unsigned, signed by a key that is not the approver's, or re-bound after signing: none counts."""
    p, _ = pending_action(svc)
    console_key = r.Ed25519PrivateKey.generate()
    unsigned = r.approval(p, "alice", signed=False)
    d = decided(svc.send(unsigned))
    assert d.outcome == "waiting"
    assert f"approval {unsigned.approval_id} by alice ignored: unsigned: no human signature" in d.reasons
    wrong_key = r.attestation.sign_record(console_key, r.approval(p, "bob", signed=False))
    d = decided(svc.send(wrong_key))
    assert any(x.startswith(f"approval {wrong_key.approval_id} by bob ignored: key ") and "not enrolled for bob" in x
               for x in d.reasons), d.reasons
    # A genuine signature of alice's, moved onto bob's name (the console rewrites who approved).
    genuine = r.approval(p, "alice")
    renamed = genuine.model_copy(update={"approver_id": "bob", "key_id": genuine.key_id, "event_id": r.eid()})
    d = decided(svc.send(renamed))
    assert any("ignored" in x for x in d.reasons) and d.outcome == "waiting"
    # A veto needs a signature too: an unsigned "reject" does not stop the action.
    d = decided(svc.send(r.approval(p, "carol", decision="reject", signed=False)))
    assert d.outcome == "waiting" and not any(x.startswith("rejected_by_human") for x in d.reasons)
    with store.transaction() as tx:
        assert tx.approvals(p.action_id) == []  # nothing forged was stored
    # The real people still can: two genuine approvals authorize.
    svc.send(r.approval(p, "alice"))
    out = svc.send(r.approval(p, "bob"))
    assert decided(out).outcome == "authorized"
    (auth,) = of(out, ActionAuthorized)
    assert len(auth.approval_ids) == 2


def test_unsigned_validation_does_not_open_gate_one(svc, store):
    inc, hyp = f"inc-{uuid.uuid4().hex[:8]}", f"hyp-{uuid.uuid4().hex[:8]}"
    svc.send(r.incident(inc))
    assert decided(svc.send(r.proposal(inc, hyp))).outcome == "waiting"
    forged = r.validation(inc, hyp, "vera", signed=False)
    d = decided(svc.send(forged))
    assert d.outcome == "waiting"
    assert f"validation {forged.event_id} by vera ignored: unsigned: no human signature" in d.reasons
    # Signed for another hypothesis, then re-pointed at this one: does not verify.
    other = r.validation(inc, "hyp-other", "vera").model_copy(update={"hypothesis_id": hyp, "event_id": r.eid()})
    assert "does not verify" in " ".join(decided(svc.send(other)).reasons)
    with store.transaction() as tx:
        assert tx.validations(hyp) == []
    assert decided(svc.send(r.validation(inc, hyp, "vera"))).outcome == "pending_approval"


def test_kill_switch_release_needs_an_enrolled_admins_signature(svc):
    svc.send(r.kill_switch("global", signed=False))  # engaging only stops things: no signature needed
    inc, hyp = f"inc-{uuid.uuid4().hex[:8]}", f"hyp-{uuid.uuid4().hex[:8]}"
    svc.send(r.incident(inc))
    svc.send(r.validation(inc, hyp))

    def outcome() -> str:
        return decided(svc.send(r.proposal(inc, hyp))).outcome

    assert outcome() == "denied"
    svc.send(r.kill_switch("global", engaged=False, signed=False))  # forged release: ignored
    assert outcome() == "denied"
    # Signed, but by someone not enrolled as admin (alice's key, alice's name).
    not_admin = r.kill_switch("global", engaged=False, signed=False).model_copy(update={"changed_by": "alice"})
    svc.send(r.attestation.sign_record(r.human_key("alice"), not_admin))
    assert outcome() == "denied"
    # Signed by the admin but dated in the future (it would outrank every later switch): refused.
    future = r.kill_switch("global", engaged=False, signed=False).model_copy(
        update={"occurred_at": r.now() + timedelta(hours=1)})
    svc.send(r.attestation.sign_record(r.human_key("root-admin"), future))
    assert outcome() == "denied"
    svc.send(r.kill_switch("global", engaged=False))
    assert outcome() == "pending_approval"

"""Table-driven policy cases from Python against the real OPA server (v1.22.3) serving policies/.

The fixture starts its own ``opa run --server --addr 127.0.0.1:<free port> policies/`` and talks to it only through
the adapter (opa-python-client). Inputs are built with the pydantic models, so the Python identity normalisation and
action hashing are exercised too; two cases send raw documents to check the Rego's own defences.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilothouse.policy.adapters.opa import OpaPolicyEngine, find_opa_binary, local_opa_server, main
from pilothouse.policy.domain import (
    PolicyEngineUnavailable,
    PolicyEvaluationFailed,
    PolicyInput,
    action_hash,
    parse_policy_input,
)

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
FIXTURES = json.loads((POLICIES / "pilothouse/fixtures/data.json").read_text(encoding="utf-8"))

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine() -> Iterator[OpaPolicyEngine]:
    if find_opa_binary() is None:
        pytest.fail("no opa binary (~/.cache/pilothouse/bin/opa, /tmp/gobin/opa or PATH): run `pilothouse stack up`")
    with local_opa_server(POLICIES) as running:
        yield running


# -- building inputs --------------------------------------------------------------------------------------------

Doc = dict


def base() -> Doc:
    doc = copy.deepcopy(FIXTURES["base_input"])
    del doc["action"]["action_hash"]  # the model computes the real hash
    return doc


def current_hash(doc: Doc) -> str:
    a = doc["action"]
    return action_hash(a["action_type"], a["target"]["kind"], a["target"]["name"], a["params"])


def approval(doc: Doc, approver_id: str, roles: tuple[str, ...] = ("approver",), kind: str = "human", **extra) -> dict:
    return {
        "approval_id": f"ap-{len(doc['approvals'])}",
        "approver": {"id": approver_id, "kind": kind, "roles": list(roles), "display_name": approver_id},
        "action_hash": current_hash(doc),
        "granted_at": "2026-11-25T11:58:00Z",
        "expires_at": "2026-11-25T12:10:00Z",
        **extra,
    }


def approve(*approvers: tuple[str, tuple[str, ...], str]) -> Callable[[Doc], None]:
    def patch(doc: Doc) -> None:
        for approver_id, roles, kind in approvers:
            doc["approvals"].append(approval(doc, approver_id, roles, kind))

    return patch


def human(approver_id: str, *roles: str) -> tuple[str, tuple[str, ...], str]:
    return approver_id, roles or ("approver",), "human"


def high_risk(doc: Doc) -> None:
    doc["action"]["action_type"] = "shift_traffic"
    doc["action"]["params"] = {"to": "canary", "percent": 50}
    doc["action"]["facts"]["blast_radius"] = "high"


def read_only(doc: Doc) -> None:
    doc["action"]["action_type"] = "collect_diagnostics"
    doc["action"]["params"] = {"kind": "thread_dump"}
    doc["action"]["facts"] = {"reversible": True, "blast_radius": "low", "read_only": True}


def human_proposer(doc: Doc) -> None:
    doc["proposal"]["proposed_by"] = {"id": "dana", "kind": "human", "roles": ["responder", "approver"]}


def changed_after_approval(doc: Doc) -> None:
    doc["approvals"].append(approval(doc, "alice"))  # bound to grace_seconds=30
    doc["action"]["params"]["grace_seconds"] = 0  # ... then the action changed


def expired(doc: Doc) -> None:
    doc["approvals"].append(approval(doc, "alice", expires_at="2026-11-25T11:59:59Z"))


def frozen(doc: Doc) -> None:
    doc["controls"]["freeze_windows"] = [
        {"name": "black-friday", "start": "2026-11-25T00:00:00Z", "end": "2026-11-30T00:00:00Z",
         "environments": ["production"], "services": ["*"]}
    ]


def budget(consumed: float) -> Callable[[Doc], None]:
    def patch(doc: Doc) -> None:
        doc["budget"]["consumed"] = consumed

    return patch


def kill_global(doc: Doc) -> None:
    doc["controls"]["kill_switch"] = {"global": True, "services": []}


def kill_service(doc: Doc) -> None:
    doc["controls"]["kill_switch"] = {"global": False, "services": ["Checkout"]}


def unvalidated(doc: Doc) -> None:
    doc["proposal"]["hypothesis"]["validations"] = []


@dataclass(frozen=True)
class Case:
    name: str
    entrypoint: str
    patches: tuple[Callable[[Doc], None], ...]
    outcome: str
    codes: frozenset[str] = frozenset()  # must appear in reason_codes
    refused: frozenset[str] = frozenset()  # exactly the union of refused_approvals codes
    accepted: int = 0
    approvers_needed: int | None = None


A = "approvals"
P = "proposal"
CASES = [
    # --- refused ---
    Case("self-approval", A, (human_proposer, approve(human("DANA"))), "pending_approval", refused=frozenset({"self_approval"})),
    Case("approver validated the hypothesis", A, (approve(human("OnCall-1", "approver")),), "pending_approval",
         refused=frozenset({"approver_is_validator"})),
    Case("same human twice, case variant", A, (high_risk, approve(human("alice"), human("ALICE"))), "pending_approval",
         refused=frozenset({"duplicate_approver"}), accepted=1, approvers_needed=2),
    Case("same human twice, Unicode variant", A,
         (high_risk, approve(human("alice"), human("\uff41\uff4c\uff49\uff43\uff45\u200b"))), "pending_approval",
         refused=frozenset({"duplicate_approver"}), accepted=1),
    Case("service principal approving", A, (approve(("actuator", ("approver",), "human")),), "pending_approval",
         refused=frozenset({"non_human_principal"})),
    Case("service principal by kind", A, (approve(("deployer", ("approver",), "service")),), "pending_approval",
         refused=frozenset({"non_human_principal"})),
    Case("model approving", A, (approve(("llama-3.1", ("approver",), "model")),), "pending_approval",
         refused=frozenset({"non_human_principal"})),
    Case("approval of a changed action", A, (changed_after_approval,), "pending_approval", refused=frozenset({"hash_mismatch"})),
    Case("expired approval", A, (expired,), "pending_approval", refused=frozenset({"expired"})),
    Case("frozen window, non-admin approvers", A, (frozen, approve(human("alice"), human("bob"))), "pending_approval",
         codes=frozenset({"freeze_window_active"}), refused=frozenset({"frozen_window"}), approvers_needed=2),
    Case("responder lacks the approver role", A, (approve(human("carol", "responder")),), "pending_approval",
         refused=frozenset({"missing_role"})),
    Case("exhausted budget", A, (budget(38), approve(human("alice"))), "deny", codes=frozenset({"budget_exhausted"}),
         refused=frozenset({"budget_exhausted"})),
    Case("global kill switch", A, (kill_global, approve(human("alice"))), "deny", codes=frozenset({"kill_switch_global"}),
         refused=frozenset({"kill_switch_global"})),
    Case("per-service kill switch", A, (kill_service, approve(human("alice"))), "deny",
         codes=frozenset({"kill_switch_service"}), refused=frozenset({"kill_switch_service"})),
    Case("hypothesis not validated", P, (unvalidated,), "deny", codes=frozenset({"hypothesis_not_validated"})),
    Case("concurrency cap", P, (lambda d: d["controls"].update(in_flight_on_target=1),), "deny",
         codes=frozenset({"concurrency_cap"})),
    # --- allowed / pending ---
    Case("medium risk proposal pending one approver", P, (), "pending_approval", codes=frozenset({"approval_required"}),
         approvers_needed=1),
    Case("medium risk, one approver", A, (approve(human("alice")),), "allow", accepted=1, approvers_needed=1),
    Case("high risk proposal pending two approvers", P, (high_risk,), "pending_approval", approvers_needed=2),
    Case("high risk, two distinct approvers", A, (high_risk, approve(human("alice"), human("bob"))), "allow", accepted=2),
    Case("frozen window, two admins", A, (frozen, approve(human("root", "admin"), human("ops-lead", "admin"))), "allow",
         accepted=2),
    Case("low budget tightens to two approvers", A, (budget(27), approve(human("alice"))), "pending_approval",
         codes=frozenset({"budget_low"}), accepted=1, approvers_needed=2),
    Case("read-only diagnostics auto-allowed", P, (read_only,), "allow", codes=frozenset({"read_only_auto_allowed"}),
         approvers_needed=0),
    Case("read-only denied when budget exhausted", P, (read_only, budget(39.5)), "deny", codes=frozenset({"budget_exhausted"})),
    Case("read-only denied by global kill switch", P, (read_only, kill_global), "deny",
         codes=frozenset({"kill_switch_global"})),
    Case("read-only denied by service kill switch", P, (read_only, kill_service), "deny",
         codes=frozenset({"kill_switch_service"})),
]


def build(case: Case) -> PolicyInput:
    doc = base()
    for patch in case.patches:
        patch(doc)
    return parse_policy_input(doc)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(engine: OpaPolicyEngine, case: Case) -> None:
    policy_input = build(case)
    record = engine.decide(case.entrypoint, policy_input)  # type: ignore[arg-type]
    d = record.decision
    assert d.outcome == case.outcome, d.reasons
    assert d.allow is (case.outcome == "allow")
    assert case.codes <= set(d.reason_codes), d.reasons
    assert {c for r in d.refused_approvals for c in r.codes} == case.refused, d.refused_approvals
    assert len(d.accepted_approvals) == case.accepted
    if case.approvers_needed is not None:
        assert d.approvers_needed == case.approvers_needed
    assert d.bundle_revision == engine.bundle_revision()
    assert d.action_hash == policy_input.action.action_hash
    assert all(":" in r for r in d.reasons)
    if case.outcome == "deny":
        assert not d.accepted_approvals


# -- the Rego's own defences, with Python normalisation bypassed --------------------------------------------------


def raw_document(approver_ids: list[str], proposer: dict | None = None) -> dict:
    policy_input = build(Case("raw", A, (high_risk,), "pending_approval"))
    doc = policy_input.to_opa()
    if proposer:
        doc["proposal"]["proposed_by"] = proposer
    doc["approvals"] = [
        {"approval_id": f"ap-{i}", "approver": {"id": a, "kind": "human", "roles": ["approver"], "display_name": a},
         "action_hash": doc["action"]["action_hash"], "granted_at": "2026-11-25T11:58:00Z",
         "expires_at": "2026-11-25T12:10:00Z"}
        for i, a in enumerate(approver_ids)
    ]
    return doc


def test_rego_folds_case_and_invisible_characters_itself(engine: OpaPolicyEngine) -> None:
    result = engine.evaluate("pilothouse/approvals/decision", raw_document(["oncall-7", "ONCALL\u200b-7 "]))
    assert result["outcome"] == "pending_approval"
    assert result["accepted_approvals"] == ["ap-0"]
    assert result["refused_approvals"][0]["codes"] == ["duplicate_approver"]


def test_rego_refuses_self_approval_with_unnormalised_ids(engine: OpaPolicyEngine) -> None:
    proposer = {"id": "Dana\u2060", "kind": "human", "roles": ["approver"], "display_name": "Dana"}
    result = engine.evaluate("pilothouse/approvals/decision", raw_document(["DANA", "bob"], proposer))
    assert result["outcome"] == "pending_approval"
    assert result["refused_approvals"][0]["codes"] == ["self_approval"]


def test_garbage_input_is_denied_not_allowed(engine: OpaPolicyEngine) -> None:
    for entrypoint in ("pilothouse/proposal/decision", "pilothouse/approvals/decision"):
        result = engine.evaluate(entrypoint, {"action": {"facts": {"read_only": True}}, "approvals": [{}]})
        assert result["outcome"] == "deny"
        assert result["allow"] is False
        assert any(code.startswith("input_") for code in result["reason_codes"])


# -- replay, errors, CLI ----------------------------------------------------------------------------------------


def test_decisions_replay_identically(engine: OpaPolicyEngine) -> None:
    case = next(c for c in CASES if c.name == "high risk, two distinct approvers")
    first = engine.decide("approvals", build(case))
    second = engine.decide("approvals", build(case))
    assert first == second
    other = engine.decide("proposal", build(case))
    assert other.decision_id != first.decision_id
    assert other.input_hash == first.input_hash


def test_unreachable_opa_is_retryable() -> None:
    from pilothouse.bus.errors import RetryableError
    from pilothouse.policy.adapters.opa import _free_port

    with OpaPolicyEngine("127.0.0.1", _free_port(), timeout_s=0.5) as dead:
        with pytest.raises(PolicyEngineUnavailable) as info:
            dead.decide("proposal", build(CASES[0]))
    assert isinstance(info.value, RetryableError)


def test_undefined_entrypoint_is_permanent(engine: OpaPolicyEngine) -> None:
    with pytest.raises(PolicyEvaluationFailed, match="undefined"):
        engine.evaluate("pilothouse/proposal/no_such_rule", {})


def test_cli_decide_and_bad_input(engine: OpaPolicyEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "input.json"
    good.write_text(build(CASES[-1]).model_dump_json(by_alias=True), encoding="utf-8")
    assert main(["decide", "proposal", "--input", str(good), "--opa-url", engine.endpoint]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["decision"]["outcome"] == "deny"
    bad = tmp_path / "bad.json"
    bad.write_text('{"now": "soon"}', encoding="utf-8")
    assert main(["decide", "proposal", "--input", str(bad), "--opa-url", engine.endpoint]) == 2
    assert "input refused" in capsys.readouterr().err


def test_opa_evaluation_error_is_permanent(tmp_path: Path) -> None:
    """A policy bug (conflicting values) is a 500 from OPA, but retrying cannot fix it: PermanentError."""
    from pilothouse.bus.errors import PermanentError

    (tmp_path / "broken.rego").write_text("package broken\n\nx := 1 if input.a\n\nx := 2 if input.b\n", encoding="utf-8")
    with local_opa_server(tmp_path) as broken:
        assert broken.evaluate("broken/x", {"a": True}) == 1
        with pytest.raises(PolicyEvaluationFailed, match="conflicting") as info:
            broken.evaluate("broken/x", {"a": True, "b": True})
    assert isinstance(info.value, PermanentError)


def test_server_without_the_bundle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "other.rego").write_text("package other\n\ny := 1\n", encoding="utf-8")
    with local_opa_server(tmp_path) as empty:
        with pytest.raises(PolicyEvaluationFailed, match="bundle loaded"):
            empty.decide("proposal", build(CASES[0]))


def test_proxy_environment_is_not_used_for_decisions(engine: OpaPolicyEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTP_PROXY in the environment must not route authorization traffic (here: to a closed port)."""
    from pilothouse.policy.adapters.opa import _free_port

    dead_proxy = f"http://127.0.0.1:{_free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert engine.decide("proposal", build(CASES[-1])).decision.outcome == "deny"

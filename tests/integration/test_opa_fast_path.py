"""The Rego fast path (``usual_decision``) against the full rules (``full_decision``) on the real OPA server.

Both entrypoints answer the usual input (no block, freeze or veto; approvals that pass their own checks) from one
rule body and leave everything else to the full rules. Wherever the fast path is defined, the decision OPA returns
must be byte-identical to what the full rules return for the same input. Inputs: every table case of
test_policy_opa.py, the benchmark's mix, and seeded variations of them (budgets, severities, environments, facts,
approvals, kill switches, freezes, vetoes, and random field replacements or deletions).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from pilothouse.policy.adapters.opa import OpaPolicyEngine
from tests.integration.test_policy_opa import CASES, build, raw_document
from tests.integration.test_policy_opa import engine  # noqa: F401 - the module's private OPA server fixture

pytestmark = pytest.mark.integration

SEED = 20261125
VARIATIONS = 600

Doc = dict[str, Any]


def raw(engine: OpaPolicyEngine, path: str, doc: Doc) -> tuple[int, bytes]:
    """OPA's answer as bytes: the comparison is on the serialised decision, not on parsed values."""
    return engine._post(f"/v1/data/{path}", json.dumps({"input": doc}).encode())


def tweaks(rng: random.Random) -> list[Callable[[Doc], None]]:
    window = {"name": "fz", "start": "2026-11-25T00:00:00Z", "end": "2026-11-26T00:00:00Z"}

    def approvals(d: Doc) -> list[dict]:
        return d.setdefault("approvals", [])

    return [
        lambda d: d["controls"].update(freeze_windows=[window]),
        lambda d: d["controls"].update(freeze_windows=[{**window, "services": ["other"]}]),
        lambda d: d["controls"].update(freeze_windows=[
            {**window, "start": "2026-11-25T12:00:01Z"},  # later today
            {**window, "end": "2026-11-25T12:00:00Z"},  # ended at now
            {**window, "environments": [rng.choice(["staging", "Production", "*"])]},
        ]),
        lambda d: d["controls"]["kill_switch"].update(services=[rng.choice(["Checkout", "other"])]),
        lambda d: d["controls"]["kill_switch"].update(**{"global": rng.choice([True, False, "yes"])}),
        lambda d: d.update(rejections=[{"rejecter": {"id": rng.choice(["zed", "svc:x"]), "kind": "human",
                                                      "roles": []}}]),
        lambda d: d["budget"].update(consumed=rng.choice([0, 20, 27, 30, 33, 35, 36, 39, 39.5, 40, 50])),
        lambda d: d["incident"].update(severity=rng.choice(["sev1", "SEV2", "sev3", "sev9", ""])),
        lambda d: d["action"]["target"].update(environment=rng.choice(["production", "Staging", "development", "qa"])),
        lambda d: d["action"]["facts"].update(blast_radius=rng.choice(["low", "medium", "high"]),
                                              reversible=rng.choice([True, False])),
        lambda d: d["action"]["facts"].update(read_only=rng.choice([True, False])),
        lambda d: d["controls"].update(in_flight_on_target=rng.choice([0, 1, 2])),
        lambda d: approvals(d).extend(copy.deepcopy(approvals(d)[:1])),
        lambda d: [a["approver"].update(roles=rng.choice([["admin"], ["responder"], [], ["Approver "]]))
                   for a in approvals(d)],
        lambda d: [a["approver"].update(id=rng.choice(["Alice", "bob", "oncall-1", "svc:x", "al\u200bice"]))
                   for a in approvals(d)],
        lambda d: [a.update(expires_at=rng.choice(["2026-11-25T11:59:00Z", "2026-11-25T12:00:00Z",
                                                   "2026-11-25T12:30:00Z"]))
                   for a in approvals(d)],
    ]


SCALARS = [None, True, False, 0, 1, -1, 2.5, "", "x", "ALICE", "svc:x", "2026-11-25T12:30:00Z", "bad", [], {}, ["*"]]


def replace_or_delete(doc: Doc, rng: random.Random) -> None:
    """Replace or delete one field anywhere in the document (what a broken or hostile caller might send)."""
    slots: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            slots.append((node, key))
            walk(value)

    walk(doc)
    parent, key = rng.choice(slots)
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    else:
        parent[key] = copy.deepcopy(rng.choice(SCALARS))


def inputs() -> list[Doc]:
    from benchmarks.policy import sample_inputs

    bases = [build(case).to_opa() for case in CASES]
    bases += [policy_input.to_opa() for _, policy_input in sample_inputs()]
    bases.append(raw_document(["alice", "ALICE", "al\u200bice"]))
    rng = random.Random(SEED)
    options = tweaks(rng)
    docs = list(bases)
    for _ in range(VARIATIONS):
        doc = copy.deepcopy(rng.choice(bases))
        for tweak in rng.sample(options, rng.randint(0, 4)):
            tweak(doc)
        if rng.random() < 0.3:
            replace_or_delete(doc, rng)
        docs.append(doc)
    return docs


@pytest.mark.parametrize("entrypoint", ["proposal", "approvals"])
def test_fast_path_decisions_equal_the_full_rules(engine: OpaPolicyEngine, entrypoint: str) -> None:
    fast_taken = 0
    for doc in inputs():
        status, decision = raw(engine, f"pilothouse/{entrypoint}/decision", doc)
        _, full = raw(engine, f"pilothouse/{entrypoint}/full_decision", doc)
        assert status == 200
        assert decision == full, json.dumps(doc)
        _, fast = raw(engine, f"pilothouse/{entrypoint}/usual_decision", doc)
        if b'"result"' in fast:
            fast_taken += 1
            assert fast == decision, json.dumps(doc)
    # the fast path must actually be taken for a good share of the inputs, or this test compares nothing
    assert fast_taken >= 50, fast_taken


def test_bench_mix_takes_the_fast_path(engine: OpaPolicyEngine) -> None:
    """The benchmark measures the usual input: every one of its four documents is answered by the fast path."""
    from benchmarks.policy import sample_inputs

    for entrypoint, policy_input in sample_inputs():
        _, fast = raw(engine, f"pilothouse/{entrypoint}/usual_decision", policy_input.to_opa())
        assert b'"result"' in fast, (entrypoint, policy_input.action.action_type)

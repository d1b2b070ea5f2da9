"""Tripwire for the Rego fast path (policies/README.md, "Performance").

``risk.usual`` / ``usual_decision`` restate the full rules for the usual input, and apply only where no block, input
error, refusal, freeze or veto can fire. A rule added to the full rules (a new block, say) would be skipped by the fast
path unless its condition also stops the fast path from applying: that would fail open. So the set of rule
definitions in the full rules is pinned here; changing it fails this test until someone has extended the fast path's
conditions (or confirmed they need none), added a case to tests/integration/test_opa_fast_path.py, and updated the pin.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

POLICIES = Path(__file__).resolve().parents[2] / "policies" / "pilothouse"
HEAD = re.compile(r"^(?:default\s+)?([a-z_][a-z0-9_]*)(?=\s|\[|\(|:)", re.M)

# rule name -> number of definitions, for the full rules only (the fast path's own rules start with "usual")
PINNED = {
    "risk/risk.rego": {
        "cfg": 1, "now_ns": 1, "target_service": 1, "environment": 1, "read_only": 1, "state_changing": 1,
        "proposer_id": 1, "input_errors": 1, "all_input_errors": 6, "valid_action_hash": 1, "valid_facts": 1,
        "valid_budget": 1, "validator_norm_ids": 1, "validator_ids": 1, "valid_validations": 1, "admissible": 1,
        "blocks": 8, "blast_points": 1, "reversibility_points": 1, "environment_points": 1, "severity_points": 1,
        "score": 1, "tier": 1, "cost": 1, "budget_limit": 1, "budget_remaining": 1, "budget_exhausted": 1,
        "budget_low": 1, "budget_window_current": 1, "killed_services": 1, "in_flight": 1, "matches_scope": 2,
        "active_freezes": 1, "frozen": 1, "tightening": 1, "freeze_minimum": 1, "approvers_needed": 2,
        "approver_roles": 3, "notes": 4, "read_only_note": 1, "approval_required_note": 1, "budget_low_note": 1,
        "format_reasons": 1, "codes": 1, "assessment": 2, "budget_low_flag": 1,
    },
    "approvals/approvals.rego": {
        "recorded": 1, "ids": 1, "display_id": 1, "approver_is_human": 1, "has_hash": 1, "has_expiry": 1,
        "role_list": 1, "has_required_role": 1, "well_formed": 1, "own_refusals": 12, "block_refusals": 1,
        "approval_ok": 1, "approval_id_reused": 1, "own": 1, "acceptable": 1, "first_approval_of_same_human": 1,
        "duplicate_refusal": 1, "duplicate_note": 1, "refusals": 1, "accepted": 1, "refused": 1, "sufficient": 1,
        "outcome": 2, "still_needed": 1, "status_notes": 3, "sufficient_note": 1, "pending_note": 1,
        "refused_note": 1, "all_reasons": 1, "reasons": 1, "reason_codes": 1, "decision": 1, "full_decision": 1,
    },
    "proposal/proposal.rego": {
        "outcome": 2, "reasons": 1, "reason_codes": 1, "decision": 1, "full_decision": 1, "still_needed": 1,
    },
}


def full_rules(path: Path) -> Counter:
    names = Counter(m.group(1) for m in HEAD.finditer(path.read_text()))
    return Counter({n: c for n, c in names.items()
                    if n not in ("package", "import", "else") and not n.startswith("usual")})


def test_the_full_rules_the_fast_path_restates_are_unchanged():
    for rel, pinned in PINNED.items():
        got = full_rules(POLICIES / rel)
        added = {n: got[n] for n in got if got[n] != pinned.get(n)}
        removed = sorted(set(pinned) - set(got))
        assert not added and not removed, (
            f"{rel}: rule definitions changed (now {added}, gone {removed}). The fast path (risk.usual, "
            f"usual_decision) restates these rules and must not apply where a new block/refusal/note could fire: "
            f"extend its conditions, add a case to tests/integration/test_opa_fast_path.py, then update PINNED.")


def test_the_tripwire_sees_a_new_block(tmp_path):
    src = (POLICIES / "risk/risk.rego").read_text()
    changed = tmp_path / "risk.rego"
    changed.write_text(src + '\nblocks contains {"code": "weekend", "message": "no changes at weekends"} if false\n')
    assert full_rules(changed)["blocks"] == PINNED["risk/risk.rego"]["blocks"] + 1

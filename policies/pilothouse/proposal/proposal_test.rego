package pilothouse.proposal_test

import data.pilothouse.fixtures
import data.pilothouse.proposal

base := fixtures.base_input

decide(patch) := d if {
	d := proposal.decision with input as object.union(base, patch)
}

read_only_facts := {"action": {"action_type": "collect_diagnostics", "facts": {"reversible": true, "blast_radius": "low", "read_only": true}}}

test_medium_risk_needs_one_approver if {
	d := decide({})
	d.outcome == "pending_approval"
	d.requires_approval
	not d.allow
	d.approvers_needed == 1
	d.approvals_still_needed == 1
	d.approver_roles == ["admin", "approver"]
	d.risk.tier == "medium"
	d.risk.score == 4
	d.reason_codes == ["approval_required"]
	d.bundle_revision == data.pilothouse.config.bundle_revision
	d.action_hash == base.action.action_hash
}

test_low_risk_in_staging_any_responder if {
	d := decide({"action": {"target": {"environment": "staging"}}})
	d.risk.tier == "low"
	d.approvers_needed == 1
	d.approver_roles == ["admin", "approver", "responder"]
}

test_high_blast_radius_needs_two if {
	d := decide({"action": {"action_type": "shift_traffic", "facts": {"blast_radius": "high"}}})
	d.risk.tier == "high"
	d.approvers_needed == 2
	d.outcome == "pending_approval"
}

test_irreversible_in_production_is_high if {
	d := decide({"action": {"facts": {"reversible": false}}})
	d.risk.tier == "high"
	d.risk.score == 8
}

test_severity_raises_risk if {
	calm := decide({"action": {"facts": {"blast_radius": "medium"}}})
	calm.risk.tier == "medium"
	hot := decide({"action": {"facts": {"blast_radius": "medium"}}, "incident": {"severity": "SEV1"}})
	hot.risk.tier == "high"
	hot.approvers_needed == 2
}

test_unknown_environment_scored_like_production if {
	d := decide({"action": {"target": {"environment": "moon-base"}}})
	d.risk.score == 4
}

test_read_only_auto_allowed if {
	d := decide(read_only_facts)
	d.outcome == "allow"
	d.allow
	not d.requires_approval
	d.approvers_needed == 0
	d.risk.tier == "read_only"
	d.risk.cost == 1
	d.reason_codes == ["read_only_auto_allowed"]
}

test_read_only_allowed_during_freeze if {
	freeze := {"name": "black-friday", "start": "2026-11-25T00:00:00Z", "end": "2026-11-30T00:00:00Z"}
	d := decide(object.union(read_only_facts, {"controls": {"freeze_windows": [freeze]}}))
	d.outcome == "allow"
}

test_read_only_denied_when_budget_exhausted if {
	d := decide(object.union(read_only_facts, {"budget": {"consumed": 39.5}}))
	d.outcome == "deny"
	not d.allow
	"budget_exhausted" in d.reason_codes
}

test_read_only_denied_by_global_kill_switch if {
	d := decide(object.union(read_only_facts, {"controls": {"kill_switch": {"global": true}}}))
	d.outcome == "deny"
	"kill_switch_global" in d.reason_codes
}

test_read_only_denied_by_service_kill_switch_any_case if {
	d := decide(object.union(read_only_facts, {"controls": {"kill_switch": {"services": ["CHECKOUT"]}}}))
	d.outcome == "deny"
	"kill_switch_service" in d.reason_codes
}

test_kill_switch_of_other_service_does_not_apply if {
	d := decide({"controls": {"kill_switch": {"services": ["payments"]}}})
	d.outcome == "pending_approval"
}

test_gate1_no_validation_denied if {
	d := decide({"proposal": {"hypothesis": {"validations": []}}})
	d.outcome == "deny"
	d.reason_codes == ["approval_required", "hypothesis_not_validated"]
}

validation_by(principal) := {"proposal": {"hypothesis": {"validations": [{
	"validator": principal,
	"validated_at": "2026-11-25T11:00:00Z",
}]}}}

test_gate1_model_validation_does_not_count if {
	d := decide(validation_by({"id": "reasoning", "kind": "human", "roles": ["responder"]}))
	"hypothesis_not_validated" in d.reason_codes
}

test_gate1_validation_without_responder_role_does_not_count if {
	d := decide(validation_by({"id": "dana", "kind": "human", "roles": ["viewer"]}))
	"hypothesis_not_validated" in d.reason_codes
}

test_gate1_admin_validation_counts if {
	d := decide(validation_by({"id": "dana", "kind": "human", "roles": ["Admin"]}))
	d.outcome == "pending_approval"
}

test_gate1_proposer_cannot_validate if {
	human_proposal := {"proposal": {"proposed_by": {"id": "Dana", "kind": "human", "roles": ["responder"]}}}
	d := decide(object.union(human_proposal, validation_by({"id": "dana", "kind": "human", "roles": ["responder"]})))
	"hypothesis_not_validated" in d.reason_codes
}

test_gate1_validation_from_the_future_does_not_count if {
	future := {"proposal": {"hypothesis": {"validations": [{
		"validator": {"id": "dana", "kind": "human", "roles": ["responder"]},
		"validated_at": "2026-11-25T13:00:00Z",
	}]}}}
	d := decide(future)
	"hypothesis_not_validated" in d.reason_codes
}

test_budget_low_adds_an_approver if {
	d := decide({"budget": {"consumed": 33}})
	d.outcome == "pending_approval"
	d.approvers_needed == 2
	d.risk.budget_low
	"budget_low" in d.reason_codes
}

test_budget_exhausted_denies_state_change if {
	d := decide({"budget": {"consumed": 37}})
	d.outcome == "deny"
	d.risk.budget_remaining == 3
	"budget_exhausted" in d.reason_codes
}

test_budget_limit_per_scope if {
	d := decide({"budget": {"consumed": 37}}) with data.pilothouse.config.budgets.limits as {"checkout": 100}
	d.outcome == "pending_approval"
	d.risk.budget_limit == 100
}

test_stale_budget_window_denied if {
	d := decide({"budget": {"window_end": "2026-11-25T06:00:00Z"}})
	d.outcome == "deny"
	"budget_window_stale" in d.reason_codes
}

test_freeze_requires_two_admins if {
	freeze := {"name": "black-friday", "start": "2026-11-25T00:00:00Z", "end": "2026-11-30T00:00:00Z", "environments": ["production"]}
	d := decide({"controls": {"freeze_windows": [freeze]}})
	d.outcome == "pending_approval"
	d.approvers_needed == 2
	d.approver_roles == ["admin"]
	d.risk.frozen_by == ["black-friday"]
	"freeze_window_active" in d.reason_codes
}

test_freeze_of_other_service_or_time_does_not_apply if {
	other := {"name": "payments-freeze", "start": "2026-11-25T00:00:00Z", "end": "2026-11-30T00:00:00Z", "services": ["payments"]}
	past := {"name": "old", "start": "2026-11-01T00:00:00Z", "end": "2026-11-02T00:00:00Z"}
	d := decide({"controls": {"freeze_windows": [other, past]}})
	d.approvers_needed == 1
	d.risk.frozen_by == []
}

test_freeze_and_low_budget_capped if {
	freeze := {"name": "f", "start": "2026-11-25T00:00:00Z", "end": "2026-11-30T00:00:00Z", "services": ["*"]}
	d := decide({
		"action": {"facts": {"reversible": false}},
		"budget": {"consumed": 28},
		"controls": {"freeze_windows": [freeze]},
	})
	d.risk.tier == "high"
	d.approvers_needed == 3
}

test_concurrency_cap_denies if {
	d := decide({"controls": {"in_flight_on_target": 1}})
	d.outcome == "deny"
	"concurrency_cap" in d.reason_codes
}

test_concurrency_cap_does_not_limit_read_only if {
	d := decide(object.union(read_only_facts, {"controls": {"in_flight_on_target": 5}}))
	d.outcome == "allow"
}

test_invalid_now_denied if {
	d := decide({"now": "yesterday"})
	d.outcome == "deny"
	"input_now_invalid" in d.reason_codes
}

test_invalid_hash_and_facts_denied if {
	d := decide({"action": {"action_hash": "not-a-hash", "facts": {"read_only": "yes"}}})
	d.outcome == "deny"
	"input_action_hash_missing" in d.reason_codes
	"input_facts_invalid" in d.reason_codes
}

test_invalid_budget_denied if {
	d := decide({"budget": {"consumed": -1}})
	d.outcome == "deny"
	"input_budget_invalid" in d.reason_codes
}

test_empty_input_denied_with_reasons if {
	d := proposal.decision with input as {}
	d.outcome == "deny"
	not d.allow
	"input_target_invalid" in d.reason_codes
	"input_now_invalid" in d.reason_codes
	count(d.reasons) == count(d.reason_codes)
}

# The fast path (usual_decision) must be defined for the usual input and equal the full rules there.
fast_path_agrees(patch) if {
	inp := object.union(base, patch)
	fast := proposal.usual_decision with input as inp
	fast == proposal.full_decision with input as inp
}

test_fast_path_equals_full_rules if {
	fast_path_agrees({})
	fast_path_agrees(read_only_facts)
	fast_path_agrees({"action": {"target": {"environment": "staging"}}})
	fast_path_agrees({"action": {"target": {"environment": "qa"}}, "incident": {"severity": "SEV1"}})
	fast_path_agrees({"action": {"action_type": "shift_traffic", "facts": {"blast_radius": "high", "reversible": false}}})
	fast_path_agrees({"budget": {"consumed": 27}})
	fast_path_agrees(object.union(read_only_facts, {"budget": {"consumed": 39}}))
	fast_path_agrees({"rejections": []})
	fast_path_agrees({"controls": {"kill_switch": {"services": ["payments"]}}})
	fast_path_agrees({"controls": {"freeze_windows": [
		object.union(window_now, {"start": "2026-11-25T13:00:00Z"}),
		object.union(window_now, {"end": "2026-11-25T12:00:00Z"}),
		object.union(window_now, {"environments": ["staging"]}),
		object.union(window_now, {"services": ["payments"]}),
		object.remove(window_now, ["name"]),
		object.union(window_now, {"start": "not a time"}),
	]}})
}

window_now := {"name": "f", "start": "2026-11-25T11:00:00Z", "end": "2026-11-25T13:00:00Z"}

# Anything that blocks, freezes or vetoes is left to the full rules.
test_fast_path_leaves_unusual_inputs_to_the_full_rules if {
	not proposal.usual_decision with input as object.union(base, {"controls": {"in_flight_on_target": 1}})
	not proposal.usual_decision with input as object.union(base, {"controls": {"kill_switch": {"global": true}}})
	not proposal.usual_decision with input as object.union(base, {"controls": {"kill_switch": {"services": ["CheckOut"]}}})
	not proposal.usual_decision with input as object.union(base, {"controls": {"freeze_windows": [window_now]}})
	not proposal.usual_decision with input as object.union(base, {"controls": {"freeze_windows": [object.union(
		window_now,
		{"services": ["checkout"], "environments": ["production"]},
	)]}})
	not proposal.usual_decision with input as object.union(base, {"rejections": [{"rejecter": {"id": "zed"}}]})
	not proposal.usual_decision with input as object.union(base, {"budget": {"consumed": 37}})
	not proposal.usual_decision with input as object.union(base, {"now": "2026-11-26T00:00:00Z"})
	not proposal.usual_decision with input as object.union(base, {"proposal": {"hypothesis": {"validations": []}}})
	not proposal.usual_decision with input as object.union(base, {"proposal": {"proposed_by": {"id": "oncall-1"}}})
	not proposal.usual_decision with input as object.union(base, {"action": {"facts": {"blast_radius": "huge"}}})
	not proposal.usual_decision with input as object.remove(base, ["controls"])
}

package pilothouse.approvals_test

import data.pilothouse.approvals
import data.pilothouse.fixtures

base := fixtures.base_input

high_risk := {"action": {"action_type": "shift_traffic", "facts": {"blast_radius": "high"}}}

decide(patch, recorded) := d if {
	d := approvals.decision with input as object.union(object.union(base, patch), {"approvals": recorded})
}

# An approval by a principal, otherwise identical to Alice's.
by(id, principal_patch) := object.union(fixtures.alice, {
	"approval_id": sprintf("ap-%v", [id]),
	"approver": object.union({"id": id, "kind": "human", "roles": ["approver"]}, principal_patch),
})

refused_codes(d) := {c | some r in d.refused_approvals; some c in r.codes}

test_one_approver_suffices_for_medium if {
	d := decide({}, [fixtures.alice])
	d.outcome == "allow"
	d.allow
	d.accepted_approvals == ["ap-alice"]
	d.refused_approvals == []
	d.approvals_still_needed == 0
	"approvals_sufficient" in d.reason_codes
}

test_no_approvals_pending if {
	d := decide({}, [])
	d.outcome == "pending_approval"
	d.requires_approval
	d.approvals_still_needed == 1
	"approvals_pending" in d.reason_codes
}

test_two_distinct_humans_for_high if {
	one := decide(high_risk, [fixtures.alice])
	one.outcome == "pending_approval"
	one.approvals_still_needed == 1
	two := decide(high_risk, [fixtures.alice, fixtures.bob])
	two.outcome == "allow"
	two.accepted_approvals == ["ap-alice", "ap-bob"]
}

test_same_human_twice_case_variant if {
	d := decide(high_risk, [fixtures.alice, by("ALICE", {})])
	d.outcome == "pending_approval"
	d.accepted_approvals == ["ap-alice"]
	d.refused_approvals[0].approval_id == "ap-ALICE"
	d.refused_approvals[0].approver_id == "alice"
	d.refused_approvals[0].codes == ["duplicate_approver"]
}

test_same_human_twice_invisible_character_variant if {
	d := decide(high_risk, [fixtures.alice, by("\u200ba\u200dlice\ufe0f ", {})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"duplicate_approver"}
}

test_expired_first_approval_does_not_block_a_fresh_one if {
	stale := object.union(fixtures.alice, {"approval_id": "ap-old", "expires_at": "2026-11-25T11:59:59Z"})
	d := decide({}, [stale, fixtures.alice])
	d.outcome == "allow"
	d.accepted_approvals == ["ap-alice"]
	refused_codes(d) == {"expired"}
}

test_self_approval_refused if {
	human_proposal := {"proposal": {"proposed_by": {"id": "alice", "kind": "human", "roles": ["approver"]}}}
	d := decide(human_proposal, [by("Alice", {})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"self_approval"}
}

test_validator_cannot_approve if {
	d := decide({}, [by("ONCALL-1", {"roles": ["approver", "responder"]})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"approver_is_validator"}
}

test_service_principal_refused_even_if_claiming_human if {
	d := decide({}, [by("actuator", {}), by("svc:deployer", {})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"non_human_principal"}
	count(d.refused_approvals) == 2
}

test_model_principal_refused if {
	d := decide({}, [by("llama", {"kind": "model"}), by("reasoning", {"kind": "service"})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"non_human_principal", "self_approval"}
}

test_hash_mismatch_refused if {
	changed := object.union(fixtures.alice, {"action_hash": fixtures.other_hash})
	d := decide({}, [changed])
	d.outcome == "pending_approval"
	refused_codes(d) == {"hash_mismatch"}
}

test_missing_hash_refused if {
	d := decide({}, [object.remove(fixtures.alice, ["action_hash"])])
	refused_codes(d) == {"hash_mismatch", "approval_malformed"}
}

test_expired_refused if {
	d := decide({}, [object.union(fixtures.alice, {"expires_at": "2026-11-25T12:00:00Z"})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"expired"}
}

test_missing_expiry_refused if {
	d := decide({}, [object.remove(fixtures.alice, ["expires_at"])])
	refused_codes(d) == {"expired", "approval_malformed"}
}

test_approval_from_the_future_refused if {
	d := decide({}, [object.union(fixtures.alice, {"granted_at": "2026-11-25T12:00:01Z"})])
	refused_codes(d) == {"granted_in_future"}
}

test_responder_cannot_approve_medium if {
	d := decide({}, [by("carol", {"roles": ["responder"]})])
	d.outcome == "pending_approval"
	refused_codes(d) == {"missing_role"}
}

freeze := {"controls": {"freeze_windows": [{"name": "black-friday", "start": "2026-11-25T00:00:00Z", "end": "2026-11-30T00:00:00Z"}]}}

test_frozen_window_refuses_non_admins if {
	d := decide(freeze, [fixtures.alice, fixtures.root])
	d.outcome == "pending_approval"
	d.accepted_approvals == ["ap-root"]
	refused_codes(d) == {"frozen_window"}
}

test_frozen_window_two_admins_allowed if {
	d := decide(freeze, [fixtures.root, by("ops-lead", {"roles": ["admin"]})])
	d.outcome == "allow"
}

test_exhausted_budget_refuses_all if {
	d := decide({"budget": {"consumed": 40}}, [fixtures.alice])
	d.outcome == "deny"
	not d.allow
	not d.requires_approval
	d.accepted_approvals == []
	refused_codes(d) == {"budget_exhausted"}
}

test_global_kill_switch_refuses_all if {
	d := decide({"controls": {"kill_switch": {"global": true}}}, [fixtures.alice, fixtures.bob])
	d.outcome == "deny"
	refused_codes(d) == {"kill_switch_global"}
	count(d.refused_approvals) == 2
}

test_service_kill_switch_refuses_all if {
	d := decide({"controls": {"kill_switch": {"services": ["checkout"]}}}, [fixtures.alice])
	d.outcome == "deny"
	refused_codes(d) == {"kill_switch_service"}
}

test_not_admissible_refuses_all if {
	d := decide({"proposal": {"hypothesis": {"validations": []}}}, [fixtures.alice])
	d.outcome == "deny"
	refused_codes(d) == {"hypothesis_not_validated"}
}

test_read_only_needs_no_approval if {
	d := decide({"action": {"facts": {"read_only": true}}}, [])
	d.outcome == "allow"
	d.approvers_needed == 0
}

test_approval_without_id_listed_by_index if {
	d := decide({}, [object.remove(by("", {"kind": "model"}), ["approval_id"])])
	d.refused_approvals[0].approval_id == "#0"
	d.refused_approvals[0].approver_id == ""
}

test_empty_input_denied if {
	d := approvals.decision with input as {}
	d.outcome == "deny"
	d.accepted_approvals == []
}

test_approval_without_approver_is_refused if {
	d := decide({}, [object.remove(fixtures.alice, ["approver"])])
	d.outcome == "pending_approval"
	d.accepted_approvals == []
	"approval_malformed" in refused_codes(d)
	"non_human_principal" in refused_codes(d)
	"missing_role" in refused_codes(d)
}

test_approval_without_roles_is_refused if {
	d := decide({}, [object.union(fixtures.alice, {"approver": {"roles": null}})])
	d.accepted_approvals == []
	"missing_role" in refused_codes(d)
}

test_reused_approval_id_counts_once if {
	forged := object.union(fixtures.bob, {"approval_id": "ap-alice"})
	d := decide(high_risk, [fixtures.alice, forged])
	d.outcome == "pending_approval"
	d.accepted_approvals == ["ap-alice"]
	refused_codes(d) == {"duplicate_approval_id"}
}

rejection(id, kind) := {
	"rejection_id": sprintf("rej-%v", [id]),
	"rejecter": {"id": id, "kind": kind, "roles": ["approver"]},
	"action_hash": fixtures.alice.action_hash,
	"rejected_at": "2026-11-25T11:59:00Z",
	"comment": "not during peak",
}

test_human_reject_vetoes_sufficient_approvals if {
	d := decide({"rejections": [rejection("carol", "human")]}, [fixtures.alice])
	d.outcome == "deny"
	not d.allow
	"rejected_by_human" in d.reason_codes
	d.accepted_approvals == []
}

test_service_principal_cannot_veto if {
	d := decide({"rejections": [rejection("svc:reasoning", "human")]}, [fixtures.alice])
	d.outcome == "allow"
	not "rejected_by_human" in d.reason_codes
}

# The early exit (approval_ok) must agree with the full refusal rules: for each single approval, it holds exactly
# when own_refusals has nothing for it.
early_exit_agrees(patch, approval) if {
	inp := object.union(object.union(base, patch), {"approvals": [approval]})
	refusals := approvals.own_refusals with input as inp
	approvals.approval_ok(0) with input as inp
	count(object.get(refusals, 0, set())) == 0
}

early_exit_agrees(patch, approval) if {
	inp := object.union(object.union(base, patch), {"approvals": [approval]})
	refusals := approvals.own_refusals with input as inp
	not approvals.approval_ok(0) with input as inp
	count(object.get(refusals, 0, set())) > 0
}

test_early_exit_agrees_with_every_refusal_rule if {
	early_exit_agrees({}, fixtures.alice)
	early_exit_agrees({}, by("svc:deployer", {}))
	early_exit_agrees({}, by("model:gpt", {"kind": "human"}))
	early_exit_agrees({}, by("reasoning", {}))
	early_exit_agrees({"proposal": {"proposed_by": {"id": "alice"}}}, fixtures.alice)
	early_exit_agrees({}, by("oncall-1", {}))
	early_exit_agrees({}, object.union(fixtures.alice, {"action_hash": fixtures.other_hash}))
	early_exit_agrees({}, object.union(fixtures.alice, {"expires_at": "2026-11-25T11:59:00Z"}))
	early_exit_agrees({}, object.union(fixtures.alice, {"granted_at": "2026-11-25T12:01:00Z"}))
	early_exit_agrees({}, by("dave", {"roles": ["responder"]}))
	early_exit_agrees({}, object.remove(fixtures.alice, ["expires_at"]))
	early_exit_agrees(
		{"controls": {"freeze_windows": [{
			"name": "f", "start": "2026-11-25T00:00:00Z", "end": "2026-11-26T00:00:00Z",
			"environments": ["*"], "services": ["*"],
		}]}},
		fixtures.alice,
	)
}

# The fast path (usual_decision) must be defined for the usual input and equal the full rules there.
fast_path_agrees(patch, recorded) if {
	inp := object.union(object.union(base, patch), {"approvals": recorded})
	fast := approvals.usual_decision with input as inp
	fast == approvals.full_decision with input as inp
}

test_fast_path_equals_full_rules if {
	fast_path_agrees({}, [])
	fast_path_agrees({}, [fixtures.alice])
	fast_path_agrees(high_risk, [fixtures.alice])
	fast_path_agrees(high_risk, [fixtures.alice, fixtures.bob])
	fast_path_agrees(high_risk, [fixtures.alice, by("ALICE", {}), by("\u200ba\u200dlice\ufe0f ", {})])
	fast_path_agrees(high_risk, [by("Bob", {}), fixtures.alice, fixtures.bob, fixtures.root])
	fast_path_agrees({"budget": {"consumed": 27}}, [fixtures.alice])
	fast_path_agrees({"action": {"facts": {"read_only": true}}}, [])
}

# An approval that fails any of its own checks, and any block or freeze, is left to the full rules.
test_fast_path_leaves_unusual_approvals_to_the_full_rules if {
	not fast_path_defined({}, [object.union(fixtures.alice, {"expires_at": "2026-11-25T11:59:00Z"})])
	not fast_path_defined({}, [object.union(fixtures.alice, {"granted_at": "2026-11-25T12:01:00Z"})])
	not fast_path_defined({}, [object.union(fixtures.alice, {"action_hash": fixtures.other_hash})])
	not fast_path_defined({}, [by("dave", {"roles": ["responder"]})])
	not fast_path_defined({}, [by("oncall-1", {})])
	not fast_path_defined({}, [by("svc:deployer", {})])
	not fast_path_defined({}, [by("reasoning", {})])
	not fast_path_defined({}, [by("carol", {"kind": "service"})])
	not fast_path_defined({"proposal": {"proposed_by": {"id": "alice"}}}, [fixtures.alice])
	not fast_path_defined({}, [fixtures.alice, object.union(fixtures.bob, {"approval_id": "ap-alice"})])
	not fast_path_defined({"action": {"facts": {"read_only": true}}}, [fixtures.alice])
	not fast_path_defined({"controls": {"kill_switch": {"global": true}}}, [fixtures.alice])
}

fast_path_defined(patch, recorded) if {
	approvals.usual_decision with input as object.union(object.union(base, patch), {"approvals": recorded})
}

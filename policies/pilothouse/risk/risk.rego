# METADATA
# title: Risk assessment shared by both entrypoints
# description: >-
#   Everything both gates need: input sanity, Gate 1 (a human responder validated the hypothesis), the risk score and
#   tier, the risk budget, concurrency caps, change freezes and the kill switches. Time comes only from input.now so
#   every decision replays identically from (input, bundle revision).
package pilothouse.risk

import data.pilothouse.identity

cfg := data.pilothouse.config

now_ns := time.parse_rfc3339_ns(input.now)

target_service := identity.normalise(input.action.target.service)

environment := lower(input.action.target.environment)

read_only if input.action.facts.read_only == true

state_changing if not read_only

proposer_id := identity.normalise(input.proposal.proposed_by.id)

# ---------------------------------------------------------------------------------------------------------------
# Input sanity: a missing or malformed field must deny with a clear reason, never fall through to allow.
# ---------------------------------------------------------------------------------------------------------------

# Early exit: well-formed input (the usual case: the Python side validates it first) is one rule body; the
# per-field reasons are only worked out when something is wrong.
input_errors := set() if {
	now_ns
	valid_action_hash
	valid_facts
	target_service
	environment
	valid_budget
} else := all_input_errors

all_input_errors contains {"code": "input_now_invalid", "message": "input.now must be an RFC 3339 timestamp"} if {
	not now_ns
}

all_input_errors contains {"code": "input_action_hash_missing", "message": "input.action.action_hash is missing or empty"} if {
	not valid_action_hash
}

valid_action_hash if regex.match(`^[0-9a-f]{64}$`, input.action.action_hash)

all_input_errors contains {"code": "input_facts_invalid", "message": msg} if {
	not valid_facts
	msg := "input.action.facts needs reversible (bool), read_only (bool) and blast_radius (low|medium|high)"
}

valid_facts if {
	is_boolean(input.action.facts.reversible)
	is_boolean(input.action.facts.read_only)
	cfg.risk.blast_radius_points[input.action.facts.blast_radius]
}

all_input_errors contains {"code": "input_target_invalid", "message": msg} if {
	not target_service
	msg := "input.action.target.service and input.action.target.environment are required"
}

all_input_errors contains {"code": "input_target_invalid", "message": msg} if {
	not environment
	msg := "input.action.target.service and input.action.target.environment are required"
}

all_input_errors contains {"code": "input_budget_invalid", "message": msg} if {
	not valid_budget
	msg := "input.budget needs scope, consumed (number >= 0), window_start and window_end (RFC 3339)"
}

valid_budget if {
	is_number(input.budget.consumed)
	input.budget.consumed >= 0
	is_string(input.budget.scope)
	time.parse_rfc3339_ns(input.budget.window_start)
	time.parse_rfc3339_ns(input.budget.window_end)
}

# ---------------------------------------------------------------------------------------------------------------
# Gate 1: the hypothesis the proposal addresses was validated by a human responder who did not propose it.
# ---------------------------------------------------------------------------------------------------------------

# Everyone who validated, valid or not: none of them may approve (separation of duties is judged on the claim).
validator_norm_ids[k] := identity.normalise(v.validator.id) if some k, v in input.proposal.hypothesis.validations

validator_ids := {id | some id in validator_norm_ids}

valid_validations contains k if {
	some k, v in input.proposal.hypothesis.validations
	id := validator_norm_ids[k]
	identity.is_human_with_id(v.validator, id)
	identity.has_any_role(v.validator, cfg.validator_roles)
	id != proposer_id
	time.parse_rfc3339_ns(v.validated_at) <= now_ns
}

admissible if count(valid_validations) > 0

blocks contains {"code": "hypothesis_not_validated", "message": msg} if {
	not admissible
	msg := sprintf(
		"Gate 1: hypothesis %v has no validation by a human with role %v who did not propose the action",
		[object.get(input.proposal.hypothesis, "hypothesis_id", "<missing>"), concat("|", cfg.validator_roles)],
	)
}

# ---------------------------------------------------------------------------------------------------------------
# Risk score and tier.
# ---------------------------------------------------------------------------------------------------------------

blast_points := cfg.risk.blast_radius_points[input.action.facts.blast_radius]

reversibility_points := 0 if {
	input.action.facts.reversible == true
} else := cfg.risk.irreversible_points if {
	input.action.facts.reversible == false
}

# An unknown environment is scored like production: fail towards caution.
environment_points := object.get(cfg.risk.environment_points, environment, cfg.risk.unknown_environment_points)

severity_points := object.get(cfg.risk.severity_points, lower(object.get(input.incident, "severity", "")), 0)

score := ((blast_points + reversibility_points) + environment_points) + severity_points

# One rule with an else chain: evaluated top-down, stops at the first match (cheaper than four separate rules).
tier := "read_only" if {
	read_only
} else := "low" if {
	score <= cfg.risk.low_max
} else := "medium" if {
	score <= cfg.risk.medium_max
} else := "high" if {
	score > cfg.risk.medium_max
}

# ---------------------------------------------------------------------------------------------------------------
# Risk budget: executed actions consume it (input.budget.consumed, summed by the ledger over the window).
# ---------------------------------------------------------------------------------------------------------------

cost := cfg.risk.read_only_cost if {
	read_only
} else := score

budget_limit := object.get(cfg.budgets.limits, input.budget.scope, cfg.budgets.default_limit)

budget_remaining := budget_limit - input.budget.consumed

budget_exhausted if budget_remaining < cost

# Low water: what is left after this action would be below the configured fraction of the limit.
budget_low if {
	not budget_exhausted
	budget_remaining - cost < budget_limit * cfg.budgets.low_water_fraction
}

budget_window_current if {
	time.parse_rfc3339_ns(input.budget.window_start) <= now_ns
	now_ns < time.parse_rfc3339_ns(input.budget.window_end)
}

blocks contains {"code": "budget_exhausted", "message": msg} if {
	budget_exhausted
	msg := sprintf(
		"risk budget %v exhausted: %v of %v left, this action costs %v",
		[input.budget.scope, budget_remaining, budget_limit, cost],
	)
}

blocks contains {"code": "budget_window_stale", "message": msg} if {
	valid_budget
	now_ns
	not budget_window_current
	msg := sprintf("risk budget window %v..%v does not contain now (%v): budget figures are stale", [
		input.budget.window_start, input.budget.window_end, input.now,
	])
}

# ---------------------------------------------------------------------------------------------------------------
# A human's "reject" is a veto: no number of approvals outweighs it (only humans can veto; a service cannot).
# ---------------------------------------------------------------------------------------------------------------

blocks contains {"code": "rejected_by_human", "message": msg} if {
	some r in object.get(input, "rejections", [])
	id := identity.normalise(r.rejecter.id)
	identity.is_human_with_id(r.rejecter, id)
	msg := sprintf("%v rejected this action (veto): %v", [id, object.get(r, "comment", "")])
}

# ---------------------------------------------------------------------------------------------------------------
# Kill switches, concurrency caps and change freezes.
# ---------------------------------------------------------------------------------------------------------------

blocks contains {"code": "kill_switch_global", "message": "the global kill switch is engaged: nothing runs"} if {
	input.controls.kill_switch.global == true
}

killed_services := {identity.normalise(s) | some s in input.controls.kill_switch.services}

blocks contains {"code": "kill_switch_service", "message": msg} if {
	killed_services[target_service]
	msg := sprintf("the kill switch for service %v is engaged", [target_service])
}

in_flight := object.get(object.get(input, "controls", {}), "in_flight_on_target", 0)

blocks contains {"code": "concurrency_cap", "message": msg} if {
	state_changing
	in_flight >= cfg.concurrency.max_in_flight_per_target
	msg := sprintf("%v actions already in flight on %v %v (cap %v)", [
		in_flight, object.get(input.action.target, "kind", "target"), object.get(input.action.target, "name", target_service),
		cfg.concurrency.max_in_flight_per_target,
	])
}

blocks contains err if some err in input_errors

matches_scope(values, _) if "*" in values

matches_scope(values, wanted) if {
	some v in values
	identity.normalise(v) == wanted
}

active_freezes contains w.name if {
	some w in input.controls.freeze_windows
	time.parse_rfc3339_ns(w.start) <= now_ns
	now_ns < time.parse_rfc3339_ns(w.end)
	matches_scope(object.get(w, "environments", ["*"]), environment)
	matches_scope(object.get(w, "services", ["*"]), target_service)
}

# Read-only diagnostics are not frozen: looking is always allowed within budget.
frozen if {
	state_changing
	count(active_freezes) > 0
}

# ---------------------------------------------------------------------------------------------------------------
# How many human approvals, with which roles.
# ---------------------------------------------------------------------------------------------------------------

tightening := 1 if {
	state_changing
	budget_low
} else := 0

freeze_minimum := cfg.freeze.min_approvers if frozen

else := 0

default approvers_needed := 0

approvers_needed := min({
	max({cfg.tiers[tier].approvers + tightening, freeze_minimum}),
	cfg.budgets.max_approvers,
}) if state_changing

default approver_roles := []

approver_roles := sort(cfg.freeze.approver_roles) if frozen

approver_roles := sort(cfg.tiers[tier].roles) if not frozen

notes contains read_only_note(cost, budget_remaining) if read_only

read_only_note(action_cost, remaining) := {"code": "read_only_auto_allowed", "message": msg} if {
	msg := sprintf("read-only diagnostics within budget are auto-allowed (cost %v, %v left)", [action_cost, remaining])
}

notes contains approval_required_note(tier, score, approvers_needed, approver_roles) if state_changing

approval_required_note(t, s, n, roles) := {"code": "approval_required", "message": msg} if {
	msg := sprintf("%v risk (score %v) needs %v distinct human approver(s) with role %v who neither proposed nor validated it", [
		t, s, n, concat("|", roles),
	])
}

notes contains budget_low_note(input.budget.scope, budget_remaining, budget_limit, cost) if {
	state_changing
	budget_low
}

budget_low_note(scope, remaining, limit, action_cost) := {"code": "budget_low", "message": msg} if {
	msg := sprintf("risk budget %v is running low (%v of %v left, this action costs %v): one more approver required", [
		scope, remaining, limit, action_cost,
	])
}

notes contains {"code": "freeze_window_active", "message": msg} if {
	frozen
	msg := sprintf("change freeze %v is active: only %v may approve, at least %v approvers", [
		concat(",", sort(active_freezes)), concat("|", cfg.freeze.approver_roles), cfg.freeze.min_approvers,
	])
}

# Human-readable "code: text" strings sorted by code, then text: stable across replays.
format_reasons(items) := sort([sprintf("%v: %v", [r.code, r.message]) | some r in items])

codes(items) := {r.code | some r in items}

default assessment := {}

assessment := {
	"tier": tier,
	"score": score,
	"cost": cost,
	"budget_scope": input.budget.scope,
	"budget_limit": budget_limit,
	"budget_remaining": budget_remaining,
	"budget_low": budget_low_flag,
	"frozen_by": sort(active_freezes),
}

budget_low_flag if budget_low

else := false

# ---------------------------------------------------------------------------------------------------------------
# Fast path: the usual input, judged in one rule body.
# ---------------------------------------------------------------------------------------------------------------

# usual is defined only for an input on which no block can fire and no freeze applies: well-formed, Gate 1 passed,
# inside its budget window with budget left, no kill switch, veto, freeze window or action in flight on the target,
# and (state-changing) at least one approver needed. It holds everything both decisions need. Why: OPA spends a few
# us of CPU per rule or function it evaluates against ~1 us per expression inside a body, and the full rules above
# take ~60 rules per decision; this body replaces them for the usual input (policies/README.md, "Performance").
# It restates the full rules' arithmetic (keep both in step when changing policy) and shares their message
# functions; whatever it does not cover (any block, freeze, veto...) is left to them. The Rego tests and
# tests/integration/test_opa_fast_path.py check that both paths give byte-identical decisions.
usual := {
	"now_ns": now,
	"proposer_id": proposer,
	"validator_ids": validators,
	"read_only": ro,
	"tier": t,
	"approvers_needed": needed,
	"approver_roles": roles,
	"notes": usual_notes(ro, t, s, needed, roles, scope, remaining, limit, action_cost, low),
	"assessment": {
		"tier": t,
		"score": s,
		"cost": action_cost,
		"budget_scope": scope,
		"budget_limit": limit,
		"budget_remaining": remaining,
		"budget_low": low,
		"frozen_by": [],
	},
} if {
	# Config bound once: each data.pilothouse.config reference costs more than a local lookup.
	c := data.pilothouse.config

	# input sanity (input_errors is empty)
	now := time.parse_rfc3339_ns(input.now)
	action := input.action
	regex.match(`^[0-9a-f]{64}$`, action.action_hash)
	facts := action.facts
	ro := facts.read_only
	is_boolean(ro)
	blast := c.risk.blast_radius_points[facts.blast_radius]
	env := lower(action.target.environment)
	service := identity.normalise(action.target.service)
	budget := input.budget
	is_number(budget.consumed)
	budget.consumed >= 0
	scope := budget.scope
	is_string(scope)

	# budget window current, no kill switch, freeze, veto or action in flight. Kill switches on other services
	# and freeze windows that are not active for this target (later, over, scoped elsewhere) are usual: the
	# service sends every window that has not ended yet. The freeze test is active_freezes, expression for
	# expression.
	time.parse_rfc3339_ns(budget.window_start) <= now
	now < time.parse_rfc3339_ns(budget.window_end)
	controls := input.controls
	controls.kill_switch.global == false
	not service in {identity.normalise(x) | some x in controls.kill_switch.services}
	count([w.name |
		some w in controls.freeze_windows
		time.parse_rfc3339_ns(w.start) <= now
		now < time.parse_rfc3339_ns(w.end)
		matches_scope(object.get(w, "environments", ["*"]), env)
		matches_scope(object.get(w, "services", ["*"]), service)
	]) == 0
	object.get(input, "rejections", []) == []
	in_flight_now := object.get(controls, "in_flight_on_target", 0)
	is_number(in_flight_now)
	in_flight_now < c.concurrency.max_in_flight_per_target

	# Gate 1 (admissible, inlined): a human with a validator role, not the proposer, validated by now
	proposer := identity.normalise(input.proposal.proposed_by.id)
	validations := input.proposal.hypothesis.validations
	validators := {identity.normalise(v.validator.id) | some v in validations}
	valid := [v |
		some v in validations
		p := v.validator
		p.kind == "human"
		id := identity.normalise(p.id)
		id != ""
		not id in c.service_principals
		not strings.any_prefix_match(id, c.non_human_prefixes)
		id != proposer
		time.parse_rfc3339_ns(v.validated_at) <= now
		some r in p.roles
		lower(trim_space(r)) in c.validator_roles
	]
	count(valid) > 0

	# score, tier, budget
	rev := {true: 0, false: c.risk.irreversible_points}[facts.reversible]
	env_points := object.get(c.risk.environment_points, env, c.risk.unknown_environment_points)
	severity := object.get(c.risk.severity_points, lower(object.get(input.incident, "severity", "")), 0)
	s := ((blast + rev) + env_points) + severity

	# Conditionals as lookups keyed by a boolean (cheaper than a function call each): the tier chain of `tier`,
	# the cost of `cost`, and approvers_needed without a freeze (one more when the budget runs low).
	by_score := {true: "low", false: {true: "medium", false: "high"}[s <= c.risk.medium_max]}[s <= c.risk.low_max]
	t := {true: "read_only", false: by_score}[ro]
	action_cost := {true: c.risk.read_only_cost, false: s}[ro]
	limit := object.get(c.budgets.limits, scope, c.budgets.default_limit)
	remaining := limit - budget.consumed
	remaining >= action_cost
	low := (remaining - action_cost) < (limit * c.budgets.low_water_fraction)
	state_changing_needs := min({max({c.tiers[t].approvers + {true: 1, false: 0}[low], 0}), c.budgets.max_approvers})
	needed := {true: 0, false: state_changing_needs}[ro]

	# a state-changing action that nobody needs to approve is left to the full rules (it is denied)
	{true: true, false: needed > 0}[ro]
	roles := sort(c.tiers[t].roles)
}

usual_notes(true, _, _, _, _, _, remaining, _, action_cost, _) := {read_only_note(action_cost, remaining)}

usual_notes(false, t, s, n, roles, _, _, _, _, false) := {approval_required_note(t, s, n, roles)}

usual_notes(false, t, s, n, roles, scope, remaining, limit, action_cost, true) := {
	approval_required_note(t, s, n, roles),
	budget_low_note(scope, remaining, limit, action_cost),
}

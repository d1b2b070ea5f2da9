package pilothouse.risk_test

import data.pilothouse.fixtures
import data.pilothouse.risk

base := fixtures.base_input

with_facts(blast, reversible, env, severity) := object.union(base, {
	"action": {
		"facts": {"blast_radius": blast, "reversible": reversible},
		"target": {"environment": env},
	},
	"incident": {"severity": severity},
})

score_of(blast, reversible, env, severity) := s if {
	s := risk.score with input as with_facts(blast, reversible, env, severity)
}

tier_of(blast, reversible, env, severity) := t if {
	t := risk.tier with input as with_facts(blast, reversible, env, severity)
}

test_score_table if {
	score_of("low", true, "development", "sev4") == 1
	score_of("low", true, "staging", "sev3") == 2
	score_of("medium", true, "production", "sev2") == 7
	score_of("high", false, "production", "sev1") == 15
}

test_tier_boundaries if {
	tier_of("low", true, "staging", "sev2") == "low" # 3
	tier_of("low", true, "production", "sev4") == "medium" # 4
	tier_of("medium", true, "production", "sev2") == "medium" # 7
	tier_of("medium", true, "production", "sev1") == "high" # 8
}

test_read_only_tier_and_cost if {
	risk.tier == "read_only" with input as object.union(base, {"action": {"facts": {"read_only": true}}})
	risk.cost == 1 with input as object.union(base, {"action": {"facts": {"read_only": true}}})
}

test_budget_low_boundary if {
	# limit 40, low water 25 % = 10, cost 4: consumed 26 leaves exactly 10 after the action (not low), 27 leaves 9
	not risk.budget_low with input as object.union(base, {"budget": {"consumed": 26}})
	risk.budget_low with input as object.union(base, {"budget": {"consumed": 27}})
}

test_budget_exactly_enough_is_not_exhausted if {
	not risk.budget_exhausted with input as object.union(base, {"budget": {"consumed": 36}})
	risk.budget_exhausted with input as object.union(base, {"budget": {"consumed": 36.5}})
}

test_validator_ids_include_invalid_validators if {
	ids := risk.validator_ids with input as object.union(base, {"proposal": {"hypothesis": {"validations": [
		{"validator": {"id": "Mallory", "kind": "model", "roles": []}, "validated_at": "2026-11-25T11:00:00Z"},
		{"validator": {"id": "oncall-1", "kind": "human", "roles": ["responder"]}, "validated_at": "2026-11-25T11:00:00Z"},
	]}}})
	ids == {"mallory", "oncall-1"}
}

test_assessment_shape if {
	a := risk.assessment with input as base
	a == {
		"tier": "medium", "score": 4, "cost": 4, "budget_scope": "checkout", "budget_limit": 40,
		"budget_remaining": 40, "budget_low": false, "frozen_by": [],
	}
}

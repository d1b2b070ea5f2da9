# METADATA
# title: Entrypoint - a proposal arrives
# description: >-
#   Is the proposed action admissible (Gate 1), auto-allowed (read-only diagnostics within budget), pending human
#   approval (Gate 2: how many approvers, with which roles) or denied - and why.
package pilothouse.proposal

import data.pilothouse.risk

default outcome := "deny"

outcome := "deny" if {
	count(risk.blocks) > 0
} else := "allow" if {
	risk.read_only
} else := "pending_approval" if {
	risk.state_changing
	risk.approvers_needed > 0
}

reasons := array.concat(risk.format_reasons(risk.blocks), risk.format_reasons(risk.notes)) if {
	count(risk.blocks) > 0
} else := risk.format_reasons(risk.notes) if {
	count(risk.notes) > 0
} else := ["undecidable: the input could not be assessed; denied"]

reason_codes := sort(risk.codes(risk.blocks) | risk.codes(risk.notes)) if {
	count(risk.blocks | risk.notes) > 0
} else := ["undecidable"]

# METADATA
# title: Proposal decision
# description: The decision document for a newly arrived proposal.
# entrypoint: true
decision := fast if {
	fast := usual_decision
} else := full_decision

# The usual input (risk.usual: no block, freeze or veto) in one body: read-only diagnostics are allowed, anything
# else waits for its approvers. Must equal full_decision for every input where risk.usual is defined (tested).
usual_decision := {
	"entrypoint": "proposal",
	"outcome": o,
	"allow": o == "allow",
	"requires_approval": o == "pending_approval",
	"approvers_needed": u.approvers_needed,
	"approvals_still_needed": u.approvers_needed,
	"approver_roles": u.approver_roles,
	"risk": u.assessment,
	"reasons": risk.format_reasons(u.notes),
	"reason_codes": sort(risk.codes(u.notes)),
	"accepted_approvals": [],
	"refused_approvals": [],
	"action_hash": input.action.action_hash,
	"bundle_revision": data.pilothouse.config.bundle_revision,
} if {
	u := risk.usual
	o := usual_outcome(u.read_only)
}

usual_outcome(true) := "allow"

usual_outcome(false) := "pending_approval"

# The full rules: every block, freeze and veto, with all their reasons.
full_decision := {
	"entrypoint": "proposal",
	"outcome": outcome,
	"allow": outcome == "allow",
	"requires_approval": outcome == "pending_approval",
	"approvers_needed": risk.approvers_needed,
	"approvals_still_needed": still_needed,
	"approver_roles": risk.approver_roles,
	"risk": risk.assessment,
	"reasons": reasons,
	"reason_codes": reason_codes,
	"accepted_approvals": [],
	"refused_approvals": [],
	"action_hash": object.get(object.get(input, "action", {}), "action_hash", ""),
	"bundle_revision": data.pilothouse.config.bundle_revision,
}

still_needed := risk.approvers_needed if outcome == "pending_approval"

else := 0

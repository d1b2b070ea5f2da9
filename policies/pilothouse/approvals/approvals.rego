# METADATA
# title: Entrypoint - approvals so far
# description: >-
#   Given the approvals recorded for an action (approver stable id, roles, the action hash each was bound to,
#   expiry), are they sufficient now? Every approval that does not count is listed with the reasons it was refused.
package pilothouse.approvals

import data.pilothouse.identity
import data.pilothouse.risk

recorded := object.get(input, "approvals", [])

# Normalised approver ids by approval index, computed once per query (normalising is the costliest step).
ids[i] := identity.normalise(a.approver.id) if some i, a in recorded

display_id(i) := object.get(ids, i, "")

# Helpers take the whole approval so that a missing field stays inside the negated call: OPA hoists a field
# reference used as a call argument out of a `not`, which would make the refusal rule silently not fire.
approver_is_human(i) if identity.is_human_with_id(recorded[i].approver, ids[i])

has_hash(a) if is_string(a.action_hash)

has_expiry(a) if time.parse_rfc3339_ns(a.expires_at)

role_list(a) := concat(",", sort(identity.roles(a.approver))) if is_array(a.approver.roles)

else := "no roles"

has_required_role(a) if identity.has_any_role(a.approver, risk.approver_roles)

well_formed(a) if {
	is_string(a.approval_id)
	is_string(a.approver.id)
	is_string(a.approver.kind)
	is_array(a.approver.roles)
	is_string(a.action_hash)
	time.parse_rfc3339_ns(a.granted_at)
	time.parse_rfc3339_ns(a.expires_at)
}

own_refusals[i] contains {"code": "approval_malformed", "message": msg} if {
	some i, a in recorded
	not well_formed(a)
	msg := "approval needs approval_id, approver {id, kind, roles}, action_hash, granted_at and expires_at (RFC 3339)"
}

# Reasons one approval cannot count, judged on the approval alone: own_refusals[index] is a set of reasons.
own_refusals[i] contains {"code": "non_human_principal", "message": msg} if {
	some i, a in recorded
	not approver_is_human(i)
	msg := sprintf("%v is a service or model principal (or has no stable id): only humans approve", [
		display_id(i),
	])
}

# An approval id names one act of consent: a second record with the same id cannot add a second approver.
own_refusals[i] contains {"code": "duplicate_approval_id", "message": msg} if {
	some i, a in recorded
	some j, earlier in recorded
	j < i
	earlier.approval_id == a.approval_id
	msg := sprintf("approval id %v was already used by approval #%d", [a.approval_id, j])
}

own_refusals[i] contains {"code": "self_approval", "message": msg} if {
	some i, a in recorded
	ids[i] == risk.proposer_id
	msg := sprintf("%v proposed this action and cannot approve it", [ids[i]])
}

own_refusals[i] contains {"code": "approver_is_validator", "message": msg} if {
	some i, a in recorded
	risk.validator_ids[ids[i]]
	msg := sprintf("%v validated the hypothesis and cannot also approve the action", [ids[i]])
}

own_refusals[i] contains {"code": "hash_mismatch", "message": msg} if {
	some i, a in recorded
	a.action_hash != input.action.action_hash
	msg := sprintf("approval was bound to action hash %v, the action now hashes to %v", [
		a.action_hash, input.action.action_hash,
	])
}

own_refusals[i] contains {"code": "hash_mismatch", "message": "approval carries no action hash"} if {
	some i, a in recorded
	not has_hash(a)
}

own_refusals[i] contains {"code": "expired", "message": msg} if {
	some i, a in recorded
	time.parse_rfc3339_ns(a.expires_at) <= risk.now_ns
	msg := sprintf("approval expired at %v (now %v)", [a.expires_at, input.now])
}

own_refusals[i] contains {"code": "expired", "message": "approval has no valid expires_at (RFC 3339)"} if {
	some i, a in recorded
	not has_expiry(a)
}

own_refusals[i] contains {"code": "granted_in_future", "message": msg} if {
	some i, a in recorded
	time.parse_rfc3339_ns(a.granted_at) > risk.now_ns
	msg := sprintf("approval granted at %v, after now (%v)", [a.granted_at, input.now])
}

own_refusals[i] contains {"code": "missing_role", "message": msg} if {
	some i, a in recorded
	not risk.frozen
	not has_required_role(a)
	msg := sprintf("%v risk needs role %v; %v has %v", [
		risk.tier, concat("|", risk.approver_roles), display_id(i), role_list(a),
	])
}

own_refusals[i] contains {"code": "frozen_window", "message": msg} if {
	some i, a in recorded
	risk.frozen
	not has_required_role(a)
	msg := sprintf("change freeze %v is active: only %v may approve, %v may not", [
		concat(",", sort(risk.active_freezes)), concat("|", risk.approver_roles), display_id(i),
	])
}

# Decision-level blocks (kill switch, exhausted budget, not admissible...) refuse every approval too.
block_refusals := {{"code": b.code, "message": sprintf("cannot count while %v", [b.message])} | some b in risk.blocks}

# Early exit: an approval that passes every own check (the usual case) is judged in this one body; the full set of
# refusal rules (own_refusals) is only evaluated when some approval fails one. approval_ok must imply that no
# own_refusals rule fires for i (the tests compare both paths on every refusal code).
approval_ok(i) if {
	a := recorded[i]
	well_formed(a)
	approver_is_human(i)
	ids[i] != risk.proposer_id
	not risk.validator_ids[ids[i]]
	a.action_hash == input.action.action_hash
	time.parse_rfc3339_ns(a.expires_at) > risk.now_ns
	time.parse_rfc3339_ns(a.granted_at) <= risk.now_ns
	has_required_role(a)
	not approval_id_reused(i)
}

approval_id_reused(i) if {
	some j, earlier in recorded
	j < i
	earlier.approval_id == recorded[i].approval_id
}

own(i) := set() if {
	approval_ok(i)
} else := object.get(own_refusals, i, set())

acceptable := {i | some i, _ in recorded; count(own(i)) == 0}

# The same human twice counts once: an approval is a duplicate if an earlier acceptable approval has the same
# normalised stable id (oncall-7, ONCALL-7 and on<ZWSP>call-7 are one account).
first_approval_of_same_human[i] := min(earlier) if {
	some i, id in ids
	earlier := {j |
		some j in acceptable
		j < i
		ids[j] == id
	}
	count(earlier) > 0
}

duplicate_refusal(i) := {duplicate_note(ids[i], object.get(recorded[j], "approval_id", j)) |
	j := first_approval_of_same_human[i]
}

duplicate_note(id, first) := {"code": "duplicate_approver", "message": msg} if {
	msg := sprintf("%v already approved (approval %v): the same human counts once", [id, first])
}

refusals[i] := (own(i) | block_refusals) | duplicate_refusal(i) if some i, _ in recorded

accepted := [a.approval_id |
	some i, a in recorded
	count(refusals[i]) == 0
]

refused := [r |
	some i, a in recorded
	reasons := refusals[i]
	count(reasons) > 0
	r := {
		"approval_id": object.get(a, "approval_id", sprintf("#%d", [i])),
		"approver_id": display_id(i),
		"codes": sort(risk.codes(reasons)),
		"reasons": risk.format_reasons(reasons),
	}
]

sufficient if count(accepted) >= risk.approvers_needed

default outcome := "deny"

outcome := "deny" if {
	count(risk.blocks) > 0
} else := "allow" if {
	risk.read_only
} else := "allow" if {
	risk.state_changing
	risk.approvers_needed > 0
	sufficient
} else := "pending_approval" if {
	risk.state_changing
	risk.approvers_needed > 0
}

still_needed := max({0, risk.approvers_needed - count(accepted)}) if outcome == "pending_approval"

else := 0

status_notes contains sufficient_note(count(accepted), risk.approvers_needed) if {
	outcome == "allow"
	risk.state_changing
}

sufficient_note(n, needed) := {"code": "approvals_sufficient", "message": msg} if {
	msg := sprintf("%d of %d required approvals accepted", [n, needed])
}

status_notes contains pending_note(count(accepted), risk.approvers_needed, still_needed) if {
	outcome == "pending_approval"
}

pending_note(n, needed, still) := {"code": "approvals_pending", "message": msg} if {
	msg := sprintf("%d of %d required approvals accepted; %d more needed", [n, needed, still])
}

status_notes contains refused_note(count(refused)) if count(refused) > 0

refused_note(k) := {"code": "approvals_refused", "message": msg} if {
	msg := sprintf("%d approval(s) refused: see refused_approvals", [k])
}

all_reasons := (risk.blocks | risk.notes) | status_notes

reasons := risk.format_reasons(all_reasons) if {
	count(all_reasons) > 0
} else := ["undecidable: the input could not be assessed; denied"]

reason_codes := sort(risk.codes(all_reasons)) if {
	count(all_reasons) > 0
} else := ["undecidable"]

# METADATA
# title: Approvals decision
# description: Are the recorded approvals sufficient now? Lists accepted and refused approvals with reasons.
# entrypoint: true
decision := fast if {
	fast := usual_decision
} else := full_decision

# ---------------------------------------------------------------------------------------------------------------
# Fast path: the usual input (risk.usual: no block, freeze or veto) whose approvals all pass their own checks, in
# one body. Only one refusal is possible then: the same human twice. Anything else (a malformed, expired,
# mismatched, self- or validator approval, a reused approval id, a missing role) leaves usual_decision undefined
# and the full rules decide. Must equal full_decision wherever it is defined (tested).
# ---------------------------------------------------------------------------------------------------------------

usual_decision := {
	"entrypoint": "approvals",
	"outcome": o,
	"allow": o == "allow",
	"requires_approval": o == "pending_approval",
	"approvers_needed": needed,
	"approvals_still_needed": still,
	"approver_roles": u.approver_roles,
	"risk": u.assessment,
	"reasons": risk.format_reasons(all),
	"reason_codes": sort(risk.codes(all)),
	"accepted_approvals": accepted_ids,
	"refused_approvals": refused_dups,
	"action_hash": h,
	"bundle_revision": c.bundle_revision,
} if {
	u := risk.usual
	c := data.pilothouse.config
	rec := object.get(input, "approvals", [])
	h := input.action.action_hash
	now := u.now_ns
	roles := u.approver_roles

	# the normalised approver id of every approval that passes its own checks (approval_ok, inlined)
	checked := {i: id |
		some i, a in rec
		is_string(a.approval_id)
		p := a.approver
		p.kind == "human"
		is_array(p.roles)
		a.action_hash == h
		time.parse_rfc3339_ns(a.granted_at) <= now
		time.parse_rfc3339_ns(a.expires_at) > now
		id := identity.normalise(p.id)
		id != ""
		not id in c.service_principals
		not strings.any_prefix_match(id, c.non_human_prefixes)
		id != u.proposer_id
		not u.validator_ids[id]
		some r in p.roles
		lower(trim_space(r)) in roles
	}
	count(checked) == count(rec)
	count({a.approval_id | some a in rec}) == count(rec)

	# the same human twice counts once: the first approval of each id is accepted
	first := {id: min({j | some j, x in checked; x == id}) | some id in checked}
	accepted_ids := [a.approval_id | some i, a in rec; first[checked[i]] == i]
	refused_dups := [{
		"approval_id": a.approval_id,
		"approver_id": checked[i],
		"codes": ["duplicate_approver"],
		"reasons": risk.format_reasons({duplicate_note(checked[i], rec[j].approval_id)}),
	} |
		some i, a in rec
		j := first[checked[i]]
		j != i
	]

	n := count(accepted_ids)
	needed := u.approvers_needed
	o := usual_outcome(u.read_only, n, needed)
	still := usual_still_needed(o, n, needed)
	progress := {x | x := usual_progress_note(o, u.read_only, n, needed, still)}
	all := (u.notes | progress) | {refused_note(k) | k := count(refused_dups); k > 0}
}

usual_outcome(true, _, _) := "allow"

usual_outcome(false, n, needed) := "allow" if n >= needed

usual_outcome(false, n, needed) := "pending_approval" if n < needed

usual_still_needed("pending_approval", n, needed) := max({0, needed - n})

usual_still_needed("allow", _, _) := 0

usual_progress_note("allow", false, n, needed, _) := sufficient_note(n, needed)

usual_progress_note("pending_approval", _, n, needed, still) := pending_note(n, needed, still)

# The full rules: every refusal reason of every approval, blocks, freezes and vetoes.
full_decision := {
	"entrypoint": "approvals",
	"outcome": outcome,
	"allow": outcome == "allow",
	"requires_approval": outcome == "pending_approval",
	"approvers_needed": risk.approvers_needed,
	"approvals_still_needed": still_needed,
	"approver_roles": risk.approver_roles,
	"risk": risk.assessment,
	"reasons": reasons,
	"reason_codes": reason_codes,
	"accepted_approvals": accepted,
	"refused_approvals": refused,
	"action_hash": object.get(object.get(input, "action", {}), "action_hash", ""),
	"bundle_revision": data.pilothouse.config.bundle_revision,
}

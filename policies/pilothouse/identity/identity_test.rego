package pilothouse.identity_test

import data.pilothouse.identity

test_normalise_case_and_space if {
	identity.normalise(" ONCALL-7 ") == "oncall-7"
}

test_normalise_strips_zero_width if {
	identity.normalise("on\u200bcall\u2060-7\ufeff") == "oncall-7"
}

test_normalise_strips_tag_characters if {
	identity.normalise("oncall-7\udb40\udc41") == "oncall-7"
}

test_human_is_human if {
	identity.is_human({"id": "alice", "kind": "human", "roles": ["responder"]})
}

test_service_claiming_human_is_not_human if {
	not identity.is_human({"id": "Actuator", "kind": "human", "roles": ["approver"]})
}

test_prefixed_principal_is_not_human if {
	not identity.is_human({"id": "model:llama", "kind": "human", "roles": ["approver"]})
}

test_model_kind_is_not_human if {
	not identity.is_human({"id": "alice", "kind": "model", "roles": ["approver"]})
}

test_empty_id_is_not_human if {
	not identity.is_human({"id": "\u200b ", "kind": "human", "roles": ["approver"]})
}

test_roles_are_lowered if {
	identity.has_any_role({"id": "a", "roles": [" Approver"]}, ["approver"])
	not identity.has_any_role({"id": "a", "roles": ["responder"]}, ["approver", "admin"])
}

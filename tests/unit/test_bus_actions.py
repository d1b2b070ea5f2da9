"""The action catalogue: the issue's six actions, closed params, validation that names the problem, stable hashes."""

from __future__ import annotations

import pytest

from pilothouse.bus.actions import ActionRejected, action_hash, load_actions


def test_catalogue_has_the_required_actions_with_their_facts():
    cat = load_actions()
    assert {"restart_service", "scale_replicas", "rollback_deploy", "toggle_feature_flag", "shift_traffic",
            "collect_diagnostics"} <= set(cat.actions)
    assert cat.get("collect_diagnostics").read_only is True
    assert all(not a.read_only for n, a in cat.actions.items() if n != "collect_diagnostics")
    assert cat.get("rollback_deploy").blast_radius == "high"
    assert cat.get("shift_traffic").target_kinds == ("instance",)
    assert cat.revision.startswith(f"v{cat.version}-")


@pytest.mark.parametrize(
    "name,kind,params,reason",
    [
        ("rm_rf", "service", {}, "not a catalogue action"),
        ("restart_service", "instance", {"service": "cart"}, "target kind"),
        ("scale_replicas", "service", {"service": "cart"}, "'replicas' is a required property"),
        ("scale_replicas", "service", {"service": "cart", "replicas": 500}, "replicas: 500 is greater than"),
        ("restart_service", "service", {"service": "cart; rm -rf /"}, "does not match"),
        ("restart_service", "service", {"service": "cart", "command": "sh"}, "Additional properties"),
        ("toggle_feature_flag", "service", {"service": "cart", "flag": "x", "enabled": "yes"}, "not of type 'boolean'"),
        ("restart_service", "service", ["cart"], "params must be an object"),
    ],
)
def test_invalid_proposals_are_rejected_with_a_reason(name, kind, params, reason):
    with pytest.raises(ActionRejected, match=reason):
        load_actions().check(name, kind, params)


def test_valid_params_pass():
    assert load_actions().check("scale_replicas", "service", {"service": "cart", "replicas": 3}).reversible


def test_action_hash_is_canonical_and_binds_every_part():
    h = action_hash("scale_replicas", "service", "cart", {"service": "cart", "replicas": 3})
    assert h == action_hash("scale_replicas", "service", "cart", {"replicas": 3, "service": "cart"})
    assert h != action_hash("scale_replicas", "service", "cart", {"service": "cart", "replicas": 4})
    assert h != action_hash("scale_replicas", "service", "checkout", {"service": "cart", "replicas": 3})
    with pytest.raises(ActionRejected):
        action_hash("scale_replicas", "service", "cart", {"weight": float("nan")})

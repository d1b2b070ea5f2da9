"""The actuator's pure decisions: authorization checks, clock skew (fake clock), verification and rollback plans."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pilothouse.actuator.domain import (
    CheckResult,
    ClockReading,
    KillSwitches,
    Refused,
    check_authorization,
    check_clock,
    decide_verification,
    evaluate_checks,
    rollback_plan,
    summarise_prediction,
    verification_due,
)
from pilothouse.bus.actions import action_hash, canonical_json, load_actions
from pilothouse.bus.authorization import key_id, sign
from pilothouse.bus.records import ActionAuthorized

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
CAT = load_actions()


def ok_clock(now: datetime = NOW) -> ClockReading:
    return ClockReading(now - timedelta(milliseconds=1), now, now + timedelta(milliseconds=1))


def authorization(action_type="scale_replicas", target_kind="service", target="cart", params=None, **kw):
    params = {"service": "cart", "replicas": 3} if params is None else params
    base = dict(event_id="e-1", incident_id="inc-1", correlation_id="inc-1", occurred_at=NOW, authorization_id="au-1",
                action_id="ac-1", action_hash=action_hash(action_type, target_kind, target, params),
                action_type=action_type, target_kind=target_kind, target=target,
                params_json=canonical_json(params).decode(), decision_id="dec-1", bundle_revision="r1",
                input_sha256="0" * 64, approval_ids=["ap-1"], issued_at=NOW - timedelta(seconds=5),
                expires_at=NOW + timedelta(minutes=5), key_id="", signature="")
    base.update(kw)
    return ActionAuthorized(**base)


@pytest.fixture(scope="module")
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keys(key):
    return {key_id(key.public_key()): key.public_key()}


NO_SWITCHES = KillSwitches()


def check(rec, keys, *, now=NOW, clock=None, switches=NO_SWITCHES):
    return check_authorization(rec, catalogue=CAT, keys=keys, now=now, clock=clock or ok_clock(now), max_skew_s=5.0,
                               kill_switches=switches)


def refused_check(rec, keys, **kw) -> str:
    with pytest.raises(Refused) as e:
        check(rec, keys, **kw)
    return e.value.check


# ---- clock skew ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset_s,ok", [(0, True), (4.9, True), (-4.9, True), (5.2, False), (-30, False),
                                         (3600, False)])
def test_clock_skew_beyond_the_bound_is_refused(offset_s, ok):
    local = NOW + timedelta(seconds=offset_s)
    reading = ClockReading(local - timedelta(milliseconds=5), NOW, local + timedelta(milliseconds=5))
    assert reading.skew_s == pytest.approx(offset_s, abs=1e-6)
    if ok:
        check_clock(reading, 5.0)
    else:
        with pytest.raises(Refused, match="clock_skew"):
            check_clock(reading, 5.0)


def test_a_reference_read_too_slowly_cannot_vouch_for_the_clock():
    # 0 s apparent skew, but the round trip took 12 s: the uncertainty (6 s) alone exceeds the bound.
    reading = ClockReading(NOW - timedelta(seconds=6), NOW, NOW + timedelta(seconds=6))
    with pytest.raises(Refused, match="±6.000s"):
        check_clock(reading, 5.0)


def test_a_clock_that_goes_backwards_is_refused():
    with pytest.raises(Refused, match="backwards"):
        check_clock(ClockReading(NOW, NOW, NOW - timedelta(seconds=1)), 5.0)


def test_skewed_clock_refuses_an_otherwise_valid_authorization(key, keys):
    rec = sign(key, authorization())
    skewed = NOW + timedelta(seconds=30)
    reading = ClockReading(skewed, NOW, skewed)
    assert refused_check(rec, keys, now=skewed, clock=reading) == "clock_skew"


# ---- authorization checks ------------------------------------------------------------------------------------------

def test_a_valid_authorization_is_accepted(key, keys):
    acc = check(sign(key, authorization()), keys)
    assert acc.action.name == "scale_replicas" and acc.params == {"service": "cart", "replicas": 3}
    assert acc.services == {"cart"}


def test_forged_signature_is_refused(key, keys):
    forger = Ed25519PrivateKey.generate()
    assert refused_check(sign(forger, authorization()), keys) == "signature"
    impostor = sign(forger, authorization()).model_copy(update={"key_id": key_id(key.public_key())})
    assert refused_check(impostor, keys) == "signature"


def test_expired_authorization_is_refused(key, keys):
    rec = sign(key, authorization())
    assert refused_check(rec, keys, now=NOW + timedelta(minutes=6)) == "expired"


def test_rebound_authorization_is_refused(key, keys):
    # Policy signed a hash of replicas=3, but the params say 12: the hash the actuator recomputes differs.
    rec = sign(key, authorization(params_json='{"replicas":12,"service":"cart"}'))
    assert refused_check(rec, keys) == "action_hash"
    # Params swapped after signing: the signature breaks first.
    altered = sign(key, authorization()).model_copy(update={"params_json": '{"replicas":12,"service":"cart"}'})
    assert refused_check(altered, keys) == "signature"


def test_target_must_match_the_params(key, keys):
    rec = sign(key, authorization(target="checkout"))
    assert refused_check(rec, keys) == "target"


def test_missing_decision_id_or_approvals_is_refused(key, keys):
    assert refused_check(sign(key, authorization(decision_id=" ")), keys) == "decision_id"
    assert refused_check(sign(key, authorization(approval_ids=[])), keys) == "approvals"


def test_read_only_actions_need_no_approvals(key, keys):
    rec = sign(key, authorization(action_type="collect_diagnostics", params={"service": "cart"}, approval_ids=[]))
    assert check(rec, keys).action.read_only


@pytest.mark.parametrize("params_json,what", [("[1]", "params"), ("{", "params"), ('{"service":"cart"}', "catalogue"),
                                              ('{"service":"cart","replicas":99}', "catalogue"),
                                              ('{"service":"cart","replicas":3,"x":1}', "catalogue")])
def test_params_must_be_a_valid_catalogue_object(key, keys, params_json, what):
    assert refused_check(sign(key, authorization(params_json=params_json)), keys) == what


def test_unknown_action_is_refused(key, keys):
    assert refused_check(sign(key, authorization(action_type="rm_rf", params={"service": "cart"})), keys) == "catalogue"


@pytest.mark.parametrize("scopes,blocked", [({"global"}, True), ({"service:cart"}, True),
                                            ({"service:checkout"}, False), (set(), False)])
def test_kill_switch_blocks_its_scope(key, keys, scopes, blocked):
    rec = sign(key, authorization())
    if blocked:
        assert refused_check(rec, keys, switches=KillSwitches(frozenset(scopes))) == "kill_switch"
    else:
        check(rec, keys, switches=KillSwitches(frozenset(scopes)))


def test_instance_targets_name_the_instance(key, keys):
    params = {"service": "cart", "instance": "cart-1", "weight": 0.0}
    ok = sign(key, authorization("shift_traffic", "instance", "cart-1", params))
    assert check(ok, keys).services == {"cart"}
    wrong = sign(key, authorization("shift_traffic", "instance", "cart-0", params))
    assert refused_check(wrong, keys) == "target"


# ---- verification and rollback -------------------------------------------------------------------------------------

STATE_OK = {"error_ratio": 0.002, "p99_ms": 20.0, "slo": {"error_ratio_max": 0.01, "p99_ms_max": 60}}
STATE_BAD = {"error_ratio": 0.3, "p99_ms": 20.0, "slo": {"error_ratio_max": 0.01, "p99_ms_max": 60}}


def test_checks_compare_metrics_with_the_slo_threshold():
    spec = CAT.get("scale_replicas").verify
    ok = evaluate_checks(spec, STATE_OK)
    assert [c.passed for c in ok] == [True, True] and ok[0].observed == 0.002 and ok[0].threshold == 0.01
    bad = evaluate_checks(spec, STATE_BAD)
    assert [c.passed for c in bad] == [False, True]


def test_unreadable_metrics_fail_their_check():
    spec = CAT.get("scale_replicas").verify
    assert [c.passed for c in evaluate_checks(spec, None)] == [False, False]
    res = evaluate_checks(spec, {"error_ratio": "n/a", "p99_ms": 1.0, "slo": {"p99_ms_max": 60}})
    assert [c.passed for c in res] == [False, True] and "cannot read" in res[0].detail


def test_rollback_plan_takes_values_from_params_and_before():
    plan = rollback_plan(CAT.get("scale_replicas"), {"service": "cart", "replicas": 5}, {"replicas": 2})
    assert plan is not None and plan.action == "scale_replicas" and plan.params == {"service": "cart", "replicas": 2}
    flag = rollback_plan(CAT.get("toggle_feature_flag"), {"service": "cart", "flag": "redis_fallback",
                                                          "enabled": True}, {"enabled": False})
    assert flag is not None and flag.params == {"service": "cart", "flag": "redis_fallback", "enabled": False}
    assert rollback_plan(CAT.get("restart_service"), {"service": "cart"}, {}) is None
    with pytest.raises(Refused, match="before.replicas"):
        rollback_plan(CAT.get("scale_replicas"), {"service": "cart", "replicas": 5}, {})


def _checks(*passed: bool) -> list[CheckResult]:
    return [CheckResult(f"c{i}", p, 1.0, 1.0) for i, p in enumerate(passed)]


def test_verification_decisions():
    scale, restart = CAT.get("scale_replicas"), CAT.get("restart_service")
    p, before = {"service": "cart", "replicas": 5}, {"replicas": 2}
    assert decide_verification(scale, p, before, _checks(True, True), KillSwitches()).outcome == "verified"
    d = decide_verification(scale, p, before, _checks(False, True), KillSwitches())
    assert d.outcome == "roll_back" and d.rollback and d.rollback.params["replicas"] == 2
    assert decide_verification(restart, {"service": "cart"}, {}, _checks(False), KillSwitches()).outcome == "failed"
    held = decide_verification(scale, p, before, _checks(False), KillSwitches(frozenset({"service:cart"})))
    assert held.outcome == "failed" and "withheld" in held.detail
    diag = CAT.get("collect_diagnostics")
    assert decide_verification(diag, {"service": "cart"}, {}, [], KillSwitches()).outcome == "skipped"


def test_verification_waits_for_the_window_in_target_time():
    assert not verification_due(100.0, 60, 159.0)
    assert verification_due(100.0, 60, 160.0)


def test_prediction_summary_carries_the_verdict():
    text, after = summarise_prediction({"horizon_s": 120, "summary": {
        "verdict": "recovers", "slo_met_with_action": True, "violations_before": ["checkout"],
        "violations_without_action": ["checkout"], "violations_with_action": []}})
    assert after is True and "recovers" in text and "checkout" in text
    assert summarise_prediction({})[1] is None


def test_window_checks_use_the_mean_of_the_samples():
    from pilothouse.actuator.domain import evaluate_window, in_sampling_half

    spec = CAT.get("toggle_feature_flag").verify  # error_ratio <= slo.error_ratio_max
    slo = {"error_ratio_max": 0.01}
    # One bad tick among good ones does not fail the check; a bad mean does.
    spiky = [{"error_ratio": 0.001, "slo": slo}, {"error_ratio": 0.025, "slo": slo}, {"error_ratio": 0.001, "slo": slo}]
    [c] = evaluate_window(spec, spiky)
    assert c.passed and c.observed == pytest.approx(0.009) and "3 samples" in c.detail
    [bad] = evaluate_window(spec, [{"error_ratio": 0.02, "slo": slo}, {"error_ratio": 0.03, "slo": slo}])
    assert not bad.passed and bad.observed == pytest.approx(0.025)
    [gap] = evaluate_window(spec, [{"error_ratio": 0.001, "slo": slo}, None])
    assert not gap.passed and "every sample" in gap.detail
    assert [c.passed for c in evaluate_window(spec, [])] == [False]
    assert not in_sampling_half(100, 60, 129) and in_sampling_half(100, 60, 130) and not in_sampling_half(100, 60, 160)

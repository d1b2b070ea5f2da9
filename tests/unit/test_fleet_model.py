"""The fleet simulation (pure model): propagation, fixes, preconditions, dry-run, shadow prediction, determinism."""

from __future__ import annotations

import itertools
import math

import pytest

from pilothouse.fleet.errors import InvalidRequest, NotFound, PreconditionFailed
from pilothouse.fleet.model import BUCKETS_S, EDGES, MAX_REPLICAS, SPEC, TOPO, Fleet


def first_anomaly(fleet: Fleet, ticks: int) -> dict[str, int]:
    """Tick at which each service first leaves its SLO."""
    first: dict[str, int] = {}
    for _ in range(ticks):
        fleet.step()
        for name, rep in fleet.slo_report().items():
            if not rep["met"] and name not in first:
                first[name] = fleet.state.tick
    return first


def mean_recent(fleet: Fleet, service: str, window: int) -> tuple[float, float]:
    rows = fleet.state.services[service].recent[-window:]
    return sum(r[2] for r in rows) / len(rows), sum(r[4] for r in rows) / len(rows)


def test_healthy_fleet_meets_every_slo_and_has_the_online_boutique_graph() -> None:
    fleet = Fleet.create()
    fleet.step(120)
    assert all(rep["met"] for rep in fleet.slo_report().values()), fleet.slo_report()
    calls = {(e.caller, e.callee) for e in EDGES}
    assert {("frontend", "checkout"), ("checkout", "payment"), ("cart", "redis"),
            ("recommendation", "productcatalog")} <= calls
    assert TOPO[0] == "frontend" and TOPO.index("cart") < TOPO.index("redis")


@pytest.mark.parametrize(("kind", "service", "instance", "chain"), [
    ("failing_dependency", "redis", None, ["redis", "cart", "frontend"]),
    ("error_rate", "currency", None, ["currency", "checkout"]),
    ("cpu_saturation", "recommendation", None, ["recommendation", "frontend"]),
    ("latency", "productcatalog", "productcatalog-1", ["productcatalog", "recommendation"]),
])
def test_fault_reaches_callers_after_the_root_cause(kind: str, service: str, instance: str | None,
                                                    chain: list[str]) -> None:
    fleet = Fleet.create()
    start = fleet.state.tick
    fleet.inject(kind, service, instance)
    first = first_anomaly(fleet, 30)
    assert set(chain) <= set(first), first
    ticks = [first[name] for name in chain]
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks), first  # strictly later at each hop
    assert first[service] == min(first.values()) == start + 1  # the root cause is the first to show it
    assert all(first[name] > first[service] for name in first if name != service)


def test_rollback_fixes_bad_deploy() -> None:
    fleet = Fleet.create()
    fleet.inject("bad_deploy", "checkout", params={"error_rate": 0.4})
    assert fleet.state.services["checkout"].version == "1.5.0"
    fleet.step(30)
    assert mean_recent(fleet, "checkout", 10)[0] > 0.3
    assert not fleet.slo_report()["frontend"]["met"]
    out = fleet.apply("rollback_deploy", {"service": "checkout"})
    assert out["result"] == {"from_version": "1.5.0", "to_version": "1.4.0"}
    fleet.step(30)
    assert all(rep["met"] for rep in fleet.slo_report().values())
    assert mean_recent(fleet, "checkout", 10)[0] < SPEC["checkout"].slo_error_ratio
    assert [d.kind for d in fleet.state.services["checkout"].history] == ["initial", "deploy", "rollback"]


def test_restart_fixes_memory_leak_and_without_it_the_leak_kills_the_instances() -> None:
    fleet = Fleet.create()
    fleet.inject("memory_leak", "cart", params={"leak_mb_per_s": 5})
    control = fleet.fork()
    mem = [fleet.state.services["cart"].instances[0].memory_mb]
    for _ in range(20):
        fleet.step()
        mem.append(fleet.state.services["cart"].instances[0].memory_mb)
    assert all(b > a for a, b in itertools.pairwise(mem))  # climbs every second
    fleet.apply("restart_service", {"service": "cart"})
    fleet.step(120)
    control.step(140)
    cart = fleet.state.services["cart"]
    assert all(i.oom_kills == 0 and i.restarts == 1 for i in cart.instances)
    assert all(i.memory_mb < SPEC["cart"].mem_base_mb + 20 for i in cart.instances)
    assert fleet.faults_view()["resolved"][0]["resolved_by"] == "restart_service"
    assert sum(i.oom_kills for i in control.state.services["cart"].instances) >= 2
    assert all(rep["met"] for rep in fleet.slo_report().values())


def test_restarting_one_instance_leaves_a_service_wide_leak_running() -> None:
    fleet = Fleet.create()
    fleet.inject("memory_leak", "cart")
    fleet.apply("restart_service", {"service": "cart", "instance": "cart-0"})
    assert len(fleet.faults_view()["active"]) == 1


def test_dry_run_on_a_fork_changes_nothing_live() -> None:
    fleet = Fleet.create()
    fleet.inject("bad_deploy", "checkout")
    fleet.step(5)
    before = fleet.to_dict()
    for action, params in [("rollback_deploy", {"service": "checkout"}),
                           ("scale_replicas", {"service": "cart", "replicas": 5}),
                           ("restart_service", {"service": "frontend"}),
                           ("set_feature_flag", {"service": "frontend", "flag": "ads_enabled", "enabled": False}),
                           ("shift_traffic", {"service": "cart", "instance": "cart-1", "weight": 0.0})]:
        out = fleet.fork().apply(action, params)
        assert out["changes"], action
    assert fleet.to_dict() == before


@pytest.mark.parametrize(("action", "params", "error"), [
    ("rollback_deploy", {"service": "payment"}, PreconditionFailed),
    ("rollback_deploy", {"service": "payment", "to_version": "0.1.0"}, PreconditionFailed),
    ("scale_replicas", {"service": "cart", "replicas": 2}, PreconditionFailed),
    ("scale_replicas", {"service": "cart", "replicas": MAX_REPLICAS + 1}, InvalidRequest),
    ("scale_replicas", {"service": "cart", "replicas": "3"}, InvalidRequest),
    ("set_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": False}, PreconditionFailed),
    ("set_feature_flag", {"service": "cart", "flag": "nope", "enabled": True}, NotFound),
    ("shift_traffic", {"service": "email", "instance": "email-0", "weight": 0.0}, PreconditionFailed),
    ("shift_traffic", {"service": "cart", "instance": "cart-9", "weight": 0.5}, NotFound),
    ("shift_traffic", {"service": "cart", "instance": "cart-0", "weight": 1.5}, InvalidRequest),
    ("restart_service", {"service": "nosuch"}, NotFound),
    ("restart_service", {"service": "cart", "force": True}, InvalidRequest),
    ("reboot_everything", {"service": "cart"}, NotFound),
])
def test_preconditions_and_validation_refuse_without_changing_state(action: str, params: dict,
                                                                    error: type[Exception]) -> None:
    fleet = Fleet.create()
    before = fleet.to_dict()
    with pytest.raises(error) as info:
        fleet.apply(action, params)
    assert info.value.reason  # a readable reason
    assert fleet.to_dict() == before


def test_second_restart_while_one_is_running_is_refused() -> None:
    fleet = Fleet.create()
    fleet.apply("restart_service", {"service": "frontend"})
    with pytest.raises(PreconditionFailed, match="already in progress"):
        fleet.apply("restart_service", {"service": "frontend"})
    fleet.step(10)
    fleet.apply("restart_service", {"service": "frontend"})


def test_rolling_restart_keeps_a_multi_replica_service_serving() -> None:
    fleet = Fleet.create()
    fleet.apply("restart_service", {"service": "frontend"})
    for _ in range(8):
        fleet.step()
        frontend = fleet.state.services["frontend"]
        assert sum(i.up for i in frontend.instances) >= 2
        assert frontend.error_ratio < 0.05


def test_shift_traffic_moves_load_off_an_instance() -> None:
    fleet = Fleet.create()
    fleet.apply("shift_traffic", {"service": "cart", "instance": "cart-1", "weight": 0.0})
    fleet.step()
    cart = fleet.state.services["cart"]
    assert cart.instances[1].rps == 0.0
    assert cart.instances[0].rps == pytest.approx(cart.rps)


def test_scale_up_new_replicas_warm_up_before_taking_traffic() -> None:
    fleet = Fleet.create()
    out = fleet.apply("scale_replicas", {"service": "recommendation", "replicas": 4})
    assert [c["target"] for c in out["changes"]] == ["recommendation-2", "recommendation-3", "recommendation"]
    fleet.step()
    assert fleet.state.services["recommendation"].instances[3].rps == 0.0
    fleet.step(5)
    assert fleet.state.services["recommendation"].instances[3].rps > 0.0


@pytest.mark.parametrize(("kind", "service", "instance", "right", "wrong"), [
    ("bad_deploy", "checkout", None, ("rollback_deploy", {"service": "checkout"}),
     ("restart_service", {"service": "checkout"})),
    ("memory_leak", "cart", None, ("restart_service", {"service": "cart"}),
     ("set_feature_flag", {"service": "frontend", "flag": "ads_enabled", "enabled": False})),
    ("cpu_saturation", "recommendation", None, ("scale_replicas", {"service": "recommendation", "replicas": 5}),
     ("restart_service", {"service": "recommendation"})),
    ("failing_dependency", "redis", None,
     ("set_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": True}),
     ("restart_service", {"service": "cart"})),
    ("error_rate", "currency", "currency-0",
     ("shift_traffic", {"service": "currency", "instance": "currency-0", "weight": 0.0}),
     ("rollback_deploy", {"service": "cart", "to_version": "1.3.5"})),
])
def test_shadow_predicts_recovery_for_the_right_action_and_not_for_a_wrong_one(
        kind: str, service: str, instance: str | None, right: tuple[str, dict], wrong: tuple[str, dict]) -> None:
    fleet = Fleet.create()
    if wrong[0] == "rollback_deploy":  # give cart a version to roll back to (healthy both ways)
        fleet.inject("bad_deploy", "cart", params={"error_rate": 0.0})
    fleet.inject(kind, service, instance, {"leak_mb_per_s": 6} if kind == "memory_leak" else None)
    fleet.step(60)
    before = fleet.to_dict()
    good = fleet.shadow(right[0], right[1], 180)
    bad = fleet.shadow(wrong[0], wrong[1], 180)
    assert fleet.to_dict() == before  # shadowing never touches the live state
    assert not good["summary"]["slo_met_without_action"]
    assert good["summary"]["slo_met_with_action"] and good["summary"]["verdict"] == "recovers"
    assert not bad["summary"]["slo_met_with_action"] and bad["summary"]["verdict"] != "recovers"
    assert good["changes"] and good["services"][service]["before"]["met"] is False


def test_shadow_without_action_predicts_the_live_future_exactly() -> None:
    fleet = Fleet.create(seed=11)
    fleet.inject("latency", "shipping", params={"delay_ms": 250})
    fleet.step(5)
    prediction = fleet.shadow(None, None, 40)
    fleet.step(40)
    for name in SPEC:
        err, p99 = mean_recent(fleet, name, prediction["window_s"])
        predicted = prediction["services"][name]["without_action"]
        assert predicted["error_ratio"] == pytest.approx(err, rel=1e-5, abs=1e-6)
        assert predicted["p99_ms"] == pytest.approx(p99, rel=1e-5, abs=1e-3)


def test_shadow_refuses_an_action_whose_precondition_fails_and_a_bad_horizon() -> None:
    fleet = Fleet.create()
    with pytest.raises(PreconditionFailed):
        fleet.shadow("rollback_deploy", {"service": "payment"}, 60)
    for horizon in (0, 10_000, 1.5, True):
        with pytest.raises(InvalidRequest):
            fleet.shadow(None, None, horizon)  # type: ignore[arg-type]


def test_same_seed_same_run_and_persisted_state_resumes_identically() -> None:
    a, b, c = Fleet.create(seed=3), Fleet.create(seed=3), Fleet.create(seed=4)
    for f in (a, b, c):
        f.inject("cpu_saturation", "frontend", "frontend-0")
        f.step(20)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()
    resumed = Fleet.from_dict(a.to_dict())
    a.step(30)
    resumed.step(30)
    assert resumed.to_dict() == a.to_dict()


@pytest.mark.parametrize(("kind", "service", "instance", "params", "error"), [
    ("meteor", "cart", None, {}, InvalidRequest),
    ("latency", "nosuch", None, {}, NotFound),
    ("latency", "cart", "cart-7", {}, NotFound),
    ("bad_deploy", "cart", "cart-0", {}, InvalidRequest),
    ("latency", "cart", None, {"delay_ms": -5}, InvalidRequest),
    ("latency", "cart", None, {"delay": 5}, InvalidRequest),
    ("failing_dependency", "frontend", None, {}, InvalidRequest),
    ("bad_deploy", "cart", None, {"version": "1.3.5"}, PreconditionFailed),
])
def test_bad_fault_requests_are_refused_with_a_reason(kind: str, service: str, instance: str | None, params: dict,
                                                      error: type[Exception]) -> None:
    fleet = Fleet.create()
    before = fleet.to_dict()
    with pytest.raises(error):
        fleet.inject(kind, service, instance, params)
    assert fleet.to_dict() == before


def test_duplicate_fault_is_refused_and_clear_ends_it() -> None:
    fleet = Fleet.create()
    fault = fleet.inject("error_rate", "shipping", params={"rate": 0.5})
    with pytest.raises(PreconditionFailed):
        fleet.inject("error_rate", "shipping")
    fleet.step(10)
    assert fleet.state.services["shipping"].error_ratio > 0.4
    fleet.clear_fault(fault.id)
    fleet.step(10)
    assert fleet.state.services["shipping"].error_ratio < SPEC["shipping"].slo_error_ratio
    with pytest.raises(PreconditionFailed):
        fleet.clear_fault(fault.id)


def test_counters_and_histogram_are_consistent() -> None:
    fleet = Fleet.create()
    fleet.inject("cpu_saturation", "frontend", params={"factor": 4})  # sheds: 503s are counted but not timed
    fleet.step(30)
    for svc in fleet.state.services.values():
        for inst in svc.instances:
            b = inst.duration_buckets
            assert all(x <= y + 1e-9 for x, y in itertools.pairwise(b))
            assert b[-1] <= inst.duration_count + 1e-6
            assert inst.duration_count == pytest.approx(inst.requests["200"] + inst.requests["500"])
    frontend = fleet.state.services["frontend"].instances[0]
    assert frontend.requests["503"] > 0
    assert len(frontend.duration_buckets) == len(BUCKETS_S)


def test_service_logs_name_the_dominant_cause() -> None:
    fleet = Fleet.create()
    fleet.inject("failing_dependency", "redis")
    fleet.step(10)
    cart_errors = [e for e in fleet.pending_events if e["service"] == "cart" and e["level"] == "error"]
    assert cart_errors and all(e["reason"] == "Unavailable" and e["dependency"] == "redis" for e in cart_errors)
    first_cart = min(e["tick"] for e in cart_errors)
    first_frontend = min(e["tick"] for e in fleet.pending_events
                         if e["service"] == "frontend" and e["level"] == "error")
    assert first_frontend > first_cart
    assert all(math.isfinite(e.get("failed_requests", 0.0)) for e in fleet.pending_events)

"""The fleet's HTTP API in process (real Starlette app, real state files, manual clock)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from pilothouse.fleet.errors import StateFileError
from pilothouse.fleet.server import FleetRuntime, create_app
from pilothouse.fleet.store import OPS_LOG, SERVICE_LOG, STATE_FILE


def open_runtime(state_dir: Path, **kwargs: object) -> FleetRuntime:
    return FleetRuntime.open(state_dir, seed=7, base_rps=100.0, hop_delay=2, clock="manual", **kwargs)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(open_runtime(tmp_path))) as c:
        yield c


def act(client: TestClient, action: str, body: dict, key: str | None, dry_run: bool = False):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(f"/actions/{action}", json=body, headers=headers,
                       params={"dry_run": "true"} if dry_run else None)


def bad_checkout(client: TestClient) -> None:
    assert client.post("/faults", json={"kind": "bad_deploy", "service": "checkout"}).status_code == 201
    assert client.post("/advance", json={"seconds": 20}).status_code == 200


def test_same_key_applies_once_and_replays_the_first_result(client: TestClient) -> None:
    bad_checkout(client)
    first = act(client, "rollback_deploy", {"service": "checkout"}, "inc-1/act-1")
    assert first.status_code == 200 and first.json()["applied"] is True
    client.post("/advance", json={"seconds": 3})
    second = act(client, "rollback_deploy", {"service": "checkout"}, "inc-1/act-1")
    assert second.status_code == 200 and second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    # applied twice, a second rollback would have gone back to the bad 1.5.0
    checkout = client.get("/state").json()["services"]["checkout"]
    assert checkout["version"] == "1.4.0" and len(checkout["deploy_history"]) == 3
    log = client.get("/actions/log").json()
    assert log["entries"] == [{"key": "inc-1/act-1", "action": "rollback_deploy", "params": {"service": "checkout"},
                               "status": 200, "executions": 1, "requests": 2, "first_tick": 30, "last_tick": 33}]
    assert log["total_executions"] == 1


def test_a_key_reused_for_another_request_is_refused(client: TestClient) -> None:
    assert act(client, "scale_replicas", {"service": "cart", "replicas": 3}, "k").status_code == 200
    r = act(client, "scale_replicas", {"service": "cart", "replicas": 4}, "k")
    assert r.status_code == 422 and "different request" in r.json()["reason"]
    assert client.get("/state").json()["services"]["cart"]["replicas"] == 3


def test_dry_run_changes_nothing_and_leaves_the_key_free(client: TestClient, tmp_path: Path) -> None:
    bad_checkout(client)
    state_before = client.get("/state").json()
    file_before = json.loads((tmp_path / STATE_FILE).read_text())["fleet"]
    dry = act(client, "rollback_deploy", {"service": "checkout"}, "k1", dry_run=True)
    assert dry.status_code == 200
    assert dry.json()["dry_run"] is True and dry.json()["applied"] is False
    assert dry.json()["changes"] == [{"target": "checkout", "field": "version", "before": "1.5.0", "after": "1.4.0"}]
    assert client.get("/state").json() == state_before
    assert json.loads((tmp_path / STATE_FILE).read_text())["fleet"] == file_before
    assert client.get("/actions/log").json()["entries"] == []
    real = act(client, "rollback_deploy", {"service": "checkout"}, "k1")
    assert real.json()["applied"] is True and real.json()["changes"] == dry.json()["changes"]


def test_dry_run_reports_a_failing_precondition(client: TestClient) -> None:
    r = act(client, "rollback_deploy", {"service": "payment"}, "k", dry_run=True)
    assert r.status_code == 409 and r.json()["error"] == "precondition_failed"
    assert "no previous version" in r.json()["reason"]


def test_refused_precondition_is_journaled_with_zero_executions(client: TestClient) -> None:
    r = act(client, "rollback_deploy", {"service": "payment"}, "k409")
    assert r.status_code == 409 and r.json()["history"] == ["0.9.3"]
    again = act(client, "rollback_deploy", {"service": "payment"}, "k409")
    assert again.status_code == 409 and again.json() == r.json()
    entry = client.get("/actions/log", params={"key": "k409"}).json()["entries"][0]
    assert (entry["status"], entry["executions"], entry["requests"]) == (409, 0, 2)


@pytest.mark.parametrize(("action", "body", "key", "query", "status", "code"), [
    ("scale_replicas", {"service": "cart", "replicas": 3}, None, None, 400, "missing_idempotency_key"),
    ("scale_replicas", {"service": "cart", "replicas": 3}, "k" * 201, None, 422, "invalid_request"),
    ("scale_replicas", {"service": "cart", "replicas": 0}, "k", None, 422, "invalid_request"),
    ("scale_replicas", {"service": "cart"}, "k", None, 422, "invalid_request"),
    ("scale_replicas", {"service": "cart", "replicas": 3}, "k", {"dry_run": "maybe"}, 422, "invalid_request"),
    ("delete_everything", {"service": "cart"}, "k", None, 404, "not_found"),
    ("restart_service", {"service": "mainframe"}, "k", None, 404, "not_found"),
])
def test_malformed_action_calls_get_a_clear_error_and_are_not_journaled(client: TestClient, action: str, body: dict,
                                                                        key: str | None, query: dict | None,
                                                                        status: int, code: str) -> None:
    before = client.get("/state").json()
    headers = {"Idempotency-Key": key} if key else {}
    r = client.post(f"/actions/{action}", json=body, headers=headers, params=query)
    assert r.status_code == status and r.json()["error"] == code and r.json()["reason"]
    assert client.get("/state").json() == before
    assert client.get("/actions/log").json()["entries"] == []


def test_body_that_is_not_json_is_refused(client: TestClient) -> None:
    r = client.post("/actions/restart_service", content=b"{not json", headers={"Idempotency-Key": "k"})
    assert r.status_code == 422 and "JSON" in r.json()["reason"]


def test_collect_diagnostics_is_read_only(client: TestClient) -> None:
    client.post("/faults", json={"kind": "failing_dependency", "service": "redis"})
    client.post("/advance", json={"seconds": 10})
    before = client.get("/state").json()
    r = act(client, "collect_diagnostics", {"service": "cart"}, "diag-1")
    assert r.status_code == 200 and r.json()["applied"] is False and r.json()["changes"] == []
    diag = r.json()["result"]
    assert diag["service"] == "cart" and diag["slo"]["met"] is False
    assert any(d["service"] == "redis" and d["error_ratio"] == 1.0 for d in diag["dependencies"])
    assert any(log["reason"] == "Unavailable" for log in diag["recent_logs"])
    assert "faults" not in json.dumps(diag)  # observable data only, no ground truth
    assert client.get("/state").json() == before


def test_shadow_endpoint_predicts_without_touching_live_state(client: TestClient) -> None:
    bad_checkout(client)
    before = client.get("/state").json()
    r = client.post("/shadow", json={"action": "rollback_deploy", "params": {"service": "checkout"},
                                     "horizon_s": 90})
    assert r.status_code == 200
    pred = r.json()
    assert pred["summary"]["verdict"] == "recovers" and pred["summary"]["slo_met_without_action"] is False
    assert pred["services"]["checkout"]["with_action"]["met"] is True
    assert client.get("/state").json() == before
    none = client.post("/shadow", json={"action": None, "horizon_s": 30}).json()
    assert "verdict" not in none["summary"] and none["summary"]["violations_without_action"]
    assert client.post("/shadow", json={"action": "rollback_deploy", "params": {"service": "payment"}}
                       ).status_code == 409
    assert client.post("/shadow", json={"action": None, "horizon_s": 99999}).status_code == 422


def test_fault_api_inject_list_clear(client: TestClient) -> None:
    r = client.post("/faults", json={"kind": "latency", "service": "cart", "instance": "cart-0",
                                     "params": {"delay_ms": 300}})
    assert r.status_code == 201
    fault_id = r.json()["fault"]["id"]
    assert client.post("/faults", json={"kind": "latency", "service": "cart", "instance": "cart-0"}
                       ).status_code == 409
    assert client.post("/faults", json={"kind": "latency", "service": "cart", "oops": 1}).status_code == 422
    assert [f["id"] for f in client.get("/faults").json()["active"]] == [fault_id]
    assert client.delete(f"/faults/{fault_id}").status_code == 200
    assert client.delete(f"/faults/{fault_id}").status_code == 409
    assert client.delete("/faults/f-999").status_code == 404
    client.post("/faults", json={"kind": "error_rate", "service": "ad"})
    client.post("/faults", json={"kind": "error_rate", "service": "email"})
    cleared = client.post("/faults/clear", json={"service": "ad"}).json()["cleared"]
    assert [f["service"] for f in cleared] == ["ad"]
    assert len(client.get("/faults").json()["active"]) == 1


def test_state_endpoint_hides_ground_truth_and_logs_are_json_lines(client: TestClient, tmp_path: Path) -> None:
    client.post("/faults", json={"kind": "failing_dependency", "service": "redis"})
    client.post("/advance", json={"seconds": 12})
    state = client.get("/state").json()
    assert "faults" not in state and state["services"]["redis"]["reachable"] is False
    service_lines = [json.loads(line) for line in (tmp_path / SERVICE_LOG).read_text().splitlines()]
    assert any(e["service"] == "cart" and e.get("reason") == "Unavailable" for e in service_lines)
    assert all({"ts", "tick", "service", "level", "msg"} <= set(e) for e in service_lines)
    assert not any("fault" in e["msg"] for e in service_lines)
    ops = [json.loads(line) for line in (tmp_path / OPS_LOG).read_text().splitlines()]
    assert any(e["event"] == "fault_injected" for e in ops)


def test_restart_resumes_state_and_journal(tmp_path: Path) -> None:
    with TestClient(create_app(open_runtime(tmp_path))) as c:
        bad_checkout(c)
        assert act(c, "rollback_deploy", {"service": "checkout"}, "once").status_code == 200
        tick = c.get("/health").json()["tick"]
    with TestClient(create_app(open_runtime(tmp_path))) as c:
        assert c.get("/health").json()["tick"] == tick
        replay = act(c, "rollback_deploy", {"service": "checkout"}, "once")
        assert replay.headers["idempotent-replayed"] == "true"
        assert c.get("/state").json()["services"]["checkout"]["version"] == "1.4.0"
        assert c.get("/actions/log").json()["entries"][0]["executions"] == 1


def test_unreadable_state_file_refuses_to_start_and_keeps_the_file(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{truncated")
    with pytest.raises(StateFileError, match="move it away"):
        open_runtime(tmp_path)
    assert (tmp_path / STATE_FILE).read_text() == "{truncated"


def test_token_guards_mutations_but_not_reads(tmp_path: Path) -> None:
    with TestClient(create_app(open_runtime(tmp_path, token="s3cret"))) as c:
        assert c.get("/state").status_code == 200
        assert c.post("/faults", json={"kind": "latency", "service": "cart"}).status_code == 401
        r = act(c, "scale_replicas", {"service": "cart", "replicas": 3}, "k")
        assert r.status_code == 401
        ok = c.post("/actions/scale_replicas", json={"service": "cart", "replicas": 3},
                    headers={"Idempotency-Key": "k", "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_advance_needs_the_manual_clock(tmp_path: Path) -> None:
    rt = FleetRuntime.open(tmp_path, seed=7, base_rps=100.0, hop_delay=2, clock="realtime", speed=0.001)
    with TestClient(create_app(rt)) as c:
        r = c.post("/advance", json={"seconds": 5})
        assert r.status_code == 409


def test_catalog_lists_every_action_fault_and_service(client: TestClient) -> None:
    cat = client.get("/catalog").json()
    assert set(cat["actions"]) == {"restart_service", "scale_replicas", "rollback_deploy", "set_feature_flag",
                                   "toggle_feature_flag", "shift_traffic", "collect_diagnostics"}
    assert cat["actions"]["toggle_feature_flag"]["alias_of"] == "set_feature_flag"
    assert cat["actions"]["collect_diagnostics"]["read_only"] is True
    assert cat["actions"]["scale_replicas"]["params_schema"]["required"] == ["service", "replicas"]
    assert set(cat["faults"]) == {"cpu_saturation", "latency", "error_rate", "bad_deploy", "memory_leak",
                                  "failing_dependency"}
    assert cat["services"]["cart"]["dependencies"] == ["redis"] and "redis_fallback" in cat["services"]["cart"]["flags"]


def test_answers_carry_what_an_undo_needs_and_which_check_failed(client: TestClient) -> None:
    r = act(client, "toggle_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": True}, "t1")
    assert r.status_code == 200 and r.json()["before"] == {"enabled": False}
    undo = act(client, "set_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": False}, "t2")
    assert undo.status_code == 200 and undo.json()["before"] == {"enabled": True}
    assert act(client, "scale_replicas", {"service": "cart", "replicas": 4}, "t3").json()["before"] == {"replicas": 2}
    refused = act(client, "toggle_feature_flag", {"service": "cart", "flag": "redis_fallback", "enabled": False}, "t4")
    assert refused.status_code == 409 and refused.json()["check"] == "flag_differs"
    missing = act(client, "shift_traffic", {"service": "cart", "instance": "cart-9", "weight": 0.0}, "t5")
    assert missing.status_code == 404 and missing.json()["check"] == "instance_exists"

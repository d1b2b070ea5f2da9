"""The per-process runtime every service shares: JSON logs with ids, /metrics and /health, SIGTERM handling."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal

import httpx
import pytest

from pilothouse.bus.runtime import Health, CollectionSchedule, JsonFormatter, on_shutdown, serve_observability


def test_json_logs_carry_event_and_incident_ids():
    rec = logging.LogRecord("pilothouse.x", logging.INFO, __file__, 1, "handled %s", ("alert",), None)
    rec.event_id, rec.incident_id = "ev-1", "inc-9"
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "handled alert" and out["event_id"] == "ev-1" and out["incident_id"] == "inc-9"
    assert out["level"] == "info" and out["ts"].endswith("Z")


def test_metrics_and_health_endpoints():
    health = Health()
    ready = {"kafka": True}
    health.add("kafka", lambda: ready["kafka"])
    server = serve_observability("127.0.0.1", 0, health)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        r = httpx.get(base + "/metrics")
        assert r.status_code == 200 and "python_info" in r.text
        assert httpx.get(base + "/health").json() == {"healthy": True, "checks": {"kafka": True}}
        ready["kafka"] = False
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json()["healthy"] is False
        health.add("crashing", lambda: 1 / 0)
        ready["kafka"] = True
        assert httpx.get(base + "/health").json()["checks"]["crashing"] is False
        assert httpx.get(base + "/nope").status_code == 404
    finally:
        server.shutdown()


def test_sigterm_runs_the_shutdown_callback_once():
    calls = []
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stopping = on_shutdown(lambda: calls.append(1))
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopping.is_set() and calls == [1]
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def test_service_runtime_stops_workers_and_closes_in_reverse_order():
    import threading

    from pilothouse.bus.service import ServiceRuntime

    events = []
    stop_a, stop_b = threading.Event(), threading.Event()
    rt = ServiceRuntime("test", 0)
    rt.add_worker("a", lambda: stop_a.wait(10), stop=stop_a.set, close=lambda: events.append("close a"))
    rt.add_worker("b", lambda: stop_b.wait(10), stop=stop_b.set, close=lambda: events.append("close b"))
    rt.add_closer(lambda: events.append("close pool"))
    threading.Timer(0.3, rt.stop).start()
    assert rt.run(install_signal_handlers=False) == 0
    assert events == ["close b", "close a", "close pool"]


def test_a_crashing_worker_stops_the_process_with_an_error_code():
    import threading

    from pilothouse.bus.service import ServiceRuntime

    stop = threading.Event()
    rt = ServiceRuntime("test", 0)
    rt.add_worker("ok", lambda: stop.wait(10), stop=stop.set)

    def boom():
        raise RuntimeError("lost the database")

    rt.add_worker("boom", boom, stop=lambda: None)
    assert rt.run(install_signal_handlers=False) == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _scheduler(clock: _Clock, pending: list[int], collected: list[int], **kw):
    return CollectionSchedule(clock=clock, collect=lambda gen: collected.append(gen) or 7,
                               pending=lambda: pending[0], **kw)


def test_full_collections_wait_for_a_lull_and_a_minimum_interval():
    clock, pending, collected = _Clock(), [3], []
    s = _scheduler(clock, pending, collected, idle_s=0.5, min_interval_s=60, max_interval_s=600)
    clock.now += 59.9
    assert s.tick() is None  # idle, but the last one (the start) is not a minute old
    clock.now += 0.2
    s.busy()
    clock.now += 0.4
    assert s.tick() is None  # busy 0.4 s ago: no lull yet
    assert collected == [1, 1]  # every tick that makes no full collection makes a young one (generations 0-1)
    clock.now += 0.1
    assert s.tick() == "idle" and collected == [1, 1, 2]  # a full collection (generation 2)
    clock.now += 30
    assert s.tick() is None and collected[-1] == 1  # idle again, but only 30 s after it


def test_no_idle_collection_without_young_collections_since_and_an_overdue_one_under_any_load():
    clock, pending, collected = _Clock(), [0], []
    s = _scheduler(clock, pending, collected, idle_s=0.5, min_interval_s=60, max_interval_s=600)
    clock.now += 120
    assert s.tick() is None  # idle a long time, but nothing was allocated that a full walk could free
    for _ in range(2400):  # busy every 0.25 s for 600 s: never idle
        clock.now += 0.25
        s.busy()
        if s.tick() is not None:
            break
    assert [g for g in collected if g == 2] == [2] and 600 <= clock.now - 1000 < 600.3
    with pytest.raises(ValueError):
        CollectionSchedule(min_interval_s=10, max_interval_s=5)


def test_start_takes_full_collections_over_and_stop_gives_them_back():
    before = gc.get_threshold()
    s = CollectionSchedule()
    try:
        s.start()
        s.start()  # a second call changes nothing
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**8
    finally:
        s.stop()
    assert gc.get_threshold() == before

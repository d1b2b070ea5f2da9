"""The per-process runtime every service shares: JSON logs with ids, /metrics and /health, SIGTERM handling."""

from __future__ import annotations

import json
import logging
import os
import signal

import httpx

from pilothouse.bus.runtime import Health, JsonFormatter, on_shutdown, serve_observability


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

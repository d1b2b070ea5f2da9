"""The real fleet server in a subprocess on a free loopback port: scraped like Prometheus would, driven by its CLI.

Needs nothing from the local stack (no Kafka/Postgres/OPA/LLM), so it is not marked `integration`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FleetProcess:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # speed 5: five simulated seconds per wall second, so counters move quickly
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pilothouse.fleet", "--port", str(self.port), "--state-dir", str(self.state_dir),
             "--speed", "5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet exited: {self.proc.stdout.read().decode()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("fleet did not become healthy within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pilothouse.fleet", *args, "--url", self.url],
                              capture_output=True, text=True, timeout=60, env={**os.environ})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetProcess]:
    proc = FleetProcess(tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def scrape(url: str) -> dict[str, object]:
    r = httpx.get(f"{url}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def total(families: dict, name: str, sample_name: str, **labels: str) -> float:
    return sum(s.value for s in families[name].samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_parse_as_prometheus_text_and_move_in_real_time(fleet: FleetProcess) -> None:
    first = scrape(fleet.url)
    expected = {"fleet_requests": "counter", "fleet_request_duration_seconds": "histogram",
                "fleet_cpu_usage_ratio": "gauge", "fleet_memory_bytes": "gauge", "fleet_replicas": "gauge",
                "fleet_version_info": "gauge", "fleet_up": "gauge", "fleet_service_error_ratio": "gauge",
                "fleet_slo_objective": "gauge"}
    for name, kind in expected.items():
        assert first[name].type == kind, name
    assert {s.labels["service"] for s in first["fleet_replicas"].samples} == {
        "frontend", "cart", "productcatalog", "currency", "recommendation", "shipping", "checkout", "ad", "payment",
        "email", "redis"}
    buckets = [s for s in first["fleet_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["instance"] == "frontend-0"]
    values = [s.value for s in buckets]
    assert buckets[-1].labels["le"] == "+Inf" and values == sorted(values)
    before = total(first, "fleet_requests", "fleet_requests_total", service="frontend")
    time.sleep(1.5)
    after = total(scrape(fleet.url), "fleet_requests", "fleet_requests_total", service="frontend")
    assert after > before  # the clock runs on its own


def test_fault_via_cli_shows_in_metrics_and_action_via_cli_fixes_it(fleet: FleetProcess) -> None:
    injected = fleet.cli("inject", "error_rate", "shipping", "--param", "rate=0.6")
    assert injected.returncode == 0, injected.stderr
    time.sleep(1.5)
    errors_before = total(scrape(fleet.url), "fleet_requests", "fleet_requests_total", service="shipping", code="500")
    time.sleep(1.0)
    families = scrape(fleet.url)
    assert total(families, "fleet_requests", "fleet_requests_total", service="shipping", code="500") > errors_before
    assert total(families, "fleet_service_error_ratio", "fleet_service_error_ratio", service="shipping") > 0.4

    dry = fleet.cli("act", "scale_replicas", "--param", "service=shipping", "--param", "replicas=3", "--dry-run")
    assert dry.returncode == 0 and '"applied": false' in dry.stdout
    assert total(scrape(fleet.url), "fleet_replicas", "fleet_replicas", service="shipping") == 2
    done = fleet.cli("act", "scale_replicas", "--param", "service=shipping", "--param", "replicas=3", "--key", "x1")
    again = fleet.cli("act", "scale_replicas", "--param", "service=shipping", "--param", "replicas=3", "--key", "x1")
    assert done.returncode == 0 and again.returncode == 0 and again.stdout == done.stdout
    assert total(scrape(fleet.url), "fleet_replicas", "fleet_replicas", service="shipping") == 3
    log = httpx.get(f"{fleet.url}/actions/log", params={"key": "x1"}).json()
    assert log["entries"][0]["executions"] == 1 and log["entries"][0]["requests"] == 2

    refused = fleet.cli("act", "rollback_deploy", "--param", "service=shipping")
    assert refused.returncode == 1 and "no previous version" in refused.stdout
    assert fleet.cli("clear", "--all").returncode == 0


def test_restarted_server_resumes_where_it_stopped(tmp_path: Path) -> None:
    proc = FleetProcess(tmp_path)
    proc.start()
    try:
        proc.cli("act", "set_feature_flag", "--param", "service=frontend", "--param", "flag=ads_enabled",
                 "--param", "enabled=false", "--key", "flag-1")
        time.sleep(1.0)
        tick = httpx.get(f"{proc.url}/health").json()["tick"]
    finally:
        proc.stop()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal it captured
    assert proc.proc is not None and proc.proc.returncode in (0, -signal.SIGTERM)
    again = FleetProcess(tmp_path)
    again.start()
    try:
        assert httpx.get(f"{again.url}/health").json()["tick"] >= tick
        assert httpx.get(f"{again.url}/state").json()["services"]["frontend"]["flags"]["ads_enabled"] is False
        assert httpx.get(f"{again.url}/actions/log").json()["entries"][0]["key"] == "flag-1"
    finally:
        again.stop()


def test_unreachable_fleet_gives_a_clear_cli_error(tmp_path: Path) -> None:
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "pilothouse.fleet", "faults", "--url", f"http://127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot reach the fleet" in r.stderr

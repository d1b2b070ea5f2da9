"""Real Prometheus and Alertmanager (Debian packages) watching the sandbox fleet, for the demo.

The same path a deployment uses: Prometheus scrapes the fleet's /metrics and the services' /metrics, evaluates alert
rules (SLO burn on error ratio and p99 latency, memory and CPU pressure), Alertmanager groups the alerts and POSTs
webhook v4 payloads to the sensing gateway with a bearer token.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import time
from pathlib import Path

import httpx
import yaml

from pilothouse.stack import procs
from pilothouse.stack.config import Settings
from pilothouse.stack.errors import ComponentFailed, MissingPrerequisite

PROMETHEUS = "prometheus"
ALERTMANAGER = "alertmanager"
PROMETHEUS_PORT = 19090
ALERTMANAGER_PORT = 19094
CONFIG_FILES = ("prometheus.yml", "rules.yml", "alertmanager.yml")
FIX = "apt-get install -y prometheus prometheus-alertmanager (or: sudo infra/install-prereqs.sh)"

# Generic SLO rules over the fleet's metrics: no service names, so they hold for any service the fleet runs.
ALERT_RULES = {
    "groups": [{
        "name": "fleet-slo",
        "rules": [
            {
                "alert": "ServiceErrorRatioHigh",
                "expr": 'fleet_service_error_ratio > on(service) group_left fleet_slo_objective{sli="error_ratio"}',
                "for": "6s",
                "labels": {"severity": "critical"},
                "annotations": {
                    "summary": "{{ $labels.service }}: error ratio {{ $value | humanizePercentage }} above its SLO",
                    "description": "Requests to {{ $labels.service }} fail more often than the SLO allows.",
                },
            },
            {
                "alert": "ServiceLatencyHigh",
                "expr": 'fleet_service_latency_seconds{quantile="0.99"} > on(service) group_left '
                        'fleet_slo_objective{sli="latency_p99_seconds"}',
                "for": "6s",
                "labels": {"severity": "warning"},
                "annotations": {
                    "summary": "{{ $labels.service }}: p99 latency {{ $value | humanizeDuration }} above its SLO",
                },
            },
            {
                "alert": "InstanceMemoryPressure",
                "expr": "fleet_memory_bytes / on(service) group_left fleet_memory_limit_bytes > 0.85",
                "for": "6s",
                "labels": {"severity": "warning"},
                "annotations": {"summary": "{{ $labels.instance }} of {{ $labels.service }} near its memory limit"},
            },
            {
                "alert": "InstanceCpuSaturated",
                "expr": "fleet_cpu_usage_ratio > 0.9",
                "for": "6s",
                "labels": {"severity": "warning"},
                "annotations": {"summary": "{{ $labels.instance }} of {{ $labels.service }} CPU saturated"},
            },
        ],
    }]
}


def _binary(name: str, candidates: tuple[str, ...]) -> str:
    for c in candidates:
        found = shutil.which(c)
        if found:
            return found
    raise MissingPrerequisite(f"{name} (Debian package)", FIX)


def prometheus_url(settings: Settings) -> str:
    return f"http://{settings.host}:{PROMETHEUS_PORT}"


def alertmanager_url(settings: Settings) -> str:
    return f"http://{settings.host}:{ALERTMANAGER_PORT}"


def write_configs(settings: Settings, *, scrape_targets: dict[str, list[str]], webhook_url: str,
                  webhook_token: str) -> Path:
    """Write prometheus.yml, rules and alertmanager.yml under ``<data>/monitoring``; returns that folder."""
    root = settings.data_dir / "monitoring"
    root.mkdir(parents=True, exist_ok=True)
    (root / "rules.yml").write_text(yaml.safe_dump(ALERT_RULES, sort_keys=False))
    prom = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(root / "rules.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"{settings.host}:{ALERTMANAGER_PORT}"]}]}]},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in scrape_targets.items()
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(prom, sort_keys=False))
    token_file = root / "webhook.token"
    token_file.write_text(webhook_token)
    token_file.chmod(0o600)
    am = {
        "route": {"receiver": "pilothouse", "group_by": ["alertname", "service"], "group_wait": "1s",
                  "group_interval": "5s", "repeat_interval": "1m"},
        "receivers": [{"name": "pilothouse", "webhook_configs": [{
            "url": webhook_url, "send_resolved": True, "max_alerts": 0,
            "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(token_file)}},
        }]}],
    }
    (root / "alertmanager.yml").write_text(yaml.safe_dump(am, sort_keys=False))
    return root


def start(settings: Settings, *, scrape_targets: dict[str, list[str]], webhook_url: str, webhook_token: str) -> None:
    """Start (or restart with fresh config) Prometheus and Alertmanager; wait until both are ready."""
    prom_bin = _binary("prometheus", ("prometheus",))
    am_bin = _binary("alertmanager", ("prometheus-alertmanager", "alertmanager"))
    root = write_configs(settings, scrape_targets=scrape_targets, webhook_url=webhook_url, webhook_token=webhook_token)
    # Keep running Prometheus/Alertmanager when their configuration did not change: restarting them would forget
    # which alerts are firing, and Alertmanager could then never send the "resolved" that closes an incident.
    digest = hashlib.sha256(b"".join((root / n).read_bytes() for n in CONFIG_FILES)).hexdigest()
    stamp = root / "config.sha256"
    running = all(procs.find(settings.run_dir, n) for n in (PROMETHEUS, ALERTMANAGER))
    if running and stamp.exists() and stamp.read_text() == digest:
        return
    stop(settings)
    stamp.write_text(digest)
    (root / "prometheus-data").mkdir(exist_ok=True)
    (root / "alertmanager-data").mkdir(exist_ok=True)
    procs.start(ALERTMANAGER, [
        am_bin, f"--config.file={root / 'alertmanager.yml'}", f"--storage.path={root / 'alertmanager-data'}",
        f"--web.listen-address={settings.host}:{ALERTMANAGER_PORT}", "--cluster.listen-address=",
    ], run_dir=settings.run_dir, log_path=settings.logs_dir / "alertmanager.log", cwd=root)
    procs.start(PROMETHEUS, [
        prom_bin, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'prometheus-data'}",
        f"--web.listen-address={settings.host}:{PROMETHEUS_PORT}", "--storage.tsdb.retention.time=1d",
    ], run_dir=settings.run_dir, log_path=settings.logs_dir / "prometheus.log", cwd=root)
    _wait(f"{prometheus_url(settings)}/-/ready", "prometheus", settings.logs_dir / "prometheus.log")
    _wait(f"{alertmanager_url(settings)}/-/ready", "alertmanager", settings.logs_dir / "alertmanager.log")


def _wait(url: str, name: str, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise ComponentFailed(f"{name} not ready after {timeout_s:.0f}s; see {log}:\n{procs.log_tail(log)}")


def stop(settings: Settings) -> None:
    """Stop both (no error if they are not running)."""
    for name in (PROMETHEUS, ALERTMANAGER):
        procs.stop(settings.run_dir, name, sig=signal.SIGTERM, timeout_s=20)


def health(settings: Settings) -> dict[str, dict]:
    """Readiness of both."""
    out = {}
    for name, url in ((PROMETHEUS, prometheus_url(settings)), (ALERTMANAGER, alertmanager_url(settings))):
        try:
            ok = httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            ok = False
        out[name] = {"healthy": ok, "url": url}
    return out

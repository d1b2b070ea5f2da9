"""What every service process shares: JSON logs, a /metrics + /health HTTP endpoint, clean SIGTERM shutdown.

Lives in the bus package because it is the one package services share; it imports no service.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={...}`` fields (event_id, incident_id, ...) become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send JSON logs to stderr; call once in ``__main__``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pilothouse").info("starting", extra={"service": service})


GC_PAUSE_SECONDS = Histogram("pilothouse_gc_pause_seconds",
                             "Cyclic garbage collections of this process (it stops meanwhile), by generation",
                             ["generation"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
_gc_watched = False


def watch_gc() -> None:
    """Time every garbage collection of this process (the whole process stops meanwhile: requests and records
    wait) into ``pilothouse_gc_pause_seconds{generation}``. Once per process; later calls do nothing."""
    global _gc_watched
    if _gc_watched:
        return
    _gc_watched = True
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            GC_PAUSE_SECONDS.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)


class Health:
    """Readiness flags a service sets as its components come up (all must be true for /health to answer 200)."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}

    def add(self, name: str, check: Callable[[], bool]) -> None:
        """Register a named check."""
        self._checks[name] = check

    def report(self) -> tuple[bool, dict[str, bool]]:
        """(healthy, per-check results)."""
        results = {}
        for name, check in self._checks.items():
            try:
                results[name] = bool(check())
            except Exception:  # noqa: BLE001 - a failing check is an unhealthy check
                results[name] = False
        return all(results.values()), results


def serve_observability(host: str, port: int, health: Health) -> ThreadingHTTPServer:
    """Start /metrics (Prometheus text format) and /health (JSON) on a daemon thread."""

    class _H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            if self.path.startswith("/metrics"):
                body, ctype, code = generate_latest(), CONTENT_TYPE_LATEST, 200
            elif self.path.startswith("/health"):
                ok, checks = health.report()
                body = json.dumps({"healthy": ok, "checks": checks}).encode()
                ctype, code = "application/json", 200 if ok else 503
            else:
                body, ctype, code = b'{"error":"not found"}', "application/json", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet: scrapes are not news
            return

    server = ThreadingHTTPServer((host, port), _H)
    threading.Thread(target=server.serve_forever, name="observability", daemon=True).start()
    return server


def on_shutdown(callback: Callable[[], None]) -> threading.Event:
    """Call ``callback`` on SIGTERM/SIGINT (once); returns an Event set when a signal arrived."""
    stopping = threading.Event()

    def _handler(signum, _frame) -> None:
        if not stopping.is_set():
            stopping.set()
            logging.getLogger("pilothouse").info("shutting down", extra={"signal": signal.Signals(signum).name})
            callback()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stopping

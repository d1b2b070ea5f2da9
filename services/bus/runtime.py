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

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

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


FULL_COLLECTIONS = Counter("pilothouse_gc_scheduled_full_total",
                           "Full garbage collections this process scheduled itself (see CollectionSchedule), by why "
                           "(idle: the service had nothing to do; overdue: the longest interval had passed)", ["reason"])
FULL_COLLECTED = Counter("pilothouse_gc_scheduled_full_unreachable_total",
                         "Unreachable objects the scheduled full collections found (cyclic garbage)")
_NEVER = 1_000_000_000  # a generation-2 threshold no count reaches: no automatic full collection


class CollectionSchedule:
    """The garbage collections of a service that keeps a large state in memory (the correlator: an object per alert
    of every incident it holds): young ones on a clock, full ones at the service's lulls. CPython's own schedule
    stopped it for tens of milliseconds at a time, under load:

    * **Full collections** (generation 2) start once a tenth young collection finds the long-lived objects grown by a
      quarter, and walk every tracked object: 56-90 ms each in the sensing bench, two or three in every two minutes at
      2,300 alerts/s.
    * **Young collections** start when allocations minus deallocations of tracked objects pass a threshold (700). A
      service that replaces its state as it goes (an incident evicted, another decoded) frees about as many objects as
      it makes, so that count hardly grows while the young generations fill up: once the correlator's incidents
      began to leave its live set, a generation-1 collection every ~10 s over 25,000 alerts' objects, 20-42 ms.

    :meth:`start` turns automatic full collections off (the threshold of generation 2 out of reach; automatic young
    ones stay, for bursts between ticks). :meth:`tick`, every ``period_s`` (a timer on the service's event loop: a
    collection never interrupts a batch halfway, it runs between two), then

    * makes a full collection when the service has been idle (no :meth:`busy`) for ``idle_s``, at least
      ``min_interval_s`` after the last one, and young collections happened since (something new to find); or when
      ``max_interval_s`` have passed since the last one, whatever the load: cyclic garbage is freed at that pace at
      worst (objects without reference cycles are freed at once anyway, by reference counting; the correlator's
      state makes no cyclic garbage, which its unit test checks);
    * else a young collection (generations 0 and 1): what ``period_s`` of work left, ~0.1 us an object.

    Full collections are counted by reason, with the unreachable objects they found. ``clock``, ``collect`` and
    ``pending`` are for tests."""

    def __init__(self, *, idle_s: float = 0.5, min_interval_s: float = 60.0, max_interval_s: float = 600.0,
                 period_s: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 collect: Callable[[int], int] = gc.collect,
                 pending: Callable[[], int] = lambda: gc.get_count()[2]) -> None:
        if not 0 < min_interval_s <= max_interval_s:
            raise ValueError("need 0 < min_interval_s <= max_interval_s")
        self.idle_s, self.min_interval_s, self.max_interval_s, self.period_s = (
            idle_s, min_interval_s, max_interval_s, period_s)
        self._clock, self._collect, self._pending = clock, collect, pending
        self._last_full = self._last_busy = clock()
        self._saved: tuple[int, int, int] | None = None

    def start(self) -> None:
        """Take over: no automatic full collection from now on (until :meth:`stop`)."""
        if self._saved is None:
            self._saved = gc.get_threshold()
            gc.set_threshold(self._saved[0], self._saved[1], _NEVER)
            self._last_full = self._last_busy = self._clock()

    def stop(self) -> None:
        """Give full collections back to CPython (the thresholds as they were before :meth:`start`)."""
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def busy(self) -> None:
        """The service is working now (call it when work starts and when it ends)."""
        self._last_busy = self._clock()

    def due(self) -> str | None:
        """Why a full collection should run now ("idle", "overdue"), or None."""
        now = self._clock()
        since = now - self._last_full
        if since >= self.max_interval_s:
            return "overdue"
        if since >= self.min_interval_s and now - self._last_busy >= self.idle_s and self._pending() > 0:
            return "idle"
        return None

    def tick(self) -> str | None:
        """A full collection if one is :meth:`due` (why it ran), else a young one (None)."""
        reason = self.due()
        if reason is None:
            self._collect(1)
            return None
        FULL_COLLECTED.inc(self._collect(2))
        FULL_COLLECTIONS.labels(reason).inc()
        self._last_full = self._clock()
        return reason


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

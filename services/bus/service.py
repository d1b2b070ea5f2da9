"""Running a service process: workers on threads, /metrics + /health, JSON logs, clean SIGTERM shutdown.

Every service's ``__main__`` builds its settings and adapters, then::

    runtime = ServiceRuntime("ledger", settings.observability_port)
    runtime.add_worker("mirror", loop.run, stop=loop.stop, close=loop.close)
    sys.exit(runtime.run())

On SIGTERM every worker is asked to stop, then each ``close`` runs (commit offsets, flush producers, close pools) in
reverse order of registration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pilothouse.bus.runtime import Health, configure_logging, on_shutdown, serve_observability

log = logging.getLogger("pilothouse")


@dataclass
class _Worker:
    name: str
    run: Callable[[], object]
    stop: Callable[[], None]
    close: Callable[[], None] | None
    error: BaseException | None = None
    thread: threading.Thread | None = None


class ServiceRuntime:
    """A service process: named workers, health checks, observability endpoint, graceful shutdown."""

    def __init__(self, name: str, observability_port: int, *, host: str = "127.0.0.1", log_level: str = "INFO"):
        self.name = name
        self.host = host
        self.port = observability_port
        self.log_level = log_level
        self.health = Health()
        self._workers: list[_Worker] = []
        self._closers: list[Callable[[], None]] = []
        self._stopping = threading.Event()

    def add_worker(self, name: str, run: Callable[[], object], *, stop: Callable[[], None],
                   close: Callable[[], None] | None = None) -> None:
        """Run ``run()`` on its own thread; ``stop()`` must make it return; ``close()`` runs after all stopped."""
        w = _Worker(name, run, stop, close)
        self._workers.append(w)
        self.health.add(f"worker:{name}", lambda w=w: w.thread is not None and w.thread.is_alive())

    def add_closer(self, close: Callable[[], None]) -> None:
        """Something to close on shutdown that is not a worker (a connection pool, a producer)."""
        self._closers.append(close)

    def stop(self) -> None:
        """Ask every worker to stop (what SIGTERM does)."""
        self._stopping.set()
        for w in self._workers:
            try:
                w.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("stopping worker failed", extra={"worker": w.name})

    def run(self, *, install_signal_handlers: bool = True) -> int:
        """Start everything, block until stopped or a worker dies; returns the process exit code."""
        configure_logging(self.name, self.log_level)
        server = serve_observability(self.host, self.port, self.health)
        if install_signal_handlers:
            on_shutdown(self.stop)
        for w in self._workers:
            w.thread = threading.Thread(target=self._guard, args=(w,), name=w.name, daemon=True)
            w.thread.start()
        while not self._stopping.is_set():
            if any(w.thread and not w.thread.is_alive() for w in self._workers):
                self.stop()  # one worker ended on its own: stop the rest, exit non-zero
                break
            self._stopping.wait(0.5)
        for w in self._workers:
            if w.thread:
                w.thread.join(timeout=30)
        for close in [w.close for w in reversed(self._workers) if w.close] + list(reversed(self._closers)):
            try:
                close()
            except Exception:  # noqa: BLE001 - close the rest
                log.exception("close failed")
        server.shutdown()
        failed = [w for w in self._workers if w.error is not None]
        log.info("stopped", extra={"service": self.name, "failed_workers": [w.name for w in failed]})
        return 1 if failed else 0

    def _guard(self, w: _Worker) -> None:
        try:
            w.run()
            if not self._stopping.is_set():
                w.error = RuntimeError(f"worker {w.name} returned unexpectedly")
                log.error("worker returned", extra={"worker": w.name})
        except BaseException as e:  # noqa: BLE001 - record and let run() shut the process down
            w.error = e
            log.exception("worker crashed", extra={"worker": w.name})

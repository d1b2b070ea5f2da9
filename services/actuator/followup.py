"""The follow-up worker: drives executions a crash interrupted, then verifies (and rolls back) finished ones."""

from __future__ import annotations

import logging
import threading

from pilothouse.actuator.handlers import ActuatorHandlers
from pilothouse.bus.errors import PilothouseError

log = logging.getLogger("pilothouse.actuator.followup")


class FollowUpWorker:
    """Every ``poll_s``: ``recover_once()`` then ``verify_once()``; errors are logged and retried next pass."""

    def __init__(self, handlers: ActuatorHandlers, *, poll_s: float = 1.0):
        self.handlers = handlers
        self.poll_s = poll_s
        self._stop = threading.Event()

    def run_once(self) -> tuple[int, int]:
        return self.handlers.recover_once(), self.handlers.verify_once()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                recovered, verified = self.run_once()
            except PilothouseError as e:
                log.warning("follow-up pass failed", extra={"error": str(e)[:300]})
                recovered = verified = 0
            if not recovered and not verified:
                self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()

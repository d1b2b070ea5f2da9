"""Files the fleet writes: its state (atomic JSON) and JSON-lines logs (rotated by size)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pilothouse.fleet.errors import StateFileError

STATE_FILE = "fleet-state.json"
SERVICE_LOG = "services.jsonl"  # what the simulated services log: the log a log reader watches
OPS_LOG = "fleet-ops.jsonl"  # the fleet's own operations: HTTP access, fault injection (ground truth: keep apart)
FORMAT = 1


class StateStore:
    """Whole-state snapshots in <dir>/fleet-state.json, replaced atomically (write temp, fsync, rename, fsync dir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved document, or None when there is none. An unreadable file raises StateFileError: we never
        silently start afresh over someone's state."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateFileError(f"cannot read {self.path}: {e}") from e
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise StateFileError(f"{self.path} is not valid JSON ({e}); move it away to start a fresh fleet") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StateFileError(f"{self.path} is not a fleet state file of format {FORMAT}; move it away to start "
                                 "a fresh fleet")
        return doc

    def save(self, doc: dict[str, Any], *, durable: bool = True) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = json.dumps({**doc, "format": FORMAT}, separators=(",", ":")).encode()
        fd, tmp = tempfile.mkstemp(prefix=".fleet-state.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if durable:
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


class JsonLog:
    """Append-only JSON lines; rotates to <name>.1 beyond max_bytes (one generation kept)."""

    def __init__(self, path: Path, max_bytes: int = 20 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        now = datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._fh.write("".join(json.dumps({"ts": now, **r}, separators=(",", ":"), default=str) + "\n"
                               for r in records))
        self._fh.flush()
        if self._fh.tell() > self.max_bytes:
            self._fh.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._fh = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._fh.close()

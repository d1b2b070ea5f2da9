"""Settings files a running service re-reads when they change (freeze calendars, the human key registry).

The first load raises (a service must not start without the file it was told to use); a later bad edit keeps the
last good value, logs an error and sets :attr:`WatchedFile.last_error`, so a typo never empties a safety list.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from pilothouse.bus.errors import PilothouseError

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A JSON (``.json``) or YAML file parsed by ``parse``; :meth:`current` re-reads it when its mtime changes."""

    def __init__(self, path: Path | None, parse: Callable[[Any], T], *, empty: T, what: str,
                 error: type[PilothouseError], logger: str = "pilothouse"):
        self.path = path
        self.last_error: str | None = None
        self._parse, self._what, self._error, self._log = parse, what, error, logging.getLogger(logger)
        self._mtime: float | None = None
        self._value = empty
        self._lock = threading.Lock()
        if path is not None:
            self._load(initial=True)

    def _load(self, *, initial: bool = False) -> None:
        assert self.path is not None
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return
            text = self.path.read_text(encoding="utf-8")
            value = self._parse(json.loads(text) if self.path.suffix == ".json" else yaml.safe_load(text))
        except (OSError, ValueError, yaml.YAMLError, PilothouseError) as e:
            if initial:
                raise self._error(f"{self._what} file {self.path}: {e}") from e
            self.last_error = f"{self.path}: {e}"
            self._log.error(f"{self._what} file invalid: keeping the last good one",
                            extra={"error": self.last_error[:500]})
            return
        self._value, self._mtime, self.last_error = value, mtime, None

    def current(self) -> T:
        """The parsed file as it is now (the empty value when no file is configured)."""
        if self.path is None:
            return self._value
        with self._lock:
            self._load()
            return self._value

"""Errors of the local stack. `MissingPrerequisite` carries the one-line fix the CLI prints (exit code 2)."""

from __future__ import annotations

from pilothouse.bus.errors import PilothouseError


class StackError(PilothouseError):
    """The stack could not be provisioned, started or read; the message says what and where to look."""


class MissingPrerequisite(StackError):
    """Something the stack needs is not installed or not reachable; `fix` is the command that installs it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"missing prerequisite: {what} — fix: {fix}")
        self.what = what
        self.fix = fix


class NotProvisioned(StackError):
    """No stack.json in the data directory: `pilothouse stack up` has not run there."""


class ComponentFailed(StackError):
    """A component did not become healthy; the message names its log file."""

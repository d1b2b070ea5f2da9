"""Signed checkpoints in an append-only JSON-lines file, outside Postgres (a superuser there cannot rewrite them).

One canonical JSON object per line (sorted keys), each append ``fsync``-ed. Loading never drops a line silently:
every line that cannot be read back as a checkpoint is returned with its line number and the reason (an interrupted
write leaves a last line without its newline; it is reported as incomplete).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import orjson

from pilothouse.bus.errors import PermanentError, RetryableError
from pilothouse.ledger.domain import Checkpoint, EntryInvalid

FILE_NAME = "checkpoints.jsonl"


class CheckpointFileError(RetryableError):
    """The checkpoint file could not be written or read (disk full, permissions)."""


class CheckpointLoad(NamedTuple):
    checkpoints: list[Checkpoint]
    rejected: list[tuple[int, str]]  # (line number, reason) for every line that is not a readable checkpoint


class CheckpointFile:
    """``<directory>/checkpoints.jsonl`` (the directory comes from the ledger's settings)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME

    def append(self, checkpoints: Iterable[Checkpoint]) -> int:
        data = b"".join(orjson.dumps(cp.to_dict(), option=orjson.OPT_SORT_KEYS) + b"\n" for cp in checkpoints)
        if not data:
            return 0
        try:
            created = not self.path.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:  # make the new directory entry durable too
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise CheckpointFileError(f"cannot append to {self.path}: {e}") from e
        return data.count(b"\n")

    def load(self) -> CheckpointLoad:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return CheckpointLoad([], [])
        except OSError as e:
            raise CheckpointFileError(f"cannot read {self.path}: {e}") from e
        checkpoints: list[Checkpoint] = []
        rejected: list[tuple[int, str]] = []
        lines = raw.split(b"\n")
        incomplete_tail = lines[-1] != b""
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            if number == len(lines) and incomplete_tail:
                rejected.append((number, "incomplete last line (an interrupted write): not a checkpoint"))
                continue
            try:
                checkpoints.append(Checkpoint.from_dict(orjson.loads(line)))
            except orjson.JSONDecodeError as e:
                rejected.append((number, f"not JSON: {e}"))
            except (EntryInvalid, PermanentError, TypeError, AttributeError) as e:
                rejected.append((number, f"not a checkpoint: {e}"))
        return CheckpointLoad(checkpoints, rejected)

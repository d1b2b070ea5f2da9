"""Detached processes with pid files: start, find, stop.

A pid file holds the pid and the process start time (from /proc/<pid>/stat), so a recycled pid is never mistaken
for our process and never signalled.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pilothouse.stack.errors import StackError


def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if it does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Running:
    """A process the stack started, as recorded in its pid file."""

    name: str
    pid: int
    start_ticks: int
    pid_file: Path

    def alive(self) -> bool:
        return _start_ticks(self.pid) == self.start_ticks


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def find(run_dir: Path, name: str) -> Running | None:
    """The live process recorded for `name`, or None (a stale pid file is removed)."""
    path = pid_file(run_dir, name)
    try:
        data = json.loads(path.read_text())
        proc = Running(name, int(data["pid"]), int(data["start_ticks"]), path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if proc.alive():
        return proc
    path.unlink(missing_ok=True)
    return None


def start(
    name: str,
    argv: list[str],
    *,
    run_dir: Path,
    log_path: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    user: str | None = None,
) -> subprocess.Popen:
    """Start `argv` in its own session (it survives the CLI), output appended to `log_path`, and record its pid.

    `user` runs it as that OS user (needs root), e.g. PostgreSQL, which refuses to run as root.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting {name}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                user=user,
                group=pwd.getpwnam(user).pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        except OSError as e:
            raise StackError(f"cannot start {name} ({argv[0]}): {e}") from e
    ticks = _start_ticks(proc.pid)
    if ticks is None:  # exited at once; the caller sees it through poll() and the log
        return proc
    path = pid_file(run_dir, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "start_ticks": ticks, "argv": argv}))
    os.replace(tmp, path)
    return proc


def stop(run_dir: Path, name: str, *, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> str:
    """Stop the recorded process: `sig`, wait up to `timeout_s`, then SIGKILL its process group.

    Returns "not running", "stopped" or "killed".
    """
    proc = find(run_dir, name)
    if proc is None:
        return "not running"
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        proc.pid_file.unlink(missing_ok=True)
        return "stopped"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            proc.pid_file.unlink(missing_ok=True)
            return "stopped"
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made the pid its group id
    except ProcessLookupError:
        pass
    for _ in range(50):
        if not proc.alive():
            break
        time.sleep(0.1)
    proc.pid_file.unlink(missing_ok=True)
    return "killed"


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])

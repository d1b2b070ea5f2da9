"""Detached process supervision with pid files (real child processes, no stack needed)."""

from __future__ import annotations

import json
import sys
import time

from pilothouse.stack import procs

IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"


def wait_for_line(path, text, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_start_find_stop(tmp_path):
    run, log = tmp_path / "run", tmp_path / "logs" / "sleeper.log"
    proc = procs.start("sleeper", ["sleep", "60"], run_dir=run, log_path=log, cwd=tmp_path)
    found = procs.find(run, "sleeper")
    assert found is not None and found.pid == proc.pid
    assert "starting sleeper: sleep 60" in log.read_text()
    assert procs.stop(run, "sleeper", timeout_s=5) == "stopped"
    proc.wait(5)
    assert procs.find(run, "sleeper") is None
    assert not (run / "sleeper.pid").exists()
    assert procs.stop(run, "sleeper") == "not running"


def test_a_process_ignoring_sigterm_is_killed_after_the_timeout(tmp_path):
    run, log = tmp_path / "run", tmp_path / "stubborn.log"
    proc = procs.start("stubborn", [sys.executable, "-c", IGNORE_TERM], run_dir=run, log_path=log, cwd=tmp_path)
    wait_for_line(log, "\nready")  # the header line echoes the argv, which contains "ready" too
    assert procs.stop(run, "stubborn", timeout_s=0.5) == "killed"
    assert proc.wait(5) == -9


def test_a_recycled_pid_is_not_mistaken_for_our_process(tmp_path):
    run, log = tmp_path / "run", tmp_path / "x.log"
    proc = procs.start("x", ["sleep", "60"], run_dir=run, log_path=log, cwd=tmp_path)
    pid_file = run / "x.pid"
    record = json.loads(pid_file.read_text())
    record["start_ticks"] -= 1  # same pid, different start time: another process
    pid_file.write_text(json.dumps(record))
    assert procs.find(run, "x") is None
    assert not pid_file.exists()
    assert procs.stop(run, "x") == "not running"
    assert proc.poll() is None  # never signalled
    proc.kill()
    proc.wait(5)


def test_garbage_pid_file_is_discarded(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "y.pid").write_text("not json")
    assert procs.find(tmp_path / "run", "y") is None
    assert not (tmp_path / "run" / "y.pid").exists()

"""Did the machine take a core away, or slow it down? A cyclictest-like probe for timed benchmark phases.

One process per core, pinned to it, at real-time priority (``SCHED_FIFO``): it sleeps ``period_ms`` and notes how
late it woke. A real-time task preempts every ordinary one the moment its timer fires, so its lateness is not the
benchmark's own queueing: it is time the core was not there at all (the hypervisor ran another guest, or the kernel
had interrupts off). Where real-time priority is refused (no root, no CAP_SYS_NICE) the probe runs as an ordinary
task, ``realtime`` says so, and its lateness then includes waiting behind the benchmark's own processes.

A core can also be there but slower (a busy sibling hyperthread of another guest, a lower clock). So at every
wake-up the probe also times a fixed piece of work (~17 µs of Python), which nothing of the benchmark's can
interrupt; ``work_us`` holds its median per 100 ms. The same work taking longer in one stretch of a phase than in
the rest means the core did less per second there, for every process on it.

Cost: a wake-up every 2 ms per core, ~2-3 % of a core each (measured with ``ps`` on the 2-vCPU VM).

    with HostProbe() as probe:
        ...  # the timed phase
    probe.late  # [(wall-clock ms, cpu, late ms)] for every wake-up later than ``report_ms``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def _probe(cpu: int, period_ms: float, report_ms: float, max_s: float) -> None:
    """The probe process: until stdin closes (or ``max_s``), wake every ``period_ms``; print one JSON document."""
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        realtime = True
    except (PermissionError, OSError):
        realtime = False
    stop = threading.Event()

    def until_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_eof, daemon=True).start()
    period, late_s = period_ms / 1000, report_ms / 1000
    deadline = time.monotonic() + max_s
    wakeups, late, work_us = 0, [], []
    bucket, timings = None, []
    while not stop.is_set():
        due = time.monotonic() + period
        time.sleep(period)
        now = time.monotonic()
        wakeups += 1
        wall_ms = time.time() * 1000
        if now - due > late_s:
            late.append((round(wall_ms, 1), round((now - due) * 1000, 2)))
        started = time.perf_counter_ns()
        _work()
        took = time.perf_counter_ns() - started
        here = int(wall_ms // 100)
        if here != bucket:
            if timings:
                timings.sort()
                work_us.append((bucket * 100, round(timings[len(timings) // 2] / 1000, 2)))
            bucket, timings = here, []
        timings.append(took)
        if now > deadline:
            break
    json.dump({"cpu": cpu, "realtime": realtime, "wakeups": wakeups, "late": late, "work_us": work_us}, sys.stdout)


def _work() -> int:
    """The fixed piece of work timed at every wake-up (~17 µs on the 2-vCPU VM)."""
    x = 0
    for i in range(600):
        x += i * i
    return x


class HostProbe:
    """Probe processes on ``cpus`` (default: every core of the machine, also when this process is pinned to some)
    while the block runs."""

    def __init__(self, cpus: list[int] | None = None, *, period_ms: float = 2.0, report_ms: float = 1.0,
                 max_s: float = 1800.0) -> None:
        self.cpus = list(range(os.cpu_count() or 1)) if cpus is None else cpus
        self.period_ms, self.report_ms, self.max_s = period_ms, report_ms, max_s
        self._procs: list[subprocess.Popen] = []
        self.results: list[dict] = []

    @property
    def late(self) -> list[tuple[float, int, float]]:
        return sorted((at, r["cpu"], ms) for r in self.results for at, ms in r["late"])

    def work_us(self, start_ms: float, end_ms: float) -> dict[str, float]:
        """Per core, the median time of the probe's fixed work in a span (wall-clock ms): how fast the core was."""
        out = {}
        for r in self.results:
            inside = sorted(us for at, us in r["work_us"] if start_ms <= at < end_ms)
            if inside:
                out[str(r["cpu"])] = inside[len(inside) // 2]
        return out

    def __enter__(self) -> HostProbe:
        code = (f"from pilothouse.benchmarks.host_probe import _probe; "
                f"_probe({{cpu}}, {self.period_ms}, {self.report_ms}, {self.max_s})")
        for cpu in self.cpus:
            self._procs.append(subprocess.Popen([sys.executable, "-c", code.format(cpu=cpu)], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, text=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            try:
                out, _ = proc.communicate("", timeout=10)  # closes stdin: the probe stops and reports
            except subprocess.TimeoutExpired:
                proc.kill()
                continue
            if proc.returncode == 0 and out:
                self.results.append(json.loads(out))
        self._procs = []

    def figures(self, *, over_ms: float = 5.0) -> dict:
        """The summary for a benchmark's JSON: wake-ups, how many were later than ``report_ms`` and ``over_ms``,
        the latest, per core; ``realtime`` False when any probe ran as an ordinary task."""
        return {
            "realtime": all(r["realtime"] for r in self.results) if self.results else None,
            "period_ms": self.period_ms,
            "cores": {str(r["cpu"]): {"wakeups": r["wakeups"], f"late_over_{self.report_ms:g}ms": len(r["late"]),
                                      f"late_over_{over_ms:g}ms": sum(ms > over_ms for _, ms in r["late"]),
                                      "max_late_ms": max((ms for _, ms in r["late"]), default=0.0),
                                      **_spread(sorted(us for _, us in r["work_us"]))}
                      for r in self.results},
        }


def _spread(us: list[float]) -> dict[str, float]:
    """The fixed work's time over the probe's 100 ms medians (sorted): typical, and the slowest 10 % and 1 %."""
    if not us:
        return {}
    return {"work_us_p50": us[len(us) // 2], "work_us_p90": us[int(len(us) * 0.9)],
            "work_us_p99": us[min(len(us) - 1, int(len(us) * 0.99))]}

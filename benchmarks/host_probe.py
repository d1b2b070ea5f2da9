"""Did the machine take a core away, or slow it down? A cyclictest-like probe for timed benchmark phases.

One process per core, pinned to it, at real-time priority (``SCHED_FIFO``): it sleeps ``period_ms`` and notes how
late it woke. A real-time task preempts every ordinary one the moment its timer fires, so its lateness is not the
benchmark's own queueing: it is time the core was not there at all (the hypervisor ran another guest, or the kernel
had interrupts off). Where real-time priority is refused (no root, no CAP_SYS_NICE) the probe runs as an ordinary
task, ``realtime`` says so, and its lateness then includes waiting behind the benchmark's own processes.

A core can also be there but slower (a busy sibling hyperthread of another guest, a lower clock). So at every
wake-up the probe also times a fixed piece of work (~20 µs of Python), which nothing of the benchmark's can
interrupt; ``work_us`` holds its median per 100 ms. The same work taking much longer in one stretch of a phase than
in the rest means the core did less per second there, for every process on it. A few per cent longer is also what
busier processes on the same core cost it (its cache is evicted between wake-ups).

Cost: a wake-up every 5 ms per core, 1.5 % of a core each over 10 s, its start included (every 2 ms: 2.2 %; on the
2-vCPU VM).

:class:`ProcessSchedule` answers the other half: which of the benchmark's processes had a core in a stretch of the
phase, and which waited for one (every thread's schedstat, every 250 ms, from a sampler process of its own:
1.1 % of a core with the broker's 109 threads; every 100 ms, 2.3 %).

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


def _stop_on_eof() -> threading.Event:
    """In a probe or sampler process: an event set once the parent closes our stdin (or goes away)."""
    stop = threading.Event()

    def until_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_eof, daemon=True).start()
    return stop


def _start(call: str) -> subprocess.Popen:
    """A probe or sampler process running ``call`` (a call of one of this module's functions)."""
    return subprocess.Popen([sys.executable, "-c", f"from pilothouse.benchmarks import host_probe; host_probe.{call}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _report(proc: subprocess.Popen) -> object | None:
    """Close its stdin (it stops) and read the JSON it prints; None if it did not finish well."""
    try:
        out, _ = proc.communicate("", timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    return json.loads(out) if proc.returncode == 0 and out else None


def _probe(cpu: int, period_ms: float, report_ms: float, max_s: float) -> None:
    """The probe process: until stdin closes (or ``max_s``), wake every ``period_ms``; print one JSON document."""
    os.sched_setaffinity(0, {cpu})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        realtime = True
    except (PermissionError, OSError):
        realtime = False
    stop = _stop_on_eof()
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
            _median_into(work_us, bucket, timings)
            bucket, timings = here, []
        timings.append(took)
        if now > deadline:
            break
    _median_into(work_us, bucket, timings)  # the last 100 ms too
    json.dump({"cpu": cpu, "realtime": realtime, "wakeups": wakeups, "late": late, "work_us": work_us}, sys.stdout)


def _median_into(work_us: list, bucket: int | None, timings: list[int]) -> None:
    if timings:
        timings.sort()
        work_us.append((bucket * 100, round(timings[len(timings) // 2] / 1000, 2)))


def _work() -> int:
    """The fixed piece of work timed at every wake-up (~20 µs on the 2-vCPU VM)."""
    x = 0
    for i in range(600):
        x += i * i
    return x


class HostProbe:
    """Probe processes on ``cpus`` (default: every core of the machine, also when this process is pinned to some)
    while the block runs."""

    def __init__(self, cpus: list[int] | None = None, *, period_ms: float = 5.0, report_ms: float = 1.0,
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
        self._procs = [_start(f"_probe({cpu}, {self.period_ms}, {self.report_ms}, {self.max_s})")
                       for cpu in self.cpus]
        return self

    def __exit__(self, *exc: object) -> None:
        reports = [_report(proc) for proc in self._procs]
        self.results = [r for r in reports if r is not None]
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


def _sample(pids: dict[str, int], period_ms: float, max_s: float) -> None:
    """The sampler process: until stdin closes (or ``max_s``), every ``period_ms`` read each process's threads'
    schedstat (time on a core, time runnable but waiting for one); print, per interval, each process's share of it."""
    stop = _stop_on_eof()
    last: dict[tuple[str, str], tuple[int, int]] = {}
    intervals = []
    deadline = time.monotonic() + max_s
    previous = None
    while not stop.is_set() and time.monotonic() < deadline:
        now_ms = time.time() * 1000
        moved: dict[str, list[float]] = {}
        for name, pid in pids.items():
            ran = waited = 0
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        on_cpu, on_queue = (int(x) for x in f.read().split()[:2])
                except (OSError, ValueError):
                    continue  # the thread ended
                before = last.get((name, tid))
                last[(name, tid)] = (on_cpu, on_queue)
                if before is not None:
                    ran += on_cpu - before[0]
                    waited += on_queue - before[1]
            moved[name] = [ran, waited]
        if previous is not None:
            span_ns = (now_ms - previous) * 1e6
            intervals.append((round(now_ms, 1), {name: [round(r / span_ns, 3), round(w / span_ns, 3)]
                                                 for name, (r, w) in moved.items()}))
        previous = now_ms
        time.sleep(period_ms / 1000)
    json.dump(intervals, sys.stdout)


class ProcessSchedule:
    """Which process had a core, and which waited for one, per ``period_ms`` while the block runs: a sampler process
    reads every thread's schedstat of ``pids`` (name -> pid). ``window(start_ms, end_ms)``: per process, the share of a
    core it ran and the share it waited (summed over its threads: 1.0 is one core's worth) over that span."""

    def __init__(self, pids: dict[str, int], *, period_ms: float = 250.0, max_s: float = 1800.0) -> None:
        self.pids, self.period_ms, self.max_s = pids, period_ms, max_s
        self._proc: subprocess.Popen | None = None
        self.intervals: list[tuple[float, dict[str, list[float]]]] = []

    def __enter__(self) -> ProcessSchedule:
        self._proc = _start(f"_sample({json.dumps(self.pids)}, {self.period_ms}, {self.max_s})")
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        self.intervals = [(at, shares) for at, shares in _report(proc) or []]

    def window(self, start_ms: float, end_ms: float) -> dict[str, list[float]]:
        inside = [shares for at, shares in self.intervals if start_ms < at <= end_ms]
        out: dict[str, list[float]] = {}
        for shares in inside:
            for name, (ran, waited) in shares.items():
                total = out.setdefault(name, [0.0, 0.0])
                total[0] += ran / len(inside)
                total[1] += waited / len(inside)
        return {name: [round(r, 2), round(w, 2)] for name, (r, w) in out.items()}

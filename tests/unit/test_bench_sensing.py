"""The sensing bench's instruments: its reading of the local broker's stops (safepoints) from its GC log, in lines
as the stack's broker writes them (JDK unified logging, ``-Xlog:gc*,safepoint:file=...:time,uptimemillis,tags``),
its client's collections, the host probe (a core taken away is seen) and the per-process schedule (which process
ran)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

from pilothouse.benchmarks.host_probe import HostProbe, ProcessSchedule
from pilothouse.benchmarks.sensing import broker_stops, wait_for_deleted_logs

LOG = """\
[2026-11-26T14:57:52.872+0000][87755ms][gc,start    ] GC(6) Pause Young (Normal) (G1 Evacuation Pause)
[2026-11-26T14:57:52.926+0000][87809ms][gc          ] GC(6) Pause Young (Normal) (G1 Evacuation Pause) \
1215M->180M(2048M) 53.932ms
[2026-11-26T14:57:52.926+0000][87809ms][safepoint   ] Safepoint "G1CollectForAllocation", Time since last: \
80412345678 ns, Reaching safepoint: 95120 ns, Cleanup: 10250 ns, At safepoint: 53980112 ns, Total: 54085482 ns
[2026-11-26T14:57:53.100+0000][87983ms][safepoint   ] Safepoint "ICBufferFull", Time since last: 174000000 ns, \
Reaching safepoint: 2885 ns, Cleanup: 136071 ns, At safepoint: 1292 ns, Total: 140248 ns
[2026-11-26T14:59:13.294+0000][168177ms][safepoint   ] Safepoint "Deoptimize", Time since last: 80194000000 ns, \
Reaching safepoint: 31000000 ns, Cleanup: 5000 ns, At safepoint: 1200000 ns, Total: 32205000 ns
[2026-11-26T14:59:13.310+0000][168193ms][gc          ] GC(8) Concurrent Mark Cycle 41.000ms
"""


def _ms(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000


def test_stops_are_read_with_their_start_length_and_operation(tmp_path):
    (tmp_path / "kafkaServer-gc.log").write_text(LOG)
    stops = broker_stops(tmp_path, 0, _ms("2030-01-01T00:00:00.000+0000"))
    # the start is the end stamp less the whole stop (reaching the safepoint included); the 0.14 ms stop is under
    # the default 1 ms floor; GC lines and concurrent phases are no stops of their own
    assert stops == [
        {"at_ms": round(_ms("2026-11-26T14:57:52.926+0000") - 54.085482), "ms": 54.085,
         "kind": "G1CollectForAllocation"},
        {"at_ms": round(_ms("2026-11-26T14:59:13.294+0000") - 32.205), "ms": 32.205, "kind": "Deoptimize"},
    ]
    assert [s["kind"] for s in broker_stops(tmp_path, 0, 1e15, min_ms=0.1)] == [
        "G1CollectForAllocation", "ICBufferFull", "Deoptimize"]


def test_only_stops_that_began_in_the_span_count_also_from_rotated_files(tmp_path):
    first, rest = LOG.split("[2026-11-26T14:59:13.294", 1)
    (tmp_path / "kafkaServer-gc.log.0").write_text(first)
    (tmp_path / "kafkaServer-gc.log").write_text("[2026-11-26T14:59:13.294" + rest)
    start = _ms("2026-11-26T14:57:52.873+0000")  # the collection began at 52.926 s - 54.085 ms = 52.872 s
    stops = broker_stops(tmp_path, start, _ms("2026-11-26T14:59:13.261+0000"))
    assert stops == []  # the deoptimization began at 13.294 s - 32.205 ms = 13.2618 s: after the span
    stops = broker_stops(tmp_path, start - 2, _ms("2026-11-26T14:59:13.262+0000"))
    assert [s["kind"] for s in stops] == ["G1CollectForAllocation", "Deoptimize"]


def test_no_log_is_none_and_not_an_empty_list(tmp_path):
    assert broker_stops(tmp_path, 0, 1e15) is None
    (tmp_path / "kafkaServer-gc.log").write_text("")
    assert broker_stops(tmp_path, 0, 1e15) == []


def test_a_rotated_file_last_written_before_the_span_is_not_read(tmp_path):
    old = tmp_path / "kafkaServer-gc.log.0"
    old.write_text(LOG)
    start = _ms("2026-11-26T14:57:52.800+0000")
    assert len(broker_stops(tmp_path, start, 1e15)) == 2
    os.utime(old, (start / 1000 - 1, start / 1000 - 1))  # its last line was written a second before the span
    assert broker_stops(tmp_path, start, 1e15) == []


def test_the_client_makes_no_full_collection_while_a_phase_is_timed_and_restores_the_collector():
    """What lived before the phase is frozen, full collections are off and every collection is noted (when, how
    long, which generation); afterwards the thresholds and the frozen objects are as they were."""
    import gc

    from pilothouse.benchmarks.sensing import ClientCollections

    before = gc.get_threshold()
    with ClientCollections() as client:
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[2] >= 1_000_000_000
        gc.collect(1)
        for _ in range(50_000):  # cycles: young collections come, and no full one
            a = []
            a.append(a)
    figures = client.figures()
    assert figures["collections"] >= 2 and figures["full"] == 0 and figures["max_ms"] > 0
    assert {gen for _, _, gen in client.pauses} <= {0, 1}
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert client._callback not in gc.callbacks


def test_host_probe_sees_a_core_taken_away():
    """A probe process stopped for 80 ms (SIGSTOP, as a hypervisor would deschedule the core) reports a wake-up
    that late; only wake-ups later than ``report_ms`` are listed; its fixed work is timed."""
    cpu = min(os.sched_getaffinity(0))
    with HostProbe([cpu], period_ms=2.0, report_ms=1.0) as probe:
        time.sleep(0.5)  # the interpreter starts and the probe is looping
        pid = probe._procs[0].pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.08)
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.1)
    figures = probe.figures(over_ms=5.0)
    core = figures["cores"][str(cpu)]
    assert isinstance(figures["realtime"], bool)
    assert core["wakeups"] > 50
    assert core["late_over_5ms"] >= 1
    assert 60 <= core["max_late_ms"] < 1000
    assert all(late > 1.0 for _, _, late in probe.late)
    # the fixed work's time, per 100 ms: there, and the same kind of figure whatever the span
    assert 0 < core["work_us_p50"] <= core["work_us_p90"] <= core["work_us_p99"]
    assert probe.work_us(0, 1e15)[str(cpu)] > 0
    assert probe.work_us(0, 1) == {}


def test_the_bench_waits_for_the_broker_to_remove_deleted_topics_files(tmp_path):
    (tmp_path / "alerts-0").mkdir()  # a live partition: not waited for
    gone = tmp_path / "test.bench-alerts-0.0123abcd-delete"
    gone.mkdir()
    threading.Timer(0.6, gone.rmdir).start()
    waited = wait_for_deleted_logs(tmp_path, timeout_s=10)
    assert not gone.exists()
    assert 0.5 <= waited < 10
    assert wait_for_deleted_logs(tmp_path, timeout_s=10) == 0.0
    assert wait_for_deleted_logs(tmp_path / "no-such-broker") is None


def test_process_schedule_says_which_process_ran():
    """A process that spins runs about a core's worth in every interval; one that sleeps runs none of it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with ProcessSchedule({"spinner": os.getpid(), "sleeper": sleeper.pid}, period_ms=50) as sched:
            until = time.perf_counter() + 0.8
            started_ms = time.time() * 1000
            while time.perf_counter() < until:
                pass
            ended_ms = time.time() * 1000
    finally:
        sleeper.kill()
    assert len(sched.intervals) >= 5
    shares = sched.window(started_ms + 200, ended_ms)
    assert shares["spinner"][0] > 0.5  # ran (a core is shared on a busy machine: not asserting 1.0)
    assert shares["sleeper"][0] < 0.05
    assert sched.window(0, 1) == {}

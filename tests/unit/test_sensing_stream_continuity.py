"""No alert record may be lost between Faust and the correlator.

Two guards, tested here with fakes (the integration test kills and restarts the worker on the real broker):
- ``SeekFirstRecovery`` ends a recovery in an order where no stream record is delivered before the seek to the
  committed offsets, or before the agents' queues are emptied (faust-streaming #596 drops records otherwise);
- ``CorrelationWorker._check_continuity`` stops the worker when Faust delivers a record out of sequence and the
  broker holds records in between; a jump over transaction markers or compacted records is accepted.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from pilothouse.bus.faust_recovery import SeekFirstRecovery
from pilothouse.sensing.app_faust import CorrelationWorker, SkippedRecords


def _run(coro):
    """Run ``coro`` on a fresh event loop in its own thread. In the full suite an earlier test leaves a loop marked
    running in the main thread, and asyncio.run refuses to start there (the CI rehearsal of 25a77ab failed so)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class _Calls(list):
    def rec(self, name, result=None):
        def call(*args):
            self.append((name, *args))
            return result
        return call


def _recovery(calls: _Calls, assignment: set[str]):
    async def perform_seek():
        calls.append(("perform_seek",))

    async def wait(coro, timeout=None):
        await coro

    async def maybe_start():
        calls.append(("fetcher.maybe_start",))

    consumer = SimpleNamespace(assignment=lambda: assignment, stop_flow=calls.rec("stop_flow"),
                               resume_flow=calls.rec("resume_flow"), resume_partitions=calls.rec("resume_partitions"),
                               perform_seek=perform_seek)
    app = SimpleNamespace(conf=SimpleNamespace(broker_request_timeout=30.0),
                          flow_control=SimpleNamespace(resume=calls.rec("flow_control.resume")),
                          _fetcher=SimpleNamespace(maybe_start=maybe_start))
    recovery = SimpleNamespace(app=app, log=SimpleNamespace(info=lambda *a: None), _wait=wait,
                               completed=SimpleNamespace(set=calls.rec("completed")),
                               _is_changelog_tp=lambda tp: tp.endswith("-changelog"))
    return recovery, consumer


def test_recovery_delivers_no_stream_record_before_the_seek_and_the_queue_clear():
    calls = _Calls()
    recovery, consumer = _recovery(calls, {"alerts", "telemetry", "app-incidents-changelog"})
    _run(SeekFirstRecovery._resume_after_seek(recovery, consumer))
    names = [c[0] for c in calls]
    # the flow is stopped before anything else, and resumed only after the seek and the queue clear
    assert names[0] == "stop_flow"
    assert names.index("perform_seek") < names.index("flow_control.resume") < names.index("resume_flow")
    assert names.index("resume_partitions") < names.index("perform_seek")  # Faust seeks resumed partitions
    assert names[-1] == "fetcher.maybe_start"
    resumed = next(c[1] for c in calls if c[0] == "resume_partitions")
    assert resumed == {"alerts", "telemetry"}  # never the changelog: recovery paused it


def test_recovery_with_nothing_assigned_does_not_seek():
    calls = _Calls()
    recovery, consumer = _recovery(calls, set())
    _run(SeekFirstRecovery._resume_after_seek(recovery, consumer))
    assert "perform_seek" not in [c[0] for c in calls]
    assert [c[0] for c in calls][-2:] == ["resume_flow", "fetcher.maybe_start"]


class _Probe:
    def __init__(self, committed: int, records: set[int]):
        self.committed, self.records, self.asked = committed, records, []

    def start_offset(self, topic, partition):
        self.asked.append(("start", topic, partition))
        return self.committed

    def data_offsets(self, topic, partition, start, end):
        self.asked.append(("between", start, end))
        return sorted(o for o in self.records if start <= o < end)


def _check(probe: _Probe, expected: int | None, offset: int):
    worker = SimpleNamespace(_prober=lambda: probe)
    tp = SimpleNamespace(topic="alerts", partition=3)
    return _run(CorrelationWorker._check_continuity(worker, tp, expected, offset))


def test_the_first_record_after_an_assignment_must_be_at_the_committed_offset():
    probe = _Probe(committed=115, records=set(range(0, 149)))
    _check(probe, None, 115)
    assert probe.asked == [("start", "alerts", 3)]
    with pytest.raises(SkippedRecords, match=r"offsets \[115\] \(delivered 116 after 114\)"):
        _check(_Probe(committed=115, records=set(range(0, 149))), None, 116)


def test_a_jump_over_records_stops_the_worker_and_names_them():
    probe = _Probe(committed=0, records={10, 11, 12, 13, 14, 15})
    with pytest.raises(SkippedRecords, match=r"offsets \[11, 12, 13\]"):
        _check(probe, 11, 14)
    assert probe.asked == [("between", 11, 14)]


def test_a_jump_over_transaction_markers_or_compacted_records_is_accepted():
    probe = _Probe(committed=0, records={0, 1, 2, 4, 5, 9})  # 3: a commit marker; 6-8: compacted away
    _check(probe, 3, 4)
    _check(probe, 6, 9)
    assert probe.asked == [("between", 3, 4), ("between", 6, 9)]


def test_a_record_delivered_again_stops_the_worker():
    with pytest.raises(SkippedRecords, match="offset 7 delivered after 9"):
        _check(_Probe(committed=0, records=set(range(20))), 10, 7)


def test_a_partition_that_delivers_nothing_after_an_assignment_is_sought_again(monkeypatch):
    import pilothouse.sensing.app_faust as app_faust

    monkeypatch.setattr(app_faust, "DELIVERY_WATCH_S", 0.0)
    from collections import namedtuple

    TP = namedtuple("TP", "topic partition")
    stalled, flowing = TP("alerts", 0), TP("alerts", 1)
    empty = TP("alerts", 2)  # nothing past the committed offset: nothing to deliver
    probe = _Probe(committed=100, records=set(range(0, 149)))
    sought = []

    async def seek(tp, offset):
        sought.append((tp.partition, offset))
        taken[tp] = offset + 1  # Faust delivers once sought

    taken = {flowing: 120}
    worker = SimpleNamespace(_taken=taken, _prober=lambda: probe, _highwater=lambda tp: 100 if tp == empty else 149,
                             app=SimpleNamespace(consumer=SimpleNamespace(seek=seek)))
    worker._reseek_if_stalled = lambda tp: CorrelationWorker._reseek_if_stalled(worker, tp)
    _run(asyncio.wait_for(CorrelationWorker._watch_delivery(worker, [stalled, flowing, empty]), 5))
    assert sought == [(0, 100)]  # the watch ends: each partition delivered, or had nothing to deliver
    # a partition with nothing to deliver is left alone (the watch ends once the others delivered)
    sought.clear()

    _run(CorrelationWorker._reseek_if_stalled(worker, empty))
    assert sought == []

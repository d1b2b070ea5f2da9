"""Requests that stop right after a call: the trace evidence names the callee, the engine discounts the caller.

A service whose answers make its callers give up (an error or an unusable result, with no latency or resource
symptom of its own) shows only in its callers' behaviour. The fan-out evidence alone blames the caller.
"""

from __future__ import annotations

from pilothouse.reasoning.engine import rank_root_causes
from pilothouse.sensing.evidence import Span, Window, trace_hotspots, trace_profile

MIN = 60_000


def _minute(minute: int, *, stop_share: float, n: int = 40) -> list[Span]:
    """``front`` serves ``Recv``: a client call to ``cat`` then one to ``cur``; ``stop_share`` of the requests end
    right after the ``cat`` call (the share of requests that stop before any call stays the same)."""
    spans: list[Span] = []
    t0 = minute * MIN
    stops = round(n * stop_share)
    for i in range(n):
        root, t = f"{minute}-{i}", t0 + i * 100
        spans.append(Span(root, root, "", "front", "Recv", t, 20_000))
        if i % 10 == 0:
            continue  # a tenth of the requests never call anyone, in every minute
        spans.append(Span(root, root + "c", root, "front", "Cat/Get", t + 1, 5_000))
        spans.append(Span(root, root + "cs", root + "c", "cat", "Cat/Get", t + 2, 4_000))
        if i % 10 <= stops * 10 // n:
            continue  # stopped after cat answered
        spans.append(Span(root, root + "u", root, "front", "Cur/Convert", t + 10, 3_000))
        spans.append(Span(root, root + "us", root + "u", "cur", "Cur/Convert", t + 11, 2_000))
    return spans


def _profiles(minutes: range, stop_share: float) -> list:
    return [trace_profile(_minute(m, stop_share=stop_share), start_ms=m * MIN, source_link=f"test://{m}")
            for m in minutes]


def test_trace_evidence_names_the_callee_after_which_requests_stop() -> None:
    reference = _profiles(range(0, 10), 0.0)
    window = Window(20 * MIN, 23 * MIN)
    items = trace_hotspots(_profiles(range(20, 23), 0.5), reference, window)
    stops = [e for e in items if e.signal.startswith("stops_after:")]
    assert [(e.service, e.attributes["stopped_caller"], e.attributes["signal_class"]) for e in stops] == [
        ("cat", "front", "errors")]
    assert "ended right after calling cat" in stops[0].summary and stops[0].score >= 4.0
    # the caller's own fan-out changed too (fewer calls to cur): that evidence is still there, against front
    assert any(e.service == "front" and e.attributes["signal_class"] == "call_pattern" for e in items)
    # nothing changed -> no stopping point
    quiet = trace_hotspots(_profiles(range(20, 23), 0.0), reference, window)
    assert not [e for e in quiet if e.signal.startswith("stops_after:")]


def test_engine_blames_the_callee_the_requests_stop_after_not_the_caller() -> None:
    reference = _profiles(range(0, 10), 0.0)
    window = Window(20 * MIN, 23 * MIN)
    items = trace_hotspots(_profiles(range(20, 23), 0.5), reference, window)
    graph = [("front", "cat"), ("front", "cur")]
    ranking = rank_root_causes(items, graph)
    assert ranking.top(1) == ["cat"], ranking.to_dict()
    front = next(c for c in ranking.candidates if c.service == "front")
    assert front.features.get("call_pattern_explained_by_callee") == 1.0
    # the same evidence without the stopping point blames the caller whose fan-out changed
    without = [e for e in items if not e.signal.startswith("stops_after:")]
    assert rank_root_causes(without, graph).top(1) == ["front"]

"""Evidence extraction: ids, Prometheus reader, robust baselines, metric/edge/trace/log/change evidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pilothouse.sensing.evidence import (
    AlertRecord,
    ChangeRecord,
    EvidenceInputError,
    LogRecord,
    Series,
    Span,
    Window,
    alert_evidence,
    change_evidence,
    classify_signal,
    edges_from_correlation,
    evidence_id,
    log_bursts,
    log_template,
    metric_anomalies,
    network_time_series,
    prometheus_graph_link,
    robust_baseline,
    series_from_prometheus,
    signal_side,
    trace_hotspots,
    trace_profile,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rca"
MIN = 60_000


def _series(service: str, signal: str, values: np.ndarray, *, t0: int = 0, step: int = MIN) -> Series:
    ts = t0 + step * np.arange(values.size, dtype=np.int64)
    return Series(service, signal, ts, values.astype(float), source_link=f"test://{service}/{signal}")


# ---------------------------------------------------------------------------------------------------- ids


def test_evidence_id_is_stable_and_depends_on_every_part() -> None:
    w = Window(1_000, 2_000)
    a = evidence_id("metric_anomaly", "cart", "cpu", w)
    assert a == evidence_id("metric_anomaly", "cart", "cpu", Window(1_000, 2_000))
    assert a.startswith("ev-") and len(a) == 15 and int(a[3:], 16) >= 0
    others = {
        evidence_id("log_burst", "cart", "cpu", w), evidence_id("metric_anomaly", "cart2", "cpu", w),
        evidence_id("metric_anomaly", "cart", "mem", w),
        evidence_id("metric_anomaly", "cart", "cpu", Window(1_000, 2_001)),
    }
    assert a not in others and len(others) == 4


def test_window_rejects_reversed_bounds() -> None:
    with pytest.raises(EvidenceInputError, match="before it starts"):
        Window(10, 5)


# ---------------------------------------------------------------------------------------------------- prometheus


def test_series_from_prometheus_reads_matrix() -> None:
    body = json.loads((FIXTURES / "prometheus_query_range.json").read_text())
    series = series_from_prometheus(body, source_link="http://prom/graph")
    assert [(s.service, s.signal) for s in series] == [
        ("checkout", "container_cpu_usage_seconds_total"), ("payment", "container_cpu_usage_seconds_total")]
    cpu = series[0]
    assert cpu.timestamps_ms.tolist() == [1700000000000 + i * 60_000 for i in range(6)]
    assert np.isnan(cpu.values[3]) and cpu.values[4] == pytest.approx(0.93)
    assert cpu.attributes == {"namespace": "shop"}  # service label and __name__ are not repeated
    assert series[1].timestamps_ms[0] == 1700000000500 and np.isposinf(series[1].values[1])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"status": "error", "errorType": "bad_data", "error": "parse error"}, "status='error'"),
        ({"status": "success", "data": {"resultType": "vector", "result": []}}, "expected data.resultType 'matrix'"),
        ({"status": "success", "data": {"resultType": "matrix", "result": {}}}, "not a list"),
        ({"status": "success", "data": {"resultType": "matrix", "result": [{"values": []}]}}, r"result\[0\] has no"),
        ({"status": "success", "data": {"resultType": "matrix",
                                        "result": [{"metric": {"service": "a"}, "values": [[1, "x"]]}]}},
         r"values\[0\]"),
        ({"status": "success", "data": {"resultType": "matrix",
                                        "result": [{"metric": {"pod": "a"}, "values": [[1, "1"]]}]}},
         "neither label 'service' nor 'job'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_series_from_prometheus_refuses_malformed_input(body: object, message: str) -> None:
    with pytest.raises(EvidenceInputError, match=message):
        series_from_prometheus(body)  # type: ignore[arg-type]


def test_series_of_several_pods_get_distinct_signals() -> None:
    body = {"status": "success", "data": {"resultType": "matrix", "result": [
        {"metric": {"__name__": "cpu", "service": "cart", "pod": "cart-2"}, "values": [[1, "1"]]},
        {"metric": {"__name__": "cpu", "service": "cart", "pod": "cart-1"}, "values": [[1, "2"]]},
        {"metric": {"__name__": "mem", "service": "cart", "pod": "cart-1"}, "values": [[1, "3"]]},
    ]}}
    assert [s.signal for s in series_from_prometheus(body)] == ['cpu{pod="cart-2"}', 'cpu{pod="cart-1"}', "mem"]


def test_prometheus_graph_link_quotes_the_query() -> None:
    link = prometheus_graph_link("http://prom:9090/", 'rate(x{service="a b"}[1m])', Window(0, 300_000))
    assert link.startswith("http://prom:9090/graph?g0.expr=rate%28x%7Bservice%3D%22a%20b%22%7D%5B1m%5D%29")
    assert "g0.end_input=300" in link


def test_signal_classification_uses_generic_keywords() -> None:
    assert classify_signal("PodServerLatencyP90(s)") == "latency"
    assert classify_signal("http_request_duration_seconds") == "latency"
    assert classify_signal("CpuUsageRate(%)") == "cpu"
    assert classify_signal("MemoryUsage(Mi)") == "memory"
    assert classify_signal("PodSuccessRate(%)") == "errors"
    assert classify_signal("NetworkReceiveBytes") == "network_io"
    assert classify_signal("PodWorkload(Ops)") == "traffic"
    assert signal_side("PodClientLatencyP99(s)") == "client"
    assert signal_side("NodeCpuUsageRate(%)") == "host"
    assert signal_side("cpu") == "pod"
    assert classify_signal('cpu_seconds{pod="latency-probe-1"}') == "cpu"
    assert signal_side('cpu_seconds{instance="node-7"}') == "pod"


# ---------------------------------------------------------------------------------------------------- baselines


def test_robust_baseline_floors_constant_series_and_widens_for_spiky_ones() -> None:
    const = robust_baseline(np.full(100, 5.0))
    assert const is not None and const.median == 5.0 and const.scale == pytest.approx(0.05)
    rng = np.random.default_rng(7)
    quiet = rng.normal(10, 1, 600)
    spiky = quiet.copy()
    spiky[::25] += 30  # a habitual spike every 25 samples
    bq, bs = robust_baseline(quiet), robust_baseline(spiky)
    assert bq is not None and bs is not None
    # the same +30 excursion is far less surprising for the series that does it routinely
    assert (40 - bs.median) / bs.scale < 0.5 * (40 - bq.median) / bq.scale
    assert robust_baseline(np.array([1.0, np.nan])) is None


# ---------------------------------------------------------------------------------------------------- metrics


def test_metric_step_is_found_with_onset_direction_and_link() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(100, 2, 70)
    v[62:] += 60  # step at minute 62
    s = _series("cart", "cpu_usage", v)
    window = Window(60 * MIN, 69 * MIN)
    items = metric_anomalies([s], window, pre_window_ms=60 * MIN, min_points=2)
    assert len(items) == 1
    e = items[0]
    assert (e.kind, e.service, e.signal, e.direction) == ("metric_anomaly", "cart", "cpu_usage", "up")
    assert e.onset_ms == 62 * MIN
    assert e.score > 10 and e.baseline == pytest.approx(100, abs=2) and e.observed == pytest.approx(v[62:].max())
    assert e.source_link == "test://cart/cpu_usage"
    assert e.attributes["signal_class"] == "cpu"
    assert e.evidence_id == evidence_id("metric_anomaly", "cart", "cpu_usage", window)
    assert set(e.to_dict()) == {"evidence_id", "kind", "service", "signal", "summary", "direction", "score",
                                "onset_ms", "baseline", "observed", "source_link", "attributes"}


def test_noise_alone_produces_no_evidence_and_single_spikes_need_min_points() -> None:
    rng = np.random.default_rng(3)
    series = [_series(f"svc{i}", "latency_p90", rng.normal(1.0, 0.05, 80)) for i in range(40)]
    assert metric_anomalies(series, Window(70 * MIN, 79 * MIN), min_points=2) == []
    v = rng.normal(1.0, 0.05, 80)
    v[75] = 5.0  # one sample
    one = [_series("x", "latency_p90", v)]
    assert metric_anomalies(one, Window(70 * MIN, 79 * MIN), min_points=2) == []
    assert len(metric_anomalies(one, Window(70 * MIN, 79 * MIN), min_points=1)) == 1


def test_reference_excludes_the_incident_itself() -> None:
    rng = np.random.default_rng(5)
    v = rng.normal(50, 1, 300)
    v[200:205] -= 40  # the incident, also present in the "normal" reference recording
    s = _series("db", "SuccessRate", v)
    window = Window(200 * MIN, 204 * MIN)
    with_guard = metric_anomalies([s], window, reference={("db", "SuccessRate"): s}, guard_ms=10 * MIN)
    assert len(with_guard) == 1 and with_guard[0].direction == "down"
    assert int(with_guard[0].attributes["baseline_points"]) == 300 - 5 - 20


def test_series_sharing_timestamps_are_scored_like_single_series() -> None:
    rng = np.random.default_rng(11)
    ts = MIN * np.arange(120, dtype=np.int64)
    cols = [rng.normal(10, 1, 120) for _ in range(5)]
    cols[2][110:] += 20
    cols[4][:50] = np.nan  # gaps in the reference
    cols[4][112:] -= 15
    shared = [Series("a", f"m{j}", ts, c) for j, c in enumerate(cols)]
    alone = [Series("a", f"m{j}", ts.copy(), c.copy()) for j, c in enumerate(cols)]
    w = Window(108 * MIN, 119 * MIN)
    got = {(e.signal, e.score, e.onset_ms) for e in metric_anomalies(shared, w, pre_window_ms=100 * MIN)}
    want = {(e.signal, e.score, e.onset_ms) for e in metric_anomalies(alone, w, pre_window_ms=100 * MIN)}
    assert got == want and {g[0] for g in got} == {"m2", "m4"}


def test_network_time_aligns_offset_scrapes_and_blames_nothing_without_a_match() -> None:
    client = Series("b", "p50", np.array([1_000, 61_000, 121_000, 500_000]), np.array([0.010, 0.012, 0.500, 0.2]))
    server = Series("b", "p50", np.array([0, 60_000, 120_000]), np.array([0.008, 0.009, 0.010]))
    edge = network_time_series(client, server, caller="a", callee="b")
    assert edge.attributes == {"caller": "a", "callee": "b", "edge_metric": "network_time"}
    assert edge.values[:3] == pytest.approx([0.002, 0.003, 0.490])
    assert np.isnan(edge.values[3])  # nearest server sample is 380 s away
    shuffled = Series("b", "p50", np.array([120_000, 0, 60_000]), np.array([0.010, 0.008, 0.009]))
    assert network_time_series(client, shuffled, caller="a", callee="b").values[:3] == pytest.approx(edge.values[:3])
    with pytest.raises(EvidenceInputError, match="no samples"):
        network_time_series(client, Series("b", "p50", np.array([], dtype=np.int64), np.array([])),
                            caller="a", callee="b")


def test_edges_from_correlation_orient_caller_to_callee() -> None:
    rng = np.random.default_rng(9)
    n = 120
    db = 0.01 + rng.normal(0, 0.001, n)
    db[100:] += 0.05  # the incident moves the callee and, through it, the caller
    api = 0.03 + db + rng.normal(0, 0.002, n)
    other = 0.02 + rng.normal(0, 0.002, n)
    series = [_series("api", "latency_p50", api), _series("db", "latency_p50", db),
              _series("other", "latency_p50", other), _series("api", "cpu", rng.normal(1, 0.1, n)),
              _series("db", "client_latency_p50", db * 3)]  # client-side series do not stand for a service
    edges = edges_from_correlation(series, Window(100 * MIN, 119 * MIN))
    assert edges == {("api", "db")}


# ---------------------------------------------------------------------------------------------------- traces


def _bucket(minute: int, *, calls_b: bool = True, b_ms: float = 5.0, err: bool = False, n: int = 20) -> list[Span]:
    spans: list[Span] = []
    t = minute * MIN
    for i in range(n):
        root = f"{minute}-{i}-r"
        spans.append(Span(f"t{minute}-{i}", root, "root", "a", "GET /page", t, 20_000))
        if calls_b:
            c = f"{minute}-{i}-c"
            spans.append(Span(f"t{minute}-{i}", c, root, "a", "B/Get", t, b_ms * 1000 + 500))
            spans.append(Span(f"t{minute}-{i}", f"{minute}-{i}-s", c, "b", "B/Get", t, b_ms * 1000,
                              error=err and i % 2 == 0))
    return spans


def test_trace_profile_knows_client_spans_and_service_edges() -> None:
    p = trace_profile(_bucket(0), start_ms=0)
    assert p.count[("a", "GET /page")] == 20 and p.count[("b", "B/Get")] == 20
    assert p.callee == {("a", "B/Get"): "b"}
    assert p.service_edges == {("a", "b"): 20}


def test_trace_hotspots_find_call_pattern_latency_and_errors() -> None:
    reference = [trace_profile(_bucket(m, b_ms=5.0 + 0.1 * (m % 3)), start_ms=m * MIN) for m in range(10)]
    window = Window(20 * MIN, 22 * MIN)
    stopped = [trace_profile(_bucket(m, calls_b=False), start_ms=m * MIN) for m in (20, 21)]
    items = trace_hotspots(stopped, reference, window)
    pattern = [e for e in items if e.attributes["signal_class"] == "call_pattern"]
    assert len(pattern) == 1 and pattern[0].service == "a" and pattern[0].direction == "down"
    assert pattern[0].observed == 0.0 and pattern[0].baseline == 1.0

    slow = [trace_profile(_bucket(m, b_ms=80.0, err=True), start_ms=m * MIN) for m in (20, 21)]
    items = trace_hotspots(slow, reference, window)
    by_signal = {e.signal: e for e in items}
    # the client span's latency is evidence about the edge a->b, blamed on the callee
    edge = by_signal["call_latency:a->b:B/Get"]
    assert edge.service == "b" and edge.attributes["caller"] == "a" and edge.attributes["callee"] == "b"
    assert by_signal["latency:B/Get"].service == "b"
    assert by_signal["errors:B/Get"].observed == pytest.approx(0.5)
    assert trace_hotspots(slow, reference[:2], window) == []  # too little reference to judge


# ---------------------------------------------------------------------------------------------------- logs


def test_log_template_masks_variable_tokens() -> None:
    a = log_template("user 1234 from 10.0.0.7:5432 failed, id=3f2a9c1b-1111-2222-3333-444455556666 after 2.5s")
    b = log_template("user 99 from 10.9.8.7:1 failed, id=00000000-aaaa-bbbb-cccc-dddddddddddd after 17s")
    assert a == b == "user <num> from <ip> failed, id=<uuid> after <num>s"


def test_log_burst_flags_new_error_template_not_steady_chatter() -> None:
    recs = [LogRecord(m * MIN + k, "cart", f"served request {k}") for m in range(20) for k in range(5)]
    recs += [LogRecord(15 * MIN + k * 1000, "cart", f"ERROR redis timeout after {k} ms", "file://cart.log#L9")
             for k in range(12)]
    items = log_bursts(recs, Window(15 * MIN, 19 * MIN))
    assert len(items) == 1
    e = items[0]
    assert e.signal == "ERROR redis timeout after <num> ms" and e.observed == 12.0
    assert e.attributes["signal_class"] == "errors" and e.attributes["novelty"] == "new template"
    assert e.onset_ms == 15 * MIN and e.source_link == "file://cart.log#L9"


# ---------------------------------------------------------------------------------------------------- changes


def test_change_evidence_decays_with_age_and_ignores_old_changes() -> None:
    w = Window(100 * MIN, 110 * MIN)
    items = change_evidence([
        ChangeRecord(99 * MIN, "cart", "deploy", "v1.2.3 -> v1.2.4", "https://ci/run/1"),
        ChangeRecord(70 * MIN, "pay", "config", "pool size 10 -> 2"),
        ChangeRecord(10 * MIN, "old", "deploy", "long ago"),
    ], w)
    assert [e.service for e in items] == ["cart", "pay"]
    assert items[0].score > items[1].score > 0
    assert items[0].kind == "change_event" and items[0].direction == "none"


def test_alert_evidence_scores_by_severity_within_the_lookback() -> None:
    w = Window(100 * MIN, 110 * MIN)
    items = alert_evidence([
        AlertRecord(95 * MIN, "checkout", "HighRequestLatency", "critical", "p99 > 2s", "http://am/#/alerts?x"),
        AlertRecord(101 * MIN, "cart", "PodMemoryHigh", "warning"),
        AlertRecord(20 * MIN, "old", "Whatever", "critical"),
    ], w)
    assert [(e.service, e.kind, e.attributes["signal_class"]) for e in items] == [
        ("checkout", "alert", "latency"), ("cart", "alert", "memory")]
    assert items[0].score > items[1].score and items[0].onset_ms == 95 * MIN
    assert items[0].source_link == "http://am/#/alerts?x"


# ---------------------------------------------------------------------------------------------------- real data


def test_real_nezha_slice_cpu_contention_is_found_in_the_faulty_service() -> None:
    from pilothouse.evaluation import iter_nezha_cases

    cases = list(iter_nezha_cases(FIXTURES / "nezha_slice"))
    case = next(c for c in cases if c.fault_type == "cpu_contention")
    items = metric_anomalies(case.series, case.window, reference=case.reference, guard_ms=10 * MIN, min_points=2)
    top = max(items, key=lambda e: e.score)
    assert top.service == case.root_cause == "emailservice"
    cpu = [e for e in items if e.service == "emailservice" and e.attributes["signal_class"] == "cpu"]
    assert cpu and cpu[0].direction == "up" and cpu[0].source_link.startswith("dataset://nezha/rca_data/")

"""Handlers: ingest records (redaction manifest, fingerprint pseudonyms), incident records (evidence, hash, edges),
and the Prometheus adapter against a local HTTP server speaking the query_range API."""

from __future__ import annotations

import json
import socket
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from pilothouse.bus.errors import DecodeError, OversizedMessage
from pilothouse.bus.records import AlertReceived, Evidence, RedactionManifest, TelemetryReceived
from pilothouse.bus.serde import Serde
from pilothouse.sensing.adapters.prometheus import PrometheusMetrics
from pilothouse.sensing.config import DEFAULT_DEPENDENCY_MAP
from pilothouse.sensing.correlation import Correlator, DependencyMap, MemoryStore
from pilothouse.sensing.evidence import Window
from pilothouse.sensing.handlers import (
    SEQUENCE_STRIDE,
    AlertEvidenceCache,
    IncidentHandler,
    IngestHandler,
    alert_input,
    alert_partition,
    decode_alert_inputs,
    evidence_sha256,
)
from pilothouse.sensing.redaction import Redactor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alert-payloads"
KEY = b"unit-test-pseudonym-key-000001"
T = 1_790_000_000_000
AWS_KEY = "AKIAZ7Q3XJ4K2M5N6P7Q"


@pytest.fixture(scope="module")
def redactor():
    return Redactor(KEY)


@pytest.fixture
def ingest(redactor):
    return IngestHandler(redactor, alerts_topic="alerts", telemetry_topic="telemetry")


def _ts(ms):
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def test_alertmanager_payload_becomes_valid_avro_records(ingest):
    body = (FIXTURES / "prometheus-msteams-testdata/payloads/alert_testdata_prom_post_request_12_alerts__d4711790.json")
    result = ingest.handle("alertmanager", body.read_bytes(), received_at_ms=T)
    assert result.kind == "alert" and len(result.records) == 12
    serde = Serde()
    for r in result.records:
        assert serde.decode(serde.encode(r)).record == r  # schema-valid
    # the payload's description holds an IP: replaced by a keyed pseudonym and counted
    first = result.records[0]
    assert "<IP:" in first.annotations["description"] and result.findings["IP"] == 12
    assert "$.annotations.description" in first.redaction.redacted_fields


def test_a_requests_alerts_go_out_as_one_record_per_partition_in_order(ingest):
    """AlertsReceived per partition of the alerts topic: every alert once, each in the partition of its
    fingerprint (CRC-32 mod partitions), in request order within it; no key (the partition is chosen)."""
    body = (FIXTURES / "prometheus-msteams-testdata/payloads/alert_testdata_prom_post_request_12_alerts__d4711790.json")
    result = ingest.handle("alertmanager", body.read_bytes(), received_at_ms=T)
    for partitions in (1, 3, 7):
        messages = ingest.messages(result, partitions=partitions)
        assert len({m.partition for m in messages}) == len(messages) <= partitions
        got = []
        for m in messages:
            assert m.topic == "alerts" and m.key is None
            batch = ingest.serde.decode(m.value, expected="pilothouse.sensing.AlertsReceived").record
            assert m.count == len(batch.alerts) and batch.producer == "sensing" and batch.occurred_at == _ts(T)
            assert all(alert_partition(a.fingerprint, partitions) == m.partition for a in batch.alerts)
            got.extend(batch.alerts)
            assert [a.event_id for a in batch.alerts] == [r.event_id for r in result.records if r in batch.alerts]
        assert sorted(a.event_id for a in got) == sorted(result.event_ids)
        assert {a.event_id: a for a in got} == {r.event_id: r for r in result.records}  # the same records


def test_alerts_above_the_message_limit_are_split_and_a_single_oversized_alert_is_refused(redactor):
    small = IngestHandler(redactor, alerts_topic="alerts", telemetry_topic="t", serde=Serde(max_message_bytes=3000))
    alerts = [{"status": "firing", "labels": {"alertname": "A", "service": "cart", "n": str(i)},
               "annotations": {"description": "x" * 400}, "startsAt": "2026-01-01T00:00:00Z",
               "fingerprint": f"fp{i}"} for i in range(20)]
    result = small.handle("alertmanager", json.dumps({"version": "4", "status": "firing", "alerts": alerts}).encode(),
                          received_at_ms=T)
    messages = small.messages(result, partitions=1)
    assert len(messages) > 1 and all(len(m.value) <= 3000 for m in messages)
    decoded = [a for m in messages for a in small.serde.decode(m.value).record.alerts]
    assert [a.event_id for a in decoded] == result.event_ids  # all of them, in order
    alerts[0]["annotations"]["description"] = "y" * 4000
    big = small.handle("alertmanager", json.dumps({"version": "4", "status": "firing", "alerts": alerts}).encode(),
                       received_at_ms=T)
    with pytest.raises(OversizedMessage):
        small.messages(big, partitions=1)


def test_the_worker_decodes_the_alert_input_a_full_decode_gives(ingest):
    """decode_alert_inputs (a projection, timestamps as milliseconds, no model) == alert_input of each whole
    alert, numbered along the partition, for every alert of every real Alertmanager payload; another record
    type is refused."""
    serde = Serde()
    bodies = sorted((FIXTURES / "prometheus-msteams-testdata/payloads").glob("*.json"))
    seen = 0
    for offset, body in enumerate(bodies):
        try:
            result = ingest.handle("alertmanager", body.read_bytes(), received_at_ms=T + seen)
        except Exception:  # noqa: BLE001 - the malformed examples are other tests' business
            continue
        (message,) = ingest.messages(result, partitions=1)
        inputs = decode_alert_inputs(serde, message.value, offset)
        assert inputs == [alert_input(a, offset * SEQUENCE_STRIDE + i)
                          for i, a in enumerate(serde.decode(message.value).record.alerts)]
        assert [a.sequence for a in decode_alert_inputs(serde, message.value)] == [-1] * len(inputs)
        seen += len(inputs)
    assert seen >= 12
    with pytest.raises(DecodeError, match="not the type"):
        decode_alert_inputs(serde, serde.encode(_log(1, "cart", T, "a log line")))


def _am(fingerprint: str) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": [{
        "status": "firing", "labels": {"alertname": "A", "service": "cart"}, "annotations": {},
        "startsAt": "2026-01-01T00:00:00Z", "fingerprint": fingerprint}]}).encode()


def test_fingerprints_the_redactor_would_change_become_stable_pseudonyms(ingest):
    a = ingest.handle("alertmanager", _am(AWS_KEY), received_at_ms=T).records[0]
    b = ingest.handle("alertmanager", _am(AWS_KEY), received_at_ms=T + 1).records[0]
    assert a.fingerprint == b.fingerprint  # stable: deduplication still works
    assert a.fingerprint.startswith("psd:") and len(a.fingerprint) == 28 and AWS_KEY not in a.fingerprint
    assert "$.fingerprint" in a.redaction.redacted_fields
    assert {f.kind for f in a.redaction.findings} == {"FINGERPRINT_PSEUDONYM"}
    other = IngestHandler(Redactor(b"another-deployment-key-000000"), alerts_topic="a", telemetry_topic="t")
    c = other.handle("alertmanager", _am(AWS_KEY), received_at_ms=T).records[0]
    assert c.fingerprint != a.fingerprint  # keyed: not a plain hash anyone can recompute
    plain = ingest.handle("alertmanager", _am("0123abcd"), received_at_ms=T).records[0]
    assert plain.fingerprint == "0123abcd" and plain.redaction.redacted_fields == []


def test_otlp_logs_become_telemetry_with_redacted_bodies(ingest):
    doc = json.loads((FIXTURES / "opentelemetry-otlp-json/examples/logs.json").read_text())
    doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["body"] = {"stringValue": f"login with {AWS_KEY}"}
    result = ingest.handle("otlp_logs", json.dumps(doc).encode(), received_at_ms=T)
    rec = result.records[0]
    assert isinstance(rec, TelemetryReceived) and rec.kind == "log"
    message = ingest.messages(result, partitions=3)[0]
    assert message.topic == "telemetry" and message.key == rec.service and message.partition is None
    assert ingest.serde.decode(message.value).record == rec
    assert AWS_KEY not in rec.body and "$.body" in rec.redaction.redacted_fields


def _alert(event_id, fp, service, at, status="firing", summary="errors up"):
    return AlertReceived(event_id=event_id, correlation_id=event_id, occurred_at=_ts(at), source="alertmanager",
                         fingerprint=fp, status=status, severity="critical", service=service, summary=summary,
                         starts_at=_ts(at), received_at=_ts(at),
                         redaction=RedactionManifest(ruleset_version="rs-x", scanned=True))


def _log(i, service, at, body):
    return TelemetryReceived(event_id=f"log-{i}", correlation_id=f"log-{i}", occurred_at=_ts(at), kind="log",
                             source="otlp_logs", service=service, timestamp=_ts(at), body=body,
                             redaction=RedactionManifest(ruleset_version="rs-x", scanned=True))


def test_incident_record_carries_alert_log_and_change_evidence_and_edges(redactor):
    deps = DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())
    h, store = IncidentHandler(Correlator(deps), redactor), MemoryStore()
    # a quiet reference hour, then a burst of one error template in checkout
    for i in range(5):
        h.handle_telemetry(_log(i, "checkout", T - 3_000_000 + i * 600_000, "GET /cart 200 in 12 ms"))
    for i in range(40):
        # a log excerpt that still holds a secret must not leave sensing (the evidence is scanned again)
        h.handle_telemetry(_log(100 + i, "checkout", T + i * 1000, f"payment refused for token {AWS_KEY}"))
    h.handle_telemetry(TelemetryReceived(
        event_id="chg-1", correlation_id="chg-1", occurred_at=_ts(T - 120_000), kind="change", source="generic:ci",
        service="checkout", timestamp=_ts(T - 120_000), body="deploy checkout v1.4.2",
        attributes={"change_type": "deploy"}, redaction=RedactionManifest(ruleset_version="rs-x", scanned=True)))
    _, first = h.handle_alert(_alert("e1", "fp-front", "frontend", T), store)
    _, second = h.handle_alert(_alert("e2", "fp-check", "checkout", T + 60_000), store)
    assert first.version == 1 and second.version == 2 and second.change == "updated"
    kinds = {e.kind for e in second.evidence}
    assert kinds == {"alert", "log_burst", "change_event"}
    burst = next(e for e in second.evidence if e.kind == "log_burst")
    assert AWS_KEY not in burst.signal and AWS_KEY not in burst.summary
    assert any(f.kind.startswith("AWS") for f in second.redaction.findings)
    assert second.primary_service == "checkout" and second.services == ["checkout", "frontend"]
    # the topology covers the alerting services and their callees (where a root cause hides before it alerts)
    edges = {(e.caller, e.callee) for e in second.dependency_edges}
    assert ("frontend", "checkout") in edges and ("checkout", "payment") in edges
    scope = set(h.correlator.deps.downstream(["checkout", "frontend"], 2))
    assert {c for c, _ in edges} | {d for _, d in edges} <= scope
    assert all(e.attributes["metrics_source"] == "not configured" for e in second.evidence if e.kind == "alert")
    assert second.evidence_sha256 == evidence_sha256(reversed(second.evidence))  # order-independent
    assert second.evidence_sha256 != first.evidence_sha256
    Serde().encode(second)  # fits its schema


def _changing_alerts(n: int, seed: int) -> list[AlertReceived]:
    """Alerts that change every input of an alert's evidence item: status (resolve, re-fire), severity, summary,
    the event, and incidents that open, grow, resolve and re-open (time gaps beyond the grouping window)."""
    import random

    rnd = random.Random(seed)
    out, at = [], T
    for i in range(n):
        at += rnd.choice([1_000, 5_000, 30_000, 20 * 60_000 if rnd.random() < 0.05 else 2_000])
        out.append(AlertReceived(
            event_id=f"e{i}", correlation_id=f"e{i}", occurred_at=_ts(at), source="alertmanager",
            fingerprint=f"fp-{rnd.randrange(25)}", status=rnd.choice(["firing", "firing", "resolved"]),
            severity=rnd.choice(["critical", "warning"]), service=rnd.choice(["frontend", "checkout", "cart", "ad"]),
            summary=rnd.choice(["errors up", "errors up again", "latency high"]), starts_at=_ts(at),
            received_at=_ts(at), redaction=RedactionManifest(ruleset_version="rs-x", scanned=True)))
    return out


@pytest.mark.parametrize("max_items", [50_000, 7])
def test_cached_alert_evidence_gives_the_record_a_fresh_build_gives(redactor, max_items):
    """The alert items of an update come from a cache (built once per alert state): every record must equal the
    one a handler without any cache history builds for the same incident (and its hash must be the evidence's)."""
    deps = DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())
    h, store = IncidentHandler(Correlator(deps), redactor, new_id=lambda: "id"), MemoryStore()
    h.alert_items = AlertEvidenceCache(h.serde, max_items=max_items)
    for i in range(30):  # log lines: some updates carry a log burst too (the other, scanned-again branch)
        h.handle_telemetry(_log(i, "cart", T + 600_000 + i * 1000, f"cart write failed for user {i}"))
    emitted = with_logs = 0
    for k, alert in enumerate(_changing_alerts(400, seed=7)):
        # the metric-source note is part of each alert item: it changes now and then
        metrics = ([], "not configured") if k % 50 < 40 else ([], "prometheus unreachable or failing: timeout")
        outcome = h.correlate(alert, store, sequence=k)
        if not outcome.emits:
            continue
        got = h.incident_record(outcome.incident, metrics=metrics)
        fresh = IncidentHandler(Correlator(deps), redactor, new_id=lambda: "id", telemetry=h.telemetry)
        assert got == fresh.incident_record(outcome.incident, metrics=metrics)
        assert got.evidence_sha256 == evidence_sha256(got.evidence)
        emitted += 1
        with_logs += any(e.kind == "log_burst" for e in got.evidence)
        largest = max(len(i.alerts) for i in (store.get_incident(x) for x in store.incidents))
        assert len(h.alert_items) <= max(max_items, largest)
        assert len(h.alert_items) == sum(len(held.order) for held in h.alert_items._by_incident.values())
    assert emitted > 100 and with_logs > 0


@pytest.mark.parametrize("severity,status,summary", [
    ("critical", "firing", "High error rate on cart (5xx > 5%)"), ("warning", "resolved", ""),
    ("unknown", "firing", "Ünïcode ✓ " * 60), ("info", "firing", 'quotes " and \\ backslashes')])
def test_alert_item_built_from_a_dict_is_the_validated_models_item(severity, status, summary):
    """The alert items skip the pydantic model (two thirds of their cost): the item must be exactly the one the
    validated Evidence model gives (canonical JSON and Avro bytes), and the model must accept it."""
    from pilothouse.sensing.correlation import AlertRef, Incident
    from pilothouse.sensing.handlers import _CachedEvidence

    serde = Serde()
    ref = AlertRef("alertmanager", "fp-1", "cart", status, severity, summary, T, T + 5, "ev-7", 3)
    inc = Incident("inc-1", 2, "open", "updated", "", T, T + 5, None, {"k": ref}, "ev-7")
    item = AlertEvidenceCache._build(inc, ref, "not configured", serde)
    model = Evidence.model_validate_json(item[1])
    assert item == _CachedEvidence.of(model, serde)
    assert model.kind == "alert" and model.attributes == {"status": status, "source": "alertmanager",
                                                          "metrics_source": "not configured"}


def test_an_alert_item_the_schema_refuses_is_refused():
    from pilothouse.bus.errors import RecordInvalid
    from pilothouse.sensing.correlation import AlertRef, Incident

    ref = AlertRef("alertmanager", "fp-1", "cart", "firing", "critical", "s", T, T, "ev-7", 3)
    inc = Incident("inc-1", 1, "open", "opened", "", T, T, None, {"k": ref}, "ev-7")
    bad = AlertRef("alertmanager", "fp-1", "cart", "firing", "critical", "s", "not a time", T, "ev-7", 3)
    with pytest.raises(RecordInvalid):
        AlertEvidenceCache._build(inc, bad, "not configured", Serde())


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _PromAPI(BaseHTTPRequestHandler):
    """Answers /api/v1/query_range like Prometheus: a flat series per service, with a step up at the incident."""

    incident_start_s = T / 1000
    seen: list[dict] = []

    def do_GET(self):  # noqa: N802
        q = parse_qs(urlparse(self.path).query)
        _PromAPI.seen.append({k: v[0] for k, v in q.items()})
        if "bad" in q["query"][0]:
            body, code = {"status": "error", "errorType": "bad_data", "error": "parse error"}, 400
        elif "wobble" in q["query"][0]:  # a quiet series that rises 12 % (or 60 %) at the incident
            start, end, step = float(q["start"][0]), float(q["end"][0]), int(q["step"][0].rstrip("s"))
            after = 0.016 if "big" in q["query"][0] else 0.0112
            values, t = [], start
            while t <= end:
                values.append([t, str(after if t >= self.incident_start_s else 0.01 + 1e-5 * ((int(t) // step) % 3))])
                t += step
            body, code = {"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": {"service": "checkout"}, "values": values}]}}, 200
        elif "spiky" in q["query"][0] or "ALERTS" in q["query"][0]:
            # checkout failed for 20 of the 30 minutes before this incident too (and alerted then); it fails again
            start, end, step = float(q["start"][0]), float(q["end"][0]), int(q["step"][0].rstrip("s"))
            earlier = (self.incident_start_s - 1860, self.incident_start_s - 660)
            values, t = [], start
            while t <= end:
                failing = earlier[0] <= t <= earlier[1] or t >= self.incident_start_s
                if "ALERTS" in q["query"][0]:
                    if earlier[0] <= t <= earlier[1]:
                        values.append([t, "1"])
                else:
                    values.append([t, str(0.4 if failing else 0.01 + 0.001 * ((int(t) // step) % 3))])
                t += step
            body, code = {"status": "success", "data": {"resultType": "matrix", "result": [
                {"metric": {"service": "checkout"}, "values": values}]}}, 200
        elif urlparse(self.path).path == "/api/v1/query":  # instant: a context query (replica counts)
            t = float(q["time"][0])
            body, code = {"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"service": "checkout"}, "value": [t, "3"]},
                {"metric": {"service": "frontend"}, "value": [t, "NaN"]},
                {"metric": {}, "value": [t, "7"]}]}}, 200
        else:
            start, end, step = float(q["start"][0]), float(q["end"][0]), int(q["step"][0].rstrip("s"))
            result = []
            for svc in ("checkout", "frontend"):
                values, t = [], start
                while t <= end:
                    jitter = 0.001 * ((int(t) // step) % 3)
                    v = 0.01 + jitter if t < self.incident_start_s or svc == "frontend" else 0.4
                    values.append([t, str(v)])
                    t += step
                result.append({"metric": {"service": svc}, "values": values})
            body, code = {"status": "success", "data": {"resultType": "matrix", "result": result}}, 200
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        return


@pytest.fixture
def prometheus():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PromAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _PromAPI.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_prometheus_adapter_finds_the_anomalous_service(prometheus):
    m = PrometheusMetrics(prometheus, {"error_ratio": 'x{service=~"$services"}'}, step_s=15, pre_window_ms=1_800_000)
    items, status = m(["checkout", "frontend"], Window(T - 60_000, T + 300_000))
    assert status == "prometheus"
    assert [(i.service, i.kind, i.direction) for i in items] == [("checkout", "metric_anomaly", "up")]
    assert _PromAPI.seen[0]["query"] == 'x{service=~"checkout|frontend"}'
    assert float(_PromAPI.seen[0]["start"]) == pytest.approx((T - 60_000 - 1_800_000) / 1000)
    assert items[0].source_link.startswith(prometheus + "/graph?g0.expr=")


def test_prometheus_context_queries_add_the_current_state_to_metric_items(prometheus):
    m = PrometheusMetrics(prometheus, {"cpu_usage_ratio": 'x{service=~"$services"}'},
                          context_queries={"replicas": 'r{service=~"$services"}'})
    window = Window(T - 60_000, T + 300_000)
    items, status = m(["checkout", "frontend"], window)
    assert status == "prometheus"
    assert [(i.service, i.attributes.get("replicas")) for i in items] == [("checkout", "3")]
    instant = [s for s in _PromAPI.seen if "time" in s]
    assert instant == [{"query": 'r{service=~"checkout|frontend"}', "time": f"{window.end_ms / 1000:.3f}"}]
    # a failing context query costs the attribute, never the evidence, and the status says so
    broken = PrometheusMetrics(prometheus, {"cpu_usage_ratio": "x{$services}"}, context_queries={"replicas": "bad"})
    items, status = broken(["checkout"], window)
    assert items and "replicas" not in items[0].attributes
    assert status == "prometheus (1 context/reference queries failed)"


def test_prometheus_reference_leaves_out_the_times_the_service_was_alerting(prometheus):
    """The same fault again soon after a long earlier one: with the earlier alerting period in the reference, the
    baseline *is* the fault and the repeat does not stand out; without it, it does."""
    window = Window(T - 60_000, T + 300_000)
    plain = PrometheusMetrics(prometheus, {"error_ratio": 'spiky{service=~"$services"}'})
    assert [i.direction for i in plain(["checkout"], window)[0]] == ["down"]  # the healthy minute looks odd
    masked = PrometheusMetrics(prometheus, {"error_ratio": 'spiky{service=~"$services"}'},
                               reference_exclude_query='max by (service) (ALERTS{service=~"$services"})')
    items, status = masked(["checkout"], window)
    assert status == "prometheus"
    assert [(i.service, i.direction) for i in items] == [("checkout", "up")]
    assert int(items[0].attributes["baseline_points"]) < int(plain.pre_window_ms / 1000 / plain.step_s)
    # the exclusion query failing costs the exclusion, not the evidence, and the status says so
    broken = PrometheusMetrics(prometheus, {"error_ratio": 'spiky{service=~"$services"}'},
                               reference_exclude_query="bad")
    items, status = broken(["checkout"], window)
    assert [i.direction for i in items] == ["down"] and status == "prometheus (1 context/reference queries failed)"


def test_prometheus_small_relative_changes_of_quiet_series_are_not_evidence(prometheus):
    window = Window(T - 60_000, T + 300_000)
    small = PrometheusMetrics(prometheus, {"p99_latency_s": 'wobble{service=~"$services"}'})
    assert small(["checkout"], window)[0] == []  # +12 %: a wobble, however quiet the series was
    big = PrometheusMetrics(prometheus, {"p99_latency_s": 'wobble_big{service=~"$services"}'})
    assert [(i.service, i.direction) for i in big(["checkout"], window)[0]] == [("checkout", "up")]  # +60 %
    strict = PrometheusMetrics(prometheus, {"p99_latency_s": 'wobble{service=~"$services"}'}, rel_floor=0.01)
    assert [i.direction for i in strict(["checkout"], window)[0]] == ["up"]  # the old floor took it for a fault


def test_prometheus_adapter_reports_partial_and_unreachable(prometheus):
    partial = PrometheusMetrics(prometheus, {"ok": "x{$services}", "broken": "bad{$services}"})
    items, status = partial(["checkout"], Window(T - 60_000, T + 300_000))
    assert "partial: 1 of 2" in status and items
    down = PrometheusMetrics(f"http://127.0.0.1:{_free_port()}", {"ok": "x"}, timeout_s=0.5)
    items, status = down(["checkout"], Window(T, T + 1))
    assert items == [] and status.startswith("prometheus unreachable") and "ConnectError" in status


def test_unreachable_prometheus_is_said_on_the_incident(redactor):
    deps = DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())
    h, store = IncidentHandler(Correlator(deps), redactor), MemoryStore()
    outcome = h.correlate(_alert("e1", "fp", "cart", T), store)
    down = PrometheusMetrics(f"http://127.0.0.1:{_free_port()}", {"ok": "x"}, timeout_s=0.5)
    rec = h.incident_record(outcome.incident, metrics=down(outcome.incident.services, h.window(outcome.incident)))
    alert_ev = [e for e in rec.evidence if e.kind == "alert"]
    assert alert_ev and alert_ev[0].attributes["metrics_source"].startswith("prometheus unreachable")
    assert isinstance(rec.evidence[0], Evidence)



def test_the_encoded_record_is_the_record_encoded_whatever_the_cache_held(redactor):
    """encoded_incident_record splices evidence items encoded once into the record: the bytes must be those of
    Serde.encode(incident_record), for fresh and cached items, and decode to the same record."""
    from pilothouse.bus.serde import Serde

    deps = DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())
    h, store, serde = IncidentHandler(Correlator(deps), redactor, new_id=lambda: "ev-fixed"), MemoryStore(), Serde()
    for i in range(30):
        h.handle_telemetry(_log(i, "checkout", T + i * 1000, f"payment refused for order {i % 3}"))
    for i in range(12):
        outcome, _ = h.handle_alert(_alert(f"e{i}", f"fp-{i % 5}", "checkout" if i % 2 else "frontend",
                                           T + i * 1000, status="resolved" if i == 7 else "firing"), store)
        for metrics in (None, ([], "unreachable: timeout")):
            record = h.incident_record(outcome.incident, metrics=metrics)
            encoded = h.encoded_incident_record(outcome.incident, metrics=metrics)
            assert encoded == serde.encode(record)
            assert serde.decode(encoded).record == record
    assert {e.kind for e in record.evidence} >= {"alert", "log_burst"} and len(record.evidence) > 5


@pytest.mark.parametrize("seed", range(4))
def test_cached_alert_items_follow_any_change_of_the_alerts(seed):
    """The cache finds what changed by the refs' identity and takes in added keys from the map's order: after
    deletes, a key deleted and written again, ``update`` and new states of alerts, its items must be the ones a
    fresh cache builds (same order, same bytes)."""
    import dataclasses
    import random

    from pilothouse.sensing.correlation import AlertRef, Incident

    rnd, serde = random.Random(seed), Serde()
    cache = AlertEvidenceCache(serde)
    inc = Incident("inc-1", 1, "open", "opened", "", T, T, None, {}, "ev-0")
    for step in range(300):
        keys = list(inc.alerts)
        op = rnd.random()
        if op < 0.5 or not keys:
            k = rnd.randrange(40)
            inc.alerts[f"k{k}"] = AlertRef("alertmanager", f"fp-{k}", rnd.choice(["cart", "ad"]), "firing",
                                           "critical", f"s{k}", T + rnd.randrange(5), T, f"ev-{step}", step)
        elif op < 0.8:
            key = rnd.choice(keys)
            inc.alerts[key] = dataclasses.replace(inc.alerts[key], status=rnd.choice(["firing", "resolved"]),
                                                  last_event_id=f"ev-{step}")
        elif op < 0.9:
            key = rnd.choice(keys)
            ref = inc.alerts.pop(key)
            if rnd.random() < 0.5:  # written again: the same key, now last in the map's order
                inc.alerts[key] = ref
        else:
            k = 1000 + step
            inc.alerts.update({f"k{k}": AlertRef("pagerduty", f"fp-{k}", "cart", "firing", "warning", "u", T, T,
                                                 f"ev-{step}", step)})
        if rnd.random() < 0.6:  # not every change is published at once: some pile up between two updates
            assert cache.items(inc, "not configured") == AlertEvidenceCache(serde).items(inc, "not configured")
            fingerprints = inc.view(DependencyMap()).fingerprints
            assert cache.encoded_fingerprints(inc.incident_id, fingerprints) == [
                serde.encode_item("pilothouse.sensing.IncidentUpdated", "alert_fingerprints", f) for f in fingerprints]
    assert len(cache) == len(inc.alerts)
    assert cache.encoded_fingerprints("not-cached", ["fp-x"]) == [  # an incident it holds no items of
        serde.encode_item("pilothouse.sensing.IncidentUpdated", "alert_fingerprints", "fp-x")]


def test_an_incident_decoded_again_keeps_its_cached_alert_items(monkeypatch):
    """An incident that fell out of the correlator's live ones is decoded from its state: new refs of the same
    alerts. Its items must come from the cache (equal refs), and only a changed alert's item be built again."""
    from pilothouse.sensing.correlation import AlertRef, Incident

    built = []
    real_build = AlertEvidenceCache._build
    monkeypatch.setattr(AlertEvidenceCache, "_build", staticmethod(lambda *a: built.append(a[1]) or real_build(*a)))
    serde = Serde()
    cache = AlertEvidenceCache(serde)
    inc = Incident("inc-1", 1, "open", "opened", "", T, T, None, {
        f"k{i}": AlertRef("alertmanager", f"fp-{i}", "cart", "firing", "critical", "s", T + i, T, f"ev-{i}", i)
        for i in range(30)}, "ev-0")
    first = cache.items(inc, "not configured")
    assert len(built) == 30
    decoded = Incident.from_dict(inc.to_dict())
    assert cache.items(decoded, "not configured") == first and len(built) == 30
    decoded.alerts["k7"] = AlertRef("alertmanager", "fp-7", "cart", "resolved", "critical", "s", T + 7, T + 9,
                                    "ev-99", 99)
    assert len(cache.items(decoded, "not configured")) == 30 and len(built) == 31

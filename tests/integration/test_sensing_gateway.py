"""The ingest gateway against the real broker: real payloads in, Avro records on the topic, refusals with reasons."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from starlette.testclient import TestClient

from pilothouse.bus.config import BusSettings
from pilothouse.bus.records import AlertsReceived
from pilothouse.bus.serde import Serde
from pilothouse.sensing.config import SensingSettings
from pilothouse.sensing.gateway import build_gateway
from pilothouse.sensing.handlers import alert_partition
from pilothouse.sensing.redaction import Redactor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alert-payloads"
GENERIC = FIXTURES / "pilothouse-authored" / "generic"
TOKENS = {
    "alertmanager": "am-token-0123456789abcdef",
    "grafana": "gf-token-0123456789abcdef",
    "pagerduty": "pd-token-0123456789abcdef",
    "pagerduty_change": "pdc-token-0123456789abcdef",
    "otlp_logs": "otlp-token-0123456789abcdef",
    **{f"generic:{p.name.split('.')[0]}": f"gen-{p.name.split('.')[0]}-0123456789abcdef"
       for p in GENERIC.glob("*.rules.yaml")},
}
# Every real payload fixture the gateway must accept: (glob under FIXTURES, route, token source).
ACCEPTED = [
    ("prometheus-msteams-testdata/payloads/*.json", "/v1/alerts/alertmanager", "alertmanager"),
    ("prometheus-alertmanager/examples_ha_send_alerts.alerts_v2_post.json", "/v1/alerts/alertmanager", "alertmanager"),
    ("opentelemetry-otlp-json/examples/logs.json", "/v1/logs", "otlp_logs"),
    ("opentelemetry-otlp-json/examples/events.json", "/v1/logs", "otlp_logs"),
    ("pilothouse-authored/grafana/*.json", "/v1/alerts/grafana", "grafana"),
    ("pilothouse-authored/pagerduty/change_*.json", "/v1/changes/pagerduty", "pagerduty_change"),
    ("pilothouse-authored/pagerduty/[!c]*.json", "/v1/alerts/pagerduty", "pagerduty"),
    *[(f"pilothouse-authored/generic/{p.name.split('.')[0]}.payload.json",
       f"/v1/webhooks/{p.name.split('.')[0]}", f"generic:{p.name.split('.')[0]}") for p in GENERIC.glob("*.rules.yaml")],
]
KEY = b"integration-test-pseudonym-key-0001"
AWS_KEY = "AKIAZ7Q3XJ4K2M5N6P7Q"  # shape of an AWS access key id, invented


def _settings(alerts: str, telemetry: str, **kw) -> SensingSettings:
    return SensingSettings(
        tokens=TOKENS, alerts_topic=alerts, telemetry_topic=telemetry,
        mapping_rules={p.name.split(".")[0]: p for p in GENERIC.glob("*.rules.yaml")}, **kw)


@pytest.fixture(scope="module")
def redactor():
    return Redactor(KEY)


@pytest.fixture
def topics(new_topic):
    return new_topic(partitions=3), new_topic(partitions=1)


@pytest.fixture
def gateway(topics, bus_settings, redactor):
    gw = build_gateway(_settings(*topics), bus_settings("admin"), redactor)
    yield gw
    gw.producer.flush(5)


def auth(source: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[source]}", "Content-Type": "application/json"}


def _records(topic: str, value: bytes) -> list:
    """The alerts (an AlertsReceived holds a request's alerts on one partition) or the telemetry record."""
    record = Serde().decode(value).record
    return list(record.alerts) if isinstance(record, AlertsReceived) else [record]


def consume(bus_settings, topic: str, group_id: str, expected: int,
            timeout_s: float = 30) -> list[tuple[bytes | None, bytes, int]]:
    """(key, value, partition) of the messages on ``topic`` until they hold ``expected`` records, then a second
    more (anything more would be a duplicate)."""
    consumer = Consumer({**bus_settings("admin").librdkafka(), "group.id": group_id,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[tuple[bytes | None, bytes, int]] = []
    held = 0
    deadline = time.monotonic() + timeout_s
    try:
        while held < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            out.append((msg.key(), msg.value(), msg.partition()))
            held += len(_records(topic, msg.value()))
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append((msg.key(), msg.value(), msg.partition()))
    finally:
        consumer.close()
    return out


def test_every_real_payload_is_accepted_and_lands_on_its_topic(gateway, topics, bus_settings, group_id):
    alerts_topic, telemetry_topic = topics
    sent: dict[str, set[str]] = {alerts_topic: set(), telemetry_topic: set()}
    files = 0
    with TestClient(gateway.app) as client:
        for pattern, route, source in ACCEPTED:
            paths = sorted(FIXTURES.glob(pattern))
            assert paths, f"no fixture matches {pattern}"
            for path in paths:
                r = client.post(route, content=path.read_bytes(), headers=auth(source))
                assert r.status_code == 200, (path.name, r.text)
                body = r.json()
                assert body["accepted"] == len(body["event_ids"]) > 0
                sent[alerts_topic if body["kind"] == "alert" else telemetry_topic].update(body["event_ids"])
                files += 1
    assert files >= 25
    for topic, ids in sent.items():
        got = consume(bus_settings, topic, f"{group_id}-{topic}", len(ids))
        records = [(key, partition, rec) for key, value, partition in got for rec in _records(topic, value)]
        assert sorted(r.event_id for _, _, r in records) == sorted(ids)  # every accepted record, exactly once
        for key, partition, rec in records:
            assert rec.redaction.scanned and rec.redaction.ruleset_version.startswith("rs-")
            if topic == alerts_topic:  # no key; the partition of its fingerprint
                assert key is None and partition == alert_partition(rec.fingerprint, 3)
            else:
                assert key.decode() == rec.service
        if topic == alerts_topic:  # one message per request and partition, not one per alert
            assert len(got) < len(records)


@pytest.mark.parametrize("route, source, body, status, path, reason", [
    ("/v1/alerts/alertmanager", "alertmanager", b"{not json", 400, "$", "invalid JSON"),
    ("/v1/alerts/alertmanager", "alertmanager", b"", 400, "$", "empty body"),
    ("/v1/logs", "otlp_logs", (FIXTURES / "opentelemetry-otlp-json/examples/metrics.json").read_bytes(), 400,
     "resourceLogs", "OTLP metrics request"),
    ("/v1/alerts/pagerduty", "pagerduty", b'{"event_action": "trigger"}', 400, "routing_key", "required"),
])
def test_malformed_payloads_get_400_with_the_reason(gateway, route, source, body, status, path, reason):
    with TestClient(gateway.app) as client:
        r = client.post(route, content=body, headers=auth(source))
    assert r.status_code == status
    assert r.json()["error"] == "malformed_payload" and r.json()["path"] == path and reason in r.json()["reason"]


def test_tokens(gateway):
    body = (FIXTURES / "pilothouse-authored/grafana").glob("*.json").__next__().read_bytes()
    with TestClient(gateway.app) as client:
        none = client.post("/v1/alerts/grafana", content=body)
        basic = client.post("/v1/alerts/grafana", content=body, headers={"Authorization": "Basic eDp5"})
        wrong = client.post("/v1/alerts/grafana", content=body, headers={"Authorization": "Bearer nope-nope-nope"})
        other = client.post("/v1/alerts/grafana", content=body, headers=auth("alertmanager"))
        right = client.post("/v1/alerts/grafana", content=body, headers=auth("grafana"))
        unknown = client.post("/v1/webhooks/nobody", content=body, headers=auth("grafana"))
    assert none.status_code == 401 and none.headers["WWW-Authenticate"].startswith("Bearer")
    assert basic.status_code == 401
    assert wrong.status_code == 403 and other.status_code == 403 and "grafana" in other.json()["reason"]
    assert right.status_code == 200
    assert unknown.status_code == 404


def test_size_limit_by_header_and_by_streamed_count(topics, bus_settings, redactor):
    gw = build_gateway(_settings(*topics, max_body_bytes=1000), bus_settings("admin"), redactor)
    big = b'{"version": "4", "alerts": [' + b" " * 2000 + b"]}"
    with TestClient(gw.app) as client:
        declared = client.post("/v1/alerts/alertmanager", content=big, headers=auth("alertmanager"))
        chunked = client.post("/v1/alerts/alertmanager", content=iter([big[:600], big[600:]]),
                              headers=auth("alertmanager"))
    assert declared.status_code == 413 and "Content-Length" in declared.json()["reason"]
    assert chunked.status_code == 413 and "body exceeds" in chunked.json()["reason"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more
    return port


def _dead_broker_gateway(topics, redactor, **kw):
    dead = BusSettings(bootstrap_servers=f"127.0.0.1:{_closed_port()}", security_protocol="PLAINTEXT")
    return build_gateway(_settings(*topics, ack_timeout_s=1.5, retry_after_s=7, **kw), dead, redactor)


def test_broker_unreachable_gives_503_with_retry_after(topics, redactor):
    gw = _dead_broker_gateway(topics, redactor)
    body = (FIXTURES / "pilothouse-authored/pagerduty/resolve.json").read_bytes()
    with TestClient(gw.app) as client:
        r = client.post("/v1/alerts/pagerduty", content=body, headers=auth("pagerduty"))
    assert r.status_code == 503 and r.headers["Retry-After"] == "7"
    assert r.json()["error"] == "broker_unavailable"


def test_overload_gives_429_with_retry_after(topics, redactor):
    gw = _dead_broker_gateway(topics, redactor, max_in_flight=1)  # the first request holds the only slot 1.5 s
    body = (FIXTURES / "pilothouse-authored/pagerduty/resolve.json").read_bytes()
    results: list[int] = []
    with TestClient(gw.app) as client:
        t = threading.Thread(target=lambda: results.append(
            client.post("/v1/alerts/pagerduty", content=body, headers=auth("pagerduty")).status_code))
        t.start()
        deadline = time.monotonic() + 1.0
        while gw._in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client.post("/v1/alerts/pagerduty", content=body, headers=auth("pagerduty"))
        t.join()
    assert second.status_code == 429 and second.headers["Retry-After"] == "7"
    assert results == [503]


def test_a_secret_in_an_annotation_never_reaches_the_topic(gateway, topics, bus_settings, group_id):
    alerts_topic, _ = topics
    payload = (b'{"version": "4", "status": "firing", "alerts": [{"status": "firing", '
               b'"labels": {"alertname": "Leak", "service": "cart", "severity": "critical"}, '
               b'"annotations": {"summary": "cart is leaking", "description": "key=' + AWS_KEY.encode()
               + b' owner=ops@example.org"}, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": "0123abcd"}]}')
    with TestClient(gateway.app) as client:
        r = client.post("/v1/alerts/alertmanager", content=payload, headers=auth("alertmanager"))
    assert r.status_code == 200, r.text
    assert r.json()["redacted"].get("AWS_ACCESS_KEY", 0) + sum(
        n for k, n in r.json()["redacted"].items() if "AWS" in k) >= 1
    got = consume(bus_settings, alerts_topic, group_id, 1)
    assert len(got) == 1
    raw = got[0][1]
    assert AWS_KEY.encode() not in raw and b"ops@example.org" not in raw
    (rec,) = _records(alerts_topic, raw)
    kinds = {f.kind: f.count for f in rec.redaction.findings}
    assert any("AWS" in k for k in kinds) and kinds.get("EMAIL") == 1
    assert "$.annotations.description" in rec.redaction.redacted_fields
    assert AWS_KEY not in rec.annotations["description"]


def test_a_record_redaction_cannot_scan_is_refused_and_nothing_is_written(topics, bus_settings, group_id):
    alerts_topic, _ = topics
    tight = Redactor(KEY, max_text_chars=200)
    gw = build_gateway(_settings(*topics), bus_settings("admin"), tight)
    payload = (b'{"version": "4", "status": "firing", "alerts": ['
               b'{"status": "firing", "labels": {"alertname": "A"}, "annotations": {}, '
               b'"startsAt": "2026-01-01T00:00:00Z", "fingerprint": "aaaa"},'
               b'{"status": "firing", "labels": {"alertname": "B"}, "annotations": {"description": "'
               + b"x" * 500 + b'"}, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": "bbbb"}]}')
    with TestClient(gw.app) as client:
        r = client.post("/v1/alerts/alertmanager", content=payload, headers=auth("alertmanager"))
    assert r.status_code == 422
    assert r.json()["error"] == "redaction_refused" and "record 1 of 2" in r.json()["reason"]
    assert consume(bus_settings, alerts_topic, group_id, 1, timeout_s=3) == []  # not even the scannable alert

"""``pilothouse bench bus``: Avro records through the real broker vs. fastavro in memory, in one process.

* ``fastavro_roundtrip_per_s`` — schemaless encode + decode of the same records in memory (the baseline).
* ``records_per_s`` — the bus path: Serde-encode (single-object framing), produce (idempotent, acks=all), consume
  (read_committed) and Serde-decode, all records acknowledged and read back. Target: >= 0.5 x the baseline.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fastavro import schemaless_reader, schemaless_writer

from pilothouse.bus.config import BusSettings
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import AlertReceived, RedactionFinding, RedactionManifest
from pilothouse.bus.serde import Serde

ALERT = AlertReceived.AVRO_NAME


def make_records(n: int) -> list[dict]:
    """Realistic alerts: ~17 fields, labels and annotations maps, ~600-700 bytes of Avro."""
    now = datetime.now(timezone.utc)
    out = []
    for i in range(n):
        svc = f"service-{i % 40}"
        rec = AlertReceived(
            event_id=str(uuid.UUID(int=i)), incident_id=None, correlation_id=f"corr-{i % 500}", causation_id=None,
            occurred_at=now, producer="sensing", source="alertmanager", fingerprint=f"{i:016x}",
            status="firing" if i % 5 else "resolved", severity="critical" if i % 3 == 0 else "warning",
            service=svc, entity=f"{svc}-7d9f8b6c5-{i % 7:05d}", summary=f"High error rate on {svc} (5xx > 5%)",
            labels={"alertname": "HighErrorRate", "namespace": "prod", "pod": f"{svc}-7d9f8b6c5-x{i % 9}",
                    "severity": "critical", "team": "checkout", "cluster": "eu-west-1", "job": "kubernetes-pods"},
            annotations={"summary": f"5xx ratio above 5% for 5m on {svc}",
                         "description": "Requests are failing; see dashboard for the error budget burn rate.",
                         "runbook_url": "https://runbooks.example.org/high-error-rate"},
            starts_at=now, ends_at=None, links=[f"http://prometheus:9090/graph?g0.expr=rate(errors{{svc=\"{svc}\"}}[5m])"],
            received_at=now,
            redaction=RedactionManifest(ruleset_version="rules-7f3a", scanned=True,
                                        findings=[RedactionFinding(kind="ip", count=1)], redacted_fields=["labels.pod"]),
        )
        out.append(rec.model_dump())
    return out


def fastavro_roundtrip(serde: Serde, records: list[dict]) -> float:
    """Records per second for in-memory encode + decode (no framing, no broker)."""
    parsed = serde.schemas.get(ALERT).parsed
    t0 = time.perf_counter()
    for r in records:
        buf = io.BytesIO()
        schemaless_writer(buf, parsed, r)
        buf.seek(0)
        schemaless_reader(buf, parsed, None)
    return len(records) / (time.perf_counter() - t0)


def through_broker(settings: BusSettings, serde: Serde, records: list[dict], topic: str) -> dict:
    """Produce every record, wait for all acks, then consume and decode them all; returns timings."""
    from confluent_kafka import Consumer

    producer = BusProducer(settings, serde=serde, extra_config={"linger.ms": 20, "batch.size": 1_000_000,
                                                                "compression.type": "lz4"})
    consumer = Consumer({**settings.librdkafka(), "group.id": f"bench.{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "isolation.level": "read_committed", "fetch.min.bytes": 1_000_000,
                         "fetch.wait.max.ms": 50})
    consumer.subscribe([topic])
    t0 = time.perf_counter()
    deliveries = [producer.produce_bytes(topic, serde.encode_dict(ALERT, r), key=r["fingerprint"]) for r in records]
    producer.wait(deliveries, timeout=120)
    t_produced = time.perf_counter()
    got = 0
    deadline = time.monotonic() + 120
    while got < len(records) and time.monotonic() < deadline:
        for m in consumer.consume(10_000, 0.5):
            if m.error():
                continue
            serde.decode(m.value(), expected=ALERT)
            got += 1
    t_done = time.perf_counter()
    consumer.close()
    if got != len(records):
        raise RuntimeError(f"consumed {got} of {len(records)} records")
    return {"produce_s": t_produced - t0, "consume_s": t_done - t_produced, "total_s": t_done - t0}


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``pilothouse bench bus --out FILE [--records N]``."""
    ap = argparse.ArgumentParser(prog="pilothouse bench bus")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--records", type=int, default=50_000)
    args = ap.parse_args(argv)

    from confluent_kafka.admin import AdminClient, NewTopic

    from pilothouse.stack.info import StackInfo

    info = StackInfo.load()
    settings = BusSettings(bootstrap_servers=info.kafka.bootstrap_servers, username="admin",
                           password=info.password("admin"), client_id="bench-bus")
    serde = Serde()
    records = make_records(args.records)
    sizes = [len(serde.encode_dict(ALERT, r)) for r in records[:100]]
    admin = AdminClient(info.kafka_config("admin"))
    topic = f"bench.bus.{uuid.uuid4().hex[:8]}"
    for f in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        f.result(30)
    try:
        fastavro_roundtrip(serde, records[:2000])  # warm up
        baseline = fastavro_roundtrip(serde, records)
        timing = through_broker(settings, serde, records, topic)
        baseline_after = fastavro_roundtrip(serde, records)  # the machine is noisy: bracket the broker run
    finally:
        for f in admin.delete_topics([topic]).values():
            f.result(30)
    baseline_mean = (baseline + baseline_after) / 2
    records_per_s = args.records / timing["total_s"]
    result = {
        "benchmark": "bus",
        "records": args.records,
        "avg_record_bytes": sum(sizes) / len(sizes),
        "records_per_s": round(records_per_s, 1),
        "fastavro_roundtrip_per_s": round(baseline_mean, 1),
        "fastavro_roundtrip_per_s_runs": [round(baseline, 1), round(baseline_after, 1)],
        "ratio": round(records_per_s / baseline_mean, 3),
        "target_ratio": 0.5,
        "meets_target": records_per_s >= 0.5 * baseline_mean,
        "produce_s": round(timing["produce_s"], 3),
        "consume_s": round(timing["consume_s"], 3),
        "path": "Serde.encode_dict -> produce (idempotent, acks=all, lz4) -> broker -> consume (read_committed) "
                "-> Serde.decode",
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "platform": platform.platform()},
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0

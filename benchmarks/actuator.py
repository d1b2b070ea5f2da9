"""``pilothouse bench actuator --out FILE``: authorized actions executed per second on the sandbox fleet, and the
authorization -> execution latency, with the raw fleet HTTP call rate measured in the same run as the baseline.

Phases, each against a fresh fleet subprocess (manual clock) and the stack's Postgres (uuid-named schemas, dropped):

* ``baseline_fleet_calls_per_s`` — sequential ``POST /actions/scale_replicas`` with fresh idempotency keys: the
  target's own ceiling for one client (each call persists the fleet state with fsync before it answers). Every
  phase runs on a fresh fleet with the same number of actions (its cost per call grows with its journal).
* ``handlers`` — ``ActuatorHandlers.on_action_authorized`` called directly (no Kafka): signature + clock + catalogue
  checks, dry-run precheck, intent row, execute, outcome + outbox row; sequential.
* ``service`` — the real service wiring (``pilothouse.actuator.__main__.build``) in this process: authorizations
  produced to a test topic, consumed, executed, ActionExecuted relayed through the outbox to a test topic.
  Throughput from a burst; latency from a paced run (below the burst rate, so it is not queueing time), measured
  from ``issued_at`` to the target's answer (``finished_at``) and to the ActionExecuted event being readable.
No target is set: this is a report. The ratio to the baseline says how much of the target's rate the safety
checks and the durable bookkeeping leave.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pilothouse.actuator.adapters.postgres import Store
from pilothouse.actuator.executors import ExecutorRegistry, FleetExecutor
from pilothouse.actuator.handlers import ActuatorHandlers, Topics
from pilothouse.bus.actions import action_hash, canonical_json, load_actions
from pilothouse.bus.authorization import key_id, sign
from pilothouse.bus.config import BusSettings
from pilothouse.bus.consumer import MessageContext
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.records import ActionAuthorized
from pilothouse.bus.serde import Serde

SERVICES = ("frontend", "checkout", "recommendation", "cart", "payment", "email", "shipping", "currency",
            "productcatalog", "ad")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _lat(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(_pct(values, 0.5) * 1000, 2),
            "p95_ms": round(_pct(values, 0.95) * 1000, 2),
            "p99_ms": round(_pct(values, 0.99) * 1000, 2), "max_ms": round(max(values) * 1000, 2) if values else None,
            "mean_ms": round(statistics.fmean(values) * 1000, 2) if values else None}


class _Seq:
    """Scale actions that always pass their precondition: service i % 10 alternates 4 and 5 replicas."""

    def __init__(self) -> None:
        self.i = 0

    def next(self) -> dict:
        i, self.i = self.i, self.i + 1
        return {"service": SERVICES[i % 10], "replicas": 4 + (i // 10) % 2}


def _authorization(key: Ed25519PrivateKey, params: dict) -> ActionAuthorized:
    now = datetime.now(timezone.utc)
    return sign(key, ActionAuthorized(
        event_id=str(uuid.uuid4()), incident_id="bench", correlation_id="bench", occurred_at=now,
        authorization_id=f"auth-{uuid.uuid4().hex[:12]}", action_id=f"bench-{uuid.uuid4().hex[:12]}",
        action_hash=action_hash("scale_replicas", "service", params["service"], params), action_type="scale_replicas",
        target_kind="service", target=params["service"], params_json=canonical_json(params).decode(),
        decision_id="dec-bench", bundle_revision="bench", input_sha256="0" * 64, approval_ids=["ap-1"],
        issued_at=now, expires_at=now + timedelta(minutes=30), key_id="", signature=""))


def baseline(fleet_url: str, seq: _Seq, n: int) -> float:
    with httpx.Client(base_url=fleet_url, timeout=30) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            r = c.post("/actions/scale_replicas", json=seq.next(), headers={"Idempotency-Key": uuid.uuid4().hex})
            r.raise_for_status()
        return n / (time.perf_counter() - t0)


def handlers_phase(store: Store, fleet_url: str, key: Ed25519PrivateKey, seq: _Seq, n: int) -> dict:
    h = ActuatorHandlers(store=store, registry=ExecutorRegistry([FleetExecutor(fleet_url)]), catalogue=load_actions(),
                         keys={key_id(key.public_key()): key.public_key()}, topics=Topics("b.s", "b.e", "b.v"))
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        rec = _authorization(key, seq.next())
        h.on_action_authorized(rec, MessageContext("bench.authorized", 0, i, None))
        lat.append((datetime.now(timezone.utc) - rec.issued_at).total_seconds())
    elapsed = time.perf_counter() - t0
    with store.transaction() as tx:
        done = tx._one("SELECT count(*) AS n FROM {s}.executions WHERE status = 'executed'")["n"]
    if done != n:
        raise RuntimeError(f"handlers phase: {done} of {n} executed")
    h.registry.close()
    return {"actions": n, "actions_per_s": round(n / elapsed, 1), "latency": _lat(lat)}


def service_phase(info, fleet_url: str, key: Ed25519PrivateKey, seq: _Seq, burst: int, paced: int,
                  schema: str) -> dict:
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient, NewTopic

    from pilothouse.actuator.__main__ import build
    from pilothouse.actuator.config import Settings

    admin = AdminClient(info.kafka_config("admin"))
    names = {k: f"test.bench-actuator.{k}.{uuid.uuid4().hex[:8]}" for k in
             ("pending", "authorized", "kill_switch", "shadow", "executions", "verifications")}
    topics = list(names.values()) + [n + ".dlq" for n in names.values()]
    for f in admin.create_topics([NewTopic(t, 1, 1) for t in topics]).values():
        f.result(30)
    bus = BusSettings(bootstrap_servers=info.kafka.bootstrap_servers, username="admin",
                      password=info.password("admin"), client_id="bench-actuator")
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    settings = Settings(postgres_dsn=info.postgres_dsn, postgres_schema=schema, fleet_url=fleet_url,
                        trusted_keys={key_id(key.public_key()): base64.b64encode(raw).decode()},
                        group_prefix=f"test.bench.{uuid.uuid4().hex[:8]}", observability_port=_free_port(),
                        log_level="WARNING", **{f"topic_{k}": v for k, v in names.items()})
    runtime = build(settings, bus)
    thread = threading.Thread(target=runtime.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    producer = BusProducer(bus)
    consumer = Consumer({**bus.librdkafka(), "group.id": f"test.bench.{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    consumer.subscribe([names["executions"]])
    serde = Serde()
    seen: dict[str, tuple[float, object]] = {}
    reading = threading.Event()

    def read() -> None:  # on its own thread, so an event is timed when it becomes readable, not when we look
        while not reading.is_set():
            m = consumer.poll(0.1)
            if m is None or m.error():
                continue
            rec = serde.decode(m.value()).record
            seen.setdefault(rec.action_id, (time.time(), rec))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def collect(expect: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(seen) < expect and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(seen) < expect:
            raise RuntimeError(f"service phase: {len(seen)} of {expect} ActionExecuted records within {timeout_s}s")

    try:
        # Warm-up: group join, first connections (not measured).
        warm = [_authorization(key, seq.next()) for _ in range(5)]
        for r in warm:
            producer.produce(r, key=r.action_id, topic=names["authorized"])
        producer.flush(30)
        collect(len(warm), 90)

        recs = [_authorization(key, seq.next()) for _ in range(burst)]
        t0 = time.perf_counter()
        for r in recs:
            producer.produce(r, key=r.action_id, topic=names["authorized"])
        producer.flush(30)
        collect(len(warm) + burst, 300)
        burst_s = time.perf_counter() - t0
        rate = burst / burst_s

        interval = 1.0 / max(1.0, rate * 0.5)  # half the burst rate: latency, not queueing
        paced_recs = []
        for _ in range(paced):
            r = _authorization(key, seq.next())  # issued_at = now: the clock starts at authorization
            producer.produce(r, key=r.action_id, topic=names["authorized"])
            producer.poll(0)
            paced_recs.append(r)
            time.sleep(interval)
        producer.flush(30)
        collect(len(warm) + burst + paced, 300)
        to_exec = [(seen[r.action_id][1].finished_at - r.issued_at).total_seconds() for r in paced_recs]
        to_event = [seen[r.action_id][0] - r.issued_at.timestamp() for r in paced_recs]
        outcomes = {seen[r.action_id][1].outcome for r in recs + paced_recs}
        if outcomes != {"executed"}:
            raise RuntimeError(f"service phase: unexpected outcomes {outcomes}")
        return {"burst_actions": burst, "actions_per_s": round(rate, 1), "paced_actions": paced,
                "paced_rate_per_s": round(1 / interval, 1),
                "authorization_to_execution": _lat(to_exec), "authorization_to_event_readable": _lat(to_event)}
    finally:
        runtime.stop()
        thread.join(60)
        reading.set()
        reader.join(10)
        consumer.close()
        for f in admin.delete_topics(topics).values():
            try:
                f.result(30)
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass


class _FreshFleet:
    """A fleet subprocess on a fresh state directory: the fleet rewrites its state and idempotency journal (fsync)
    on every action, so its per-call cost grows with the journal. Every phase gets its own, equally empty fleet."""

    def __enter__(self) -> str:
        self._dir = tempfile.TemporaryDirectory()
        port = _free_port()
        self._proc = subprocess.Popen([sys.executable, "-m", "pilothouse.fleet", "--port", str(port), "--state-dir",
                                       self._dir.name, "--clock", "manual"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("fleet did not start") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(15)
        self._dir.cleanup()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``pilothouse bench actuator --out FILE [--actions N] [--paced N]``. Needs the local stack
    (Kafka, Postgres)."""
    ap = argparse.ArgumentParser(prog="pilothouse bench actuator")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--actions", type=int, default=300, help="actions per phase (baseline calls, handlers, burst)")
    ap.add_argument("--paced", type=int, default=100, help="actions sent at half the burst rate, for latency")
    args = ap.parse_args(argv)

    from pilothouse.stack.info import StackInfo

    info = StackInfo.load()
    key = Ed25519PrivateKey.generate()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    n = args.actions
    with _FreshFleet() as url:
        base = baseline(url, _Seq(), n)
    with _FreshFleet() as url:
        # Its own schema: the handler phase's outbox rows name topics that do not exist (nothing relays them).
        hstore = Store(info.postgres_dsn, schema + "_h")
        try:
            hstore.migrate()
            hp = handlers_phase(hstore, url, key, _Seq(), n)
        finally:
            hstore.drop()
            hstore.close()
    with _FreshFleet() as url:
        store = Store(info.postgres_dsn, schema)
        try:
            store.migrate()
            sp = service_phase(info, url, key, _Seq(), n, args.paced, schema)
        finally:
            store.drop()
            store.close()
    with _FreshFleet() as url:
        base_after = baseline(url, _Seq(), n)  # noisy shared machine: bracket the measured phases
    base_mean = (base + base_after) / 2
    result = {
        "benchmark": "actuator",
        "actions_per_phase": n,
        "baseline_fleet_calls_per_s": round(base_mean, 1),
        "baseline_runs": [round(base, 1), round(base_after, 1)],
        "handlers": {**hp, "ratio_to_baseline": round(hp["actions_per_s"] / base_mean, 3)},
        "service": {**sp, "ratio_to_baseline": round(sp["actions_per_s"] / base_mean, 3)},
        "per_action_work": "verify Ed25519 + clock skew vs Postgres + catalogue + kill switch, dry-run precheck "
                           "(HTTP), intent row (commit), execute (HTTP, fleet fsyncs its state), outcome + outbox "
                           "row (commit); relay: produce + ack + mark sent",
        "target": None,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

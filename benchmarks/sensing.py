"""``pilothouse bench sensing --out FILE``: alerts through gateway → Kafka → correlation → incident topic.

Real path: the gateway (``python -m pilothouse.sensing gateway``) and the Faust correlator
(``python -m pilothouse.sensing correlator``) run as subprocesses pinned to one core each (when the machine has two;
the gateway, this client and the local broker share core 0, so that the correlator, the slower stage, has core 1 to
itself: ``real_path.pinned``), against the local stack's broker on uuid-named ``test.bench-sensing-*`` topics
(deleted afterwards, with the Faust app's changelog topics and consumer group); this process posts Alertmanager
webhooks (``--batch`` alerts each; the gateway writes one AlertsReceived per webhook and partition) and reads the
incident topic.

* ``alerts_per_s`` — alerts posted at full speed divided by the time from the first POST until every alert appears
  in an IncidentUpdated (its fingerprint in ``alert_fingerprints``); the median of ``--repeats`` (3) such phases,
  each on services of its own (``real_path.full_speed_runs`` lists them all).
* ``cpu_limit_per_s`` — the same stages in memory, in this run, on the same alerts, CPU time of one core each:
  stage 1 = normalise + redact + Avro encode (the gateway's work), stage 2 = Avro decode + correlate in batches +
  the batch's state records + build and encode the incident records (the correlator's work: its own
  ``correlate_batch``, ``BatchLogStore`` and ``encoded_incident_record`` at the mean batch size the real correlator
  used at full speed: same coalescing, same work per alert). A pipeline with one core per stage is bounded by its
  slower stage. ``real_path.cpu_share`` says how much of a core each process actually got: the two stages, the
  broker and this client (posting and reading) share the machine's cores. Each stage's figure is the median of
  ``--repeats`` measurements (``in_memory.*_runs``): on a shared machine a single one varied by ±25 %.
* ``p99_latency_ms`` — alert → incident update latency (from the POST being sent to the update read back) with alerts
  sent at half the measured ``alerts_per_s``, same batch size, for ``--latency-seconds`` (120): each ``--alerts``
  alerts on new services, so that its incidents end as large as the full-speed phases' did (``half_rate_services``
  in all). How it is read: a consumer thread of this process
  (``fetch.min.bytes=1``: a fetch returns as soon as a record is there) notes each incident record's arrival time and
  bytes; they are decoded (only the fingerprints) once the topic has been quiet for 0.3 s, so that decoding takes no
  CPU from the stages while they work. ``half_rate_latency_over_time_ms``: p50/p99 per 0.5 s of the phase (the
  incidents grow through it). ``half_rate_stages_ms`` splits the
  latency per alert (p50/p99, ms, one host's clock): POST sent -> gateway stamp (``received_at``) -> alert appended
  to its log -> first update with it appended -> read here; the log times are the broker's (the bench's topics use
  ``message.timestamp.type=LogAppendTime``), read back after the run. ``half_rate_correlator``: the correlator's
  batches in that phase (mean size, time per batch, state-ack wait, age of a batch's oldest alert, full garbage
  collections and their total pause). ``half_rate_gc``: each stage's garbage collections. Both span the phase until
  its last update was read, so a full collection the correlator made once the stream fell idle (0.5 s after the
  last alert: see ``CollectionSchedule``) is counted there too. ``half_rate_gc.client``: this process's own
  collections in the phase (it freezes what lives from before and makes no full collection while a phase is timed:
  a pause of the client's is one of the measurement, see :class:`ClientCollections`); each window has its
  ``client_gc_ms``.
  ``half_rate_host``: how late a real-time probe on each core woke (every 5 ms, :class:`HostProbe`): time the
  machine itself took a core away from every process, which no stage can be blamed for; each window has its
  ``host_late_ms`` (the latest wake-up in it, 0 when none was over 1 ms late) and ``host_work_us`` (per core, how
  long the probe's fixed piece of work took: higher when the core itself was slower, for every process on it), and
  ``ran_waited`` (per process, the share of a core its threads ran and the share they waited for one, from their
  schedstat every 250 ms: :class:`ProcessSchedule`).
  ``half_rate_broker_stops``: the local broker's safepoints of 1 ms or more in that phase (GC pauses above all: each
  stops every producer and consumer at once), read from its GC log; each window has its ``broker_stopped_ms``.
* ``in_memory.correlator_us_per_alert_by_incident_size`` — the correlator stage's CPU per alert (in memory, at the
  real path's mean batch) when each incident ends with 1x, 3x and 6x the alerts it ends with here: how an update's
  cost grows with its incident (every update carries all of its incident's alerts).
* ``real_path.cpu_wait_share`` — per process (the stages, the broker, this client), the share of the phase its threads were ready to run but waited
  for a core (Linux schedstat): how contended the machine was. ``correlator_cpu_ms_per_alert``: the correlator's CPU
  time per alert at full speed, real and in memory: what the real path adds, whatever share of its core it got.

* ``warmup`` — before any of this, full-speed phases for ``--warmup-seconds`` (150) on services and topics of their
  own, per phase its rate and the broker's CPU per alert: a freshly started broker needs minutes of load before its
  JVM has compiled its request path (:func:`_warm_up`). ``warmup.deleted_logs_wait_s``: how long the bench then
  waited for the broker to remove the warm-up topics' files, which it does a minute after their deletion
  (:func:`wait_for_deleted_logs`), so that this does not happen in a timed phase.

Targets: ``alerts_per_s >= 0.5 x cpu_limit_per_s`` and ``p99_latency_ms <= 50``. Both are reported, met or not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from pilothouse.benchmarks.host_probe import HostProbe, ProcessSchedule
from pilothouse.stack import kafka

GATEWAY_TOKEN = "bench-alertmanager-token-0123456789"
PSEUDONYM_KEY = "bench-pseudonym-key-000000000001"
SERVICES = 200  # alerts spread over services outside the dependency map: incidents of moderate size
ALERT_PARTITIONS = 3  # partitions of the bench's alerts topic (the catalogue's default)


def _webhook(run: str, start: int, n: int, now: datetime, svc: str = "svc") -> bytes:
    """Alertmanager webhook of alerts start..start+n over SERVICES services named ``<svc>-<k>``."""
    alerts = []
    for i in range(start, start + n):
        alerts.append({
            "status": "firing",
            "labels": {"alertname": "HighErrorRate", "service": f"{svc}-{i % SERVICES}", "severity": "critical",
                       "namespace": "prod", "pod": f"{svc}-{i % SERVICES}-7d9f8b6c5-x{i % 9}"},
            "annotations": {"summary": f"High error rate on {svc}-{i % SERVICES} (5xx > 5%)",
                            "description": "5xx ratio 0.12 over 5m; runbook https://runbooks.example.org/5xx"},
            "startsAt": now.isoformat().replace("+00:00", "Z"), "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example.org/graph?g0.expr=x", "fingerprint": f"bench-{run}-{i:07d}",
        })
    return json.dumps({"version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "pilothouse",
                       "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
                       "externalURL": "http://am.example.org", "alerts": alerts}).encode()


# ---------------------------------------------------------------------------------------------------- in memory

def cpu_limit(n: int, batch: int, correlator_batches: dict[str, int]) -> dict:
    """Per-stage CPU-time rates of the same work in memory (this process, one core).

    Stage 2 runs the worker's own batch code (``IncidentHandler.correlate_batch`` on a ``BatchLogStore``: one state
    record and one update per changed incident per batch) with each batch size in ``correlator_batches`` (label -> alerts per batch)."""
    from pilothouse.bus.serde import Serde
    from pilothouse.sensing.config import DEFAULT_DEPENDENCY_MAP
    from pilothouse.sensing.correlation import Correlator, DependencyMap
    from pilothouse.sensing.handlers import IncidentHandler, IngestHandler, decode_alert_inputs
    from pilothouse.sensing.redaction import Redactor
    from pilothouse.sensing.state import BatchLogStore

    redactor = Redactor(PSEUDONYM_KEY.encode())
    serde = Serde()
    ingest = IngestHandler(redactor, alerts_topic="a", telemetry_topic="t", serde=serde)
    now = datetime.now(timezone.utc)
    bodies = [_webhook("mem", i, batch, now) for i in range(0, n, batch)]
    received = int(time.time() * 1000)

    t0 = time.process_time()
    messages = []  # AlertsReceived, as the gateway writes them to the bench's alerts topic
    for body in bodies:
        messages.extend(ingest.messages(ingest.handle("alertmanager", body, received_at_ms=received),
                                        partitions=ALERT_PARTITIONS))
    stage1 = time.process_time() - t0
    encoded = [m.value for m in messages]
    alert_count = sum(m.count for m in messages)

    stage2: dict[str, dict] = {}
    for label, size in correlator_batches.items():
        size = max(1, int(size))
        handler = IncidentHandler(Correlator(DependencyMap.from_yaml(DEFAULT_DEPENDENCY_MAP.read_text())), redactor,
                                  serde=serde)
        store, updates = BatchLogStore(), 0
        t0 = time.process_time()
        offset, pending = 0, []
        while offset < len(encoded):
            while offset < len(encoded) and len(pending) < size:  # messages until the batch holds `size` alerts
                pending.extend(decode_alert_inputs(serde, encoded[offset], offset))  # as the worker decodes
                offset += 1
            result = handler.correlate_batch([(a, a.sequence) for a in pending], store)
            pending = []
            store.commit()  # the batch's state records, as the worker writes them
            for inc in result.incidents:
                handler.encoded_incident_record(inc)  # what the worker publishes
                updates += 1
        elapsed = time.process_time() - t0
        stage2[label] = {"batch": size, "per_s": round(alert_count / elapsed, 1), "updates": updates}
    return {"gateway_stage_per_s": round(alert_count / stage1, 1), "correlator_stage": stage2,
            "alerts": alert_count, "messages": len(encoded)}


# ---------------------------------------------------------------------------------------------------- real path

class TopicWatch:
    """Reads a topic from the start; remembers, per alert fingerprint, when it first appeared in a record.

    Per fingerprint: ``first_seen`` (this process's ``perf_counter`` when the record was read), ``first_wall`` (the same
    moment, wall-clock ms), ``log_time`` (the broker's LogAppendTime of that record, ms: the bench creates its topics
    with ``message.timestamp.type=LogAppendTime``) and, for alerts, ``received_at`` (the gateway's stamp, ms).

    What the measurement costs: the consumer fetches with ``fetch.min.bytes=1`` (a fetch returns as soon as anything
    is there) from a thread of its own that only notes each record's bytes and arrival time; records are decoded when
    someone waits for them (``wait_for``, after the requests of a phase were sent), so that while alerts are being
    posted this process does not decode updates on the gateway's core. What reading adds is the last stage of the
    breakdown (incident log append -> read here)."""

    def __init__(self, kafka_conf: dict, topic: str, *, alerts: bool = False) -> None:
        from confluent_kafka import Consumer

        from pilothouse.bus.serde import Serde

        self.first_seen: dict[str, float] = {}
        self.first_wall: dict[str, float] = {}
        self.log_time: dict[str, int] = {}
        self.received_at: dict[str, int] = {}
        self.updates = 0
        self._alerts = alerts
        self._fields = ((("alerts", ("fingerprint", "received_at")),) if alerts  # AlertsReceived: a request's alerts
                        else ("alert_fingerprints",))
        self._serde = Serde()
        self._raw: list[tuple[float, float, int, bytes]] = []  # (perf_counter, wall ms, log time ms, value)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.group_id = f"bench.{uuid.uuid4().hex[:8]}"  # deleted with the bench's topics
        self._c = Consumer({**kafka_conf, "group.id": self.group_id, "auto.offset.reset": "earliest",
                            "enable.auto.commit": False, "fetch.wait.max.ms": 100, "fetch.min.bytes": 1})
        self._c.subscribe([topic])
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._c.poll(0.05)
            if msg is None or msg.error():
                continue
            with self._lock:
                self._raw.append((time.perf_counter(), time.time() * 1000, msg.timestamp()[1], msg.value()))

    def _decode_pending(self) -> None:
        with self._lock:
            raw, self._raw = self._raw, []
        for now, wall, log_time, value in raw:
            # only the fields read here (the evidence is skipped, not built): this client is no stage
            data = self._serde.decode_fields(value, self._fields)
            self.updates += 1
            items = data["alerts"] if self._alerts else [{"fingerprint": fp} for fp in data["alert_fingerprints"]]
            for item in items:
                fp = item["fingerprint"]
                if fp not in self.first_seen:
                    self.first_seen[fp] = now
                    self.first_wall[fp] = wall
                    self.log_time[fp] = log_time
                    if self._alerts:
                        r = item["received_at"]
                        self.received_at[fp] = r if isinstance(r, int) else int(r.timestamp() * 1000)

    def wait_for(self, fps: list[str], timeout_s: float, *, quiet_s: float = 0.3) -> bool:
        """Wait until every fingerprint was seen. Records are decoded only once none arrived for ``quiet_s``
        (the arrival times are noted as they come): decoding while the stages still work took CPU from them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                last = self._raw[-1][0] if self._raw else 0.0
            if last and time.perf_counter() - last < quiet_s:
                time.sleep(0.05)
                continue
            self._decode_pending()
            if all(fp in self.first_seen for fp in fps):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._c.close()


STAGES = ("post_to_gateway", "gateway_to_alert_log", "alert_log_to_incident_log", "incident_log_to_reader")


def stage_times(fps: list[str], sent_wall: dict[str, float], alerts: TopicWatch,
                incidents: TopicWatch) -> dict[str, list[float]]:
    """Per alert (fingerprint), each stage of alert -> incident-update latency (ms, wall clock of this one host):
    POST sent -> gateway stamp (``received_at``) -> alert appended to its log (broker's LogAppendTime) -> first
    incident update with it appended -> that update read by this process."""
    out = {}
    for fp in fps:
        if fp not in alerts.log_time or fp not in incidents.log_time or fp not in sent_wall:
            continue
        t = [sent_wall[fp], alerts.received_at[fp], alerts.log_time[fp], incidents.log_time[fp],
             incidents.first_wall[fp]]
        out[fp] = [b - a for a, b in zip(t, t[1:])]
    return out


def stage_breakdown(times: Iterable[list[float]]) -> dict[str, dict[str, float]]:
    """p50/p99 of each stage (and of their sum) over the alerts' :func:`stage_times`."""
    stages: dict[str, list[float]] = {name: [] for name in (*STAGES, "total")}
    for row in times:
        for name, value in zip(STAGES, row):
            stages[name].append(value)
        stages["total"].append(sum(row))
    return {k: {"p50": round(_pct(v, 0.5), 1), "p99": round(_pct(v, 0.99), 1)} for k, v in stages.items() if v}


def _pinned(core: int | None):
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {core})


def _post_all(url: str, bodies: list[tuple[float, bytes, list[str]]], sent_at: dict[str, float],
              concurrency: int) -> list[int]:
    """POST every body (at its offset in seconds from the start) over ``concurrency`` keep-alive connections;
    the answers' statuses. The standard library's http.client: this process shares the gateway's core, and httpx
    spent 1.1 ms of CPU per 50-alert request here against 0.4 ms (about 2 % of the whole path's CPU per alert)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    headers = {"Authorization": f"Bearer {GATEWAY_TOKEN}", "Content-Type": "application/json"}
    statuses: list[int] = []
    lock = threading.Lock()
    queue = list(enumerate(bodies))
    # connections opened before the clock starts (the first requests of a paced phase must not go out bunched)
    connections = []
    for _ in range(concurrency):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        conn.connect()
        connections.append(conn)
    start = time.perf_counter()

    def worker(conn: http.client.HTTPConnection) -> None:
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    _, (offset_s, body, fps) = queue.pop(0)
                delay = start + offset_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t = time.perf_counter()
                conn.request("POST", where.path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses.append(response.status)
                    for fp in fps:
                        sent_at[fp] = t
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in connections]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _run_delay_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU, so far (Linux schedstat; 0.0 elsewhere)."""
    total = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        pass
    return total


def _pin_all_threads(pid: int | None, cores: set[int]) -> dict[int, set[int]] | None:
    """Pin every thread of process ``pid`` to ``cores`` (``sched_setaffinity`` of a pid sets one thread only);
    returns each thread's affinity before, to put back."""
    if pid is None:
        return None
    before = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cores)
        except OSError:
            pass
    return before


def _broker_pid(info) -> int | None:
    """The local stack's broker process (its pid file), or None when the broker is not one this stack started."""
    from pilothouse.stack.procs import find

    running = find(Path(info.data_dir) / "run", "kafka")
    return running.pid if running is not None and running.alive() else None


def _metrics(port: int) -> dict[str, float]:
    """Sums and counts of a sensing process's histograms (the correlator's, the gateway's), from its /metrics."""
    import httpx

    out = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        name = line.split()[0] if line.strip() else ""
        if line.startswith("pilothouse_") and name.split("{")[0].endswith(("_sum", "_count")):
            out[name] = float(line.split()[-1])
    return out


def delete_app_topics(admin, app_id: str, extra: list[str] = (), groups: list[str] = ()) -> list[str]:
    """Delete ``extra`` topics and what a Faust app ``app_id`` created on the broker: its changelog and assignor
    topics (``<app_id>-*``) and its consumer group (and the consumer ``groups`` given). Returns what could not be
    deleted (best effort: names are uuid-scoped, nothing else matches them)."""
    names = list(extra) + [t for t in admin.list_topics(timeout=10).topics if t.startswith(app_id + "-")]
    failed = []
    for name, fut in (admin.delete_topics(names).items() if names else []):
        try:
            fut.result(30)
        except Exception:  # noqa: BLE001 - reported to the caller
            failed.append(name)
    try:
        for fut in admin.delete_consumer_groups([app_id, *groups]).values():
            fut.result(30)
    except Exception:  # noqa: BLE001 - a group that never formed (or is still leaving) is no leak worth failing on
        pass
    return failed


def wait_for_deleted_logs(log_dirs: Path, timeout_s: float = 120.0) -> float | None:
    """Wait until the local broker has removed the files of deleted topics (``<topic>-<partition>.<id>-delete``
    directories); returns the seconds waited, None when ``log_dirs`` is not there (not this stack's broker).

    A broker removes them ``log.segment.delete.delay.ms`` (60 s) after the deletion. The warm-up's topics (~150 s of
    full-speed writes) were removed that way 47-48 s into the half-rate phase, in 7 of 7 runs (session 15), and a
    window around it was among the slow ones in 3. So the timed phases start once they are gone."""
    if not log_dirs.is_dir():
        return None
    started = time.monotonic()
    while any(p.name.endswith("-delete") for p in log_dirs.iterdir()):
        if time.monotonic() - started > timeout_s:
            print(f"deleted topics' files still in {log_dirs} after {timeout_s:.0f} s; measuring anyway",
                  file=sys.stderr)
            break
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


class ClientCollections:
    """This process's own garbage collections while a phase is timed, and fewer of them.

    The client is part of the measurement: its posting threads stamp when a request is sent and its reader thread
    when an update arrives, and a collection holds the GIL, so that both wait. In three 120 s half-rate phases
    (session 14) the reader's stage (incident log -> read here) reached 45-63 ms in one window ~10 s into each
    phase while every other stage was quiet: a pause of the client, not of the pipeline. So, while a phase is
    timed: what lives from before it is frozen (``gc.freeze``: no collection walks it again) and full collections
    are off (only young ones run); both are restored after the phase. ``figures()`` says what collections the client
    still made (count, pause, the longest), and ``pauses`` when (``perf_counter``, ms, generation)."""

    def __init__(self) -> None:
        from pilothouse.bus.runtime import CollectionSchedule

        self.pauses: list[tuple[float, float, int]] = []
        self._started: float | None = None
        self._schedule = CollectionSchedule()  # only its start/stop: no automatic full collection in between

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((self._started, (time.perf_counter() - self._started) * 1000, info["generation"]))
            self._started = None

    def __enter__(self) -> ClientCollections:
        gc.collect()
        gc.freeze()
        self._schedule.start()
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)
        self._schedule.stop()
        gc.unfreeze()

    def figures(self) -> dict[str, float]:
        full = [ms for _, ms, gen in self.pauses if gen == 2]
        return {"collections": len(self.pauses), "pause_ms": round(sum(ms for _, ms, _ in self.pauses), 1),
                "full": len(full), "full_ms": round(sum(full), 1),
                "max_ms": round(max((ms for _, ms, _ in self.pauses), default=0.0), 2)}


def _gc_figures(delta: dict[str, float]) -> dict[str, float]:
    """Garbage collections of a process (all, and full ones) and their pause time (ms), from a difference of its
    /metrics."""
    name = 'pilothouse_gc_pause_seconds_{}{{generation="{}"}}'
    every = [delta.get(name.format("count", g), 0.0) for g in "012"]
    return {"collections": sum(every), "pause_ms": round(sum(delta.get(name.format("sum", g), 0.0)
                                                              for g in "012") * 1000, 1),
            "full": every[2], "full_ms": round(delta.get(name.format("sum", 2), 0.0) * 1000, 1)}


_SAFEPOINT = re.compile(r'^\[([^\]]+)\].*\] Safepoint "([^"]+)", .*Total: (\d+) ns$')


def broker_stops(log_dir: Path, start_ms: float, end_ms: float, *, min_ms: float = 1.0) -> list[dict] | None:
    """The local broker's safepoints of at least ``min_ms`` that began between two wall-clock moments (ms since the
    epoch): each one stopped all of its request threads (a GC pause, or another VM operation). Read from its GC log
    (``kafkaServer-gc.log*``, JDK unified logging with ``safepoint`` and the ``time`` decorator: each line stamped
    when the stop ended): ``[{"at_ms": start, "ms": length (from reaching it to leaving it), "kind": operation}]``.
    None without such a log (a broker this stack did not start, or an older one)."""
    files = sorted(log_dir.glob("kafkaServer-gc.log*"))
    if not files:
        return None
    stops = []
    for path in files:
        if path.stat().st_mtime * 1000 < start_ms:  # a rotated file last written before the span: nothing in it
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = _SAFEPOINT.match(line)
            if not m:
                continue
            try:
                ended = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000
            except ValueError:
                continue
            length = int(m.group(3)) / 1e6
            if length >= min_ms and start_ms <= ended - length <= end_ms:
                stops.append({"at_ms": round(ended - length), "ms": round(length, 3), "kind": m.group(2)})
    return sorted(stops, key=lambda p: p["at_ms"])


def _batch_figures(delta: dict[str, float]) -> dict[str, float]:
    """Mean batch size and mean per-batch times (ms) of the correlator, from a difference of its /metrics."""
    def mean(name: str, scale: float = 1000.0) -> float:
        n = delta.get(f"pilothouse_sensing_{name}_count", 0.0)
        return round(delta.get(f"pilothouse_sensing_{name}_sum", 0.0) / n * scale, 2) if n else float("nan")

    full = 'pilothouse_gc_pause_seconds_{}{{generation="2"}}'
    return {"batches": delta.get("pilothouse_sensing_correlate_batch_alerts_count", 0.0),
            "mean_batch": mean("correlate_batch_alerts", 1.0), "batch_ms": mean("correlate_seconds"),
            "state_ack_wait_ms": mean("state_ack_wait_seconds"), "oldest_alert_wait_ms": mean("alert_wait_seconds"),
            "full_gc": delta.get(full.format("count"), 0.0),
            "full_gc_ms": round(delta.get(full.format("sum"), 0.0) * 1000, 1)}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def _full_speed(args, url: str, watch: TopicWatch, cobs: int, pids: dict[str, int], tag: str, now: datetime,
                svc: str) -> dict:
    """One full-speed phase: ``args.alerts`` alerts posted as fast as the gateway takes them, timed until every one
    is in an incident update; CPU share and wait of every process over the phase; the correlator's figures."""
    bodies = []
    for start in range(0, args.alerts, args.batch):
        fps = [f"bench-{tag}-{i:07d}" for i in range(start, start + args.batch)]
        bodies.append((0.0, _webhook(tag, start, args.batch, now, svc=svc), fps))
    sent: dict[str, float] = {}
    metrics0 = _metrics(cobs)
    cpu0 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
    delay0 = {k: _run_delay_seconds(pid) for k, pid in pids.items()}
    with ClientCollections():
        t0 = time.perf_counter()
        statuses = _post_all(url, bodies, sent, args.concurrency)
        posted_s = time.perf_counter() - t0
        all_fps = [fp for _, _, fps in bodies for fp in fps]
        complete = watch.wait_for(all_fps, 300, quiet_s=0)  # decoding as they come: the CPU shares end here
    end = max(watch.first_seen.get(fp, time.perf_counter()) for fp in all_fps)
    # CPU share of each process over the phase (1.0 = one core all the time; the machine has os.cpu_count()) ...
    cpu_share = {k: round((_cpu_seconds(pid) - cpu0[k]) / (time.perf_counter() - t0), 2) for k, pid in pids.items()}
    # ... and the share of the phase its threads were ready to run but waited for a core (someone else had it)
    cpu_wait = {k: round((_run_delay_seconds(pid) - delay0[k]) / (time.perf_counter() - t0), 2)
                for k, pid in pids.items()}
    metrics1 = _metrics(cobs)
    delta = {k: metrics1.get(k, 0.0) - metrics0.get(k, 0.0) for k in metrics1}
    mean_batch = (delta.get("pilothouse_sensing_correlate_batch_alerts_sum", 0.0)
                  / max(1.0, delta.get("pilothouse_sensing_correlate_batch_alerts_count", 0.0)))
    time.sleep(0.5)  # let the last batch's acks and commits settle before the next phase
    return {"alerts_per_s": round(len(all_fps) / (end - t0), 1), "statuses": statuses, "complete": complete,
            "post_seconds": round(posted_s, 3), "cpu_share": cpu_share, "cpu_wait_share": cpu_wait,
            "mean_batch": round(mean_batch, 1), "ack_wait_s": delta.get("pilothouse_sensing_state_ack_wait_seconds_sum", 0.0),
            "latencies": [(watch.first_seen[fp] - sent[fp]) * 1000 for fp in all_fps if fp in watch.first_seen],
            "delta": delta, "fps": all_fps}


def _warm_up(args, url: str, watch: TopicWatch, cobs: int, pids: dict[str, int], run: str, now: datetime,
             warmup_s: float) -> dict:
    """Full-speed phases for ``warmup_s`` seconds; their figures, per run (the broker's CPU per alert among them).

    Why: a freshly started broker's JVM has not compiled its hot paths yet, and on this machine it compiles them
    slowly (its compiler threads share the gateway's core). Measured (2 vCPUs, bench right after ``pilothouse stack
    up``, 113 full-speed phases of 5,000 alerts in 240 s): the broker's CPU per alert fell from 200 us (2,500
    alerts/s) to 50-90 us after ~60 s and to 30-40 us (4,700-5,200 alerts/s) after ~150 s. A broker in production has
    been up for days, so the result is measured after this warm-up, on services and topics of its own, and the
    warm-up's figures are reported beside it. There is no stopping rule: the fall has plateaus (74 us for ten phases,
    then 45), so a rule that stops at the first plateau stops too early."""
    t0, runs = time.monotonic(), []
    while time.monotonic() - t0 < warmup_s:
        r = _full_speed(args, url, watch, cobs, pids, f"{run}w{len(runs)}", now, svc=f"warm{len(runs)}")
        share = r["cpu_share"].get("broker")
        runs.append({"alerts_per_s": r["alerts_per_s"], "mean_batch": r["mean_batch"], "cpu_share": r["cpu_share"],
                     "broker_us_per_alert": None if share is None else round(share / r["alerts_per_s"] * 1e6)})
    return {"seconds": round(time.monotonic() - t0, 1), "runs": runs}


def real_path(args, info, *, warmup_s: float | None = None) -> dict:
    """The real path's phases (full speed ``repeats`` times, then half rate) on services and topics of their own.

    With ``warmup_s``: only full-speed phases, for that long (:func:`_warm_up`); their figures, not a result."""
    from confluent_kafka.admin import AdminClient, NewTopic

    run = uuid.uuid4().hex[:8]
    app_id = f"pilothouse-sensing-bench-{run}"
    # test.* names: the bus producer accepts uuid-named topics outside the catalogue only with that prefix
    topics = {k: f"test.bench-sensing-{k}-{run}" for k in ("alerts", "telemetry", "incidents")}
    admin = AdminClient(info.kafka_config("admin"))
    # LogAppendTime: each record carries the moment the broker appended it (the stage breakdown's middle points)
    for f in admin.create_topics([NewTopic(t, 1 if k != "alerts" else ALERT_PARTITIONS, 1,
                                           config={"message.timestamp.type": "LogAppendTime"})
                                  for k, t in topics.items()]).values():
        f.result(30)
    port, obs, cobs = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTHOUSE_")}
    env.update({
        "PILOTHOUSE_KAFKA_BOOTSTRAP_SERVERS": info.kafka.bootstrap_servers, "PILOTHOUSE_KAFKA_USERNAME": "admin",
        "PILOTHOUSE_KAFKA_PASSWORD": info.password("admin"), "PILOTHOUSE_REDACTION_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "PILOTHOUSE_SENSING_TOKENS": json.dumps({"alertmanager": GATEWAY_TOKEN}),
        "PILOTHOUSE_SENSING_GATEWAY_PORT": str(port), "PILOTHOUSE_SENSING_OBSERVABILITY_PORT": str(obs),
        "PILOTHOUSE_SENSING_CORRELATOR_OBSERVABILITY_PORT": str(cobs),
        "PILOTHOUSE_SENSING_ALERTS_TOPIC": topics["alerts"], "PILOTHOUSE_SENSING_TELEMETRY_TOPIC": topics["telemetry"],
        "PILOTHOUSE_SENSING_INCIDENTS_TOPIC": topics["incidents"],
        "PILOTHOUSE_SENSING_APP_ID": app_id,
        "PILOTHOUSE_SENSING_DATA_DIR": f"/tmp/pilothouse-bench-sensing-{run}",
        "PILOTHOUSE_SENSING_MAX_IN_FLIGHT": "256",
        "PILOTHOUSE_SENSING_BATCH_MAX": str(args.correlator_batch_max),
    })
    cores = os.cpu_count() or 1
    log_dir = Path(f"/tmp/pilothouse-bench-sensing-{run}")
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, mode in enumerate(("gateway", "correlator")):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pilothouse.sensing", mode], env=env, start_new_session=True,
            stdout=open(log_dir / f"{mode}.log", "wb"), stderr=subprocess.STDOUT,
            preexec_fn=_pinned(i if cores >= 2 and args.pin else None)))
    # this client (HTTP posts, reading the incident topic) shares the gateway's core, not the correlator's
    own_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if own_affinity is not None and cores >= 2 and args.pin:
        os.sched_setaffinity(0, {0})
    # and so does the broker (every thread; put back afterwards): the correlator, the slower stage, has core 1 alone
    broker_affinity = _pin_all_threads(_broker_pid(info), {0}) if cores >= 2 and args.pin else None
    watch = TopicWatch(info.kafka_config("admin"), topics["incidents"])
    alert_watch = None  # the alert log is read after the runs (its timestamps are the broker's): no extra load
    wall_offset_ms = time.time() * 1000 - time.perf_counter() * 1000  # perf_counter -> wall clock, this run
    url = f"http://127.0.0.1:{port}/v1/alerts/alertmanager"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:  # gateway up?
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"sensing did not start; logs in {log_dir}")
            time.sleep(0.2)
        # warm-up: the correlator joined its group and writes incidents
        now = datetime.now(timezone.utc)
        warm: dict[str, float] = {}
        warm_status = _post_all(url, [(0.0, _webhook(f"{run}w", 0, args.batch, now),
                                       [f"bench-{run}w-{i:07d}" for i in range(args.batch)])], warm, 1)
        if warm_status != [200]:
            raise RuntimeError(f"warm-up request answered {warm_status}; logs in {log_dir}")
        if not watch.wait_for(list(warm), 120, quiet_s=0):
            raise RuntimeError(f"no incident update within 120 s after warm-up; logs in {log_dir}")

        # 1) full speed, ``repeats`` times (each on services of its own: the same workload every time); the run
        # with the median rate is the result, the others are listed (the machine is shared and noisy)
        pids = {"gateway": procs[0].pid, "correlator": procs[1].pid, "client": os.getpid()}
        broker = _broker_pid(info)
        if broker is not None:
            pids["broker"] = broker  # every process on the machine that works for this phase
        if warmup_s is not None:
            return _warm_up(args, url, watch, cobs, pids, run, now, warmup_s)
        runs = [_full_speed(args, url, watch, cobs, pids, f"{run}r{r}", now, svc=f"svc{r}")
                for r in range(args.repeats)]
        ranked = sorted(runs, key=lambda x: x["alerts_per_s"])
        median = ranked[len(ranked) // 2]
        statuses, complete, posted_s = median["statuses"], all(x["complete"] for x in runs), median["post_seconds"]
        cpu_share, cpu_wait, mean_batch = median["cpu_share"], median["cpu_wait_share"], median["mean_batch"]
        ack_wait_s, alerts_per_s, full_lat = median["ack_wait_s"], median["alerts_per_s"], median["latencies"]
        delta, all_fps = median["delta"], median["fps"]

        # 2) half of the measured rate for ``latency_seconds``: requests paced evenly
        rate = alerts_per_s / 2
        n2 = max(args.batch * 20, int(rate * args.latency_seconds))
        n2 -= n2 % args.batch
        # other services than phase 1, and new ones every ``args.alerts`` alerts, so that its incidents end as large
        # as phase 1's did (args.alerts / SERVICES alerts each): the same workload, only longer (an update's cost
        # grows with its incident, so reusing phase 1's incidents, or letting these grow larger, measures a heavier
        # one)
        bodies2 = []
        for k, start in enumerate(range(0, n2, args.batch)):
            fps = [f"bench-{run}h-{i:07d}" for i in range(start, start + args.batch)]
            # each ``args.alerts`` alerts on SERVICES services of their own: phase 1's workload, block after block
            # (all at once, round robin over 1,200 services, their incidents outnumbered the correlator's live
            # ones, 1,000, and every update decoded its incident from its state)
            bodies2.append((k * args.batch / rate,
                            _webhook(f"{run}h", start, args.batch, now, svc=f"half{start // args.alerts}"), fps))
        sent2: dict[str, float] = {}
        metrics2, gateway2 = _metrics(cobs), _metrics(obs)
        with HostProbe() as host, ProcessSchedule(pids) as sched, ClientCollections() as client_gc:
            statuses2 = _post_all(url, bodies2, sent2, args.concurrency)
            fps2 = [fp for _, _, fps in bodies2 for fp in fps]
            complete2 = watch.wait_for(fps2, 300)
        lat = [(watch.first_seen[fp] - sent2[fp]) * 1000 for fp in fps2 if fp in watch.first_seen]
        delta2 = {k: v - metrics2.get(k, 0.0) for k, v in _metrics(cobs).items()}
        gateway_delta2 = {k: v - gateway2.get(k, 0.0) for k, v in _metrics(obs).items()}
        alert_watch = TopicWatch(info.kafka_config("admin"), topics["alerts"], alerts=True)
        alert_watch.wait_for(fps2, 60)
        times = stage_times(fps2, {fp: t * 1000 + wall_offset_ms for fp, t in sent2.items()}, alert_watch, watch)
        stages = stage_breakdown(times.values())
        # over the phase (by send time, 0.5 s windows): the incidents grow, and so does an update's cost; and the
        # stage a slow window lost its time in
        first = min(sent2.values()) if sent2 else 0.0
        windows: dict[int, list[str]] = {}
        for fp in fps2:
            if fp in watch.first_seen:
                windows.setdefault(int((sent2[fp] - first) / 0.5), []).append(fp)
        # the broker's stops in the phase (GC pauses above all: each stops every producer and consumer at once), by
        # the same windows
        started_ms = first * 1000 + wall_offset_ms
        pauses = broker_stops(kafka.server_logs(Path(info.data_dir)), started_ms,
                              max(sent2.values(), default=first) * 1000 + wall_offset_ms)
        def window_of(ms: float) -> int:  # the window a wall-clock moment (ms) falls in, as the alerts' above
            return int((ms - started_ms) / 500)

        over_time = []
        for k, members in sorted(windows.items()):
            v = [(watch.first_seen[fp] - sent2[fp]) * 1000 for fp in members]
            over_time.append({"t_s": k * 0.5, "alerts": len(v), "p50": round(_pct(v, 0.5), 1),
                              "p99": round(_pct(v, 0.99), 1),
                              "stages_p99": {name: x["p99"] for name, x in stage_breakdown(
                                  times[fp] for fp in members if fp in times).items() if name != "total"}})
            window, span = over_time[-1], (started_ms + k * 500, started_ms + (k + 1) * 500)
            if pauses is not None:
                window["broker_stopped_ms"] = round(sum(p["ms"] for p in pauses if window_of(p["at_ms"]) == k), 1)
            window["client_gc_ms"] = round(sum(ms for at, ms, _ in client_gc.pauses
                                               if window_of(at * 1000 + wall_offset_ms) == k), 2)
            window["host_late_ms"] = max((ms for at, _, ms in host.late if window_of(at) == k), default=0.0)
            window["host_work_us"] = host.work_us(*span)
            window["ran_waited"] = sched.window(*span)
        return {
            "alerts": len(all_fps), "batch": args.batch, "concurrency": args.concurrency,
            "http_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "complete": complete, "post_seconds": round(posted_s, 3), "cpu_share": cpu_share,
            "cpu_wait_share": cpu_wait,
            "pinned": ({"gateway": 0, "client": 0, "broker": 0 if broker_affinity else None, "correlator": 1}
                       if args.pin and cores >= 2 else False),
            "full_speed_runs": [{k: x[k] for k in ("alerts_per_s", "mean_batch", "cpu_share")} for x in runs],
            "correlator_mean_batch": round(mean_batch, 1), "correlator_state_ack_wait_s": round(ack_wait_s, 3),
            "alerts_per_s": round(alerts_per_s, 1),
            "full_speed_latency_ms": {"p50": round(_pct(full_lat, 0.5), 1), "p99": round(_pct(full_lat, 0.99), 1)},
            "half_rate_alerts_per_s": round(rate, 1), "half_rate_seconds": args.latency_seconds,
            "half_rate_alerts": len(fps2), "half_rate_complete": complete2,
            "half_rate_services": SERVICES * -(-n2 // args.alerts),
            # the phase's start, wall clock (ms since the epoch): to match its windows with other logs (GC, broker)
            "half_rate_started_ms": round(started_ms),
            # the broker's stops of 1 ms or more; None: no GC log from the broker (not one this stack started)
            "half_rate_broker_stops": None if pauses is None else {
                "stops": len(pauses), "total_ms": round(sum(p["ms"] for p in pauses), 1),
                "max_ms": max((p["ms"] for p in pauses), default=0.0),
                "at_s_ms_kind": [[round((p["at_ms"] - started_ms) / 1000, 2), p["ms"], p["kind"]] for p in pauses]},
            "half_rate_http_statuses": {str(s): statuses2.count(s) for s in sorted(set(statuses2))},
            "p50_latency_ms": round(_pct(lat, 0.5), 1), "p99_latency_ms": round(_pct(lat, 0.99), 1),
            "max_latency_ms": round(max(lat), 1) if lat else None, "incident_updates_read": watch.updates,
            "half_rate_stages_ms": stages, "half_rate_correlator": _batch_figures(delta2),
            "half_rate_gc": {"gateway": _gc_figures(gateway_delta2), "correlator": _gc_figures(delta2),
                             "client": client_gc.figures()},
            # how late a real-time probe on each core woke in the phase: time the machine took a core away
            "half_rate_host": host.figures(),
            "full_speed_correlator": _batch_figures(delta),
            "half_rate_latency_over_time_ms": over_time, "latencies_ms": lat,
        }
    finally:
        watch.close()
        if alert_watch is not None:
            alert_watch.close()
        if own_affinity is not None:
            os.sched_setaffinity(0, own_affinity)
        for tid, aff in (broker_affinity or {}).items():
            try:
                os.sched_setaffinity(tid, aff)
            except OSError:
                pass
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        left = delete_app_topics(admin, app_id, list(topics.values()),
                                 [w.group_id for w in (watch, alert_watch) if w is not None])
        if left:
            print(f"could not delete bench topics: {left}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``pilothouse bench sensing --out FILE [--alerts N] [--batch B]``."""
    ap = argparse.ArgumentParser(prog="pilothouse bench sensing")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--alerts", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3, help="full-speed phases (the median one is the result)")
    ap.add_argument("--batch", type=int, default=50, help="alerts per webhook request")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent HTTP clients")
    ap.add_argument("--latency-seconds", type=float, default=120.0,
                    help="length of the half-rate phase (a p99 over 10 s missed what comes every minute or two: a "
                    "broker's young pause, a full collection of the correlator)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin (default: the gateway, this client and the broker on core 0, the correlator on "
                    "core 1; each stage is one Python process, its GIL bounds it to about one core)")
    ap.add_argument("--correlator-batch-max", type=int, default=500,
                    help="PILOTHOUSE_SENSING_BATCH_MAX of the correlator under test")
    ap.add_argument("--warmup-seconds", type=float, default=150.0,
                    help="full-speed phases for this long first, on services of their own: a freshly started broker's "
                    "JVM needs minutes to compile its hot paths (its CPU per alert falls ~5x); 0: no warm-up")
    args = ap.parse_args(argv)

    from pilothouse.stack.info import StackInfo

    info = StackInfo.load()
    # The in-memory stages see the same alerts as the real path (incident sizes, hence update sizes, match).
    # The correlator stage runs at the mean batch size the real correlator used at full speed ("run": the same
    # coalescing, so the same work per alert), and for reference one alert at a time and at full batches.
    bounds = {"one_at_a_time": 1, "full_batches": args.correlator_batch_max}
    warmup = real_path(args, info, warmup_s=args.warmup_seconds) if args.warmup_seconds > 0 else None
    if warmup is not None:
        warmup["deleted_logs_wait_s"] = wait_for_deleted_logs(kafka.log_dirs(Path(info.data_dir)))
    memory_before = cpu_limit(args.alerts, args.batch, bounds)
    real = real_path(args, info)
    memory_after = cpu_limit(args.alerts, args.batch, {"run": real["correlator_mean_batch"], **bounds})
    # the baselines are as noisy as the real path: the median of ``repeats`` measurements each
    more = [cpu_limit(args.alerts, args.batch, {"run": real["correlator_mean_batch"]})
            for _ in range(max(0, args.repeats - 1))]
    gateway_runs = [m["gateway_stage_per_s"] for m in (memory_before, memory_after, *more)]
    correlator_runs = [m["correlator_stage"]["run"]["per_s"] for m in (memory_after, *more)]
    # how the correlator's cost per alert grows with its incidents' size (an update carries every alert of its
    # incident): the same workload with 1x, 3x and 6x the alerts per service, at the batch size it ran at
    sizes = {str(k * args.alerts // SERVICES): cpu_limit(k * args.alerts, args.batch,
                                                         {"run": real["correlator_mean_batch"]})
             for k in (1, 3, 6)}
    growth = {n: round(1e6 / m["correlator_stage"]["run"]["per_s"], 1) for n, m in sizes.items()}
    gateway_limit = sorted(gateway_runs)[len(gateway_runs) // 2]
    correlator_limit = sorted(correlator_runs)[len(correlator_runs) // 2]
    limit = min(gateway_limit, correlator_limit)
    latencies = real.pop("latencies_ms")
    # CPU per alert of the correlator process at full speed (its CPU time / alerts) against the same work in memory:
    # what the real path adds (Kafka clients, Faust, state writes), independent of how much of its core it got
    real_cpu_ms = real["cpu_share"]["correlator"] * (real["alerts"] / real["alerts_per_s"]) / real["alerts"] * 1000
    real["correlator_cpu_ms_per_alert"] = {"real": round(real_cpu_ms, 3),
                                           "in_memory": round(1000 / correlator_limit, 3)}
    result = {
        "benchmark": "sensing",
        "when": datetime.now(timezone.utc).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "alerts_per_s": real["alerts_per_s"],
        "cpu_limit_per_s": round(limit, 1),
        "ratio": round(real["alerts_per_s"] / limit, 3),
        "p99_latency_ms": real["p99_latency_ms"],
        "targets": {"ratio_min": 0.5, "p99_latency_ms_max": 50,
                    "ratio_met": real["alerts_per_s"] >= 0.5 * limit, "p99_met": real["p99_latency_ms"] <= 50},
        "in_memory": {"gateway_stage_per_s": round(gateway_limit, 1), "correlator_stage_per_s": correlator_limit,
                      "gateway_stage_runs": gateway_runs, "correlator_stage_runs": correlator_runs,
                      "before": memory_before, "after": memory_after,
                      "correlator_us_per_alert_by_incident_size": growth},
        "real_path": real,
        "warmup": warmup,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = sorted(latencies)
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
        ax.plot(s, [(i + 1) / len(s) for i in range(len(s))])
        ax.axvline(50, color="red", linestyle="--", label="target p99 50 ms")
        ax.set_xlabel("alert → incident update latency (ms)")
        ax.set_ylabel("fraction of alerts")
        ax.set_title(f"sensing at {real['half_rate_alerts_per_s']:.0f} alerts/s (half of max)")
        ax.legend()
        series = real["half_rate_latency_over_time_ms"]
        ax2.plot([w["t_s"] for w in series], [w["p50"] for w in series], label="p50")
        ax2.plot([w["t_s"] for w in series], [w["p99"] for w in series], label="p99")
        ax2.axhline(50, color="red", linestyle="--")
        ax2.set_xlabel("seconds into the half-rate phase (incidents grow)")
        ax2.set_ylabel("latency (ms), 0.5 s windows")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=100)
    except Exception as e:  # noqa: BLE001 - the JSON is the result; the plot is a convenience
        print(f"no plot: {e}", file=sys.stderr)
    print(json.dumps({k: result[k] for k in ("alerts_per_s", "cpu_limit_per_s", "ratio", "p99_latency_ms")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

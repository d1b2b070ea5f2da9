"""The correlation worker: a thin Faust app around :mod:`pilothouse.sensing.correlation` and the handlers.

Consumes ``AlertReceived`` (alerts topic) and ``TelemetryReceived`` (telemetry topic); writes ``IncidentUpdated`` to
the compacted incidents topic, keyed by incident id, with a monotonic version per incident.

State: one Faust table (``incidents``), in memory, backed by the changelog topic ``<app_id>-incidents-changelog``
that Faust creates (the sensing principal owns the ``pilothouse-sensing-`` prefix). The alert index (dedup key ->
incident) and the service index (service -> incident) are derived from the incidents after every assignment. The
table has ONE changelog partition and uses the key partitioner, so recovery replays the writes in the order they
were made: grouping needs a global view (an alert of one partition joins an incident of another), which a
per-partition state would not give. Consequence: run one correlator instance (a second one would split the
partitions between them and group only within its share); the worker logs the partitions it holds.

Batches: the agent takes the alerts already queued (up to ``batch_max``, never waiting for more), applies them one
by one through a read cache, writes state after every alert, waits until the broker acknowledged those writes, then
publishes ONE IncidentUpdated per changed incident (its latest version), and only then acks the batch's alerts.

Delivery: ``at_least_once``. Offsets are committed only for acked alerts, whose state writes are on the broker, so
after a crash the alerts since the last commit are applied again; correlation detects them (the Kafka offset is the
alert's sequence) and re-emits the incident's current version instead of changing it, and opening an incident is
deterministic (its id derives from the opening alert's event id). A published version's state is always durable,
so versions on the topic only grow, and a restart neither loses nor duplicates incidents. Faust's ``exactly_once``
(aiokafka transactions against Kafka 4.1) is not used: it is unproven there (see docs/kafka-from-maven.md) and the
versioned, replay-safe writes make it unnecessary.

Undecodable records are dead-lettered to ``<topic>.dlq`` with the reason in headers; the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.faust_codec import AvroCodec
from pilothouse.bus.serde import Serde
from pilothouse.sensing.config import SensingSettings
from pilothouse.sensing.correlation import CorrelationRules, Correlator, DependencyMap, Incident, MappingStore
from pilothouse.sensing.handlers import IncidentHandler, MetricEvidence, TelemetryBuffer
from pilothouse.sensing.redaction import Redactor

log = logging.getLogger("pilothouse.sensing.correlator")

OUTCOMES = Counter("pilothouse_sensing_correlation_total", "Alerts by correlation outcome", ["outcome"])
DEAD_LETTERS = Counter("pilothouse_sensing_dead_letters_total", "Records dead-lettered", ["topic"])
TELEMETRY = Counter("pilothouse_sensing_telemetry_total", "Telemetry records buffered for evidence", ["kind"])
CORRELATE_SECONDS = Histogram("pilothouse_sensing_correlate_seconds", "Alert batch in -> incident records queued",
                              buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2))
ACK_WAIT_SECONDS = Histogram("pilothouse_sensing_state_ack_wait_seconds",
                             "Per batch: waiting for the broker to acknowledge the state writes before publishing",
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2))
BATCH_SIZE = Histogram("pilothouse_sensing_correlate_batch_alerts", "Alerts per correlation batch",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
OPEN_INCIDENTS = Gauge("pilothouse_sensing_incidents_in_state", "Incidents in the state tables")


def _credentials(bus: BusSettings) -> Any:
    if not bus.security_protocol.startswith("SASL"):
        return None
    return faust.SASLCredentials(
        username=bus.username, password=bus.password.get_secret_value() if bus.password else None,
        mechanism=bus.sasl_mechanism)


class CorrelationWorker:
    """Builds the Faust app; ``app`` is what a faust.Worker runs."""

    def __init__(self, settings: SensingSettings, bus: BusSettings, redactor: Redactor, *,
                 metrics: Any | None = None) -> None:
        self.settings = settings
        deps = DependencyMap.from_yaml(settings.dependency_map.read_text(encoding="utf-8"), str(settings.dependency_map))
        rules = CorrelationRules(group_window_ms=settings.group_window_s * 1000,
                                 reopen_window_ms=settings.reopen_window_s * 1000,
                                 topology_hops=settings.topology_hops,
                                 max_alerts_per_incident=settings.max_alerts_per_incident)
        self.handler = IncidentHandler(Correlator(deps, rules), redactor,
                                       telemetry=TelemetryBuffer(settings.telemetry_buffer_per_service))
        self.metrics = metrics  # PrometheusMetrics or None
        self._metric_cache: dict[str, tuple[float, list[str], MetricEvidence]] = {}
        serde = Serde(max_message_bytes=bus.max_message_bytes)
        self.alert_codec = AvroCodec(serde, expected="pilothouse.sensing.AlertReceived")
        self.telemetry_codec = AvroCodec(serde, expected="pilothouse.sensing.TelemetryReceived")
        self.incident_codec = AvroCodec(serde)
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{bus.bootstrap_servers}",
            broker_credentials=_credentials(bus),
            store="memory://",
            datadir=str(settings.data_dir),
            web_enabled=False,
            processing_guarantee="at_least_once",
            producer_acks=-1,
            topic_replication_factor=settings.internal_replication_factor,
            topic_allow_declare=True,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=settings.commit_interval_s,
            table_cleanup_interval=3600.0,
        )
        app = self.app
        # Only the incidents are persisted (one table, one changelog partition, written in alert order). The alert
        # and service indexes are derived from them after every assignment (MappingStore.rebuild_indexes), so they
        # always match the durable incidents and cost no changelog records (the alert index was two of every three).
        self.tables = MappingStore(app.Table("incidents", default=None, partitions=1, use_partitioner=True), {}, {})
        self._index_stale = True
        self.alerts_topic = app.topic(settings.alerts_topic, value_serializer="raw", key_serializer="raw")
        self.telemetry_topic = app.topic(settings.telemetry_topic, value_serializer="raw", key_serializer="raw")
        self.incidents_topic = app.topic(settings.incidents_topic, value_serializer="raw", key_serializer="raw")
        app.agent(self.alerts_topic, name="correlate-alerts")(self._alerts)
        app.agent(self.telemetry_topic, name="buffer-telemetry")(self._telemetry)
        app.on_partitions_assigned.connect(self._check_assignment)

    # ---- agents -----------------------------------------------------------------------------------------------------
    async def _alerts(self, stream: Any) -> None:
        # Batches without waiting: events are collected while more are already queued, and the batch is processed
        # as soon as the queue runs dry (or batch_max is reached). Idle, an alert is processed alone at once; under
        # load, batches grow and a busy incident costs one state write and one update per batch, not per alert.
        # (stream.take_events would wait out its `within` timeout even for a single event: latency for nothing.)
        # Acks are manual (noack): an event counts as processed only after its batch's writes were handed to the
        # producer, and Faust flushes the producer before it commits offsets.
        stream = stream.noack()
        pending: list[Any] = []
        async for event in stream.events():
            pending.append(event)
            if len(pending) < self.settings.batch_max and not stream.channel.empty():
                continue
            # acked only once processed: if the batch fails unexpectedly, the worker stops with it unacked and
            # the restarted worker replays it (an ack in a `finally` could have let its offsets be committed)
            await self._alert_batch(pending)
            for e in pending:
                await stream.ack(e)
            pending.clear()

    async def _alert_batch(self, events: list[Any]) -> None:
        started = time.perf_counter()
        records: list[tuple[Any, Any]] = []  # (record, message)
        for event in events:
            try:
                records.append((self.alert_codec.decode(event.value), event.message))
            except PermanentError as e:
                await self._dead_letter(event.message, e)
        if not records:
            return
        BATCH_SIZE.observe(len(records))
        if self._index_stale:  # first batch after an assignment: the table is recovered by now
            self.tables.rebuild_indexes()
            self._index_stale = False
            OPEN_INCIDENTS.set(len(self.tables.incidents))
        result = self.handler.correlate_batch([(r, m.offset) for r, m in records], self.tables)
        cause: dict[str, Any] = {}  # incident id -> message of the last alert that changed it
        for (record, msg), outcome in zip(records, result.outcomes):
            if isinstance(outcome, Exception):  # a bug on one record must not stop the stream or lose it
                log.error("correlation failed", exc_info=outcome, extra={"offset": msg.offset})
                await self._dead_letter(msg, outcome, prefix="handler crashed: ")
                continue
            OUTCOMES.labels(outcome.kind).inc()
            if outcome.kind == "ignored":
                log.info("alert ignored", extra={"event_id": record.event_id, "reason": outcome.reason})
            if outcome.incident is not None:
                cause[outcome.incident.incident_id] = msg
        if not result.incidents:
            return
        # The records are built while the state writes travel: every await lets Faust's producer buffer hand them
        # to the client and the client send them, so the acknowledgements are mostly in by the time they are needed.
        built = []
        for inc in result.incidents:
            await asyncio.sleep(0)
            try:
                metrics = await self._metrics_for(inc)
                update = self.handler.incident_record(inc, metrics=metrics)
                built.append((update.incident_id.encode(), self.incident_codec.encode(update)))
            except Exception as e:  # noqa: BLE001 - dead-letter the alert that caused this version, go on
                log.exception("incident record failed", extra={"incident_id": inc.incident_id})
                await self._dead_letter(cause[inc.incident_id], e, prefix="incident record failed: ")
        # The state of every version about to be published is on the broker first (changelog acknowledged): a
        # consumer never sees a version that a restart could not reproduce, so versions on the topic only grow
        # even when the replay after a crash is batched differently.
        waited = time.perf_counter()
        await self._flush_state()
        ACK_WAIT_SECONDS.observe(time.perf_counter() - waited)
        producer = self.app.producer
        for key, value in built:
            # Handed to the producer, ack not awaited: Faust flushes the producer before it commits these offsets.
            await producer.send(self.settings.incidents_topic, key, value, None, None, None)
        CORRELATE_SECONDS.observe(time.perf_counter() - started)

    async def _flush_state(self) -> None:
        """Wait until every table write made so far is acknowledged by the broker.

        Table writes go through Faust's producer buffer, whose ``flush()`` gives up after 0.1 s without a message
        sent and returns with messages still buffered; so drain it until it is empty, then flush the client.
        The buffer's task hands messages over without suspending, so a yield or two usually empties it; the timed
        ``flush()`` (a task and a timer per message) is the fallback for a client that pushes back."""
        producer = self.app.producer
        for _ in range(3):
            if not producer.buffer.size:
                break
            await asyncio.sleep(0)
        while producer.buffer.size:
            await producer.buffer.flush()
        await producer.flush()

    async def _telemetry(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                record = self.telemetry_codec.decode(event.value)
            except PermanentError as e:
                await self._dead_letter(event.message, e)
                continue
            self.handler.handle_telemetry(record)
            TELEMETRY.labels(record.kind).inc()

    # ---- helpers ----------------------------------------------------------------------------------------------------
    async def _metrics_for(self, inc: Incident) -> MetricEvidence:
        if self.metrics is None:
            return [], "not configured"
        scope = self.handler.evidence_scope(inc)
        cached = self._metric_cache.get(inc.incident_id)
        now = time.monotonic()
        # re-query when the incident's services changed (a caller's alert joined: its metrics are evidence too),
        # else at most every evidence_refresh_s
        if cached is not None and cached[1] == scope and now - cached[0] < self.settings.evidence_refresh_s:
            return cached[2]
        window = self.handler.window(inc)
        loop = asyncio.get_running_loop()
        # the HTTP calls run on a thread: the event loop keeps serving Kafka meanwhile
        result = await loop.run_in_executor(None, self.metrics, scope, window)
        self._metric_cache[inc.incident_id] = (now, scope, result)
        if len(self._metric_cache) > 10_000:
            self._metric_cache.pop(next(iter(self._metric_cache)))
        return result

    async def _dead_letter(self, msg: Any, error: Exception, prefix: str = "") -> None:
        headers = {k: v.encode() for k, v in {
            "pilothouse.dlq.original_topic": msg.topic, "pilothouse.dlq.original_partition": str(msg.partition),
            "pilothouse.dlq.original_offset": str(msg.offset), "pilothouse.dlq.reason": (prefix + str(error))[:2000],
            "pilothouse.dlq.error_class": type(error).__name__, "pilothouse.dlq.consumer_group": self.settings.app_id,
            "pilothouse.dlq.failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }.items()}
        fut = await self.app.topic(msg.topic + ".dlq", value_serializer="raw", key_serializer="raw").send(
            key=msg.key, value=msg.value, headers=headers)
        await fut  # a dead letter is acknowledged before its offset can be committed
        DEAD_LETTERS.labels(msg.topic).inc()
        log.warning("dead-lettered", extra={"topic": msg.topic, "offset": msg.offset, "reason": str(error)[:300]})

    async def _check_assignment(self, sender: Any, assigned: Any, **_: Any) -> None:
        self._index_stale = True  # Faust recovers the tables before the streams resume
        mine = sorted(tp.partition for tp in assigned if tp.topic == self.settings.alerts_topic)
        # one instance must hold every partition (see the module docstring); make a split visible in the logs
        log.info("partitions assigned", extra={"alerts_partitions": mine})


def build_worker(settings: SensingSettings | None = None, bus: BusSettings | None = None,
                 redactor: Redactor | None = None) -> CorrelationWorker:
    """The correlation worker from the environment (PILOTHOUSE_SENSING_*, PILOTHOUSE_KAFKA_*, PILOTHOUSE_REDACTION_*)."""
    from pilothouse.sensing.redaction import RedactionSettings

    settings = settings or SensingSettings()
    bus = bus or BusSettings()
    redactor = redactor or Redactor.from_settings(RedactionSettings())
    metrics = None
    if settings.prometheus_url:
        from pilothouse.sensing.adapters.prometheus import PrometheusMetrics

        metrics = PrometheusMetrics(settings.prometheus_url, settings.prometheus_queries,
                                    timeout_s=settings.prometheus_timeout_s, step_s=settings.prometheus_step_s,
                                    pre_window_ms=settings.pre_incident_window_s * 1000,
                                    context_queries=settings.prometheus_context_queries,
                                    reference_exclude_query=settings.prometheus_reference_exclude_query)
    return CorrelationWorker(settings, bus, redactor, metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    """Run the correlation worker until SIGTERM/SIGINT (``python -m pilothouse.sensing.app_faust``)."""
    from pilothouse.bus.runtime import Health, serve_observability

    argv = list(sys.argv[1:] if argv is None else argv)
    level = "info" if "--verbose" in argv else "warn"
    worker = build_worker()
    health = Health()
    health.add("faust", lambda: worker.app.started if hasattr(worker.app, "started") else True)
    server = serve_observability("127.0.0.1", worker.settings.correlator_observability_port, health)
    try:
        fw = faust.Worker(worker.app, loglevel=level, quiet=True)
        # Faust's start-up spinner sets the root logger to DEBUG (so it spins on every record) and leaves it there:
        # every debug call of Faust and aiokafka then built a LogRecord per message (~4% of the worker's CPU).
        fw.spinner = None
        fw.execute_from_commandline()
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

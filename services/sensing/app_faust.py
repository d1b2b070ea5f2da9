"""The correlation worker: a thin Faust app around :mod:`pilothouse.sensing.correlation` and the handlers.

Consumes ``AlertsReceived`` (alerts topic: a request's alerts per partition) and ``TelemetryReceived`` (telemetry
topic); writes ``IncidentUpdated`` to the compacted incidents topic, keyed by incident id, with a monotonic version per
incident.

State: one Faust table (``incidents``), in memory, backed by the changelog topic ``<app_id>-incidents-changelog``
that Faust creates and replays on assignment (the sensing principal owns the ``pilothouse-sensing-`` prefix). The
worker writes that changelog itself, a batch at a time (:mod:`pilothouse.sensing.state`: each changed incident's head
and changed alerts once, with the values they replace, then a marker; recovery rolls back a batch without its
marker), as raw bytes through librdkafka, and mirrors the records into the table. The alert index (dedup key ->
incident) and the service index (service -> incident) are derived from the incidents after every assignment. The
table has ONE changelog partition, so recovery replays the writes in the order they were made: grouping needs a
global view (an alert of one partition joins an incident of another), which a per-partition state would not give.
Consequence: run one correlator instance (a second one would split the partitions between them and group only
within its share); the worker logs the partitions it holds.

Batches: the agent takes the alerts already queued (up to ``batch_max``; it waits, at most ``gather_max_ms``, only
for alerts the log already holds beyond those taken), correlates them through a read cache, produces the batch's
state records, then builds ONE IncidentUpdated per changed incident (its latest version) while they travel, and
publishes each once the broker acknowledged the batch's state; the batch's alerts are acked once the broker has its
updates too. The wait is pipelined: the next batch is correlated while the broker acknowledges the previous one's
writes; batches are published in order. State writes and updates go through one idempotent librdkafka producer
(:class:`pilothouse.bus.producer.AsyncBatchProducer`), not Faust's aiokafka one: per record a C call instead of a few
dozen Python frames (with Faust's per-key table writes the worker spent a third of its CPU there).

Delivery: ``at_least_once``. Offsets are committed only for acked alerts, whose state writes and updates are on the
broker, so after a crash the alerts since the last commit are applied again, onto the state after the last complete
batch; correlation detects the ones already applied (the Kafka offset is the alert's sequence) and re-emits the
incident's current version instead of changing it, and opening an incident is deterministic (its id derives from the
opening alert's event id). A published version's state is always durable, so versions on the topic only grow, and a
restart neither loses nor duplicates incidents. Faust's ``exactly_once`` (aiokafka transactions against Kafka 4.1) is
not used: it is unproven there (see docs/kafka-from-maven.md) and the batch records make it unnecessary.

Faust itself could lose alert records when a recovery ended (faust-streaming #596). The app uses
:class:`pilothouse.bus.faust_recovery.SeekFirstTableManager`, which ends a recovery in an order that loses nothing.
The agent also checks that each partition's offsets follow each other, from the committed offset on
(``_check_continuity``). It asks the broker about any jump, and stops the worker if records were skipped.

Undecodable records are dead-lettered to ``<topic>.dlq`` with the reason in headers; the stream goes on.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
import warnings
from typing import Any

import faust
from prometheus_client import Counter, Gauge, Histogram

from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PermanentError
from pilothouse.bus.faust_codec import AvroCodec
from pilothouse.bus.faust_recovery import SeekFirstTableManager
from pilothouse.bus.producer import AsyncBatchProducer, BusProducer
from pilothouse.bus.reader import PartitionProbe
from pilothouse.bus.runtime import CollectionSchedule
from pilothouse.bus.serde import Serde
from pilothouse.sensing.config import SensingSettings
from pilothouse.sensing.correlation import AlertInput, CorrelationRules, Correlator, DependencyMap, Incident
from pilothouse.sensing.handlers import IncidentHandler, MetricEvidence, TelemetryBuffer, decode_alert_inputs
from pilothouse.sensing.redaction import Redactor
from pilothouse.sensing.state import BatchLogStore, apply_records

log = logging.getLogger("pilothouse.sensing.correlator")

OUTCOMES = Counter("pilothouse_sensing_correlation_total", "Alerts by correlation outcome", ["outcome"])
DEAD_LETTERS = Counter("pilothouse_sensing_dead_letters_total", "Records dead-lettered", ["topic"])
TELEMETRY = Counter("pilothouse_sensing_telemetry_total", "Telemetry records buffered for evidence", ["kind"])
CORRELATE_SECONDS = Histogram("pilothouse_sensing_correlate_seconds", "Alert batch in -> incident records queued",
                              buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2))
ACK_WAIT_SECONDS = Histogram("pilothouse_sensing_state_ack_wait_seconds",
                             "Per batch: waiting for the broker to acknowledge the state writes before publishing",
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2))
ALERT_WAIT_SECONDS = Histogram("pilothouse_sensing_alert_wait_seconds",
                               "Per batch: its oldest alert's record timestamp (producer or broker clock) -> "
                               "correlation starts", buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2))
BATCH_SIZE = Histogram("pilothouse_sensing_correlate_batch_alerts", "Alerts per correlation batch",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
PUBLISH_EVERY_S = 0.001  # while a batch's updates are built: how often the ones that may go are sent
OFFSET_JUMPS = Counter("pilothouse_sensing_alert_offset_jumps_total",
                       "Alert records whose offset did not follow the previous one's, by what the broker holds between "
                       "(none: transaction markers or compaction; records: Faust skipped them, the worker stops)",
                       ["between"])
DELIVERY_RESEEKS = Counter("pilothouse_sensing_alert_partition_reseeks_total",
                           "Alert partitions sought to the committed offset again: records in the log, none delivered "
                           "DELIVERY_WATCH_S after an assignment")
DELIVERY_WATCH_S = 5.0  # after an assignment: how long an alert partition with records may deliver none
OPEN_INCIDENTS = Gauge("pilothouse_sensing_incidents_in_state", "Incidents in the state tables")


class SkippedRecords(RuntimeError):
    """Faust delivered an alert record out of sequence, and the records it skipped exist on the broker."""


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
        serde = Serde(max_message_bytes=bus.max_message_bytes)
        self.handler = IncidentHandler(Correlator(deps, rules), redactor,
                                       telemetry=TelemetryBuffer(settings.telemetry_buffer_per_service), serde=serde)
        self.metrics = metrics  # PrometheusMetrics or None
        self.failure: BaseException | None = None  # why the alert stream stopped the worker (see _fail)
        self.bus = bus
        self._metric_cache: dict[str, tuple[float, list[str], MetricEvidence]] = {}
        self.telemetry_codec = AvroCodec(serde, expected="pilothouse.sensing.TelemetryReceived")
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
            # Faust's own recovery can drop stream records fetched while it seeks (faust-streaming #596): see
            # pilothouse.bus.faust_recovery
            TableManager=SeekFirstTableManager,
        )
        app = self.app
        # Only the incidents are persisted: one table, one changelog partition, a batch's changed incidents and then
        # its marker (pilothouse.sensing.state). Faust creates the changelog topic and replays it into the table on
        # assignment; the worker writes the records itself (raw bytes, through librdkafka: Faust's per-key path
        # cost ~0.3 ms per write) and mirrors them into the table. The alert and service indexes are derived from
        # the incidents after every assignment, so they always match the durable state and cost no records.
        self.table = app.Table("incidents", default=None, partitions=1, use_partitioner=True,
                               key_type=bytes, value_type=bytes)
        # raw bytes both ways (Faust derives "json" from a plain type; set before the changelog topic is made)
        self.table.key_serializer = self.table.value_serializer = "raw"
        self.tables = BatchLogStore()
        self._changelog = self.table.changelog_topic_name
        self._out: AsyncBatchProducer | None = None  # state writes and incident updates (made on the loop)
        self._index_stale = True
        self._taken: dict[Any, int] = {}  # alert partition -> next offset not yet taken into a batch
        self._given_up: dict[Any, int] = {}  # alert partition -> a high-water mark waited for in vain
        self._probe: PartitionProbe | None = None  # asks the broker about offset jumps (see _prober)
        self._watch: asyncio.Future | None = None  # _watch_delivery of the latest assignment
        self.alerts_topic = app.topic(settings.alerts_topic, value_serializer="raw", key_serializer="raw")
        self.telemetry_topic = app.topic(settings.telemetry_topic, value_serializer="raw", key_serializer="raw")
        self.incidents_topic = app.topic(settings.incidents_topic, value_serializer="raw", key_serializer="raw")
        app.agent(self.alerts_topic, name="correlate-alerts")(self._alerts)
        app.agent(self.telemetry_topic, name="buffer-telemetry")(self._telemetry)
        # Garbage collections on its own schedule: young ones every 0.1 s, full ones at the stream's lulls (at the
        # latest every full_gc_max_interval_s). CPython's schedule stopped the stream for 20-90 ms at a time under
        # load: the state is an object per alert of every incident held (see CollectionSchedule)
        self.gc_schedule = CollectionSchedule(idle_s=settings.full_gc_idle_s,
                                              max_interval_s=settings.full_gc_max_interval_s)
        app.timer(self.gc_schedule.period_s, name="gc-schedule", traced=False)(self._gc_tick)
        app.on_partitions_assigned.connect(self._check_assignment)
        app.on_partitions_revoked.connect(self._drain_output)

    # ---- agents -----------------------------------------------------------------------------------------------------
    async def _alerts(self, stream: Any) -> None:
        # Batches without a time window: events are collected while more are queued or the log holds more than was
        # taken (_more_in_log), and the batch is processed when neither holds (or batch_max is reached). Idle, an
        # alert is processed alone at once; under load, batches grow and a busy incident costs one update per batch.
        # (stream.take_events would wait out its `within` timeout even for a single event: latency for nothing.)
        # Pipelined: while the broker acknowledges one batch's state writes (then its updates are published and its
        # alerts acked, by a task), the next batch is correlated. Updates are published strictly in batch order,
        # each batch's only once its state writes are acknowledged; within a batch, an update goes out as soon as
        # it is built when that is already so (the first incidents of a burst do not wait for the last one's).
        # Acks are manual (noack): an event counts as processed only after its batch's updates were handed to the
        # producer, and Faust flushes the producer before it commits offsets. If a batch fails, the worker stops
        # with it (and every later batch) unacked, and the restarted worker replays them.
        stream = stream.noack()
        pending: list[Any] = []  # events (AlertsReceived records)
        alerts: list[tuple[AlertInput, Any]] = []  # their alerts, decoded: (alert, message)
        publishing: asyncio.Future | None = None  # the latest batch's publication
        older: asyncio.Future | None = None  # the one before it
        serde = self.handler.serde
        try:
            async for event in stream.events():
                self.gc_schedule.busy()
                tp, offset = event.message.tp, event.message.offset
                if self._taken.get(tp) != offset:  # the first record since an assignment, or a jump
                    await self._check_continuity(tp, self._taken.get(tp), offset)
                pending.append(event)
                self._taken[tp] = offset + 1
                try:
                    decoded = decode_alert_inputs(serde, event.value, event.message.offset)
                    alerts.extend((a, event.message) for a in decoded)
                except PermanentError as e:
                    await self._dead_letter(event.message, e)
                if len(alerts) < self.settings.batch_max and (
                        not stream.channel.empty() or await self._more_in_log(stream)):
                    continue
                (batch, pending), (records, alerts) = (pending, []), (alerts, [])
                if older is not None:
                    await older  # at most two batches wait for their acks; raises if a publication failed
                older, publishing = publishing, await self._alert_batch(batch, records, publishing, stream)
        except Exception as e:  # noqa: BLE001 - a batch failed: stop the worker (see _fail), do not go on past it
            self._fail(e)
        finally:
            for task in (older, publishing):
                if task is not None and not task.done():
                    task.cancel()  # its alerts stay unacked: a restart replays them

    async def _check_continuity(self, tp: Any, expected: int | None, offset: int) -> None:
        """Faust delivered the alert record at ``offset`` where the partition should go on at ``expected`` (None:
        the first record since an assignment, which must be at the group's committed offset).

        Offsets do jump legitimately: a transaction marker takes an offset, and compaction removes records. So the
        broker is asked which records lie in between. If there are any, Faust skipped them (it can: see
        :mod:`pilothouse.bus.faust_recovery`), and going on would lose them. Their offsets might even be committed.
        This raises SkippedRecords, and the worker stops (``_fail``). Nothing of this record or later ones is acked,
        so the restarted worker replays from the committed offset."""
        where = f"{tp.topic}[{tp.partition}]"
        if expected is None:
            expected = await _off_loop(self._prober().start_offset, tp.topic, tp.partition)
        if offset == expected:
            return
        if offset < expected:
            raise SkippedRecords(f"{where}: offset {offset} delivered after {expected - 1}; stopping so that a "
                                 "restart replays the partition from the committed offset")
        skipped = await _off_loop(self._prober().data_offsets, tp.topic, tp.partition, expected, offset)
        OFFSET_JUMPS.labels("records" if skipped else "none").inc()
        if skipped:
            raise SkippedRecords(f"{where}: Faust skipped the records at offsets {skipped[:20]} (delivered {offset} "
                                 f"after {expected - 1}); stopping so that a restart replays them")
        log.info("offset jump without records (transaction markers or compaction)",
                 extra={"partition": where, "from": expected, "to": offset})

    def _prober(self) -> PartitionProbe:
        """The broker probe (made on first use: an assignment, or an offset jump)."""
        if self._probe is None:
            self._probe = PartitionProbe(self.bus, self.settings.app_id)
        return self._probe

    async def _watch_delivery(self, tps: list[Any]) -> None:
        """After an assignment, every alert partition whose log holds records from the group's committed offset
        on must deliver one within DELIVERY_WATCH_S. Under CPU load, 1 restart in 16 delivered nothing at all, even
        with the recovery fix. The consumer's position was at the log end and Faust's read offset at the committed
        one, so no record was delivered or lost (the offset check would have stopped the worker). Such a partition
        is sought to its committed offset again: Faust then fetches and delivers it."""
        while tps:
            await asyncio.sleep(DELIVERY_WATCH_S)
            left = []
            for tp in tps:
                try:
                    if tp not in self._taken and await self._reseek_if_stalled(tp):
                        left.append(tp)  # sought again: it must deliver by the next look
                except Exception:  # noqa: BLE001 - the broker may be away: look again next time
                    log.warning("could not check an alert partition's delivery", exc_info=True)
                    left.append(tp)
            tps = left  # a partition that delivered, or had nothing to deliver, is not watched again

    async def _reseek_if_stalled(self, tp: Any) -> bool:
        """Seek ``tp`` to its committed offset if the broker holds records from there on and none was delivered;
        True if it did."""
        start = await _off_loop(self._prober().start_offset, tp.topic, tp.partition)
        end = self._highwater(tp)
        if end <= start or tp in self._taken:
            return False
        held = await _off_loop(self._prober().data_offsets, tp.topic, tp.partition, start, end)
        if not held or tp in self._taken:
            return False
        log.warning("no alert record delivered %.0f s after the assignment although the log holds offsets %d-%d; "
                    "seeking the partition to its committed offset again", DELIVERY_WATCH_S, held[0], held[-1],
                    extra={"partition": f"{tp.topic}[{tp.partition}]"})
        DELIVERY_RESEEKS.inc()
        await self.app.consumer.seek(tp, start)
        return True

    def _published(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("publishing a batch failed; its alerts stay unacked", exc_info=task.exception())
            self._fail(task.exception())

    def _fail(self, error: BaseException) -> None:
        """The alert stream failed (a batch's state or updates were refused by the broker, or a bug): stop the
        worker, and have it exit non-zero (``main``) for its supervisor to restart it.

        That batch's alerts, and those of any batch after it, are unacked; the restarted worker replays them from
        the last committed offset. Left to Faust, the agent would be restarted in this process and go on past them:
        those alerts unprocessed until some later restart, the offsets of every later alert uncommittable, and a
        stop waiting forever for their acks. So the stop does not wait for them (it commits what was acked)."""
        if self.failure is not None:
            return  # stopping already
        log.critical("the alert stream failed; stopping the worker so that a restart replays the unacked alerts",
                     exc_info=error)
        self.failure = error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "reconfiguring late": the consumer reads it when it stops
            self.app.conf.stream_wait_empty = False
        signal.raise_signal(signal.SIGTERM)  # the worker's own graceful stop (flushes, commits what was acked)

    async def _more_in_log(self, stream: Any) -> bool:
        """True once the stream has another event that the log already held: the batch should take it too.

        The queue runs dry between the fetcher's deliveries, also when the log holds more: the rest of a webhook's
        alerts on another partition, or a backlog. Taking only what is queued then made batches of 1-10 alerts at
        half the maximum rate (a state-ack round and an update per incident each) and of ~100 under load (little
        coalescing). So while the consumer's last fetch saw records beyond those taken (its high-water mark), wait
        for the fetcher, at most ``gather_max_ms``; never when the log holds nothing more (an idle alert is
        processed at once). A high-water mark that did not bring records in time (offsets that are transaction
        markers, not records) is not waited for again."""
        deadline = time.monotonic() + self.settings.gather_max_ms / 1000
        while True:
            behind = [tp for tp, nxt in self._taken.items() if self._highwater(tp) > nxt
                      and self._given_up.get(tp) != self._highwater(tp)]
            if not behind:
                return False
            if time.monotonic() >= deadline:
                for tp in behind:
                    self._given_up[tp] = self._highwater(tp)
                return False
            await asyncio.sleep(0.0002)
            if not stream.channel.empty():
                return True

    def _highwater(self, tp: Any) -> int:
        try:
            hw = self.app.consumer.highwater(tp)
        except Exception:  # noqa: BLE001 - not known (yet): nothing to wait for
            return -1
        return hw if isinstance(hw, int) else -1

    async def _publish(self, events: list[Any], built: list[tuple[bytes, bytes]], acked: asyncio.Future,
                       previous: asyncio.Future | None, stream: Any, sent: list[asyncio.Future]) -> None:
        """After the previous batch's publication and this batch's state acknowledgement: publish the updates not
        yet sent; once the broker has them all, ack the batch's alerts (their offsets may then be committed)."""
        if previous is not None:
            await previous
        waited = time.perf_counter()
        await acked
        ACK_WAIT_SECONDS.observe(time.perf_counter() - waited)
        if built:
            sent.append(self._output().produce_batch(self.settings.incidents_topic, built))
        for fut in sent:
            await fut
        for e in events:
            await stream.ack(e)
        self.gc_schedule.busy()

    def _output(self) -> AsyncBatchProducer:
        if self._out is None:
            # linger 1 ms: a batch's records are queued at once; the state acknowledgement is on the latency path.
            # Compressed (see SensingSettings.output_compression): ~9 KB of state and ~4 KB of update per alert
            # in the bench, where the alert itself is 0.5 KB.
            self._out = AsyncBatchProducer(BusProducer(self.bus, extra_config={
                "linger.ms": 1, "compression.type": self.settings.output_compression}))
        return self._out

    async def _drain_output(self, sender: Any, revoked: Any, **_: Any) -> None:
        """Partitions revoked (a rebalance, or the worker stopping): let the broker have what was produced."""
        if self._out is not None:
            try:
                await self._out.close(10.0)
            except Exception:  # noqa: BLE001 - what was not written is replayed by whoever takes the partitions
                log.exception("state writes or updates left unwritten at revocation")
            self._out = None

    async def _alert_batch(self, events: list[Any], records: list[tuple[AlertInput, Any]],
                           previous: asyncio.Future | None, stream: Any) -> asyncio.Future:
        """Correlate a batch (``records``: the decoded alerts of ``events``, their state writes handed to the
        producer), build its IncidentUpdated records, and return the task that publishes them (some may be sent
        already) and acks the batch's events."""
        started = time.perf_counter()
        built: list[tuple[bytes, bytes]] = []
        if records:
            BATCH_SIZE.observe(len(records))
            stamps = [m.timestamp for _, m in records if m.timestamp]  # seconds (Faust converts Kafka's ms)
            if stamps:
                ALERT_WAIT_SECONDS.observe(max(0.0, time.time() - min(stamps)))
            if self._index_stale:  # first batch after an assignment: the table is recovered by now
                await self._recover_state()
                self._index_stale = False
                # Everything alive now (Faust, clients, rules, the recovered state) lives as long as the worker:
                # out of the cyclic collector's sight it is not traversed again by every full collection. Those
                # took 60-95 ms each here (the correlator stops meanwhile: the p99 of alert -> update latency).
                gc.freeze()
                OPEN_INCIDENTS.set(len(self.tables.incidents))
            result = self.handler.correlate_batch([(r, r.sequence) for r, _ in records], self.tables)
            incidents = await self._outcomes(records, result)
        else:
            incidents = []
        # The batch's state records (its changed incidents, then its marker) go out now; the updates are built while
        # they travel (every await lets the loop serve delivery reports).
        state = self.tables.commit()
        acked = self._output().produce_batch(self._changelog, state, partition=0)
        apply_records(self.table.data, state)
        # The state of every version about to be published is on the broker first (changelog acknowledged): a
        # consumer never sees a version that a restart could not reproduce, so versions on the topic only grow
        # even when the replay after a crash is batched differently.
        sent, sends = 0, []
        yielded = time.perf_counter()
        for inc, cause in incidents:
            try:
                metrics = await self._metrics_for(inc)
                built.append((inc.incident_id.encode(), self.handler.encoded_incident_record(inc, metrics=metrics)))
            except Exception as e:  # noqa: BLE001 - dead-letter the alert that caused this version, go on
                log.exception("incident record failed", extra={"incident_id": inc.incident_id})
                await self._dead_letter(cause, e, prefix="incident record failed: ")
            # Every ~PUBLISH_EVERY_S of building: let the loop serve delivery reports (the state acknowledgement)
            # and send what is built, if it may go. (Per update, the yield and the send cost more than the build.)
            if time.perf_counter() - yielded >= PUBLISH_EVERY_S:
                await asyncio.sleep(0)
                yielded = time.perf_counter()
                if _succeeded(acked) and (previous is None or _succeeded(previous)) and len(built) > sent:
                    sends.append(self._output().produce_batch(self.settings.incidents_topic, built[sent:]))
                    sent = len(built)
        CORRELATE_SECONDS.observe(time.perf_counter() - started)
        task = asyncio.ensure_future(self._publish(events, built[sent:], acked, previous, stream, sends))
        task.add_done_callback(self._published)  # a failure stops the worker now, not when the next batch comes
        return task

    async def _outcomes(self, records: list[tuple[Any, Any]], result: Any) -> list[tuple[Incident, Any]]:
        """Count and log the outcomes, dead-letter the alerts that raised; the incidents to emit, each with the
        message of the last alert that changed it."""
        cause: dict[str, Any] = {}
        for (record, msg), outcome in zip(records, result.outcomes):
            if isinstance(outcome, Exception):  # a bug on one record must not stop the stream or lose it
                log.error("correlation failed", exc_info=outcome, extra={"offset": msg.offset,
                                                                        "event_id": record.event_id})
                await self._dead_letter(msg, outcome, prefix="handler crashed: ", alert_event_id=record.event_id)
                continue
            OUTCOMES.labels(outcome.kind).inc()
            if outcome.kind == "ignored":
                log.info("alert ignored", extra={"event_id": record.event_id, "reason": outcome.reason})
            if outcome.incident is not None:
                cause[outcome.incident.incident_id] = msg
        return [(inc, cause[inc.incident_id]) for inc in result.incidents]

    async def _recover_state(self) -> None:
        """Load the incidents Faust replayed into the table; roll back a batch that has no marker (the worker
        stopped while writing it) and make the roll-back durable before anything else is written."""
        rollback = self.tables.load(self.table.data)
        if rollback:
            await self._output().produce_batch(self._changelog, rollback, partition=0)
            apply_records(self.table.data, rollback)
            log.warning("rolled back the state writes of an incomplete batch",
                        extra={"incidents": len(rollback) - 1, "batch": self.tables.batch})

    async def _telemetry(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                record = self.telemetry_codec.decode(event.value)
            except PermanentError as e:
                await self._dead_letter(event.message, e)
                continue
            try:
                self.handler.handle_telemetry(record)
            except Exception as e:  # noqa: BLE001 - a bug on one record must not stop the stream or lose it
                log.error("telemetry handling failed", exc_info=e, extra={"offset": event.message.offset})
                await self._dead_letter(event.message, e, prefix="handler crashed: ")
                continue
            TELEMETRY.labels(record.kind).inc()

    async def _gc_tick(self) -> None:
        self.gc_schedule.start()  # the first tick takes over from CPython (later calls change nothing)
        self.gc_schedule.tick()

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
        # the HTTP calls run on a thread: the event loop keeps serving Kafka meanwhile
        result = await _off_loop(self.metrics, scope, window)
        self._metric_cache[inc.incident_id] = (now, scope, result)
        if len(self._metric_cache) > 10_000:
            self._metric_cache.pop(next(iter(self._metric_cache)))
        return result

    async def _dead_letter(self, msg: Any, error: Exception, prefix: str = "", *,
                           alert_event_id: str | None = None) -> None:
        """Dead-letter ``msg`` whole; ``alert_event_id``: the one alert of its AlertsReceived that failed (the
        others were correlated)."""
        headers = {k: v.encode() for k, v in {
            "pilothouse.dlq.original_topic": msg.topic, "pilothouse.dlq.original_partition": str(msg.partition),
            "pilothouse.dlq.original_offset": str(msg.offset), "pilothouse.dlq.reason": (prefix + str(error))[:2000],
            "pilothouse.dlq.error_class": type(error).__name__, "pilothouse.dlq.consumer_group": self.settings.app_id,
            "pilothouse.dlq.failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"pilothouse.dlq.alert_event_id": alert_event_id} if alert_event_id else {}),
        }.items()}
        fut = await self.app.topic(msg.topic + ".dlq", value_serializer="raw", key_serializer="raw").send(
            key=msg.key, value=msg.value, headers=headers)
        await fut  # a dead letter is acknowledged before its offset can be committed
        DEAD_LETTERS.labels(msg.topic).inc()
        log.warning("dead-lettered", extra={"topic": msg.topic, "offset": msg.offset, "reason": str(error)[:300]})

    async def _check_assignment(self, sender: Any, assigned: Any, **_: Any) -> None:
        self._index_stale = True  # Faust recovers the tables before the streams resume
        self._taken.clear()
        self._given_up.clear()
        _cap_fetch_wait(self.app, self.settings.fetch_max_wait_ms)
        if self._watch is not None:
            self._watch.cancel()
        alert_tps = [tp for tp in assigned if tp.topic == self.settings.alerts_topic]
        self._watch = asyncio.ensure_future(self._watch_delivery(alert_tps))
        mine = sorted(tp.partition for tp in alert_tps)
        # one instance must hold every partition (see the module docstring); make a split visible in the logs
        log.info("partitions assigned", extra={"alerts_partitions": mine})


async def _off_loop(call: Any, *args: Any) -> Any:
    """``call(*args)`` on the default executor: blocking I/O (broker probes, Prometheus queries) must not stop the
    event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, call, *args)


def _succeeded(task: asyncio.Future) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _cap_fetch_wait(app: faust.App, wait_ms: int) -> bool:
    """Cap how long the consumer's fetch requests wait at the broker for data (Faust hard-codes 1500 ms).

    aiokafka sends a node at most one fetch request at a time, for the partitions that have no records buffered. A
    request that covers only partitions without new data (the telemetry topic, or alert partitions whose records are
    all still buffered) waits the full time at the broker, and records arriving meanwhile on the other partitions
    wait with it: measured in the bench, a 1.4 s stall with seconds of alerts in the log. Faust has no setting for
    it, so the value is set on the started consumer's fetcher (private attributes; returns False, and changes
    nothing, if this Faust/aiokafka does not have them)."""
    fetcher = getattr(getattr(getattr(app.consumer, "_thread", None), "_consumer", None), "_fetcher", None)
    if fetcher is None or not isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
        log.warning("cannot cap the consumer's fetch wait (Faust/aiokafka internals changed); alerts may wait "
                    "up to 1.5 s behind an idle partition")
        return False
    fetcher._fetch_max_wait_ms = wait_ms
    return True


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
                                    context_queries=settings.prometheus_context_queries)
    return CorrelationWorker(settings, bus, redactor, metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    """Run the correlation worker until SIGTERM/SIGINT (``python -m pilothouse.sensing.app_faust``)."""
    from pilothouse.bus.runtime import Health, serve_observability, watch_gc

    argv = list(sys.argv[1:] if argv is None else argv)
    level = "info" if "--verbose" in argv else "warn"
    worker = build_worker()
    watch_gc()
    health = Health()
    health.add("faust", lambda: worker.app.started if hasattr(worker.app, "started") else True)
    server = serve_observability("127.0.0.1", worker.settings.correlator_observability_port, health)
    try:
        fw = faust.Worker(worker.app, loglevel=level, quiet=True)
        # Faust's start-up spinner sets the root logger to DEBUG (so it spins on every record) and leaves it there:
        # every debug call of Faust and aiokafka then built a LogRecord per message (~4% of the worker's CPU).
        fw.spinner = None
        try:
            fw.execute_from_commandline()  # always ends in SystemExit (0 after any stop, a signal's included)
        except SystemExit:
            if worker.failure is None:
                raise
            log.critical("stopped after a failure of the alert stream: %s", worker.failure)
            return 1
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

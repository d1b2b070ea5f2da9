"""The ingest gateway (starlette): authenticate → bound → normalise → redact → produce → answer after the broker's ack.

=============================== ===================== ===============================================================
route                           token source          payload
=============================== ===================== ===============================================================
``POST /v1/alerts/alertmanager`` ``alertmanager``      Alertmanager webhook v4 (or an API v2 ``postableAlerts`` array)
``POST /v1/alerts/grafana``      ``grafana``           Grafana alerting webhook
``POST /v1/alerts/pagerduty``    ``pagerduty``         PagerDuty Events API v2 (trigger / acknowledge / resolve)
``POST /v1/changes/pagerduty``   ``pagerduty_change``  PagerDuty Events API v2 change event → TelemetryReceived(change)
``POST /v1/logs``                ``otlp_logs``         OTLP/HTTP JSON ``ExportLogsServiceRequest``
``POST /v1/webhooks/{name}``     ``generic:{name}``    any JSON, mapped by the rules configured for ``name``
``GET /health``, ``GET /metrics``                      liveness of the gateway and Prometheus metrics
=============================== ===================== ===============================================================

Answers (JSON bodies, ``{"error": code, "reason": ...}`` for every refusal):

* 200 ``{"accepted": n, "kind", "event_ids", "redacted": {kind: count}}`` — only once the broker acknowledged every
  record of the request (``acks=all``): what was accepted is not lost.
* 400 malformed or unmappable payload (``path`` + ``reason`` from the normaliser); 404 unknown webhook name.
* 401 no bearer token; 403 a wrong token, or the token of another source.
* 413 body above ``max_body_bytes`` (Content-Length checked first, then the streamed body is counted).
* 422 refused by redaction (a record could not be scanned): nothing of the request was forwarded.
* 429 too many requests in flight; 503 the broker did not acknowledge in time. Both with ``Retry-After``; nothing
  of the request is guaranteed written, the sender retries (duplicates are absorbed by fingerprint deduplication).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pilothouse.bus.errors import (
    ConfigurationError,
    NotAuthorized,
    OversizedMessage,
    PermanentError,
    RecordInvalid,
    RetryableError,
)
from pilothouse.bus.producer import BusProducer
from pilothouse.sensing.handlers import IngestHandler, IngestResult
from pilothouse.sensing.normalize import MalformedPayload
from pilothouse.sensing.redaction import RedactionRefused

log = logging.getLogger("pilothouse.sensing.gateway")

REQUESTS = Counter("pilothouse_sensing_ingest_requests_total", "Ingest requests by source and outcome",
                   ["source", "outcome"])
RECORDS = Counter("pilothouse_sensing_ingest_records_total", "Records written to the bus", ["source", "kind"])
REDACTED = Counter("pilothouse_sensing_redactions_total", "Values replaced by redaction at ingest", ["kind"])
LATENCY = Histogram("pilothouse_sensing_ingest_seconds", "Request handling time (to the broker's ack)", ["source"],
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

ROUTES = {"alertmanager": "alertmanager", "grafana": "grafana", "pagerduty": "pagerduty"}


def _error(status: int, code: str, reason: str, *, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": code, "reason": reason, **extra}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class Gateway:
    """The HTTP front of sensing. ``producer`` must be a BusProducer of the sensing principal."""

    def __init__(self, handler: IngestHandler, producer: BusProducer, *, token_digests: dict[str, str],
                 max_body_bytes: int, max_in_flight: int, ack_timeout_s: float, retry_after_s: int,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.handler = handler
        self.producer = producer
        self.tokens = {s: d.encode() for s, d in token_digests.items()}
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.ack_timeout_s = ack_timeout_s
        self.retry_after = str(retry_after_s)
        self._clock_ms = clock_ms
        self._in_flight = 0
        self._lock = threading.Lock()
        # One request at a time normalises, redacts and queues its records; only the wait for the broker's acks
        # overlaps. Under the GIL this work cannot run in parallel anyway: interleaved (every 5 ms, the interpreter's
        # switch interval) a burst of n requests all finished after ~n requests' work; in turn, the first is done
        # after one request's work, the last no later than before.
        self._cpu_turn = threading.Lock()
        self.app = Starlette(routes=[
            Route("/v1/alerts/{kind}", self.alerts, methods=["POST"]),
            Route("/v1/changes/pagerduty", self.pagerduty_change, methods=["POST"]),
            Route("/v1/logs", self.logs, methods=["POST"]),
            Route("/v1/webhooks/{name}", self.webhook, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    # ---- routes -----------------------------------------------------------------------------------------------------
    async def alerts(self, request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in ROUTES:
            return _error(404, "not_found", f"unknown alert source {kind!r}", known=sorted(ROUTES))
        return await self._ingest(request, ROUTES[kind], ROUTES[kind])

    async def pagerduty_change(self, request: Request) -> Response:
        return await self._ingest(request, "pagerduty_change", "pagerduty_change")

    async def logs(self, request: Request) -> Response:
        return await self._ingest(request, "otlp_logs", "otlp_logs")

    async def webhook(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.handler.mapping_rules:
            return _error(404, "not_found", f"no mapping rules are configured for webhook {name!r}",
                          known=sorted(self.handler.mapping_rules))
        return await self._ingest(request, "generic", f"generic:{name}", mapping=name)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "in_flight": self._in_flight})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # ---- the pipeline -----------------------------------------------------------------------------------------------
    def _authenticate(self, request: Request, token_source: str) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not token.strip():
            return _error(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)",
                          headers={"WWW-Authenticate": 'Bearer realm="pilothouse-sensing"'})
        presented = ("sha256:" + hashlib.sha256(token.strip().encode("utf-8")).hexdigest()).encode()
        expected = self.tokens.get(token_source)
        # constant-time compare of digests; a source without a configured token accepts nothing
        if expected is None or not hmac.compare_digest(presented, expected):
            return _error(403, "forbidden", f"the token is not valid for source {token_source!r}")
        return None

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body_bytes:
                    raise _TooLarge(f"Content-Length {int(declared)} exceeds the limit of {self.max_body_bytes}")
            except ValueError:
                raise MalformedPayload("Content-Length is not a number") from None
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body_bytes:  # chunked bodies (or a lying Content-Length) are counted as they come
                raise _TooLarge(f"body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _ingest(self, request: Request, source: str, token_source: str, mapping: str | None = None) -> Response:
        started = time.perf_counter()
        refusal = self._authenticate(request, token_source)
        if refusal is not None:
            REQUESTS.labels(token_source, str(refusal.status_code)).inc()
            return refusal
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                REQUESTS.labels(token_source, "429").inc()
                return _error(429, "overloaded", f"{self._in_flight} requests in flight (limit {self.max_in_flight})",
                              headers={"Retry-After": self.retry_after})
            self._in_flight += 1
        try:
            response = await self._ingest_bounded(request, source, token_source, mapping)
        finally:
            with self._lock:
                self._in_flight -= 1
        REQUESTS.labels(token_source, str(response.status_code)).inc()
        LATENCY.labels(token_source).observe(time.perf_counter() - started)
        return response

    async def _ingest_bounded(self, request: Request, source: str, token_source: str,
                              mapping: str | None) -> Response:
        received_at_ms = self._clock_ms()
        try:
            body = await self._read_body(request)
        except _TooLarge as e:
            return _error(413, "payload_too_large", str(e), limit=self.max_body_bytes)
        except MalformedPayload as e:
            return JSONResponse(e.to_response(), status_code=400)
        except ClientDisconnect:
            return _error(400, "client_disconnected", "the client went away before the body was complete")
        try:
            result = await run_in_threadpool(self._process, source, body, received_at_ms, mapping)
        except MalformedPayload as e:
            return JSONResponse(e.to_response(), status_code=400)
        except RedactionRefused as e:
            REDACTED.labels("refused").inc()
            return _error(422, "redaction_refused", f"refused by redaction, nothing was forwarded: {e.reason}",
                          forwarded=0)
        except OversizedMessage as e:
            return _error(413, "record_too_large", str(e))
        except NotAuthorized as e:
            log.error("broker refused the sensing principal", extra={"error": str(e)})
            return _error(503, "broker_refused", "the broker refused this service's write (ACL); retry later",
                          headers={"Retry-After": self.retry_after})
        except RetryableError as e:
            return _error(503, "broker_unavailable", f"the broker did not acknowledge: {e}",
                          headers={"Retry-After": self.retry_after})
        except RecordInvalid as e:  # a normalised record that fails its schema is our bug, not the sender's
            log.error("record invalid after normalisation", extra={"error": str(e)})
            return _error(500, "internal_error", f"record does not match its schema: {e}")
        except PermanentError as e:
            return _error(503, "broker_error", str(e), headers={"Retry-After": self.retry_after})
        for kind, n in result.findings.items():
            REDACTED.labels(kind).inc(n)
        RECORDS.labels(token_source, result.kind).inc(len(result.records))
        return JSONResponse({"accepted": len(result.records), "kind": result.kind, "event_ids": result.event_ids,
                             "redacted": result.findings})

    def _process(self, source: str, body: bytes, received_at_ms: int, mapping: str | None) -> IngestResult:
        """Worker thread: normalise + redact everything first (all or nothing), then produce and wait for acks (the
        first two in turn with other requests, the wait alongside them)."""
        with self._cpu_turn:
            result = self.handler.handle(source, body, received_at_ms=received_at_ms, mapping=mapping)
        # outside the turn: a metadata refresh (every minute) waits on the broker, up to 5 s when it is down
        partitions = self.producer.partitions(self.handler.alerts_topic) if result.kind == "alert" else 1
        with self._cpu_turn:
            deliveries = [self.producer.produce_bytes(m.topic, m.value, key=m.key, partition=m.partition)
                          for m in self.handler.messages(result, partitions=partitions)]
        self.producer.wait(deliveries, timeout=self.ack_timeout_s)
        return result


def build_gateway(settings, bus_settings, redactor, *, producer: BusProducer | None = None) -> Gateway:
    """A Gateway from SensingSettings + BusSettings: mapping rules loaded (and checked) now, not per request.

    The producer gives up on a message after ``ack_timeout_s`` (``delivery.timeout.ms``), so a 503 answer means the
    record will not be written later behind the sender's back (unless it was already on the wire)."""
    from pilothouse.sensing.mapping import load_mapping_rules
    from pilothouse.sensing.normalize import Limits

    rules = {}
    for name, path in settings.mapping_rules.items():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigurationError(f"mapping rules for webhook {name!r}: cannot read {path}: {e.strerror}") from e
        rules[name] = load_mapping_rules(text)
    # The route and token use the settings' name (/v1/webhooks/<name>, token source generic:<name>); the records
    # carry the rules file's own name (source generic:<rules name>), which is what its fingerprints are scoped by.
    timeout_ms = int(settings.ack_timeout_s * 1000)
    producer = producer or BusProducer(bus_settings, extra_config={
        "delivery.timeout.ms": max(timeout_ms, 100), "request.timeout.ms": max(timeout_ms, 100),
        "linger.ms": 1,
    })
    handler = IngestHandler(redactor, alerts_topic=settings.alerts_topic, telemetry_topic=settings.telemetry_topic,
                            mapping_rules=rules, limits=Limits(max_body_bytes=settings.max_body_bytes),
                            serde=producer.serde)
    return Gateway(handler, producer, token_digests=settings.token_digests(), max_body_bytes=settings.max_body_bytes,
                   max_in_flight=settings.max_in_flight, ack_timeout_s=settings.ack_timeout_s,
                   retry_after_s=settings.retry_after_s)

"""Pure normalisers for everything the ingest gateway accepts. No I/O, no clock: the caller passes the bytes it
received and the time it received them, so every result can be replayed.

Formats, one module-level function each (all share ``normalize(source, payload, ...)`` as the entry point):

=================== ============================================ ==============================================
source              format                                       result
=================== ============================================ ==============================================
``alertmanager``    Prometheus Alertmanager webhook, version "4" NormalizedAlert per alert
``alertmanager``    (a JSON array) Alertmanager API v2           NormalizedAlert per alert (what Prometheus /
                    ``postableAlerts``                           ``amtool`` POST to ``/api/v2/alerts``)
``grafana``         Grafana-managed alerting webhook, version "1" NormalizedAlert per alert
``pagerduty``       PagerDuty Events API v2 trigger/ack/resolve  one NormalizedAlert
``pagerduty_change`` PagerDuty Events API v2 change event        one TelemetryRecord(kind="change")
``otlp_logs``       OTLP/HTTP JSON ``ExportLogsServiceRequest``  TelemetryRecord(kind="log") per log record
``generic``         any JSON, mapped by declarative rules        NormalizedAlert or TelemetryRecord(kind=change)
=================== ============================================ ==============================================

Fingerprints. The source's own id is used verbatim when it has one: Alertmanager and Grafana ``fingerprint``,
PagerDuty ``dedup_key``, or the path a generic mapping names. Otherwise ``label_fingerprint`` computes
``"sha256:" + hex(SHA-256(canonical JSON of ["pilothouse-fp-v1", source, namespace, sorted label pairs]))``
(namespace: the generic mapping's name, else ""). Deduplicate on (source, fingerprint).

Refusals. Anything malformed, unmappable or beyond ``Limits`` raises ``MalformedPayload(reason, path)`` naming
the place in the payload (``alerts[2].labels``) — the gateway answers 400 with it. Nothing is truncated silently.
What the normalisers change, they say: invisible characters (zero-width, bidi controls, Unicode tag block,
variation selectors — the carriers of hidden prompt-injection text) are removed from every string and counted in
the annotation/attribute ``pilothouse.invisible_chars_removed``; PagerDuty ``routing_key`` (an integration
credential) is checked for presence and then dropped, never copied into a record.

Not carried into records (the gateway keeps the raw body if it archives requests): the webhook envelopes'
group fields (Alertmanager/Grafana groupKey, receiver, groupLabels, commonLabels/commonAnnotations — the latter
two repeat what every alert carries — externalURL, notification_reason; Grafana orgId, title, state, message),
PagerDuty image src/alt and link text, OTLP flags/observed time (when the event time is set)/dropped counts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from pilothouse.bus.errors import ConfigurationError, PermanentError
from pilothouse.sensing.mapping import (
    STATUSES,
    FieldRule,
    MapRule,
    MappingConfigError,
    MappingRules,
    load_mapping_rules,
)

__all__ = [
    "DEFAULT_LIMITS", "SOURCES", "Limits", "MalformedPayload", "NormalizedAlert", "TelemetryRecord",
    "UnknownSource", "decode_payload", "label_fingerprint", "map_severity", "normalize",
    "normalize_alertmanager", "normalize_alertmanager_postable", "normalize_generic", "normalize_grafana",
    "normalize_otlp_logs", "normalize_pagerduty", "normalize_pagerduty_change", "parse_rfc3339_ms",
]

Status = Literal["firing", "resolved"]
Severity = Literal["critical", "error", "warning", "info", "unknown"]
FINGERPRINT_VERSION = "pilothouse-fp-v1"
INVISIBLE_NOTE = "pilothouse.invisible_chars_removed"
TRUNCATED_NOTE = "pilothouse.truncated_alerts"


# ---------------------------------------------------------------------------------------------------- errors

class MalformedPayload(PermanentError):
    """A payload the gateway must refuse (HTTP 400). ``path`` is where in the payload (``$`` = the whole body)."""

    def __init__(self, reason: str, path: str = "$") -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason
        self.path = path

    def to_response(self) -> dict[str, str]:
        """The body of the 400 answer."""
        return {"error": "malformed_payload", "path": self.path, "reason": self.reason}


class UnknownSource(ConfigurationError):
    """The gateway was asked to normalise a source it has no normaliser for (a routing bug, not bad input)."""


# ---------------------------------------------------------------------------------------------------- models

class Limits(BaseModel):
    """Bounds on one payload; beyond any of them the payload is refused with a reason, never truncated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(5 * 1024 * 1024, gt=0)
    max_alerts: int = Field(1000, gt=0)
    max_labels: int = Field(128, gt=0)
    max_annotations: int = Field(128, gt=0)
    max_key_len: int = Field(256, gt=0)
    max_label_value_len: int = Field(2048, gt=0)
    max_annotation_value_len: int = Field(32768, gt=0)
    max_summary_len: int = Field(4096, gt=0)
    max_fingerprint_len: int = Field(255, gt=0)
    max_links: int = Field(32, gt=0)
    max_url_len: int = Field(4096, gt=0)
    max_log_records: int = Field(10000, gt=0)
    max_attributes: int = Field(256, gt=0)
    max_log_body_len: int = Field(65536, gt=0)
    max_value_depth: int = Field(16, gt=0)


DEFAULT_LIMITS = Limits()


class NormalizedAlert(BaseModel):
    """One alert, whatever format it came in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: Literal["alertmanager", "grafana", "pagerduty", "generic"]
    mapping: str | None = Field(None, description="for source generic: the name of the mapping rules used")
    fingerprint: str = Field(min_length=1)
    status: Status
    severity: Severity
    service: str = ""
    entity: str = ""
    summary: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at_ms: int
    ends_at_ms: int | None = None
    links: list[str] = Field(default_factory=list)
    raw_size: int = Field(ge=0, description="bytes of the request body this alert arrived in")

    @property
    def wire_source(self) -> str:
        """The ``source`` field of the AlertReceived record: ``generic:<mapping>`` for mapped webhooks."""
        return f"generic:{self.mapping}" if self.source == "generic" else self.source


class TelemetryRecord(BaseModel):
    """A log record (OTLP) or a change event (deploy/config change)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["log", "change"]
    source: str = Field(description="otlp_logs | pagerduty_change | generic:<mapping>")
    service: str = ""
    entity: str = ""
    timestamp_ms: int
    severity: Severity
    body: str = ""
    attributes: dict[str, str] = Field(default_factory=dict)
    trace_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    span_id: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")


# ---------------------------------------------------------------------------------------------------- severity

_SEVERITY_ALIASES: dict[str, Severity] = {
    **dict.fromkeys(("critical", "crit", "page", "fatal", "emergency", "emerg", "alert", "disaster",
                     "p1", "sev1", "sev-1", "sev0", "sev-0", "p0"), "critical"),
    **dict.fromkeys(("error", "err", "major", "high", "p2", "sev2", "sev-2"), "error"),
    **dict.fromkeys(("warning", "warn", "minor", "medium", "average", "p3", "sev3", "sev-3"), "warning"),
    **dict.fromkeys(("info", "information", "informational", "notice", "low", "debug", "trace",
                     "p4", "p5", "sev4", "sev-4", "sev5", "sev-5"), "info"),
}


def map_severity(value: str | None) -> Severity:
    """Map a source's severity word (Prometheus ``severity`` label conventions, PagerDuty, Opsgenie P1-P5,
    Zabbix, OTel severityText) onto critical|error|warning|info; anything else is ``unknown``."""
    if not value:
        return "unknown"
    return _SEVERITY_ALIASES.get(value.strip().lower(), "unknown")


def _otel_severity(number: int, text: str) -> Severity:
    # OTel SeverityNumber: 1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN, 17-20 ERROR, 21-24 FATAL.
    if number >= 21:
        return "critical"
    if number >= 17:
        return "error"
    if number >= 13:
        return "warning"
    if number >= 1:
        return "info"
    return map_severity(text)


# ---------------------------------------------------------------------------------------------------- strings

_INVISIBLE_RE = re.compile(
    "[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ufe00-\ufe0f\U000e0000-\U000e007f]"
)
_URL_RE = re.compile(r"^https?://[^\s/?#]+[^\s]*$", re.IGNORECASE)
_KEY_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]" if path != "$" else f"[{key}]"
    if not _KEY_OK.match(key):
        return f"{path}[{orjson.dumps(key).decode()}]" if path != "$" else f"[{orjson.dumps(key).decode()}]"
    return key if path == "$" else f"{path}.{key}"


class _Ctx:
    """Per-payload state: limits, and how many invisible characters were removed (reported, not hidden)."""

    __slots__ = ("limits", "invisible")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.invisible = 0

    def clean(self, text: str) -> str:
        if text.isascii():
            return text
        text, n = _INVISIBLE_RE.subn("", text)
        self.invisible += n
        return text

    def take_invisible(self) -> int:
        n, self.invisible = self.invisible, 0
        return n


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedPayload(f"expected object, got {_jtype(value)}", path)
    return value


def _arr(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedPayload(f"expected array, got {_jtype(value)}", path)
    return value


def _text(value: Any, path: str, ctx: _Ctx, max_len: int, *, what: str = "string") -> str:
    if not isinstance(value, str):
        raise MalformedPayload(f"expected string, got {_jtype(value)}", path)
    value = ctx.clean(value)
    if len(value) > max_len:
        raise MalformedPayload(f"{what} of {len(value)} characters exceeds the limit of {max_len}", path)
    return value


def _opt_text(obj: Mapping[str, Any], key: str, path: str, ctx: _Ctx, max_len: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    return _text(value, _child(path, key), ctx, max_len)


def _req_text(obj: Mapping[str, Any], key: str, path: str, ctx: _Ctx, max_len: int, *, hint: str = "") -> str:
    value = obj.get(key)
    where = _child(path, key)
    if value is None:
        raise MalformedPayload("required field is missing" + (f" ({hint})" if hint else ""), where)
    value = _text(value, where, ctx, max_len)
    if not value.strip():
        raise MalformedPayload("required field is empty", where)
    return value


def _json_text(value: Any) -> str:
    """Scalars as text (booleans as true/false); objects and arrays as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _string_map(value: Any, path: str, ctx: _Ctx, *, what: str, max_items: int, max_value_len: int,
                strict_strings: bool) -> dict[str, str]:
    """A JSON object of strings (labels) or of anything (annotations-like, non-strings kept as JSON text)."""
    if value is None:
        return {}
    obj = _obj(value, path)
    if len(obj) > max_items:
        raise MalformedPayload(f"{len(obj)} {what} exceed the limit of {max_items}", path)
    out: dict[str, str] = {}
    for key, item in obj.items():
        where = _child(path, key)
        key = ctx.clean(key)
        if not key:
            raise MalformedPayload(f"empty {what} name", where)
        if key in out:  # "env" and "env<U+200B>": keeping one would silently lose the other
            raise MalformedPayload("duplicate name once invisible characters are removed", where)
        if len(key) > ctx.limits.max_key_len:
            raise MalformedPayload(f"name of {len(key)} characters exceeds the limit of {ctx.limits.max_key_len}",
                                   where)
        if strict_strings and not isinstance(item, str):
            raise MalformedPayload(f"expected string, got {_jtype(item)}", where)
        if item is None:
            continue
        if not isinstance(item, str):
            _check_depth(item, where, ctx.limits.max_value_depth)
        text = ctx.clean(_json_text(item))
        if len(text) > max_value_len:
            raise MalformedPayload(f"value of {len(text)} characters exceeds the limit of {max_value_len}", where)
        out[key] = text
    return out


def _check_depth(value: Any, path: str, max_depth: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise MalformedPayload(f"nested deeper than {max_depth} levels", path)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _add_link(links: list[str], value: Any, path: str, ctx: _Ctx) -> None:
    if value is None or value == "":
        return  # Grafana sends "" for dashboardURL/panelURL when the rule has no dashboard
    url = _text(value, path, ctx, ctx.limits.max_url_len, what="URL")
    if not _URL_RE.match(url):
        raise MalformedPayload("not an absolute http(s) URL", path)
    if url in links:
        return
    if len(links) >= ctx.limits.max_links:
        raise MalformedPayload(f"more than {ctx.limits.max_links} links", path)
    links.append(url)


# ---------------------------------------------------------------------------------------------------- time

_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_rfc3339_ms(text: str, path: str = "$", *, zero_is_none: bool = False) -> int | None:
    """RFC 3339 / ISO 8601 with an offset (``Z``, ``+02:00`` or PagerDuty's ``+0000``; up to nanoseconds, as
    Go writes them) -> milliseconds since the epoch, exact (integer arithmetic, sub-ms truncated). Go's zero
    time ``0001-01-01T00:00:00Z`` is Alertmanager's "not set": None when ``zero_is_none``. No offset: refused,
    because the instant would be a guess."""
    m = _RFC3339_RE.match(text.strip())
    if not m:
        raise MalformedPayload(f"{text[:64]!r} is not an RFC 3339 timestamp with a time zone "
                               "(e.g. 2024-05-01T12:00:00Z)", path)
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    frac = (m.group(7) or "").ljust(9, "0")
    if m.group(8):
        offset = timedelta(0)
    else:
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if offset >= timedelta(hours=24):
            raise MalformedPayload(f"{text!r}: time-zone offset out of range", path)
        if m.group(9) == "-":
            offset = -offset
    if year == 1 and zero_is_none:
        return None
    try:
        dt = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=timezone(offset))
        return (dt - _EPOCH) // timedelta(milliseconds=1) + int(frac[:3])
    except (ValueError, OverflowError) as e:
        raise MalformedPayload(f"{text!r}: {e}", path) from e


# ---------------------------------------------------------------------------------------------------- fingerprints

def label_fingerprint(source: str, labels: Mapping[str, str], namespace: str = "") -> str:
    """The fingerprint pilothouse computes when a source has none: SHA-256 over the canonical JSON of
    ``["pilothouse-fp-v1", source, namespace, [[name, value], ...] sorted by name]``."""
    canonical = orjson.dumps([FINGERPRINT_VERSION, source, namespace, sorted(labels.items())])
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def _own_fingerprint(value: Any, path: str, ctx: _Ctx) -> str | None:
    if value is None:
        return None
    text = _text(value, path, ctx, ctx.limits.max_fingerprint_len, what="fingerprint")
    if not text.strip():
        raise MalformedPayload("fingerprint is empty", path)
    return text


# ---------------------------------------------------------------------------------------------------- decoding

def decode_payload(payload: bytes | bytearray | memoryview | str | dict | list,
                   limits: Limits = DEFAULT_LIMITS) -> tuple[Any, int]:
    """Bytes (UTF-8 JSON) or an already parsed document -> (document, size in bytes). Size is checked before
    parsing, so an oversized body costs nothing."""
    if isinstance(payload, (dict, list)):
        try:
            size = len(orjson.dumps(payload))
        except TypeError as e:
            raise MalformedPayload(f"not a JSON document: {e}") from e
        if size > limits.max_body_bytes:
            raise MalformedPayload(f"body of {size} bytes exceeds the limit of {limits.max_body_bytes}")
        return payload, size
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes or a parsed JSON object/array, not {type(payload).__name__}")
    size = len(payload)
    if size == 0:
        raise MalformedPayload("empty body: expected a JSON document")
    if size > limits.max_body_bytes:
        raise MalformedPayload(f"body of {size} bytes exceeds the limit of {limits.max_body_bytes}")
    try:
        return orjson.loads(payload), size
    except orjson.JSONDecodeError as e:
        raise MalformedPayload(f"invalid JSON: {e}") from e


# ---------------------------------------------------------------------------------------------------- Alertmanager

#: Top-level keys of the Alertmanager webhook, as documented in docs/configuration.md (<webhook_config>).
ALERTMANAGER_WEBHOOK_KEYS = frozenset({
    "version", "groupKey", "truncatedAlerts", "status", "receiver", "groupLabels", "commonLabels",
    "commonAnnotations", "externalURL", "notification_reason", "alerts",
})
#: Keys of one alert inside it.
ALERTMANAGER_ALERT_KEYS = frozenset({
    "status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint",
})
#: Keys of one alert in an Alertmanager API v2 ``postableAlert`` (api/v2/openapi.yaml).
ALERTMANAGER_POSTABLE_KEYS = frozenset({"labels", "annotations", "startsAt", "endsAt", "generatorURL"})
_SERVICE_LABELS = ("service", "service_name", "app", "application", "app_kubernetes_io_name", "job")
_ENTITY_LABELS = ("instance", "pod", "host", "hostname", "node", "nodename", "container")


def _first_label(labels: Mapping[str, str], names: tuple[str, ...]) -> str:
    for name in names:
        if labels.get(name):
            return labels[name]
    return ""


def _status(value: Any, path: str) -> Status:
    if value not in STATUSES:
        shown = value if isinstance(value, str) else _jtype(value)
        raise MalformedPayload(f"status {shown!r} is not firing or resolved", path)
    return value


def _alert_list(doc: Mapping[str, Any], key: str, ctx: _Ctx) -> list[Any]:
    if key not in doc or doc[key] is None:
        raise MalformedPayload("required field is missing", key)
    alerts = _arr(doc[key], key)
    if not alerts:
        raise MalformedPayload("empty list: no alerts to ingest", key)
    if len(alerts) > ctx.limits.max_alerts:
        raise MalformedPayload(f"{len(alerts)} alerts exceed the limit of {ctx.limits.max_alerts} per payload", key)
    return alerts


def _labels(value: Any, path: str, ctx: _Ctx, *, required: bool) -> dict[str, str]:
    if value is None and required:
        raise MalformedPayload("required field is missing", path)
    labels = _string_map(value, path, ctx, what="labels", max_items=ctx.limits.max_labels,
                         max_value_len=ctx.limits.max_label_value_len, strict_strings=True)
    if required and not labels:
        raise MalformedPayload("empty label set: an alert needs at least one label to be identified", path)
    return labels


def _annotations(value: Any, path: str, ctx: _Ctx) -> dict[str, str]:
    return _string_map(value, path, ctx, what="annotations", max_items=ctx.limits.max_annotations,
                       max_value_len=ctx.limits.max_annotation_value_len, strict_strings=True)


def _summary_from(annotations: Mapping[str, str], labels: Mapping[str, str], path: str, ctx: _Ctx) -> str:
    summary = (annotations.get("summary") or annotations.get("description") or annotations.get("message")
               or labels.get("alertname") or "")
    if len(summary) > ctx.limits.max_summary_len:
        raise MalformedPayload(f"summary of {len(summary)} characters exceeds the limit of "
                               f"{ctx.limits.max_summary_len}", path)
    return summary


def _finish_notes(annotations: dict[str, str], ctx: _Ctx, truncated: int = 0) -> None:
    removed = ctx.take_invisible()
    if removed:
        annotations[INVISIBLE_NOTE] = str(removed)
    if truncated:
        annotations[TRUNCATED_NOTE] = str(truncated)


def _alertmanager_like(doc: Any, *, source: Literal["alertmanager", "grafana"], version: str, hint: str,
                       ctx: _Ctx, raw_size: int) -> list[NormalizedAlert]:
    doc = _obj(doc, "$")
    got = doc.get("version")
    if got is None:
        raise MalformedPayload(f"required field is missing (expected {version!r})", "version")
    if got != version:
        raise MalformedPayload(f"unsupported version {got!r}: expected {version!r}{hint}", "version")
    group_status = _status(doc["status"], "status") if doc.get("status") is not None else None
    truncated = doc.get("truncatedAlerts") or 0
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise MalformedPayload(f"expected a non-negative integer, got {_jtype(truncated)}", "truncatedAlerts")
    alerts = _alert_list(doc, "alerts", ctx)
    out: list[NormalizedAlert] = []
    for i, raw in enumerate(alerts):
        path = f"alerts[{i}]"
        alert = _obj(raw, path)
        labels = _labels(alert.get("labels"), f"{path}.labels", ctx, required=True)
        annotations = _annotations(alert.get("annotations"), f"{path}.annotations", ctx)
        if alert.get("status") is not None:
            status = _status(alert["status"], f"{path}.status")
        elif group_status is not None:
            status = group_status  # some senders (and prometheus-msteams' test data) omit the per-alert status
        else:
            raise MalformedPayload("required field is missing (and the payload has no top-level status)",
                                   f"{path}.status")
        starts = _req_text(alert, "startsAt", path, ctx, 64)
        starts_at_ms = parse_rfc3339_ms(starts, f"{path}.startsAt", zero_is_none=True)
        if starts_at_ms is None:
            raise MalformedPayload("zero time: an alert must say when it started", f"{path}.startsAt")
        ends = _opt_text(alert, "endsAt", path, ctx, 64)
        ends_at_ms = parse_rfc3339_ms(ends, f"{path}.endsAt", zero_is_none=True) if ends else None
        links: list[str] = []
        _add_link(links, alert.get("generatorURL"), f"{path}.generatorURL", ctx)
        if source == "grafana":
            for key in ("silenceURL", "dashboardURL", "panelURL", "imageURL"):
                _add_link(links, alert.get(key), f"{path}.{key}", ctx)
            values = alert.get("values")
            if values is not None:
                for ref, text in _string_map(values, f"{path}.values", ctx, what="values",
                                             max_items=ctx.limits.max_annotations,
                                             max_value_len=ctx.limits.max_annotation_value_len,
                                             strict_strings=False).items():
                    annotations[f"value.{ref}"] = text
            if alert.get("valueString"):  # Grafana < 9 put the values in one string
                annotations["valueString"] = _text(alert["valueString"], f"{path}.valueString", ctx,
                                                   ctx.limits.max_annotation_value_len)
            if len(annotations) > ctx.limits.max_annotations:
                raise MalformedPayload(f"{len(annotations)} annotations and values exceed the limit of "
                                       f"{ctx.limits.max_annotations}", path)
        fingerprint = (_own_fingerprint(alert.get("fingerprint"), f"{path}.fingerprint", ctx)
                       or label_fingerprint(source, labels))
        summary = _summary_from(annotations, labels, path, ctx)
        _finish_notes(annotations, ctx, truncated)
        out.append(NormalizedAlert(
            source=source, fingerprint=fingerprint, status=status,
            severity=map_severity(labels.get("severity")),
            service=_first_label(labels, _SERVICE_LABELS), entity=_first_label(labels, _ENTITY_LABELS),
            summary=summary, labels=labels, annotations=annotations,
            starts_at_ms=starts_at_ms, ends_at_ms=ends_at_ms, links=links, raw_size=raw_size,
        ))
    return out


def normalize_alertmanager(doc: Any, *, received_at_ms: int, raw_size: int,
                           limits: Limits = DEFAULT_LIMITS) -> list[NormalizedAlert]:
    """Alertmanager webhook v4 (an object), or Alertmanager API v2 ``postableAlerts`` (an array)."""
    if isinstance(doc, list):
        return normalize_alertmanager_postable(doc, received_at_ms=received_at_ms, raw_size=raw_size,
                                               limits=limits)
    return _alertmanager_like(doc, source="alertmanager", version="4",
                              hint=" (version '1' is a Grafana webhook: send it to the grafana source)"
                              if isinstance(doc, dict) and doc.get("version") == "1" else "",
                              ctx=_Ctx(limits), raw_size=raw_size)


def normalize_alertmanager_postable(doc: Any, *, received_at_ms: int, raw_size: int,
                                    limits: Limits = DEFAULT_LIMITS) -> list[NormalizedAlert]:
    """Alertmanager API v2 ``POST /api/v2/alerts`` body: ``[{labels, annotations?, startsAt?, endsAt?,
    generatorURL?}]``. As Alertmanager itself does: a missing startsAt is the receive time, and an alert whose
    endsAt is at or before the receive time is resolved. Fingerprints are computed (the body has none)."""
    ctx = _Ctx(limits)
    alerts = _alert_list({"alerts": _arr(doc, "$")}, "alerts", ctx)
    out: list[NormalizedAlert] = []
    for i, raw in enumerate(alerts):
        path = f"[{i}]"
        alert = _obj(raw, path)
        labels = _labels(alert.get("labels"), f"{path}.labels", ctx, required=True)
        annotations = _annotations(alert.get("annotations"), f"{path}.annotations", ctx)
        starts = _opt_text(alert, "startsAt", path, ctx, 64)
        starts_at_ms = (parse_rfc3339_ms(starts, f"{path}.startsAt", zero_is_none=True) if starts else None)
        ends = _opt_text(alert, "endsAt", path, ctx, 64)
        ends_at_ms = parse_rfc3339_ms(ends, f"{path}.endsAt", zero_is_none=True) if ends else None
        links: list[str] = []
        _add_link(links, alert.get("generatorURL"), f"{path}.generatorURL", ctx)
        summary = _summary_from(annotations, labels, path, ctx)
        _finish_notes(annotations, ctx)
        out.append(NormalizedAlert(
            source="alertmanager", fingerprint=label_fingerprint("alertmanager", labels),
            status="resolved" if ends_at_ms is not None and ends_at_ms <= received_at_ms else "firing",
            severity=map_severity(labels.get("severity")),
            service=_first_label(labels, _SERVICE_LABELS), entity=_first_label(labels, _ENTITY_LABELS),
            summary=summary, labels=labels, annotations=annotations,
            starts_at_ms=starts_at_ms if starts_at_ms is not None else received_at_ms,
            ends_at_ms=ends_at_ms, links=links, raw_size=raw_size,
        ))
    return out


def normalize_grafana(doc: Any, *, received_at_ms: int, raw_size: int,
                      limits: Limits = DEFAULT_LIMITS) -> list[NormalizedAlert]:
    """Grafana-managed alerting webhook (version "1"): Alertmanager-shaped plus silenceURL, dashboardURL,
    panelURL, imageURL and ``values`` (kept as annotations ``value.<refId>``)."""
    return _alertmanager_like(doc, source="grafana", version="1",
                              hint=" (version '4' is an Alertmanager webhook: send it to the alertmanager source)"
                              if isinstance(doc, dict) and doc.get("version") == "4" else "",
                              ctx=_Ctx(limits), raw_size=raw_size)


# ---------------------------------------------------------------------------------------------------- PagerDuty

_PD_ACTIONS = ("trigger", "acknowledge", "resolve")
_PD_SEVERITIES = ("critical", "error", "warning", "info")


def _pagerduty_shape_hint(doc: Mapping[str, Any]) -> None:
    """Name the PagerDuty payloads that are not Events API v2 events, so the sender knows what went wrong."""
    event = doc.get("event")
    if isinstance(event, dict) and "event_type" in event:
        raise MalformedPayload(
            f"this is a PagerDuty webhook v3 envelope (event_type {str(event.get('event_type'))[:64]!r}), "
            "not an Events API v2 event; pilothouse ingests alerts, not PagerDuty's own notifications")
    if isinstance(doc.get("messages"), list):
        raise MalformedPayload("this is a legacy PagerDuty webhook v2 'messages' body, not an Events API v2 event")
    if "webhook_subscription" in doc:
        raise MalformedPayload("this is a PagerDuty webhook subscription, not an Events API v2 event")


def _pd_links(doc: Mapping[str, Any], ctx: _Ctx) -> list[str]:
    links: list[str] = []
    for key in ("links", "images"):
        items = doc.get(key)
        if items is None:
            continue
        for j, item in enumerate(_arr(items, key)):
            where = f"{key}[{j}]"
            _add_link(links, _obj(item, where).get("href"), f"{where}.href", ctx)
    _add_link(links, doc.get("client_url"), "client_url", ctx)
    return links


def _pd_custom_details(value: Any, ctx: _Ctx, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):  # the docs allow a plain string too
        _check_depth(value, path, ctx.limits.max_value_depth)
        return {"custom_details": _text(ctx.clean(_json_text(value)), path, ctx,
                                        ctx.limits.max_annotation_value_len)}
    return _string_map(value, path, ctx, what="custom details", max_items=ctx.limits.max_annotations,
                       max_value_len=ctx.limits.max_annotation_value_len, strict_strings=False)


def normalize_pagerduty(doc: Any, *, received_at_ms: int, raw_size: int,
                        limits: Limits = DEFAULT_LIMITS) -> list[NormalizedAlert]:
    """PagerDuty Events API v2 alert event. trigger -> firing; acknowledge -> firing with label
    ``acknowledged=true``; resolve -> resolved. Fingerprint: ``dedup_key`` (required for acknowledge/resolve;
    a trigger without one gets ``label_fingerprint`` over source/component/group/class/summary). payload.source
    is the entity, payload.component (else group) the service. ``routing_key`` is required and then dropped."""
    ctx = _Ctx(limits)
    doc = _obj(doc, "$")
    _pagerduty_shape_hint(doc)
    _req_text(doc, "routing_key", "$", ctx, 256)  # checked, never copied: it is an integration credential
    action = doc.get("event_action")
    if action is None:
        hint = ("a payload without event_action is a change event: send it to the pagerduty_change source"
                if isinstance(doc.get("payload"), dict) and "severity" not in doc["payload"] else
                "trigger, acknowledge or resolve")
        raise MalformedPayload(f"required field is missing ({hint})", "event_action")
    if action not in _PD_ACTIONS:
        raise MalformedPayload(f"{str(action)[:32]!r} is not trigger, acknowledge or resolve", "event_action")
    dedup_key = _own_fingerprint(doc.get("dedup_key"), "dedup_key", ctx)
    links = _pd_links(doc, ctx)
    if action != "trigger":
        if dedup_key is None:
            raise MalformedPayload(f"required for {action}: it names the alert to {action}", "dedup_key")
        labels = {"acknowledged": "true"} if action == "acknowledge" else {}
        annotations = {"pagerduty.event_action": action}
        _finish_notes(annotations, ctx)
        return [NormalizedAlert(
            source="pagerduty", fingerprint=dedup_key,
            status="resolved" if action == "resolve" else "firing", severity="unknown",
            summary=f"PagerDuty {action} for dedup_key {dedup_key}", labels=labels, annotations=annotations,
            starts_at_ms=received_at_ms, ends_at_ms=received_at_ms if action == "resolve" else None,
            links=links, raw_size=raw_size,
        )]
    if doc.get("payload") is None:
        raise MalformedPayload("required field is missing (a trigger needs summary, source and severity)",
                               "payload")
    payload = _obj(doc["payload"], "payload")
    summary = _req_text(payload, "summary", "payload", ctx, min(1024, limits.max_summary_len))
    source = _req_text(payload, "source", "payload", ctx, limits.max_label_value_len)
    severity = payload.get("severity")
    if severity not in _PD_SEVERITIES:
        shown = "missing" if severity is None else repr(severity if isinstance(severity, str) else _jtype(severity))
        raise MalformedPayload(f"severity {shown} is not critical, error, warning or info", "payload.severity")
    labels = {"source": source}
    for key in ("component", "group", "class"):
        value = _opt_text(payload, key, "payload", ctx, limits.max_label_value_len)
        if value:
            labels[key] = value
    timestamp = _opt_text(payload, "timestamp", "payload", ctx, 64)
    starts_at_ms = parse_rfc3339_ms(timestamp, "payload.timestamp") if timestamp else received_at_ms
    annotations = _pd_custom_details(payload.get("custom_details"), ctx, "payload.custom_details")
    client = _opt_text(doc, "client", "$", ctx, limits.max_label_value_len)
    if client:
        annotations["pagerduty.client"] = client
    fingerprint = dedup_key or label_fingerprint("pagerduty", {**labels, "summary": summary})
    _finish_notes(annotations, ctx)
    return [NormalizedAlert(
        source="pagerduty", fingerprint=fingerprint, status="firing", severity=severity,
        service=labels.get("component") or labels.get("group") or "", entity=source, summary=summary,
        labels=labels, annotations=annotations, starts_at_ms=starts_at_ms, links=links, raw_size=raw_size,
    )]


def normalize_pagerduty_change(doc: Any, *, received_at_ms: int, raw_size: int,
                               limits: Limits = DEFAULT_LIMITS) -> list[TelemetryRecord]:
    """PagerDuty Events API v2 change event (``/v2/change/enqueue``): a deploy or config change, as a
    TelemetryRecord(kind="change"). payload.source is the entity; custom_details and links become attributes."""
    ctx = _Ctx(limits)
    doc = _obj(doc, "$")
    _pagerduty_shape_hint(doc)
    if "event_action" in doc:
        raise MalformedPayload("an event with event_action is an alert event: send it to the pagerduty source",
                               "event_action")
    _req_text(doc, "routing_key", "$", ctx, 256)
    if doc.get("payload") is None:
        raise MalformedPayload("required field is missing (a change event needs payload.summary)", "payload")
    payload = _obj(doc["payload"], "payload")
    summary = _req_text(payload, "summary", "payload", ctx, min(1024, limits.max_summary_len))
    source = _opt_text(payload, "source", "payload", ctx, limits.max_label_value_len) or ""
    timestamp = _opt_text(payload, "timestamp", "payload", ctx, 64)
    attributes = _pd_custom_details(payload.get("custom_details"), ctx, "payload.custom_details")
    for j, url in enumerate(_pd_links(doc, ctx)):
        attributes[f"link[{j}]"] = url
    if len(attributes) > limits.max_attributes:
        raise MalformedPayload(f"{len(attributes)} attributes exceed the limit of {limits.max_attributes}")
    removed = ctx.take_invisible()
    if removed:
        attributes[INVISIBLE_NOTE] = str(removed)
    return [TelemetryRecord(
        kind="change", source="pagerduty_change", entity=source, severity="info", body=summary,
        attributes=attributes,
        timestamp_ms=parse_rfc3339_ms(timestamp, "payload.timestamp") if timestamp else received_at_ms,
    )]


# ---------------------------------------------------------------------------------------------------- OTLP logs

_OTEL_ENTITY_KEYS = ("host.name", "k8s.pod.name", "service.instance.id", "container.name", "host.id")
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
_INT64 = (-(2**63), 2**63 - 1)


def _any_value(value: Any, path: str, depth: int, ctx: _Ctx) -> Any:
    """Decode an OTLP/JSON AnyValue into plain JSON (None for an empty AnyValue)."""
    if depth > ctx.limits.max_value_depth:
        raise MalformedPayload(f"AnyValue nested deeper than {ctx.limits.max_value_depth} levels", path)
    value = _obj(value, path)
    kinds = [k for k in value if k in ("stringValue", "intValue", "doubleValue", "boolValue", "arrayValue",
                                        "kvlistValue", "bytesValue")]
    if not kinds:
        return None
    if len(kinds) > 1:
        raise MalformedPayload(f"an AnyValue holds exactly one value, got {', '.join(kinds)}", path)
    kind = kinds[0]
    item, where = value[kind], f"{path}.{kind}"
    if kind == "stringValue":
        return _text(item, where, ctx, ctx.limits.max_log_body_len)
    if kind == "boolValue":
        if not isinstance(item, bool):
            raise MalformedPayload(f"expected boolean, got {_jtype(item)}", where)
        return item
    if kind == "intValue":  # int64 is a JSON string in proto3 JSON; accept a number too
        try:
            number = int(item) if isinstance(item, (int, str)) and not isinstance(item, bool) else None
        except ValueError:
            number = None
        if number is None or not _INT64[0] <= number <= _INT64[1]:
            raise MalformedPayload(f"expected an int64 (string or number), got {str(item)[:32]!r}", where)
        return number
    if kind == "doubleValue":
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return float(item)
        if item in ("NaN", "Infinity", "-Infinity"):
            return item
        raise MalformedPayload(f"expected a number, got {_jtype(item)}", where)
    if kind == "bytesValue":
        text = _text(item, where, ctx, ctx.limits.max_log_body_len)
        try:
            base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MalformedPayload(f"not base64: {e}", where) from e
        return text  # kept as base64 text
    values = _arr(_or_empty(_obj(item, where).get("values"), []), f"{where}.values")
    if len(values) > ctx.limits.max_attributes:
        raise MalformedPayload(f"{len(values)} values exceed the limit of {ctx.limits.max_attributes}",
                               f"{where}.values")
    if kind == "arrayValue":
        return [_any_value(v, f"{where}.values[{j}]", depth + 1, ctx) for j, v in enumerate(values)]
    return _key_values(values, f"{where}.values", depth + 1, ctx)


def _key_values(items: Any, path: str, depth: int, ctx: _Ctx) -> dict[str, Any]:
    if items is None:
        return {}
    items = _arr(items, path)
    if len(items) > ctx.limits.max_attributes:
        raise MalformedPayload(f"{len(items)} attributes exceed the limit of {ctx.limits.max_attributes}", path)
    out: dict[str, Any] = {}
    for j, kv in enumerate(items):
        where = f"{path}[{j}]"
        kv = _obj(kv, where)
        key = _text(kv.get("key"), f"{where}.key", ctx, ctx.limits.max_key_len, what="key")
        if not key:
            raise MalformedPayload("empty attribute key", f"{where}.key")
        if key in out:
            raise MalformedPayload(f"duplicate attribute key {key!r}", f"{where}.key")
        out[key] = _any_value(kv.get("value", {}), f"{where}.value", depth, ctx)
    return out


def _or_empty(value: Any, empty: Any) -> Any:
    """Absent or null means empty (proto3 JSON omits empty fields); a wrong type is still reported."""
    return empty if value is None else value


def _nanos_ms(value: Any, path: str) -> int | None:
    """OTLP fixed64 nanoseconds (string or number) -> ms; 0 or absent means unset."""
    if value is None:
        return None
    try:
        nanos = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        nanos = None
    if nanos is None or not 0 <= nanos < 2**64:
        raise MalformedPayload(f"expected unsigned nanoseconds since the epoch, got {str(value)[:32]!r}", path)
    return nanos // 1_000_000 or None


def _trace_ref(value: Any, path: str, width: int) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) != width or not _HEX_RE.match(value):
        raise MalformedPayload(f"expected {width} hex characters (OTLP/JSON encodes ids as hex)", path)
    value = value.lower()
    return None if value.strip("0") == "" else value  # all-zero ids are "invalid/unset" in W3C trace context


def normalize_otlp_logs(doc: Any, *, received_at_ms: int, raw_size: int,
                        limits: Limits = DEFAULT_LIMITS) -> list[TelemetryRecord]:
    """OTLP/HTTP JSON ExportLogsServiceRequest: resourceLogs -> scopeLogs -> logRecords, one TelemetryRecord each.
    service: resource attribute service.name; entity: host.name / k8s.pod.name / service.instance.id / ...;
    time: timeUnixNano, else observedTimeUnixNano, else the receive time. Attributes: the record's own, then
    ``resource.<key>``, ``scope.name``/``scope.version``/``scope.attributes.<key>``, ``event.name`` and
    ``severity_text``; non-string values as compact JSON."""
    ctx = _Ctx(limits)
    doc = _obj(doc, "$")
    if "resourceLogs" not in doc:
        other = next((name for key, name in (("resourceMetrics", "metrics"), ("resourceSpans", "traces"),
                                             ("resourceProfiles", "profiles")) if key in doc), None)
        hint = f" (this is an OTLP {other} request, not logs)" if other else ""
        raise MalformedPayload(f"required field is missing{hint}", "resourceLogs")
    resource_logs = _arr(doc["resourceLogs"], "resourceLogs")
    out: list[TelemetryRecord] = []
    for r, rl in enumerate(resource_logs):
        rpath = f"resourceLogs[{r}]"
        rl = _obj(rl, rpath)
        resource = _obj(_or_empty(rl.get("resource"), {}), f"{rpath}.resource")
        res_attrs = _key_values(resource.get("attributes"), f"{rpath}.resource.attributes", 1, ctx)
        service = res_attrs.get("service.name")
        service = service if isinstance(service, str) else ""
        entity = next((res_attrs[k] for k in _OTEL_ENTITY_KEYS if isinstance(res_attrs.get(k), str)), "")
        for s, sl in enumerate(_arr(_or_empty(rl.get("scopeLogs"), []), f"{rpath}.scopeLogs")):
            spath = f"{rpath}.scopeLogs[{s}]"
            sl = _obj(sl, spath)
            scope = _obj(_or_empty(sl.get("scope"), {}), f"{spath}.scope")
            scope_name = _opt_text(scope, "name", f"{spath}.scope", ctx, limits.max_label_value_len)
            scope_version = _opt_text(scope, "version", f"{spath}.scope", ctx, limits.max_label_value_len)
            scope_attrs = _key_values(scope.get("attributes"), f"{spath}.scope.attributes", 1, ctx)
            records = _arr(_or_empty(sl.get("logRecords"), []), f"{spath}.logRecords")
            if len(out) + len(records) > limits.max_log_records:
                raise MalformedPayload(f"more than {limits.max_log_records} log records in one request",
                                       f"{spath}.logRecords")
            for k, rec in enumerate(records):
                path = f"{spath}.logRecords[{k}]"
                rec = _obj(rec, path)
                attributes = {key: _json_text(v) for key, v in
                              _key_values(rec.get("attributes"), f"{path}.attributes", 1, ctx).items()
                              if v is not None}
                for key, value in res_attrs.items():
                    if value is not None:
                        attributes[f"resource.{key}"] = _json_text(value)
                if scope_name:
                    attributes["scope.name"] = scope_name
                if scope_version:
                    attributes["scope.version"] = scope_version
                for key, value in scope_attrs.items():
                    if value is not None:
                        attributes[f"scope.attributes.{key}"] = _json_text(value)
                event_name = _opt_text(rec, "eventName", path, ctx, limits.max_label_value_len)
                if event_name:
                    attributes["event.name"] = event_name
                severity_text = _opt_text(rec, "severityText", path, ctx, 64) or ""
                if severity_text:
                    attributes["severity_text"] = severity_text
                number = rec.get("severityNumber", 0)
                if isinstance(number, str) and number.startswith("SEVERITY_NUMBER_"):
                    number = 0  # enum names are legal proto3 JSON; fall back to the text
                if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= 24:
                    raise MalformedPayload(f"expected 0-24, got {str(number)[:16]!r}", f"{path}.severityNumber")
                if len(attributes) > limits.max_attributes:
                    raise MalformedPayload(f"{len(attributes)} attributes (with resource attributes) exceed "
                                           f"the limit of {limits.max_attributes}", f"{path}.attributes")
                for key, text in attributes.items():
                    if len(text) > limits.max_annotation_value_len:
                        raise MalformedPayload(f"value of {len(text)} characters exceeds the limit of "
                                               f"{limits.max_annotation_value_len}", f"{path}.attributes")
                body_value = _any_value(rec["body"], f"{path}.body", 1, ctx) if rec.get("body") else None
                body = "" if body_value is None else _json_text(body_value)
                if len(body) > limits.max_log_body_len:
                    raise MalformedPayload(f"body of {len(body)} characters exceeds the limit of "
                                           f"{limits.max_log_body_len}", f"{path}.body")
                timestamp_ms = (_nanos_ms(rec.get("timeUnixNano"), f"{path}.timeUnixNano")
                                or _nanos_ms(rec.get("observedTimeUnixNano"), f"{path}.observedTimeUnixNano")
                                or received_at_ms)
                removed = ctx.take_invisible()
                if removed:
                    attributes[INVISIBLE_NOTE] = str(removed)
                out.append(TelemetryRecord(
                    kind="log", source="otlp_logs", service=service, entity=entity, timestamp_ms=timestamp_ms,
                    severity=_otel_severity(number, severity_text), body=body, attributes=attributes,
                    trace_id=_trace_ref(rec.get("traceId"), f"{path}.traceId", 32),
                    span_id=_trace_ref(rec.get("spanId"), f"{path}.spanId", 16),
                ))
    if not out:
        raise MalformedPayload("no log records in the request", "resourceLogs")
    return out


# ---------------------------------------------------------------------------------------------------- generic

_MISSING = object()


def _rule_path(prefix: str, rule_path_text: str) -> str:
    text = rule_path_text.lstrip("$").lstrip(".")
    return f"{prefix}.{text}" if prefix else text


def _scalar(value: Any, path: str) -> str:
    if isinstance(value, (dict, list)):
        raise MalformedPayload(f"expected a scalar, got {_jtype(value)}", path)
    return _json_text(value)


def _generic_scalar(rule: FieldRule, field: str, item: Any, prefix: str, ctx: _Ctx, rules: MappingRules,
                    allowed: tuple[str, ...] | None = None, *, json_ok: bool = False) -> Any:
    """A field's value, or _MISSING. ``allowed``: the closed set of outputs (status, severity). ``json_ok``:
    an object or array is kept as compact JSON text (annotations, attributes) instead of refused."""
    if rule.const is not None:
        return rule.const
    assert rule.path is not None
    where = _rule_path(prefix, rule.path.text)
    found = rule.path.find(item)
    if not found:
        return rule.default if rule.default is not None else _MISSING
    if json_ok and isinstance(found[0], (dict, list)):
        _check_depth(found[0], where, ctx.limits.max_value_depth)
        return ctx.clean(_json_text(found[0]))
    value = ctx.clean(_scalar(found[0], where))
    if rule.value_map and value in rule.value_map:
        return rule.value_map[value]
    if allowed is None or value in allowed:
        return value
    if rule.default is not None:
        return rule.default
    mapped = ", ".join(sorted(rule.value_map)) if rule.value_map else "none"
    raise MalformedPayload(f"{field} value {value[:64]!r} is not in the value map of mapping {rules.name!r} "
                           f"(mapped: {mapped}) and the rule has no default", where)


def _generic_time(rule: FieldRule, item: Any, prefix: str) -> int | None:
    assert rule.path is not None
    where = _rule_path(prefix, rule.path.text)
    found = rule.path.find(item)
    if not found:
        return None
    value = found[0]
    if rule.time_format == "rfc3339":
        if not isinstance(value, str):
            raise MalformedPayload(f"expected an RFC 3339 string, got {_jtype(value)}", where)
        return parse_rfc3339_ms(value, where, zero_is_none=True)
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise MalformedPayload(f"expected a number ({rule.time_format}), got {value[:32]!r}", where) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MalformedPayload(f"expected a non-negative number ({rule.time_format})", where)
    scale = {"epoch_s": 1000, "epoch_ms": 1, "epoch_ns": 1e-6}[rule.time_format or "epoch_ms"]
    ms = int(value * scale) if isinstance(value, float) or scale < 1 else value * scale
    if ms > 253402300799999:  # year 9999: a unit mix-up (ns declared as ms) is an error, not a date
        raise MalformedPayload(f"{value} as {rule.time_format} is after year 9999: is the format right?", where)
    return int(ms)


def _generic_map(rule: MapRule, field: str, item: Any, prefix: str, ctx: _Ctx, rules: MappingRules,
                 *, labels: bool) -> dict[str, str]:
    limit = ctx.limits.max_labels if labels else ctx.limits.max_annotations
    value_len = ctx.limits.max_label_value_len if labels else ctx.limits.max_annotation_value_len
    out: dict[str, str] = {}
    if rule.path is not None:
        where = _rule_path(prefix, rule.path.text)
        found = rule.path.find(item)
        value = found[0] if found else None
        if isinstance(value, str) and rule.pairs_sep is not None and rule.kv_sep is not None:
            pairs = [p.strip() for p in value.split(rule.pairs_sep) if p.strip()]
            if len(pairs) > limit:
                raise MalformedPayload(f"{len(pairs)} {field} exceed the limit of {limit}", where)
            value = {}
            for pair in pairs:
                name, sep, text = pair.partition(rule.kv_sep)
                value[name.strip()] = text.strip() if sep else "true"
        if value is not None:
            if labels and isinstance(value, dict):
                for key, v in value.items():
                    if isinstance(v, (dict, list)):
                        raise MalformedPayload(f"expected a scalar label value, got {_jtype(v)}", _child(where, key))
            out.update(_string_map(value, where, ctx, what=field, max_items=limit, max_value_len=value_len,
                                   strict_strings=False))
    for name, sub in (rule.fields or {}).items():
        value = _generic_scalar(sub, f"{field}.{name}", item, prefix, ctx, rules, json_ok=not labels)
        if value is _MISSING:
            continue
        if len(value) > value_len:
            raise MalformedPayload(f"value of {len(value)} characters exceeds the limit of {value_len}",
                                   _rule_path(prefix, sub.path.text) if sub.path else f"{field}.{name}")
        out[ctx.clean(name)] = value
    if len(out) > limit:
        raise MalformedPayload(f"{len(out)} {field} exceed the limit of {limit}", prefix or "$")
    return out


def _generic_fingerprint(rules: MappingRules, item: Any, prefix: str, ctx: _Ctx,
                         labels: Mapping[str, str]) -> str:
    fp = rules.fingerprint
    assert fp is not None
    if fp.path is not None:
        where = _rule_path(prefix, fp.path.text)
        found = fp.path.find(item)
        if not found:
            raise MalformedPayload(f"the fingerprint field {fp.path.text!r} configured in mapping {rules.name!r} "
                                   "is missing from this payload: refusing rather than inventing an id", where)
        value = ctx.clean(_scalar(found[0], where))
        if not value.strip():
            raise MalformedPayload(f"the fingerprint field of mapping {rules.name!r} is empty", where)
        if len(value) > ctx.limits.max_fingerprint_len:
            raise MalformedPayload(f"fingerprint of {len(value)} characters exceeds the limit of "
                                   f"{ctx.limits.max_fingerprint_len}", where)
        return value
    if fp.from_paths:
        parts: list[list[Any]] = []
        for p in fp.from_paths:
            where = _rule_path(prefix, p.text)
            found = p.find(item)
            if not found:
                raise MalformedPayload(f"the fingerprint field {p.text!r} configured in mapping {rules.name!r} "
                                       "is missing from this payload: refusing rather than inventing an id", where)
            parts.append([p.text, sorted(ctx.clean(_scalar(v, where)) for v in found)])
        canonical = orjson.dumps([FINGERPRINT_VERSION, "generic", rules.name, parts])
        return "sha256:" + hashlib.sha256(canonical).hexdigest()
    if not labels:
        raise MalformedPayload(f"mapping {rules.name!r} fingerprints by labels, but this payload maps to no labels",
                               prefix or "$")
    return label_fingerprint("generic", labels, rules.name)


def _generic_items(doc: Any, rules: MappingRules, ctx: _Ctx) -> list[tuple[str, Any]]:
    if rules.items is None:
        items = list(enumerate(doc)) if isinstance(doc, list) else [(None, doc)]
        named = [(f"[{i}]" if i is not None else "", v) for i, v in items]
    else:
        found = rules.items.find(doc)
        base = rules.items.text.lstrip("$").lstrip(".")
        if not found:
            raise MalformedPayload(f"the items path {rules.items.text!r} of mapping {rules.name!r} is missing "
                                   "from this payload", base)
        if not rules.items.is_multi and isinstance(found[0], list):
            named = [(f"{base}[{i}]", v) for i, v in enumerate(found[0])]
        elif rules.items.is_multi:
            named = [(f"{base}#{i}", v) for i, v in enumerate(found)]
        else:
            named = [(base, found[0])]
    if not named:
        raise MalformedPayload("empty list: nothing to ingest", rules.items.text if rules.items else "$")
    if len(named) > ctx.limits.max_alerts:
        raise MalformedPayload(f"{len(named)} items exceed the limit of {ctx.limits.max_alerts} per payload",
                               rules.items.text if rules.items else "$")
    for prefix, item in named:
        _obj(item, prefix or "$")
    return named


def _field_where(rules: MappingRules, field: str, prefix: str) -> str:
    rule = rules.scalars.get(field)
    return _rule_path(prefix, rule.path.text) if rule is not None and rule.path is not None else prefix or "$"


def _generic_field(rules: MappingRules, field: str, item: Any, prefix: str, ctx: _Ctx,
                   allowed: tuple[str, ...] | None, *, required: bool, max_len: int) -> str | None:
    """One scalar output field of one item: None when absent and optional; refused when required."""
    rule = rules.scalars.get(field)
    value = _MISSING if rule is None else _generic_scalar(rule, field, item, prefix, ctx, rules, allowed)
    where = _field_where(rules, field, prefix)
    if value is _MISSING:
        if required:
            raise MalformedPayload(f"{field}: the field configured in mapping {rules.name!r} is missing "
                                   "from this payload and the rule has no default", where)
        return None
    if len(value) > max_len:
        raise MalformedPayload(f"{field} of {len(value)} characters exceeds the limit of {max_len}", where)
    return value


def normalize_generic(doc: Any, rules: MappingRules | Mapping[str, Any] | str, *, received_at_ms: int,
                      raw_size: int, limits: Limits = DEFAULT_LIMITS) -> list[NormalizedAlert] | list[TelemetryRecord]:
    """A JSON webhook from a source we do not know, mapped by declarative rules (see pilothouse.sensing.mapping).
    Rules given as a dict/YAML are validated first (MappingConfigError). A payload lacking a field the rules
    require (fingerprint, status without default, summary/body) is refused with MalformedPayload."""
    if not isinstance(rules, MappingRules):
        rules = load_mapping_rules(rules)
    ctx = _Ctx(limits)
    alerts: list[NormalizedAlert] = []
    changes: list[TelemetryRecord] = []
    for prefix, item in _generic_items(doc, rules, ctx):
        def scalar(field: str, allowed: tuple[str, ...] | None = None, *, required: bool = False,
                   max_len: int = limits.max_label_value_len, _item: Any = item, _prefix: str = prefix) -> Any:
            return _generic_field(rules, field, _item, _prefix, ctx, allowed, required=required, max_len=max_len)

        times = {f: _generic_time(r, item, prefix) for f, r in rules.times.items()}
        if rules.kind == "change":
            attributes = (_generic_map(rules.maps["attributes"], "attributes", item, prefix, ctx, rules,
                                       labels=False) if "attributes" in rules.maps else {})
            severity = scalar("severity", ("critical", "error", "warning", "info", "unknown")) or "info"
            trace_id, span_id = scalar("trace_id", max_len=64), scalar("span_id", max_len=64)
            body = scalar("body", required=True, max_len=limits.max_log_body_len)
            record = dict(
                kind="change", source=f"generic:{rules.name}", service=scalar("service") or "",
                entity=scalar("entity") or "",
                timestamp_ms=_or_empty(times.get("timestamp"), received_at_ms), severity=severity, body=body,
                trace_id=_trace_ref(trace_id, _field_where(rules, "trace_id", prefix), 32),
                span_id=_trace_ref(span_id, _field_where(rules, "span_id", prefix), 16),
            )
            removed = ctx.take_invisible()
            if removed:
                attributes[INVISIBLE_NOTE] = str(removed)
            changes.append(TelemetryRecord(**record, attributes=attributes))
            continue
        labels = (_generic_map(rules.maps["labels"], "labels", item, prefix, ctx, rules, labels=True)
                  if "labels" in rules.maps else {})
        annotations = (_generic_map(rules.maps["annotations"], "annotations", item, prefix, ctx, rules,
                                    labels=False) if "annotations" in rules.maps else {})
        status = scalar("status", STATUSES, required=True)
        severity = scalar("severity", ("critical", "error", "warning", "info", "unknown")) or "unknown"
        summary = scalar("summary", required=True, max_len=limits.max_summary_len)
        links: list[str] = []
        for p in rules.links:
            for j, url in enumerate(p.find(item)):
                _add_link(links, url, _rule_path(prefix, p.text) + (f"#{j}" if p.is_multi else ""), ctx)
        fingerprint = _generic_fingerprint(rules, item, prefix, ctx, labels)
        _finish_notes(annotations, ctx)
        alerts.append(NormalizedAlert(
            source="generic", mapping=rules.name, fingerprint=fingerprint, status=status, severity=severity,
            service=scalar("service") or "", entity=scalar("entity") or "", summary=summary,
            labels=labels, annotations=annotations,
            starts_at_ms=_or_empty(times.get("starts_at"), received_at_ms), ends_at_ms=times.get("ends_at"),
            links=links, raw_size=raw_size,
        ))
    return changes if rules.kind == "change" else alerts


# ---------------------------------------------------------------------------------------------------- entry point

_Normalizer = Callable[..., list[NormalizedAlert] | list[TelemetryRecord]]
_NORMALIZERS: dict[str, _Normalizer] = {
    "alertmanager": normalize_alertmanager,
    "grafana": normalize_grafana,
    "pagerduty": normalize_pagerduty,
    "pagerduty_change": normalize_pagerduty_change,
    "otlp_logs": normalize_otlp_logs,
}
SOURCES = (*_NORMALIZERS, "generic")


def normalize(source: str, payload: bytes | bytearray | memoryview | str | dict | list,
              mapping_rules: MappingRules | Mapping[str, Any] | str | None = None, *, received_at_ms: int,
              limits: Limits = DEFAULT_LIMITS) -> list[NormalizedAlert] | list[TelemetryRecord]:
    """Parse and normalise one request body from ``source`` (one of ``SOURCES``).

    Raises MalformedPayload (answer 400 with ``to_response()``), UnknownSource (a routing bug) or, for
    ``generic`` with rules given as a dict, MappingConfigError (load rules at startup with
    ``load_mapping_rules`` so this never happens per request)."""
    if isinstance(received_at_ms, bool) or not isinstance(received_at_ms, int):
        raise TypeError("received_at_ms must be an int (milliseconds since the epoch)")
    if source == "generic":
        if mapping_rules is None:
            raise MappingConfigError("the generic source needs mapping rules", "mapping_rules")
        rules = mapping_rules if isinstance(mapping_rules, MappingRules) else load_mapping_rules(mapping_rules)
        doc, size = decode_payload(payload, limits)
        return normalize_generic(doc, rules, received_at_ms=received_at_ms, raw_size=size, limits=limits)
    try:
        normalizer = _NORMALIZERS[source]
    except KeyError:
        raise UnknownSource(f"no normaliser for source {source!r} (known: {', '.join(SOURCES)})") from None
    doc, size = decode_payload(payload, limits)
    return normalizer(doc, received_at_ms=received_at_ms, raw_size=size, limits=limits)


# ---------------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    """``pilothouse ingest``: try a payload file against a normaliser, or check a mapping-rules file.

    ``normalize --source S [--rules RULES.yaml] [--received-at-ms MS] FILE|-`` prints one JSON record per line;
    exit 0, or 2 with the 400 answer on stderr when the payload is refused, 3 when the rules are invalid.
    ``check-rules RULES.yaml`` exits 0 when the rules load, 3 with the reason otherwise.
    The only I/O in this module lives here (files, stdin/stdout, the clock for a default receive time)."""
    import argparse
    import sys
    import time
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="pilothouse ingest", description=main.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    norm = sub.add_parser("normalize", help="normalise one payload file and print the records as JSON lines")
    norm.add_argument("--source", required=True, choices=SOURCES)
    norm.add_argument("--rules", type=Path, help="mapping rules (YAML) for --source generic")
    norm.add_argument("--received-at-ms", type=int, help="receive time to use (default: now)")
    norm.add_argument("file", help="payload file, or - for stdin")
    check = sub.add_parser("check-rules", help="validate a mapping-rules file")
    check.add_argument("rules", type=Path)
    args = parser.parse_args(argv)

    try:
        if args.command == "check-rules":
            rules = load_mapping_rules(args.rules.read_text(encoding="utf-8"))
            print(f"ok: mapping {rules.name!r} (kind {rules.kind}; fields: {', '.join(rules.fields_used())})")
            return 0
        rules = load_mapping_rules(args.rules.read_text(encoding="utf-8")) if args.rules else None
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        received = args.received_at_ms if args.received_at_ms is not None else time.time_ns() // 1_000_000
        records = normalize(args.source, data, rules, received_at_ms=received)
    except OSError as e:
        print(f"cannot read input: {e}", file=sys.stderr)
        return 1
    except MappingConfigError as e:
        print(f"invalid mapping rules: {e}", file=sys.stderr)
        return 3
    except MalformedPayload as e:
        print(orjson.dumps(e.to_response()).decode(), file=sys.stderr)
        return 2
    for record in records:
        sys.stdout.write(record.model_dump_json() + "\n")
    return 0

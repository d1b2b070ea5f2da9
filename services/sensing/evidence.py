"""Deterministic evidence extraction: telemetry in, evidence items out (pure functions, no I/O).

Every item carries a stable id derived from (kind, service, signal, window), a human summary, a robust strength
score and a link to its source, so that hypotheses can cite it and a reviewer can open the raw data.

Readers covered here:
- metrics: :func:`series_from_prometheus` turns a Prometheus ``query_range`` JSON body into :class:`Series`
  (the HTTP call belongs in an adapter); :func:`metric_anomalies` scores each series against a robust baseline
  (median / MAD, widened by the reference's own tail so that habitually spiky series do not shout);
- edge metrics: :func:`network_time_series` derives the network share of a call edge's latency
  (client-observed minus server-observed);
- traces: :func:`trace_profile` summarises the spans of one time bucket; :func:`trace_hotspots` compares window
  buckets with reference buckets (latency per operation, call fan-out per parent operation, error ratio, and
  where requests stop: the callee after which a caller's requests end);
- logs: :func:`log_template` masks variable tokens; :func:`log_bursts` finds templates whose rate jumped;
- changes: :func:`change_evidence` turns deploy/config events near the window into evidence;
- alerts: :func:`alert_evidence` turns firing alerts into evidence scored by severity.

Baselines are robust statistics of a *reference* (the pre-incident window of the same series, or a known-normal
period supplied by the caller), never thresholds fitted to a particular system.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import numpy as np

from pilothouse.bus.errors import PermanentError

Kind = Literal["metric_anomaly", "log_burst", "trace_hotspot", "change_event", "alert"]
Direction = Literal["up", "down", "none"]

# A robust z below this is noise for every kind of signal; callers may raise it, never lower it below ~2.
DEFAULT_Z_THRESHOLD = 4.0
_MAD_TO_SIGMA = 1.4826
# For a normal distribution the 1st..99th percentile span is 4.65 sigma; using it as a lower bound of the scale
# widens the baseline of series whose reference has heavy tails (occasional spikes) without hurting quiet ones.
_TAIL_SPAN_SIGMAS = 4.65


class EvidenceInputError(PermanentError):
    """Telemetry given to the evidence extractor is malformed; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Window:
    """The incident window, epoch milliseconds, both ends inclusive."""

    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if self.end_ms < self.start_ms:
            raise EvidenceInputError(f"window ends ({self.end_ms}) before it starts ({self.start_ms})")


@dataclass(frozen=True, slots=True)
class EvidenceItem:
    """One evidence item; field for field the twin of the Avro record ``pilothouse.sensing.Evidence``."""

    evidence_id: str
    kind: Kind
    service: str
    signal: str
    summary: str
    direction: Direction
    score: float
    onset_ms: int | None
    baseline: float | None
    observed: float | None
    source_link: str
    attributes: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with exactly the Avro record's fields (for ``Evidence.model_validate``)."""
        return {
            "evidence_id": self.evidence_id,
            "kind": self.kind,
            "service": self.service,
            "signal": self.signal,
            "summary": self.summary,
            "direction": self.direction,
            "score": float(self.score),
            "onset_ms": self.onset_ms,
            "baseline": self.baseline,
            "observed": self.observed,
            "source_link": self.source_link,
            "attributes": dict(self.attributes),
        }


def evidence_id(kind: str, service: str, signal: str, window: Window) -> str:
    """Stable id: the same finding over the same window always gets the same id (``ev-`` + 12 hex of SHA-256)."""
    key = "\x1f".join((kind, service, signal, str(window.start_ms), str(window.end_ms)))
    return "ev-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Series:
    """One metric time series of one service (or one call edge: then ``attributes`` has caller and callee)."""

    service: str
    signal: str
    timestamps_ms: np.ndarray
    values: np.ndarray
    source_link: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timestamps_ms.shape != self.values.shape or self.values.ndim != 1:
            raise EvidenceInputError(
                f"series {self.service}/{self.signal}: {self.timestamps_ms.shape[0]} timestamps "
                f"but values of shape {self.values.shape}"
            )


def _base_name(name: str) -> str:
    return re.split(r"[{\[]", name, maxsplit=1)[0].lower()


def classify_signal(name: str) -> str:
    """Coarse class of a metric from its name (keywords only, no system-specific names).

    Classes: latency, errors, cpu, memory, network_io, io, traffic, other. Label selectors (``{...}``) and edge
    suffixes (``[...]``) are not part of the name: a pod called "latency-probe" must not make its CPU a latency.
    """
    n = _base_name(name)
    if any(k in n for k in ("latency", "duration", "response_time", "responsetime", "delay")) \
            or re.search(r"(^|[_\-.])rt($|[_\-.])", n):
        return "latency"
    if "cpu" in n:
        return "cpu"
    if "mem" in n:
        return "memory"
    if re.search(r"(^|[_\-.])p(50|90|95|99)\b", n) or "seconds" in n:
        return "latency"
    if any(k in n for k in ("success", "error", "fail", "5xx", "exception", "status")):
        return "errors"
    if any(k in n for k in ("network", "receive", "transmit", "bytes", "net_", "packet")):
        return "network_io"
    if any(k in n for k in ("syscall", "disk", "io_", "fs_", "read", "write")):
        return "io"
    if any(k in n for k in ("workload", "ops", "qps", "rps", "request", "throughput", "count")):
        return "traffic"
    return "other"


def signal_side(name: str) -> str:
    """``client`` for outbound-call measurements, ``server`` for inbound, ``host`` for node-level, else ``pod``."""
    n = _base_name(name)
    if n.startswith("node") or "node_" in n or "host" in n:
        return "host"
    if "client" in n or "source" in n or "outbound" in n:
        return "client"
    if "server" in n or "destination" in n or "inbound" in n:
        return "server"
    return "pod"


def series_from_prometheus(
    response: Mapping[str, Any], *, service_label: str = "service", signal: str | None = None,
    source_link: str = "",
) -> list[Series]:
    """Turn a Prometheus HTTP API ``query_range`` response (``resultType: matrix``) into series.

    The service comes from ``service_label`` (falling back to ``job``); the signal from ``signal`` or
    ``__name__``. Values "NaN"/"+Inf"/"-Inf" are kept as floats (NaN is ignored by the statistics).
    Raises :class:`EvidenceInputError` with the offending path on any malformed part: nothing is silently dropped.
    """
    if not isinstance(response, Mapping):
        raise EvidenceInputError("prometheus response: expected a JSON object")
    status = response.get("status")
    if status != "success":
        raise EvidenceInputError(
            f"prometheus response: status={status!r} errorType={response.get('errorType')!r} "
            f"error={response.get('error')!r}"
        )
    data = response.get("data")
    if not isinstance(data, Mapping) or data.get("resultType") != "matrix":
        got = data.get("resultType") if isinstance(data, Mapping) else type(data).__name__
        raise EvidenceInputError(f"prometheus response: expected data.resultType 'matrix', got {got!r}")
    result = data.get("result")
    if not isinstance(result, list):
        raise EvidenceInputError("prometheus response: data.result is not a list")
    out: list[Series] = []
    for i, item in enumerate(result):
        if not isinstance(item, Mapping) or not isinstance(item.get("metric"), Mapping):
            raise EvidenceInputError(f"prometheus response: data.result[{i}] has no 'metric' object")
        labels = {str(k): str(v) for k, v in item["metric"].items()}
        values = item.get("values")
        if not isinstance(values, list):
            raise EvidenceInputError(f"prometheus response: data.result[{i}].values is not a list")
        ts = np.empty(len(values), dtype=np.int64)
        vs = np.empty(len(values), dtype=np.float64)
        for j, pair in enumerate(values):
            try:
                t, v = pair
                ts[j] = round(float(t) * 1000)
                vs[j] = float(v)  # float() accepts "NaN", "+Inf", "-Inf" as Prometheus writes them
            except (TypeError, ValueError) as e:
                raise EvidenceInputError(
                    f"prometheus response: data.result[{i}].values[{j}]={pair!r} is not [unix_seconds, 'value']"
                ) from e
        service = labels.get(service_label) or labels.get("job")
        if not service:
            raise EvidenceInputError(
                f"prometheus response: data.result[{i}] has neither label {service_label!r} nor 'job': {labels}"
            )
        name = signal or labels.get("__name__") or "value"
        attrs = {k: v for k, v in labels.items() if k not in {"__name__", service_label}}
        out.append(Series(service, name, ts, vs, source_link=source_link, attributes=attrs))
    # Several series of one service and metric (one per pod, say) must not share an evidence id: name them by
    # their remaining labels, PromQL-style, e.g. cpu{pod="a-1"}.
    seen = Counter((s.service, s.signal) for s in out)
    return [
        s if seen[(s.service, s.signal)] == 1 else Series(
            s.service, s.signal + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.attributes.items())) + "}",
            s.timestamps_ms, s.values, s.source_link, s.attributes)
        for s in out
    ]


def prometheus_graph_link(base_url: str, query: str, window: Window) -> str:
    """A Prometheus graph URL showing ``query`` over the window (what a reviewer clicks)."""
    span_s = max(60, (window.end_ms - window.start_ms) // 1000 * 3)
    end = window.end_ms / 1000
    return (
        f"{base_url.rstrip('/')}/graph?g0.expr={quote(query, safe='')}&g0.tab=0"
        f"&g0.range_input={span_s}s&g0.end_input={end:.0f}"
    )


@dataclass(frozen=True, slots=True)
class Baseline:
    """Robust location and scale of a reference sample."""

    median: float
    scale: float
    n: int


def robust_baseline(reference: np.ndarray, *, rel_floor: float = 0.01, abs_floor: float = 1e-9,
                    tail: bool = True) -> Baseline | None:
    """Median and a robust scale: max(1.4826·MAD, (q99-q01)/4.65, rel_floor·|median|, abs_floor).

    The tail term (``tail=True``) keeps a series that often spikes from producing huge z-scores on its ordinary
    spikes; leave it out when the reference is a handful of buckets that may include other incidents (the tail
    would then be those incidents). The floors keep constant series (MAD 0) from turning rounding noise into
    anomalies. None when < 3 finite points.
    """
    ref = reference[np.isfinite(reference)]
    if ref.size < 3:
        return None
    med = float(np.median(ref))
    mad = float(np.median(np.abs(ref - med))) * _MAD_TO_SIGMA
    scale = max(mad, rel_floor * abs(med), abs_floor)
    if tail:
        q01, q99 = np.quantile(ref, [0.01, 0.99])
        scale = max(scale, float(q99 - q01) / _TAIL_SPAN_SIGMAS)
    return Baseline(med, scale, int(ref.size))


def _sorted_quantile(srt: np.ndarray, n_ok: np.ndarray, q: float) -> np.ndarray:
    """Quantile per column of a column-sorted matrix whose NaNs sit at the bottom (linear interpolation)."""
    pos = q * (np.maximum(n_ok, 1) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.ceil(pos).astype(np.int64)
    cols = np.arange(srt.shape[1])
    frac = pos - lo
    return srt[lo, cols] * (1.0 - frac) + srt[hi, cols] * frac


def _column_baselines(ref: np.ndarray, *, rel_floor: float = 0.01, abs_floor: float = 1e-9,
                      tail: bool = True) -> list[Baseline | None]:
    """:func:`robust_baseline` of every column at once (two sorts instead of a median call per column)."""
    ref = np.where(np.isfinite(ref), ref, np.nan)
    n_ok = np.isfinite(ref).sum(axis=0)
    if ref.shape[0] == 0:
        return [None] * ref.shape[1]
    srt = np.sort(ref, axis=0)  # NaN sorts last
    med = _sorted_quantile(srt, n_ok, 0.5)
    dev = np.sort(np.abs(ref - med), axis=0)
    mad = _sorted_quantile(dev, n_ok, 0.5) * _MAD_TO_SIGMA
    parts = [mad, rel_floor * np.abs(med), np.full_like(med, abs_floor)]
    if tail:
        parts.append((_sorted_quantile(srt, n_ok, 0.99) - _sorted_quantile(srt, n_ok, 0.01)) / _TAIL_SPAN_SIGMAS)
    scale = np.maximum.reduce(parts)
    return [Baseline(float(m), float(c), int(n)) if n >= 3 else None
            for m, c, n in zip(med, scale, n_ok, strict=True)]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def metric_anomalies(
    series: Iterable[Series], window: Window, *, reference: Mapping[tuple[str, str], Series] | None = None,
    pre_window_ms: int = 3_600_000, guard_ms: int = 0, z_threshold: float = DEFAULT_Z_THRESHOLD,
    min_points: int = 1, rel_floor: float = 0.01,
) -> list[EvidenceItem]:
    """Metric anomalies of every series inside ``window`` against a robust baseline.

    Reference: ``reference[(service, signal)]`` when given (a known-normal period; points within ``guard_ms`` of
    the window are excluded so the incident never becomes its own baseline), else the same series over
    ``pre_window_ms`` before the window. The score is the robust |z| of the ``min_points``-th most extreme point
    (``min_points=2`` asks for a deviation that lasts at least two samples). Series without enough reference or
    window points are skipped — the caller can see which from :func:`coverage`. ``rel_floor``: the scale is at
    least this fraction of the baseline median, so a change must be at least ``z_threshold × rel_floor`` of the usual
    level to count, however quiet the series was.
    """
    lo_guard, hi_guard = window.start_ms - guard_ms, window.end_ms + guard_ms
    # Series that share their timestamp arrays (the columns of one scrape table) are scored together: one
    # median/quantile call per table instead of per column keeps a few hundred series well under 50 ms.
    groups: dict[tuple[int, int], list[tuple[Series, Series | None]]] = defaultdict(list)
    for s in series:
        ref_s = reference.get((s.service, s.signal)) if reference is not None else None
        groups[(id(s.timestamps_ms), id(ref_s.timestamps_ms) if ref_s is not None else 0)].append((s, ref_s))
    out: list[EvidenceItem] = []
    for members in groups.values():
        s0, r0 = members[0]
        in_win = (s0.timestamps_ms >= window.start_ms) & (s0.timestamps_ms <= window.end_ms)
        if int(in_win.sum()) < min_points:
            continue
        if r0 is not None:
            keep = (r0.timestamps_ms < lo_guard) | (r0.timestamps_ms > hi_guard)
            ref = np.stack([r.values[keep] for _, r in members], axis=1)  # type: ignore[union-attr]
        else:
            keep = (s0.timestamps_ms >= window.start_ms - pre_window_ms) & (s0.timestamps_ms < lo_guard)
            ref = np.stack([m.values[keep] for m, _ in members], axis=1)
        obs = np.stack([m.values[in_win] for m, _ in members], axis=1)
        obs_ts = s0.timestamps_ms[in_win]
        bases = _column_baselines(ref, rel_floor=rel_floor)
        for j, (s, _) in enumerate(members):
            base = bases[j]
            if base is None:
                continue
            item = _metric_item(s, window, obs[:, j], obs_ts, base, z_threshold, min_points)
            if item is not None:
                out.append(item)
    return out


def _metric_item(s: Series, window: Window, obs: np.ndarray, obs_ts: np.ndarray, base: Baseline,
                 z_threshold: float, min_points: int) -> EvidenceItem | None:
    finite = np.isfinite(obs)
    if int(finite.sum()) < min_points:
        return None
    obs, obs_ts = obs[finite], obs_ts[finite]
    z = (obs - base.median) / base.scale
    order = np.argsort(-np.abs(z), kind="stable")
    pick = order[min(min_points, z.size) - 1]
    zp = float(z[pick])
    strength = abs(zp)
    if not strength >= z_threshold:
        return None
    direction: Direction = "up" if zp > 0 else "down"
    same_side = (z * math.copysign(1.0, zp)) >= z_threshold
    onset = int(obs_ts[np.argmax(same_side)]) if same_side.any() else int(obs_ts[pick])
    observed = float(obs[order[0]])
    attrs = {"signal_class": classify_signal(s.signal), "side": signal_side(s.signal),
             "baseline_points": str(base.n), "baseline_scale": _fmt(base.scale),
             **{k: str(v) for k, v in s.attributes.items()}}
    what = f"{s.signal} of {s.service}"
    if "caller" in s.attributes and "callee" in s.attributes:
        what = f"{s.signal} on call {s.attributes['caller']} -> {s.attributes['callee']}"
    summary = (f"{what} went {direction} to {_fmt(observed)} (baseline median {_fmt(base.median)}, "
               f"robust z {zp:+.1f})")
    return EvidenceItem(
        evidence_id=evidence_id("metric_anomaly", s.service, s.signal, window), kind="metric_anomaly",
        service=s.service, signal=s.signal, summary=summary, direction=direction, score=round(strength, 3),
        onset_ms=onset, baseline=base.median, observed=observed, source_link=s.source_link, attributes=attrs,
    )


def edges_from_correlation(
    series: Iterable[Series], window: Window, *, min_r: float = 0.6, context_ms: int | None = None,
) -> set[tuple[str, str]]:
    """A dependency graph guessed from latency co-movement, for data that comes without call-graph or traces.

    Two services whose latency series correlate (Pearson r >= ``min_r`` over the window plus an equal stretch
    before it) are linked; the edge points from the slower to the faster one, because a caller's response time
    contains its callee's. Only service-level latency series take part (``classify_signal == 'latency'``, not
    client-side or host-level ones); the first such series of a service (in name order) stands for it.
    This is a weak guess: the engine only uses it to discount a caller's latency that its callee explains.
    """
    span = window.end_ms - window.start_ms
    lo = window.start_ms - (span if context_ms is None else context_ms)
    pick: dict[str, Series] = {}
    for s in sorted(series, key=lambda x: (x.service, x.signal)):
        if classify_signal(s.signal) == "latency" and signal_side(s.signal) in ("pod", "server") \
                and "caller" not in s.attributes and s.service not in pick:
            pick[s.service] = s
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for svc, s in pick.items():
        keep = (s.timestamps_ms >= lo) & (s.timestamps_ms <= window.end_ms)
        rows[svc] = (s.timestamps_ms[keep], s.values[keep])
    edges: set[tuple[str, str]] = set()
    names = sorted(rows)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ta, va = rows[a]
            tb, vb = rows[b]
            common, ia, ib = np.intersect1d(ta, tb, return_indices=True)
            if common.size < 5:
                continue
            x, y = va[ia], vb[ib]
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            if x.size < 5 or np.std(x) == 0 or np.std(y) == 0:
                continue
            r = float(np.corrcoef(x, y)[0, 1])
            if r >= min_r:
                edges.add((a, b) if np.median(x) >= np.median(y) else (b, a))
    return edges


def network_time_series(client_side: Series, server_side: Series, *, caller: str, callee: str,
                        tolerance_ms: int = 30_000) -> Series:
    """Network share of a call edge's latency: client-observed minus server-observed, aligned on timestamps.

    The series is attributed to the callee (where the delay is usually injected or felt) and carries
    caller/callee attributes so the engine can split the blame between the two endpoints.
    """
    if server_side.values.size == 0 or client_side.values.size == 0:
        raise EvidenceInputError(f"edge {caller}->{callee}: a side of the edge has no samples")
    # The two sides are scraped independently: pair each client sample with the nearest server sample and
    # leave it NaN (ignored) when none lies within ``tolerance_ms``.
    sts = server_side.timestamps_ms
    svals = server_side.values
    if sts.size > 1 and np.any(np.diff(sts) < 0):
        order = np.argsort(sts, kind="stable")
        sts, svals = sts[order], svals[order]
    pos = np.clip(np.searchsorted(sts, client_side.timestamps_ms), 1, max(1, sts.size - 1))
    left = np.clip(pos - 1, 0, sts.size - 1)
    right = np.clip(pos, 0, sts.size - 1)
    cts = client_side.timestamps_ms
    nearest = np.where(np.abs(sts[left] - cts) <= np.abs(sts[right] - cts), left, right)
    diff = client_side.values - svals[nearest]
    diff = np.where(np.abs(sts[nearest] - cts) <= tolerance_ms, diff, np.nan)
    # asarray keeps the caller's timestamp array when it is already int64, so edges of one table stay grouped
    return Series(callee, f"network_time[{caller}->{callee}]", np.asarray(cts, dtype=np.int64),
                  np.asarray(diff, dtype=np.float64),
                  source_link=client_side.source_link,
                  attributes={"caller": caller, "callee": callee, "edge_metric": "network_time"})


# ----------------------------------------------------------------------------------------------------------------
# Traces
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    service: str
    operation: str
    start_ms: int
    duration_us: float
    error: bool = False


@dataclass(slots=True)
class TraceProfile:
    """Summary of the spans of one time bucket (typically one minute)."""

    start_ms: int
    source_link: str = ""
    count: Counter = field(default_factory=Counter)             # (service, op) -> spans
    errors: Counter = field(default_factory=Counter)            # (service, op) -> error spans
    median_us: dict = field(default_factory=dict)               # (service, op) -> median duration
    fanout: Counter = field(default_factory=Counter)            # ((svc, op), (child svc, child op)) -> children
    service_edges: Counter = field(default_factory=Counter)     # (caller svc, callee svc) -> calls
    callee: dict = field(default_factory=dict)                  # client (svc, op) -> remote service it calls
    last_child: Counter = field(default_factory=Counter)        # ((svc, op), (child svc, child op)) -> parent spans
                                                                # whose last-started child is that one


def trace_profile(spans: Iterable[Span], *, start_ms: int, source_link: str = "") -> TraceProfile:
    """Count, error count, median latency per (service, operation), call fan-out and service call edges."""
    spans = list(spans)
    by_id = {s.span_id: (s.service, s.operation) for s in spans}
    prof = TraceProfile(start_ms=start_ms, source_link=source_link)
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    last: dict[str, tuple[int, tuple[str, str]]] = {}
    for s in spans:
        key = (s.service, s.operation)
        prof.count[key] += 1
        if s.error:
            prof.errors[key] += 1
        durations[key].append(s.duration_us)
        parent = by_id.get(s.parent_id)
        if parent is not None:
            prof.fanout[(parent, key)] += 1
            if s.parent_id not in last or s.start_ms >= last[s.parent_id][0]:
                last[s.parent_id] = (s.start_ms, key)
            if parent[0] != s.service:
                prof.service_edges[(parent[0], s.service)] += 1
    prof.median_us = {k: float(np.median(v)) for k, v in durations.items()}
    for pid, (_, child) in last.items():
        prof.last_child[(by_id[pid], child)] += 1
    # A span whose children run in another service is a client (outbound) span: its latency measures the call
    # edge (callee time + network), not the caller's own work.
    remote: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for (parent, child), n in prof.fanout.items():
        if parent[0] != child[0]:
            remote[parent][child[0]] += n
    for key, c in remote.items():
        svc, n = c.most_common(1)[0]
        if n * 2 >= prof.count[key]:
            prof.callee[key] = svc
    return prof


def trace_hotspots(
    window_profiles: Sequence[TraceProfile], reference_profiles: Sequence[TraceProfile], window: Window, *,
    z_threshold: float = DEFAULT_Z_THRESHOLD, min_spans: int = 5,
) -> list[EvidenceItem]:
    """Operations whose latency, error ratio or call fan-out in the window departs from the reference buckets.

    - latency: max over window buckets of the median duration per (service, operation); a client span (one
      whose children run in another service) measures the call edge and is reported against the callee with
      caller/callee attributes;
    - errors: error spans / spans per (service, operation);
    - fan-out: children per parent span, per (parent operation -> child operation), attributed to the parent's
      service (a service that stops calling, or calls more, changed its own behaviour: return/exception faults);
      the strongest change per parent operation is reported.
    Buckets with fewer than ``min_spans`` spans of an operation do not count for it. Latency baselines keep the
    tail term (latency is spiky); ratios do not (the few reference buckets may hold other incidents).
    """
    if not window_profiles or len(reference_profiles) < 3:
        return []
    link = window_profiles[0].source_link
    out: list[EvidenceItem] = []

    def emit(service: str, signal: str, feature: str, z: float, base: Baseline, observed: float, onset: int,
             summary: str, extra: Mapping[str, str]) -> None:
        direction: Direction = "up" if z > 0 else "down"
        out.append(EvidenceItem(
            evidence_id=evidence_id("trace_hotspot", service, signal, window), kind="trace_hotspot",
            service=service, signal=signal, summary=summary, direction=direction, score=round(abs(z), 3),
            onset_ms=onset, baseline=base.median, observed=observed, source_link=link,
            attributes={"signal_class": feature, "side": "trace", "baseline_points": str(base.n), **extra},
        ))

    def table(profiles: Sequence[TraceProfile], keys: Sequence, get: Callable[[TraceProfile, Any], float]
              ) -> np.ndarray:
        return np.array([[get(p, k) for k in keys] for p in profiles], dtype=np.float64).reshape(
            len(profiles), len(keys))

    starts = [p.start_ms for p in window_profiles]
    keys = sorted(set().union(*(p.count.keys() for p in window_profiles)))
    n_ref = table(reference_profiles, keys, lambda p, k: p.count.get(k, 0))
    n_win = table(window_profiles, keys, lambda p, k: p.count.get(k, 0))
    ok_ref, ok_win = n_ref >= min_spans, n_win >= min_spans
    with np.errstate(invalid="ignore", divide="ignore"):
        lat_ref = np.where(ok_ref, table(reference_profiles, keys, lambda p, k: p.median_us.get(k, np.nan)), np.nan)
        lat_win = np.where(ok_win, table(window_profiles, keys, lambda p, k: p.median_us.get(k, np.nan)), np.nan)
        err_ref = np.where(ok_ref, table(reference_profiles, keys, lambda p, k: p.errors.get(k, 0)) / n_ref, np.nan)
        err_win = np.where(ok_win, table(window_profiles, keys, lambda p, k: p.errors.get(k, 0)) / n_win, np.nan)
    lat_bases = _column_baselines(lat_ref, rel_floor=0.05, abs_floor=1.0, tail=True)
    err_bases = _column_baselines(err_ref, rel_floor=0.0, abs_floor=0.01, tail=False)
    for j, key in enumerate(keys):
        service, op = key
        base = lat_bases[j]
        col = lat_win[:, j]
        if base is not None and np.isfinite(col).any():
            i = int(np.nanargmax(col))
            val, onset = float(col[i]), starts[i]
            z = (val - base.median) / base.scale
            if z >= z_threshold:
                callee = next((p.callee[key] for p in window_profiles if key in p.callee), None)
                text = (f"median latency {_fmt(val / 1000)} ms vs baseline {_fmt(base.median / 1000)} ms "
                        f"(robust z {z:+.1f})")
                if callee is None:
                    emit(service, f"latency:{op}", "latency", z, base, val, onset, f"{op} in {service}: {text}",
                         {"operation": op})
                else:
                    emit(callee, f"call_latency:{service}->{callee}:{op}", "latency", z, base, val, onset,
                         f"calls {service} -> {callee} ({op}): {text}",
                         {"operation": op, "caller": service, "callee": callee, "edge_metric": "call_latency"})
        base = err_bases[j]
        col = err_win[:, j]
        if base is not None and np.isfinite(col).any() and np.nanmax(col) > 0:
            i = int(np.nanargmax(col))
            val, onset = float(col[i]), starts[i]
            z = (val - base.median) / base.scale
            if z >= z_threshold:
                emit(service, f"errors:{op}", "errors", z, base, val, onset,
                     f"{op} in {service}: error ratio {val:.1%} vs baseline {base.median:.1%}", {"operation": op})
    # call fan-out: children per parent span (pairs seen only in the reference are calls that stopped)
    pairs = sorted(set().union(*(p.fanout.keys() for p in window_profiles),
                               *(p.fanout.keys() for p in reference_profiles)))
    if not pairs:
        return out
    parents = [pair[0] for pair in pairs]
    with np.errstate(invalid="ignore", divide="ignore"):
        pn_ref = table(reference_profiles, parents, lambda p, k: p.count.get(k, 0))
        pn_win = table(window_profiles, parents, lambda p, k: p.count.get(k, 0))
        fan_ref = np.where(pn_ref >= min_spans, table(reference_profiles, pairs, lambda p, k: p.fanout.get(k, 0))
                           / pn_ref, np.nan)
        fan_win = np.where(pn_win >= min_spans, table(window_profiles, pairs, lambda p, k: p.fanout.get(k, 0))
                           / pn_win, np.nan)
    fan_bases = _column_baselines(fan_ref, rel_floor=0.02, abs_floor=0.01, tail=False)
    best: dict[tuple[str, str], tuple[float, Baseline, float, int, str]] = {}
    for j, (parent, child) in enumerate(pairs):
        base = fan_bases[j]
        col = fan_win[:, j]
        if base is None or not np.isfinite(col).any():
            continue
        # The median over window buckets: a fan-out change from a code fault persists for the whole fault.
        val = float(np.nanmedian(col))
        z = (val - base.median) / base.scale
        if abs(z) < z_threshold:
            continue
        dev = np.abs(col - base.median) / base.scale >= z_threshold
        onset = starts[int(np.argmax(dev))] if dev.any() else starts[int(np.argmax(np.isfinite(col)))]
        k = (parent[0], f"fanout:{parent[1]}")
        if k not in best or abs(z) > abs(best[k][0]):
            best[k] = (z, base, val, onset, f"{child[0]}:{child[1]}")
    for (service, signal), (z, base, val, onset, child) in sorted(best.items()):
        emit(service, signal, "call_pattern", z, base, val, onset,
             f"{signal.removeprefix('fanout:')} in {service} made {val:.2f} calls to {child} per request vs "
             f"baseline {base.median:.2f} (robust z {z:+.1f})", {"child": child})
    _stopping_points(window_profiles, reference_profiles, pairs, z_threshold, min_spans, emit)
    return out


def _stopping_points(window_profiles: Sequence[TraceProfile], reference_profiles: Sequence[TraceProfile],
                     pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]], z_threshold: float, min_spans: int,
                     emit: Callable[..., None]) -> None:
    """Where requests stop: a jump in the share of a parent operation's spans whose *last* call goes to another
    service. A caller that gives up right after calling X (X answered with an error or an unusable result) changes
    its own fan-out too, but the fan-out evidence alone blames the caller; this item names X. Reported against X
    with class ``errors`` and the caller in ``stopped_caller`` (not ``caller``/``callee``: it is no edge delay).
    The strongest such jump per (X, caller operation) is kept; window value = median over window buckets. Items go
    out through ``emit`` (the one of :func:`trace_hotspots`)."""
    callee_of: dict[tuple[str, str], str] = {}
    for p in (*window_profiles, *reference_profiles):
        for k, v in p.callee.items():
            callee_of.setdefault(k, v)
    # only a pair that ends some window request can have jumped up
    ending = set().union(*(p.last_child.keys() for p in window_profiles))
    remote = [(pa, ch, ch[0] if ch[0] != pa[0] else callee_of.get(ch)) for pa, ch in pairs if (pa, ch) in ending]
    remote = [(pa, ch, svc) for pa, ch, svc in remote if svc is not None and svc != pa[0]]
    if not remote:
        return
    parents = [pa for pa, _, _ in remote]

    def ratios(profiles: Sequence[TraceProfile]) -> np.ndarray:
        n = np.array([[p.count.get(pa, 0) for pa in parents] for p in profiles], dtype=np.float64)
        k = np.array([[p.last_child.get((pa, ch), 0) for pa, ch, _ in remote] for p in profiles], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n >= min_spans, k / n, np.nan).reshape(len(profiles), len(remote))

    r_ref, r_win = ratios(reference_profiles), ratios(window_profiles)
    bases = _column_baselines(r_ref, rel_floor=0.02, abs_floor=0.01, tail=False)
    starts = [p.start_ms for p in window_profiles]
    best: dict[tuple[str, str, str], tuple[float, Baseline, float, int, str]] = {}
    for j, (pa, ch, svc) in enumerate(remote):
        base, col = bases[j], r_win[:, j]
        if base is None or not np.isfinite(col).any():
            continue
        val = float(np.nanmedian(col))
        z = (val - base.median) / base.scale
        if z < z_threshold:
            continue
        dev = (col - base.median) / base.scale >= z_threshold
        onset = starts[int(np.argmax(dev))] if dev.any() else starts[int(np.argmax(np.isfinite(col)))]
        k = (svc, pa[0], pa[1])
        if k not in best or z > best[k][0]:
            best[k] = (z, base, val, onset, ch[1])
    for (svc, caller, op), (z, base, val, onset, child_op) in sorted(best.items()):
        emit(svc, f"stops_after:{caller}:{op}->{child_op}", "errors", z, base, val, onset,
             f"{val:.0%} of {op} requests in {caller} ended right after calling {svc} ({child_op}) vs "
             f"{base.median:.0%} normally (robust z {z:+.1f}): the caller gave up after {svc} answered",
             {"stopped_caller": caller, "operation": child_op})


def service_edges_from_traces(profiles: Iterable[TraceProfile]) -> set[tuple[str, str]]:
    """(caller, callee) service pairs seen in traces: a dependency graph when none is configured."""
    edges: set[tuple[str, str]] = set()
    for p in profiles:
        edges.update(p.service_edges.keys())
    return edges


# ----------------------------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------------------------

_MASKS = (
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<uuid>"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "<ip>"),
    (re.compile(r"\b[0-9a-f]{12,}\b", re.I), "<hex>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}[T ][\d:.,]+Z?\b"), "<ts>"),
    # a number not glued to a word before it ("v2", "sha256" stay); units after it ("17ms") are kept
    (re.compile(r"(?<![A-Za-z_\d.])[-+]?\d+(?:\.\d+)?"), "<num>"),
)


def log_template(message: str, *, max_len: int = 300) -> str:
    """Template of a log line: ids, addresses, timestamps and numbers masked; whitespace collapsed."""
    t = message[:max_len * 4]
    for rx, repl in _MASKS:
        t = rx.sub(repl, t)
    return " ".join(t.split())[:max_len]


@dataclass(frozen=True, slots=True)
class LogRecord:
    timestamp_ms: int
    service: str
    message: str
    source_link: str = ""


def log_bursts(
    records: Iterable[LogRecord], window: Window, *, reference_ms: tuple[int, int] | None = None,
    z_threshold: float = DEFAULT_Z_THRESHOLD, min_count: int = 3,
) -> list[EvidenceItem]:
    """Log templates whose count in the window exceeds their reference rate (Poisson z), per service.

    Reference: records in ``reference_ms`` (default: the same length immediately before the window). A template
    never seen in the reference but seen ``min_count`` times in the window is a burst ("new template").
    """
    win_len = window.end_ms - window.start_ms + 1
    ref_lo, ref_hi = reference_ms if reference_ms is not None else (window.start_ms - win_len, window.start_ms - 1)
    ref_len = max(1, ref_hi - ref_lo + 1)
    in_win: Counter = Counter()
    in_ref: Counter = Counter()
    first: dict[tuple[str, str], tuple[int, str]] = {}
    for r in records:
        key = (r.service, log_template(r.message))
        if window.start_ms <= r.timestamp_ms <= window.end_ms:
            in_win[key] += 1
            if key not in first or r.timestamp_ms < first[key][0]:
                first[key] = (r.timestamp_ms, r.source_link)
        elif ref_lo <= r.timestamp_ms <= ref_hi:
            in_ref[key] += 1
    out: list[EvidenceItem] = []
    for key, n in sorted(in_win.items()):
        if n < min_count:
            continue
        expected = in_ref.get(key, 0) * win_len / ref_len
        z = (n - expected) / math.sqrt(expected + 1.0)
        if z < z_threshold:
            continue
        service, tmpl = key
        severe = bool(re.search(r"error|exception|fail|fatal|panic|refused|timeout", tmpl, re.I))
        novelty = "new template" if in_ref.get(key, 0) == 0 else "burst"
        onset, link = first[key]
        out.append(EvidenceItem(
            evidence_id=evidence_id("log_burst", service, tmpl, window), kind="log_burst", service=service,
            signal=tmpl, summary=f"{service}: {n}x '{tmpl[:120]}' in window vs {expected:.1f} expected ({novelty})",
            direction="up", score=round(z, 3), onset_ms=onset, baseline=round(expected, 3), observed=float(n),
            source_link=link, attributes={"signal_class": "errors" if severe else "logs", "side": "pod",
                                          "novelty": novelty},
        ))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Changes
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    timestamp_ms: int
    service: str
    change_type: str   # deploy | config | scale | feature_flag | ...
    description: str
    source_link: str = ""


def change_evidence(changes: Iterable[ChangeRecord], window: Window, *, lookback_ms: int = 3_600_000,
                    half_life_ms: int = 900_000) -> list[EvidenceItem]:
    """Deploy/config changes from ``lookback_ms`` before the window to its end; fresher changes score higher.

    Score = 10 · 2^(-age/half_life) where age is measured from the change to the window start (0 inside it).
    """
    out: list[EvidenceItem] = []
    for c in changes:
        if not (window.start_ms - lookback_ms <= c.timestamp_ms <= window.end_ms):
            continue
        age = max(0, window.start_ms - c.timestamp_ms)
        score = 10.0 * 2.0 ** (-age / half_life_ms)
        signal = f"{c.change_type}:{c.description[:80]}"
        out.append(EvidenceItem(
            evidence_id=evidence_id("change_event", c.service, f"{signal}@{c.timestamp_ms}", window),
            kind="change_event", service=c.service, signal=signal,
            summary=f"{c.change_type} of {c.service} {age // 60000} min before the incident: {c.description[:200]}",
            direction="none", score=round(score, 3), onset_ms=c.timestamp_ms, baseline=None, observed=None,
            source_link=c.source_link, attributes={"signal_class": "change", "side": "pod",
                                                   "change_type": c.change_type},
        ))
    return out


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """A firing alert (e.g. from Alertmanager) about one service."""

    starts_at_ms: int
    service: str
    name: str
    severity: str = "warning"
    summary: str = ""
    source_link: str = ""


_SEVERITY_SCORE = {"critical": 20.0, "page": 20.0, "error": 12.0, "high": 12.0, "warning": 8.0, "medium": 8.0,
                   "info": 5.0, "low": 5.0}


def alert_evidence(
    alerts: Iterable[AlertRecord], window: Window, *, lookback_ms: int = 900_000,
) -> list[EvidenceItem]:
    """Alerts that started from ``lookback_ms`` before the window to its end, scored by severity.

    An alert says *where it hurts* more than *why*: the engine weighs it like the symptom class its name implies.
    """
    out: list[EvidenceItem] = []
    for a in alerts:
        if not (window.start_ms - lookback_ms <= a.starts_at_ms <= window.end_ms):
            continue
        cls = classify_signal(a.name)
        out.append(EvidenceItem(
            evidence_id=evidence_id("alert", a.service, a.name, window), kind="alert", service=a.service,
            signal=a.name, summary=f"alert {a.name} ({a.severity}) on {a.service}: {a.summary[:200]}".rstrip(": "),
            direction="none", score=_SEVERITY_SCORE.get(a.severity.lower(), 8.0), onset_ms=a.starts_at_ms,
            baseline=None, observed=None, source_link=a.source_link,
            attributes={"signal_class": cls, "side": signal_side(a.name), "severity": a.severity},
        ))
    return out


def coverage(series: Iterable[Series], window: Window) -> dict[str, int]:
    """How many series have points in the window (for 'what data would decide it' when abstaining)."""
    n = with_points = 0
    for s in series:
        n += 1
        with_points += int(np.any((s.timestamps_ms >= window.start_ms) & (s.timestamps_ms <= window.end_ms)))
    return {"series": n, "series_with_window_points": with_points}

"""Metric evidence from the Prometheus HTTP API (``/api/v1/query_range``), with httpx.

For an incident's services, every configured query is run over the pre-incident window plus the incident window;
the series go through :func:`pilothouse.sensing.evidence.metric_anomalies` (robust median/MAD baseline from the
pre-incident part). Never fails an incident: an unreachable or erroring Prometheus gives no metric items and a status
string saying why, which the incident's alert evidence carries as ``metrics_source``.

The reference leaves out the times a service was itself alerting (``reference_exclude_query``, by default
Prometheus' own ``ALERTS`` series): a baseline is the service's normal behaviour, and an earlier incident inside the
pre-incident window would otherwise widen it until the same fault, repeated, no longer stands out.

*Context* queries (instant, at the end of the window) add a service's current state to its metric items as
attributes, e.g. ``replicas`` — what a remedy must start from (scaling "to 2" a service that already has 2 is no fix).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping

import httpx
import numpy as np

from pilothouse.sensing import evidence as ev

log = logging.getLogger("pilothouse.sensing.prometheus")


class PrometheusMetrics:
    """``(services, window) -> (evidence items, status)`` over one Prometheus server."""

    def __init__(self, base_url: str, queries: Mapping[str, str], *, timeout_s: float = 2.0, step_s: int = 15,
                 pre_window_ms: int = 1_800_000, client: httpx.Client | None = None,
                 context_queries: Mapping[str, str] | None = None,
                 reference_exclude_query: str | None = None, rel_floor: float = 0.05) -> None:
        self.base_url = base_url.rstrip("/")
        self.queries = dict(queries)
        self.context_queries = dict(context_queries or {})
        self.reference_exclude_query = reference_exclude_query
        # a live service's p99 or CPU wanders by several per cent between quiet scrapes: at z 4 a change must be at
        # least 20 % of the usual level to be evidence (the robust scale alone turned a 12 % p99 wobble into z 12)
        self.rel_floor = rel_floor
        self.step_s = step_s
        self.pre_window_ms = pre_window_ms
        self._client = client or httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def services_regex(services: list[str]) -> str:
        """A PromQL regex alternation matching exactly these service names."""
        return "|".join(re.escape(s) for s in sorted(services)) or "^$"

    def query_range(self, query: str, start_ms: int, end_ms: int) -> dict:
        """One ``query_range`` call; raises httpx errors, or ValueError for a body that is not JSON."""
        r = self._client.get(f"{self.base_url}/api/v1/query_range", params={
            "query": query, "start": f"{start_ms / 1000:.3f}", "end": f"{end_ms / 1000:.3f}",
            "step": f"{self.step_s}s"})
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
            return r.json()  # Prometheus answers errors as {"status": "error", ...}; series_from_prometheus reports
        r.raise_for_status()
        return r.json()

    def without_alerting_reference(self, series: list[ev.Series], regex: str, window: ev.Window,
                                   failures: list[str]) -> list[ev.Series]:
        """``series`` with their pre-window points blanked (NaN: the statistics skip them) within one step of a time
        the service had an alert pending or firing. A series that would keep fewer than 3 reference points is left
        as it was (a thin reference is worse than a contaminated one: no baseline at all means no evidence)."""
        assert self.reference_exclude_query is not None
        start = window.start_ms - self.pre_window_ms
        try:
            body = self.query_range(self.reference_exclude_query.replace("$services", regex), start, window.start_ms)
            alerting = ev.series_from_prometheus(body, signal="alerting")
        except (httpx.HTTPError, ValueError, ev.EvidenceInputError) as e:
            failures.append(f"reference exclusion: {type(e).__name__}: {str(e)[:200]}")
            return series
        times: dict[str, np.ndarray] = {}
        for a in alerting:
            hot = a.timestamps_ms[np.isfinite(a.values) & (a.values > 0)]
            times[a.service] = np.sort(np.concatenate([times.get(a.service, np.empty(0, dtype=hot.dtype)), hot]))
        step_ms = self.step_s * 1000
        out = []
        for s in series:
            hot = times.get(s.service)
            if hot is None or not hot.size:
                out.append(s)
                continue
            ts = s.timestamps_ms
            # distance to the nearest alerting sample, per point
            i = np.clip(np.searchsorted(hot, ts), 1, hot.size) - 1
            j = np.clip(i + 1, 0, hot.size - 1)
            near = np.minimum(np.abs(ts - hot[i]), np.abs(ts - hot[j])) <= step_ms
            drop = near & (ts < window.start_ms)
            before = ts < window.start_ms
            if not drop.any() or int((before & ~drop & np.isfinite(s.values)).sum()) < 3:
                out.append(s)
                continue
            values = s.values.astype(float, copy=True)
            values[drop] = np.nan
            out.append(dataclasses.replace(s, values=values))
        return out

    def context(self, regex: str, window: ev.Window, failures: list[str]) -> dict[str, dict[str, str]]:
        """service -> {attribute: value} from the context queries' instant vectors at the window's end (a series
        without a ``service`` label or with a non-finite value is skipped; a failing query is added to
        ``failures``)."""
        out: dict[str, dict[str, str]] = {}
        for name, template in sorted(self.context_queries.items()):
            try:
                r = self._client.get(f"{self.base_url}/api/v1/query", params={
                    "query": template.replace("$services", regex), "time": f"{window.end_ms / 1000:.3f}"})
                body = r.json()
                if body.get("status") != "success":
                    raise ValueError(f"{body.get('errorType', 'error')}: {str(body.get('error', ''))[:150]}")
                for sample in body["data"]["result"]:
                    svc = sample.get("metric", {}).get("service")
                    value = float(sample["value"][1])
                    if svc and math.isfinite(value):
                        out.setdefault(svc, {})[name] = str(int(value)) if value.is_integer() else f"{value:.6g}"
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                failures.append(f"context {name}: {type(e).__name__}: {str(e)[:200]}")
        return out

    def __call__(self, services: list[str], window: ev.Window) -> tuple[list[ev.EvidenceItem], str]:
        if not services:
            return [], "prometheus: no services to query"
        started = time.perf_counter()
        regex = self.services_regex(services)
        series: list[ev.Series] = []
        failures: list[str] = []
        for signal, template in sorted(self.queries.items()):
            query = template.replace("$services", regex)
            try:
                body = self.query_range(query, window.start_ms - self.pre_window_ms, window.end_ms)
                series += ev.series_from_prometheus(
                    body, signal=signal, source_link=ev.prometheus_graph_link(self.base_url, query, window))
            except (httpx.HTTPError, ValueError, ev.EvidenceInputError) as e:
                failures.append(f"{signal}: {type(e).__name__}: {str(e)[:200]}")
        context_failures: list[str] = []
        if series and self.reference_exclude_query:
            series = self.without_alerting_reference(series, regex, window, context_failures)
        items = ev.metric_anomalies(series, window, pre_window_ms=self.pre_window_ms,
                                    rel_floor=self.rel_floor) if series else []
        if items and self.context_queries:
            context = self.context(regex, window, context_failures)
            items = [ev.EvidenceItem(**{**i.to_dict(), "attributes": {**context[i.service], **i.attributes}})
                     if context.get(i.service) else i for i in items]
        if failures:
            log.warning("prometheus queries failed", extra={"failures": failures})
        if failures and len(failures) == len(self.queries):
            return items, "prometheus unreachable or failing: " + "; ".join(failures)[:500]
        if context_failures:
            log.warning("prometheus context queries failed", extra={"failures": context_failures})
        status = "prometheus" + (f" (partial: {len(failures)} of {len(self.queries)} queries failed)" if failures else "")
        status += f" ({len(context_failures)} context/reference queries failed)" if context_failures else ""
        log.debug("metric evidence", extra={"seconds": time.perf_counter() - started, "items": len(items)})
        return items, status

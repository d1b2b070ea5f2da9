"""Prometheus exposition of the simulated fleet (a custom collector over the live state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pilothouse.fleet.model import BUCKETS_S, SPEC, Fleet

MIB = 1024 * 1024


class FleetCollector(Collector):
    """Reads the fleet at scrape time; `get_fleet` returns the live fleet (it is replaced on atomic updates)."""

    def __init__(self, get_fleet: Callable[[], Fleet]) -> None:
        self._get_fleet = get_fleet

    def collect(self) -> Iterator[Metric]:
        fleet = self._get_fleet()
        s = fleet.state
        si = ["service", "instance"]
        requests = CounterMetricFamily("fleet_requests", "Requests served, by HTTP status code.",
                                       labels=[*si, "code"])
        duration = HistogramMetricFamily("fleet_request_duration_seconds",
                                         "Latency of requests that were served (shed requests are not timed).",
                                         labels=si)
        cpu = GaugeMetricFamily("fleet_cpu_usage_ratio", "CPU use as a fraction of the instance's limit.", labels=si)
        mem = GaugeMetricFamily("fleet_memory_bytes", "Resident memory of the instance.", labels=si)
        up = GaugeMetricFamily("fleet_up", "1 when the instance is serving, 0 when restarting, crashed or "
                                           "unreachable.", labels=si)
        weight = GaugeMetricFamily("fleet_traffic_weight", "Load-balancer weight of the instance.", labels=si)
        restarts = CounterMetricFamily("fleet_instance_restarts", "Restarts of the instance (requested or OOM).",
                                       labels=si)
        ooms = CounterMetricFamily("fleet_instance_oom_kills", "OOM kills of the instance.", labels=si)
        replicas = GaugeMetricFamily("fleet_replicas", "Configured replicas.", labels=["service"])
        mem_limit = GaugeMetricFamily("fleet_memory_limit_bytes", "Memory limit per instance.", labels=["service"])
        version = InfoMetricFamily("fleet_version", "Deployed version.", labels=["service"])
        flags = GaugeMetricFamily("fleet_feature_flag_enabled", "Feature flag state.", labels=["service", "flag"])
        err = GaugeMetricFamily("fleet_service_error_ratio", "Fraction of the service's requests that failed in the "
                                                             "last second (as seen by its callers).",
                                labels=["service"])
        lat = GaugeMetricFamily("fleet_service_latency_seconds", "Service latency quantiles over the last second.",
                                labels=["service", "quantile"])
        rps = GaugeMetricFamily("fleet_service_requests_per_second", "Offered load in the last second.",
                                labels=["service"])
        slo = GaugeMetricFamily("fleet_slo_objective", "SLO thresholds (error ratio max, p99 latency max).",
                                labels=["service", "sli"])
        tick = GaugeMetricFamily("fleet_sim_tick", "Simulated seconds since the fleet was created.")
        tick.add_metric([], s.tick)

        for name, svc in s.services.items():
            spec = SPEC[name]
            replicas.add_metric([name], len(svc.instances))
            mem_limit.add_metric([name], spec.mem_limit_mb * MIB)
            version.add_metric([name], {"version": svc.version})
            for flag, enabled in svc.flags.items():
                flags.add_metric([name, flag], 1.0 if enabled else 0.0)
            err.add_metric([name], svc.error_ratio)
            lat.add_metric([name, "0.5"], svc.p50_ms / 1000.0)
            lat.add_metric([name, "0.99"], svc.p99_ms / 1000.0)
            rps.add_metric([name], svc.rps)
            slo.add_metric([name, "error_ratio"], spec.slo_error_ratio)
            slo.add_metric([name, "latency_p99_seconds"], spec.slo_p99_ms / 1000.0)
            for inst in svc.instances:
                labels = [name, inst.name]
                for code, count in inst.requests.items():
                    requests.add_metric([*labels, code], count)
                buckets = [(_le(b), c) for b, c in zip(BUCKETS_S, inst.duration_buckets, strict=True)]
                buckets.append(("+Inf", inst.duration_count))
                duration.add_metric(labels, buckets, inst.duration_sum_s)
                cpu.add_metric(labels, inst.cpu)
                mem.add_metric(labels, inst.memory_mb * MIB)
                up.add_metric(labels, 1.0 if inst.up else 0.0)
                weight.add_metric(labels, inst.weight)
                restarts.add_metric(labels, inst.restarts)
                ooms.add_metric(labels, inst.oom_kills)
        yield from (requests, duration, cpu, mem, up, weight, restarts, ooms, replicas, mem_limit, version, flags,
                    err, lat, rps, slo, tick)


def _le(bound: float) -> str:
    return repr(float(bound))


def exposition(get_fleet: Callable[[], Fleet]) -> bytes:
    """Prometheus text format of the fleet now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(get_fleet))
    return generate_latest(registry)

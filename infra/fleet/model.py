"""Deterministic discrete-time simulation of an Online-Boutique-shaped microservice fleet.

Pure: no I/O, no clock, no global random state. One tick is one second of simulated time. Noise comes from a
counter-based hash of (seed, tick, key), so a run is a function of its seed and the sequence of injected faults and
actions — a forked copy simulated forward predicts the live fleet exactly when nothing else changes.

How a tick is computed:
1. offered load flows top-down from the frontend along the call graph (calls per caller request);
2. services are evaluated bottom-up; each instance gets a share of its service's load by traffic weight, its CPU
   utilisation sets a queueing factor (M/M/1-like) and overload sheds requests (503);
3. a caller sees each dependency's error ratio and latency as they were `hop_delay` ticks ago, so an anomaly starts
   at the root cause and reaches callers later, one hop at a time; dependency latency beyond the caller's timeout
   becomes caller errors (DeadlineExceeded).
Latency per instance is modelled as log-normal from its p50 and p99; a service's p50/p99 is the quantile of the
mixture of its instances (so one slow instance out of three shows in the service p99).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pilothouse.fleet.errors import InvalidRequest, NotFound, PreconditionFailed

TICK_S = 1.0
HISTORY = 120  # samples kept per service (propagation look-back and diagnostics)
RECENT_EVENTS = 20  # log events kept per service for diagnostics
RESTART_S = 2  # ticks an instance is out of rotation during a (rolling) restart
OOM_RESTART_S = 3  # ticks an OOM-killed instance needs to come back
WARMUP_S = 3  # ticks a new replica needs before it receives traffic
MAX_REPLICAS = 12
MAX_HORIZON_S = 1800
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
Z99 = 2.3263478740408408  # standard normal 0.99 quantile
_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------------------------------
# Topology (the Online Boutique shape)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    capacity_rps: float  # requests/s one instance serves at 100 % CPU
    p50_ms: float  # own service time (without dependencies), median
    p99_ms: float
    mem_base_mb: float
    mem_per_rps_mb: float
    mem_limit_mb: float
    replicas: int
    version: str
    flags: tuple[tuple[str, bool], ...]
    slo_error_ratio: float
    slo_p99_ms: float
    base_error_ratio: float = 0.0005


@dataclass(frozen=True)
class Edge:
    caller: str
    callee: str
    calls: float  # expected calls per caller request
    criticality: float  # probability that a failed call fails the caller's request
    timeout_ms: float
    enabled_by: tuple[str, bool] | None = None  # (caller flag, value for which the edge is used)


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("frontend", 80, 4, 20, 120, 0.5, 512, 3, "1.8.2",
                (("recommendations_enabled", True), ("ads_enabled", True)), 0.01, 250),
    ServiceSpec("checkout", 50, 8, 35, 90, 0.5, 256, 2, "1.4.0", (("email_confirmations", True),), 0.01, 200),
    ServiceSpec("recommendation", 100, 5, 25, 150, 0.4, 384, 2, "2.1.1", (), 0.02, 120),
    ServiceSpec("cart", 150, 2, 10, 80, 0.2, 256, 2, "1.3.5", (("redis_fallback", False),), 0.01, 60),
    ServiceSpec("payment", 100, 6, 30, 70, 0.2, 256, 2, "0.9.3", (), 0.01, 100),
    ServiceSpec("email", 100, 5, 25, 60, 0.2, 256, 1, "0.7.0", (), 0.02, 100),
    ServiceSpec("shipping", 200, 2, 10, 60, 0.1, 256, 2, "1.1.0", (), 0.01, 50),
    ServiceSpec("currency", 400, 1, 5, 70, 0.05, 256, 2, "1.2.4", (), 0.01, 30),
    ServiceSpec("productcatalog", 400, 1, 6, 100, 0.05, 256, 2, "1.6.0", (), 0.01, 40),
    ServiceSpec("ad", 150, 2, 12, 110, 0.2, 384, 2, "1.0.8", (), 0.05, 60),
    ServiceSpec("redis", 2000, 0.3, 2, 200, 0.1, 1024, 1, "7.2.4", (), 0.005, 15),
)

EDGES: tuple[Edge, ...] = (
    Edge("frontend", "cart", 0.5, 1.0, 1000),
    Edge("frontend", "productcatalog", 2.0, 1.0, 1000),
    Edge("frontend", "currency", 1.5, 1.0, 1000),
    Edge("frontend", "recommendation", 0.8, 0.2, 300, ("recommendations_enabled", True)),
    Edge("frontend", "shipping", 0.3, 1.0, 1000),
    Edge("frontend", "checkout", 0.1, 1.0, 3000),
    Edge("frontend", "ad", 0.8, 0.0, 200, ("ads_enabled", True)),
    Edge("checkout", "payment", 1.0, 1.0, 1000),
    Edge("checkout", "email", 1.0, 0.1, 500, ("email_confirmations", True)),
    Edge("checkout", "shipping", 1.0, 1.0, 1000),
    Edge("checkout", "currency", 2.0, 1.0, 1000),
    Edge("checkout", "cart", 1.0, 1.0, 1000),
    Edge("checkout", "productcatalog", 2.0, 1.0, 1000),
    Edge("cart", "redis", 1.5, 1.0, 500, ("redis_fallback", False)),
    Edge("recommendation", "productcatalog", 1.0, 1.0, 500),
)

# A flag that changes the service's own cost: (service, flag) -> (value, extra p50 ms, extra p99 ms).
# cart.redis_fallback keeps carts in process memory: slower, but no redis dependency.
FLAG_COSTS: dict[tuple[str, str], tuple[bool, float, float]] = {("cart", "redis_fallback"): (True, 3.0, 15.0)}

SPEC: dict[str, ServiceSpec] = {s.name: s for s in SERVICES}
OUT_EDGES: dict[str, tuple[Edge, ...]] = {s.name: tuple(e for e in EDGES if e.caller == s.name) for s in SERVICES}
IN_EDGES: dict[str, tuple[Edge, ...]] = {s.name: tuple(e for e in EDGES if e.callee == s.name) for s in SERVICES}
ENTRY = "frontend"


def _callers_first() -> tuple[str, ...]:
    indeg = {name: len(IN_EDGES[name]) for name in SPEC}
    ready = [name for name in SPEC if indeg[name] == 0]
    order: list[str] = []
    while ready:
        name = ready.pop(0)
        order.append(name)
        for edge in OUT_EDGES[name]:
            indeg[edge.callee] -= 1
            if indeg[edge.callee] == 0:
                ready.append(edge.callee)
    if len(order) != len(SPEC):
        raise RuntimeError("the call graph has a cycle")
    return tuple(order)


TOPO = _callers_first()


# --------------------------------------------------------------------------------------------------------------------
# Deterministic noise and latency distribution helpers
# --------------------------------------------------------------------------------------------------------------------

_MASK = (1 << 64) - 1


def _key(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def noise(seed: int, tick: int, key: int) -> float:
    """Uniform [0, 1) from (seed, tick, key) by a splitmix64 finaliser: stateless, so forks replay it exactly."""
    x = (seed * 0x9E3779B97F4A7C15 + tick * 0xBF58476D1CE4E5B9 + key * 0x94D049BB133111EB + 0x632BE59BD9B4E019) & _MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return x / 18446744073709551616.0


def lognormal(p50_ms: float, p99_ms: float) -> tuple[float, float]:
    """(mu, sigma) of ln(latency in ms) for a log-normal with that median and 99th percentile."""
    p50 = max(p50_ms, 0.01)
    p99 = max(p99_ms, p50 * 1.01)
    return math.log(p50), max((math.log(p99) - math.log(p50)) / Z99, 0.01)


def exceed(mu: float, sigma: float, x_ms: float) -> float:
    """P(latency > x_ms)."""
    if x_ms <= 0:
        return 1.0
    return 0.5 * math.erfc((math.log(x_ms) - mu) / (sigma * _SQRT2))


def mixture_quantile(parts: list[tuple[float, float, float]], q: float) -> float:
    """Quantile q of a mixture of log-normals [(weight, mu, sigma)] (weights sum to 1), by bisection in log space."""
    z = 0.0 if q == 0.5 else Z99 if q == 0.99 else _inv_norm(q)
    if len(parts) == 1:
        _, mu, sigma = parts[0]
        return math.exp(mu + sigma * z)
    lo = min(mu + sigma * z for _, mu, sigma in parts)
    hi = max(mu + sigma * z for _, mu, sigma in parts)
    if hi - lo < 0.1:
        # instances alike (they differ by jitter only): the weighted log-quantile is within a percent or two, and
        # this is the common case, so skip the bisection (the hot spot of shadow runs)
        return math.exp(sum(w * (mu + sigma * z) for w, mu, sigma in parts) / sum(w for w, _, _ in parts))
    for _ in range(16):
        mid = (lo + hi) / 2
        tail = sum(w * 0.5 * math.erfc((mid - mu) / (sigma * _SQRT2)) for w, mu, sigma in parts)
        if tail > 1 - q:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _inv_norm(q: float) -> float:
    lo, hi = -8.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / _SQRT2) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# --------------------------------------------------------------------------------------------------------------------
# State (pydantic models, so the whole fleet persists as JSON and forks by deep copy)
# --------------------------------------------------------------------------------------------------------------------


class Instance(BaseModel):
    name: str
    weight: float = 1.0
    ready_at: int = 0  # a new replica serves from this tick
    down_from: int = -1  # out of rotation during [down_from, down_until) (restart or OOM kill)
    down_until: int = -1
    down_reason: str = ""
    leak_mb: float = 0.0  # leaked memory since the last (re)start
    restarts: int = 0
    oom_kills: int = 0
    # last tick's values
    up: bool = True
    rps: float = 0.0
    cpu: float = 0.0
    memory_mb: float = 0.0
    error_ratio: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    # cumulative counters (Prometheus counters: never reset while the instance exists)
    requests: dict[str, float] = Field(default_factory=lambda: {"200": 0.0, "500": 0.0, "503": 0.0})
    duration_buckets: list[float] = Field(default_factory=lambda: [0.0] * len(BUCKETS_S))
    duration_sum_s: float = 0.0
    duration_count: float = 0.0

    def serving(self, tick: int) -> bool:
        return tick >= self.ready_at and not (self.down_from <= tick < self.down_until)


class Deploy(BaseModel):
    version: str
    tick: int
    kind: Literal["initial", "deploy", "rollback"]


class ServiceState(BaseModel):
    name: str
    version: str
    history: list[Deploy]
    flags: dict[str, bool]
    instances: list[Instance]
    next_index: int
    reachable: bool = True
    # last tick's service-level values
    rps: float = 0.0
    error_ratio: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    # (tick, offered rps, error ratio, p50 ms, p99 ms, 1.0 if any instance served else 0.0), oldest first
    recent: list[tuple[int, float, float, float, float, float]] = Field(default_factory=list)
    # latency mixtures of the last hop_delay + 1 ticks: [(traffic fraction, mu, sigma)] per tick, oldest first
    recent_parts: list[list[tuple[float, float, float]]] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list)


class Fault(BaseModel):
    id: str
    kind: str
    service: str
    instance: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    started_tick: int
    resolved_tick: int | None = None
    resolved_by: str | None = None


class FleetState(BaseModel):
    seed: int
    tick: int = 0
    base_rps: float
    hop_delay: int
    services: dict[str, ServiceState]
    faults: list[Fault] = Field(default_factory=list)
    next_fault: int = 1


# --------------------------------------------------------------------------------------------------------------------
# Faults and actions: parameters
# --------------------------------------------------------------------------------------------------------------------

FaultKind = Literal["cpu_saturation", "latency", "error_rate", "bad_deploy", "memory_leak", "failing_dependency"]

# kind -> {param: (default, min, max)}; bad_deploy also takes a string "version".
FAULT_PARAMS: dict[str, dict[str, tuple[float, float, float]]] = {
    "cpu_saturation": {"factor": (3.0, 1.0, 50.0)},  # each request costs factor x CPU
    "latency": {"delay_ms": (400.0, 1.0, 60000.0)},
    "error_rate": {"rate": (0.3, 0.0, 1.0)},
    "bad_deploy": {"error_rate": (0.35, 0.0, 1.0), "delay_ms": (0.0, 0.0, 60000.0)},
    "memory_leak": {"leak_mb_per_s": (4.0, 0.01, 100000.0)},
    "failing_dependency": {},
}
INSTANCE_FAULTS = frozenset({"cpu_saturation", "latency", "error_rate", "memory_leak"})

ACTIONS = ("restart_service", "scale_replicas", "rollback_deploy", "set_feature_flag", "toggle_feature_flag",
           "shift_traffic", "collect_diagnostics")
# schemas/actions.yaml names the flag action toggle_feature_flag; both names do the same thing
ACTION_ALIASES = {"toggle_feature_flag": "set_feature_flag"}
READ_ONLY_ACTIONS = frozenset({"collect_diagnostics"})


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    service: str


class RestartParams(_Params):
    instance: str | None = None


class ScaleParams(_Params):
    replicas: int = Field(ge=1, le=MAX_REPLICAS, strict=True)


class RollbackParams(_Params):
    to_version: str | None = None


class FlagParams(_Params):
    flag: str
    enabled: bool = Field(strict=True)


class ShiftParams(_Params):
    instance: str
    weight: float = Field(ge=0.0, le=1.0)


class DiagnosticsParams(_Params):
    pass


ACTION_PARAMS: dict[str, type[_Params]] = {
    "restart_service": RestartParams,
    "scale_replicas": ScaleParams,
    "rollback_deploy": RollbackParams,
    "set_feature_flag": FlagParams,
    "toggle_feature_flag": FlagParams,
    "shift_traffic": ShiftParams,
    "collect_diagnostics": DiagnosticsParams,
}


def parse_action(action: str, params: dict[str, Any]) -> _Params:
    """Validate an action name and its parameters; raises NotFound / InvalidRequest with a readable reason."""
    model = ACTION_PARAMS.get(action)
    if model is None:
        raise NotFound(f"unknown action {action!r}", known=list(ACTIONS))
    if not isinstance(params, dict):
        raise InvalidRequest("action parameters must be a JSON object")
    try:
        return model.model_validate(params)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in e.errors()]
        raise InvalidRequest(f"invalid parameters for {action}: " + "; ".join(problems)) from e


# --------------------------------------------------------------------------------------------------------------------
# The fleet
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _View:
    """What a caller sees of a dependency (as of hop_delay ticks ago)."""

    error_ratio: float
    p50_ms: float
    p99_ms: float
    reachable: bool
    parts: list[tuple[float, float, float]]  # latency mixture (weight, mu, sigma) of its serving instances

    def exceed(self, x_ms: float) -> float:
        return sum(w * exceed(mu, sigma, x_ms) for w, mu, sigma in self.parts)


class Fleet:
    """The simulated fleet. All mutation goes through step(), inject(), clear_fault() and apply()."""

    def __init__(self, state: FleetState) -> None:
        self.state = state
        self.pending_events: list[dict[str, Any]] = []  # drained by the server into the JSON log

    # ---- construction, persistence, forking -------------------------------------------------------------------------

    @classmethod
    def create(cls, seed: int = 7, base_rps: float = 100.0, hop_delay: int = 2, warmup_ticks: int = 10) -> Fleet:
        if base_rps <= 0 or hop_delay < 0:
            raise InvalidRequest("base_rps must be > 0 and hop_delay >= 0")
        services: dict[str, ServiceState] = {}
        for spec in SERVICES:
            instances = [_new_instance(spec, i, ready_at=0) for i in range(spec.replicas)]
            services[spec.name] = ServiceState(
                name=spec.name, version=spec.version, history=[Deploy(version=spec.version, tick=0, kind="initial")],
                flags=dict(spec.flags), instances=instances, next_index=spec.replicas)
        fleet = cls(FleetState(seed=seed, base_rps=base_rps, hop_delay=hop_delay, services=services))
        fleet.step(warmup_ticks)
        fleet.pending_events.clear()
        return fleet

    def to_dict(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fleet:
        state = FleetState.model_validate(data)
        unknown = set(state.services) ^ set(SPEC)
        if unknown:
            raise InvalidRequest(f"state does not match the topology (services {sorted(unknown)})")
        return cls(state)

    def fork(self) -> Fleet:
        """An independent copy (for dry runs and shadow simulation); the live fleet is never touched through it."""
        return Fleet(self.state.model_copy(deep=True))

    # ---- lookups -----------------------------------------------------------------------------------------------------

    def service(self, name: str) -> ServiceState:
        svc = self.state.services.get(name)
        if svc is None:
            raise NotFound(f"unknown service {name!r}", known=sorted(self.state.services), check="service_exists")
        return svc

    @staticmethod
    def instance(svc: ServiceState, name: str) -> Instance:
        for inst in svc.instances:
            if inst.name == name:
                return inst
        raise NotFound(f"service {svc.name!r} has no instance {name!r}", known=[i.name for i in svc.instances],
                       check="instance_exists")

    def active_faults(self) -> list[Fault]:
        return [f for f in self.state.faults if f.resolved_tick is None]

    def fault_is_active(self, fault: Fault) -> bool:
        """Unresolved and currently biting: a bad deploy only bites while its version is deployed."""
        if fault.resolved_tick is not None:
            return False
        if fault.kind == "bad_deploy":
            return self.state.services[fault.service].version == fault.params["version"]
        return True

    def edge_enabled(self, edge: Edge) -> bool:
        if edge.enabled_by is None:
            return True
        flag, value = edge.enabled_by
        return self.state.services[edge.caller].flags.get(flag) == value

    # ---- simulation --------------------------------------------------------------------------------------------------

    def offered_load(self, tick: int) -> float:
        s = self.state
        wave = 1.0 + 0.1 * math.sin(2 * math.pi * tick / 600.0)  # a slow, ten-minute "day"
        jitter = 1.0 + 0.04 * (noise(s.seed, tick, _key("load")) - 0.5)
        return s.base_rps * wave * jitter

    def step(self, ticks: int = 1, *, accumulate: bool = True, log: bool = True) -> None:
        """Advance the simulation. accumulate=False skips histogram/counter bookkeeping (shadow runs)."""
        for _ in range(ticks):
            self._tick(accumulate=accumulate, log=log)

    def _tick(self, *, accumulate: bool, log: bool) -> None:
        s = self.state
        t = s.tick + 1
        faults = [f for f in s.faults if self.fault_is_active(f)]

        load = dict.fromkeys(TOPO, 0.0)
        load[ENTRY] = self.offered_load(t)
        for name in TOPO:
            for edge in OUT_EDGES[name]:
                if self.edge_enabled(edge):
                    load[edge.callee] += load[name] * edge.calls

        for name in reversed(TOPO):
            self._evaluate(s.services[name], load[name], t, faults, accumulate, log)
        s.tick = t

    def _view(self, callee: str) -> _View:
        svc = self.state.services[callee]
        idx = len(svc.recent) - 1 - self.state.hop_delay
        _, _, err, p50, p99, served = svc.recent[max(idx, 0)]
        parts = svc.recent_parts[max(len(svc.recent_parts) - 1 - self.state.hop_delay, 0)]
        if served <= 0.0:
            err = 1.0
        return _View(err, p50, p99, served > 0.0, parts)

    def _evaluate(self, svc: ServiceState, offered: float, t: int, faults: list[Fault], accumulate: bool,
                  log: bool) -> None:
        spec = SPEC[svc.name]
        seed = self.state.seed
        mine = [f for f in faults if f.service == svc.name]
        unreachable = any(f.kind == "failing_dependency" for f in mine)
        svc.reachable = not unreachable

        # Dependencies as they were hop_delay ticks ago.
        deps: list[tuple[Edge, _View, float]] = []
        for edge in OUT_EDGES[svc.name]:
            if self.edge_enabled(edge):
                v = self._view(edge.callee)
                timeout_frac = v.exceed(edge.timeout_ms)
                call_err = 1.0 - (1.0 - v.error_ratio) * (1.0 - timeout_frac)
                deps.append((edge, v, call_err))
        dep_ok = 1.0
        dep_p50 = 0.0
        dep_tail = 0.0
        for edge, v, call_err in deps:
            dep_ok *= _all_calls_ok(edge.calls, edge.criticality * call_err)
            p50 = min(v.p50_ms, edge.timeout_ms)
            p99 = min(v.p99_ms, edge.timeout_ms)
            dep_p50 += edge.calls * p50
            dep_tail = max(dep_tail, p99 - p50)

        extra_p50 = extra_p99 = 0.0
        for (fsvc, flag), (value, add50, add99) in FLAG_COSTS.items():
            if fsvc == svc.name and svc.flags.get(flag) == value:
                extra_p50 += add50
                extra_p99 += add99
        version_err = wait_p50 = wait_p99 = 0.0
        for f in mine:
            if f.kind == "bad_deploy":
                version_err = 1.0 - (1.0 - version_err) * (1.0 - f.params["error_rate"])
                wait_p50 += f.params["delay_ms"]
                wait_p99 += f.params["delay_ms"]

        # Memory: leaks accumulate; an instance over its limit is OOM-killed and comes back empty.
        for inst in svc.instances:
            leak = sum(f.params["leak_mb_per_s"] for f in mine
                       if f.kind == "memory_leak" and f.instance in (None, inst.name))
            if inst.down_from == t and inst.down_reason == "restart":
                inst.leak_mb = 0.0
                inst.restarts += 1
            if leak and inst.serving(t):
                inst.leak_mb += leak * TICK_S
            mem = spec.mem_base_mb + spec.mem_per_rps_mb * inst.rps + inst.leak_mb
            if mem >= spec.mem_limit_mb and inst.serving(t):
                inst.down_from, inst.down_until, inst.down_reason = t, t + OOM_RESTART_S, "oom"
                inst.leak_mb = 0.0
                inst.oom_kills += 1
                inst.restarts += 1
                if log:
                    self._event(svc, t, inst.name, "error",
                                f"container killed: OOMKilled (memory limit {spec.mem_limit_mb:.0f} MiB)",
                                reason="OOMKilled")

        ready = [i for i in svc.instances if i.serving(t) and not unreachable]
        total_w = sum(i.weight for i in ready)
        parts: list[tuple[float, float, float]] = []
        err_weighted = 0.0
        for inst in svc.instances:
            inst.up = inst.serving(t) and not unreachable
            share = offered * inst.weight / total_w if inst.up and total_w > 0 else 0.0
            ikey = _key(svc.name, inst.name)
            ifaults = [f for f in mine if f.instance in (None, inst.name)]
            factor = 1.0
            delay = 0.0
            own_err = spec.base_error_ratio
            for f in ifaults:
                if f.kind == "cpu_saturation":
                    factor *= f.params["factor"]
                elif f.kind == "latency":
                    delay += f.params["delay_ms"]
                elif f.kind == "error_rate":
                    own_err = 1.0 - (1.0 - own_err) * (1.0 - f.params["rate"])
            own_err = 1.0 - (1.0 - own_err) * (1.0 - version_err)
            util = share * factor / spec.capacity_rps
            shed = 1.0 - 1.0 / util if util > 1.0 else 0.0
            queue = 1.0 / (1.0 - min(util, 0.95))
            mem = spec.mem_base_mb + spec.mem_per_rps_mb * share + inst.leak_mb
            gc = 1.0 + 6.0 * max(0.0, mem / spec.mem_limit_mb - 0.8)
            jitter = 1.0 + 0.1 * (noise(seed, t, ikey) - 0.5)
            # CPU work queues (and suffers GC pauses); injected waits (a slow disk, a sleep in a bad build) do not
            p50 = ((spec.p50_ms + extra_p50) * queue * gc + delay + wait_p50) * jitter + dep_p50
            p99 = ((spec.p99_ms + extra_p99) * queue * gc + delay + wait_p99) * jitter + dep_p50 + dep_tail
            err = 1.0 - (1.0 - shed) * (1.0 - own_err) * dep_ok

            inst.rps = share
            inst.cpu = min(1.0, 0.02 + util) if inst.up else 0.0
            inst.memory_mb = mem if inst.up else 0.0
            inst.error_ratio = err if share > 0 else 0.0
            inst.p50_ms = p50 if share > 0 else 0.0
            inst.p99_ms = p99 if share > 0 else 0.0
            if share <= 0:
                continue
            mu, sigma = lognormal(p50, p99)
            parts.append((share / offered if offered > 0 else 0.0, mu, sigma))
            err_weighted += share * err
            n = share * TICK_S
            n503 = n * shed
            n500 = n * (1.0 - shed) * (1.0 - (1.0 - own_err) * dep_ok)
            if accumulate:
                inst.requests["503"] += n503
                inst.requests["500"] += n500
                inst.requests["200"] += n - n503 - n500
                timed = n - n503  # shed requests are rejected at once and not timed
                for b, bound in enumerate(BUCKETS_S):
                    inst.duration_buckets[b] += timed * (1.0 - exceed(mu, sigma, bound * 1000.0))
                inst.duration_sum_s += timed * math.exp(mu + sigma * sigma / 2) / 1000.0
                inst.duration_count += timed
            if log:
                self._log_instance(svc, inst, t, n500 + n503, shed, own_err, deps, util, mem, spec)

        served = 1.0
        if offered > 0 and total_w > 0 and parts:
            err = err_weighted / offered
            p50 = mixture_quantile(parts, 0.5)
            p99 = mixture_quantile(parts, 0.99)
        elif offered <= 0:
            # no traffic (e.g. no caller uses it any more): no bad events, so the SLO holds vacuously
            err, p50, p99, served = 0.0, 0.0, 0.0, 0.0 if unreachable or total_w <= 0 else 1.0
        else:
            # nobody serves: callers get connection refused at once
            err, p50, p99, served = 1.0, 1.0, 1.0, 0.0
            if log and offered > 0 and t % 10 == 0:
                self._event(svc, t, None, "error", "no instance available to serve requests",
                            reason="Unavailable")
        svc.rps, svc.error_ratio, svc.p50_ms, svc.p99_ms = offered, err, p50, p99
        svc.recent.append((t, offered, err, p50, p99, served))
        svc.recent_parts.append(parts)
        if len(svc.recent_parts) > self.state.hop_delay + 1:
            del svc.recent_parts[: len(svc.recent_parts) - self.state.hop_delay - 1]
        if len(svc.recent) > HISTORY:
            del svc.recent[: len(svc.recent) - HISTORY]

    # ---- logs --------------------------------------------------------------------------------------------------------

    def _event(self, svc: ServiceState, t: int, instance: str | None, level: str, msg: str, **fields: Any) -> None:
        event = {"tick": t, "service": svc.name, "instance": instance, "level": level, "msg": msg, **fields}
        self.pending_events.append(event)
        svc.events.append(event)
        if len(svc.events) > RECENT_EVENTS:
            del svc.events[: len(svc.events) - RECENT_EVENTS]

    def _log_instance(self, svc: ServiceState, inst: Instance, t: int, failed: float, shed: float, own_err: float,
                      deps: list[tuple[Edge, _View, float]], util: float, mem: float, spec: ServiceSpec) -> None:
        # One error line per instance per tick when it failed at least one request, naming the dominant cause,
        # the way a real service logs the error it returned; plus periodic warnings and summaries.
        if failed >= 0.5 and (failed / max(inst.rps, 1e-9)) > 0.005:
            causes: list[tuple[float, str, dict[str, Any]]] = [
                (shed, "request rejected: server overloaded (queue full)", {"reason": "Overloaded"}),
                (own_err - spec.base_error_ratio if own_err > spec.base_error_ratio else 0.0,
                 f"internal error handling request (version {svc.version})", {"reason": "Internal"}),
            ]
            for edge, v, call_err in deps:
                weight = edge.criticality * call_err * edge.calls
                if not v.reachable:
                    msg = f"rpc error: code = Unavailable desc = connection refused calling {edge.callee}"
                    reason = "Unavailable"
                elif v.p99_ms >= edge.timeout_ms and call_err > v.error_ratio:
                    msg = (f"rpc error: code = DeadlineExceeded desc = {edge.callee} did not answer within "
                           f"{edge.timeout_ms:.0f}ms")
                    reason = "DeadlineExceeded"
                else:
                    msg = f"rpc error: code = Internal desc = {edge.callee} returned an error"
                    reason = "DependencyError"
                causes.append((weight, msg, {"reason": reason, "dependency": edge.callee}))
            share, msg, fields = max(causes, key=lambda c: c[0])
            if share > 0:
                self._event(svc, t, inst.name, "error", msg, failed_requests=round(failed, 1), **fields)
        if t % 10 == 0:
            if inst.p99_ms > SPEC[svc.name].slo_p99_ms:
                self._event(svc, t, inst.name, "warn", f"slow requests: p99 {inst.p99_ms:.0f}ms",
                            p99_ms=round(inst.p99_ms, 1), cpu=round(inst.cpu, 3))
            if mem > 0.85 * spec.mem_limit_mb:
                self._event(svc, t, inst.name, "warn",
                            f"memory pressure: {mem:.0f} MiB of {spec.mem_limit_mb:.0f} MiB limit, GC overhead high",
                            memory_mb=round(mem, 1))
            if util > 0.9:
                self._event(svc, t, inst.name, "warn", f"CPU saturated ({min(util, 9.99) * 100:.0f}% of limit)",
                            cpu=round(min(util, 1.0), 3))
        if t % 30 == 0:
            self.pending_events.append({"tick": t, "service": svc.name, "instance": inst.name, "level": "info",
                                        "msg": "request summary", "rps": round(inst.rps, 2),
                                        "error_ratio": round(inst.error_ratio, 4), "p50_ms": round(inst.p50_ms, 1),
                                        "p99_ms": round(inst.p99_ms, 1)})

    # ---- faults ------------------------------------------------------------------------------------------------------

    def inject(self, kind: str, service: str, instance: str | None = None,
               params: dict[str, Any] | None = None) -> Fault:
        """Start a fault; returns it. Raises InvalidRequest / NotFound / PreconditionFailed with a reason."""
        if kind not in FAULT_PARAMS:
            raise InvalidRequest(f"unknown fault kind {kind!r}", known=sorted(FAULT_PARAMS))
        svc = self.service(service)
        params = dict(params or {})
        if instance is not None:
            if kind not in INSTANCE_FAULTS:
                raise InvalidRequest(f"{kind} applies to a whole service; do not name an instance")
            self.instance(svc, instance)
        clean: dict[str, Any] = {}
        version = params.pop("version", None) if kind == "bad_deploy" else None
        for name, (default, lo, hi) in FAULT_PARAMS[kind].items():
            value = params.pop(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
                raise InvalidRequest(f"{kind}.{name} must be a number in [{lo}, {hi}], got {value!r}")
            clean[name] = float(value)
        if params:
            raise InvalidRequest(f"unknown parameter(s) for {kind}: {sorted(params)}",
                                 known=sorted(FAULT_PARAMS[kind]) + (["version"] if kind == "bad_deploy" else []))
        if kind == "failing_dependency" and not IN_EDGES[service]:
            raise InvalidRequest(f"{service} has no callers, so it cannot be a failing dependency")
        for f in self.active_faults():
            if f.kind == kind and f.service == service and f.instance == instance:
                raise PreconditionFailed(f"fault {f.id} ({kind} on {service}"
                                         f"{'/' + instance if instance else ''}) is already active", fault_id=f.id)
        t = self.state.tick
        if kind == "bad_deploy":
            if version is None:
                version = _bump(svc.version)
            if not isinstance(version, str) or not version or len(version) > 64:
                raise InvalidRequest("bad_deploy.version must be a non-empty string of at most 64 characters")
            if version == svc.version:
                raise PreconditionFailed(f"{service} already runs version {version}")
            clean["version"] = version
            svc.history.append(Deploy(version=version, tick=t, kind="deploy"))
            svc.version = version
            self._event(svc, t, None, "info", f"deployed version {version}", version=version)
        fault = Fault(id=f"f-{self.state.next_fault}", kind=kind, service=service, instance=instance, params=clean,
                      started_tick=t)
        self.state.next_fault += 1
        self.state.faults.append(fault)
        return fault

    def clear_fault(self, fault_id: str, by: str = "operator") -> Fault:
        for f in self.state.faults:
            if f.id == fault_id:
                if f.resolved_tick is not None:
                    raise PreconditionFailed(f"fault {fault_id} was already resolved at tick {f.resolved_tick}")
                f.resolved_tick, f.resolved_by = self.state.tick, by
                return f
        raise NotFound(f"no fault {fault_id!r}")

    def clear_all(self, service: str | None = None) -> list[Fault]:
        if service is not None:
            self.service(service)
        return [self.clear_fault(f.id) for f in self.active_faults() if service in (None, f.service)]

    def faults_view(self) -> dict[str, Any]:
        def one(f: Fault) -> dict[str, Any]:
            return {**f.model_dump(mode="json"), "active": self.fault_is_active(f)}
        return {"active": [one(f) for f in self.state.faults if f.resolved_tick is None],
                "resolved": [one(f) for f in self.state.faults if f.resolved_tick is not None]}

    # ---- actions -----------------------------------------------------------------------------------------------------

    def apply(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        """Apply an action to this fleet; returns {"changes": [...], "before": {...}, "result": {...}}.

        Preconditions raise PreconditionFailed before anything changes. For a dry run, call it on fork().
        """
        p = parse_action(action, params)
        svc = self.service(p.service)
        t = self.state.tick
        changes: list[dict[str, Any]] = []

        def change(target: str, field: str, before: Any, after: Any) -> None:
            changes.append({"target": target, "field": field, "before": before, "after": after})

        result: dict[str, Any] = {}
        prior: dict[str, Any] = {}  # what an undo needs (schemas/actions.yaml `params_from: before.*`)
        if isinstance(p, RestartParams):
            targets = [self.instance(svc, p.instance)] if p.instance else list(svc.instances)
            busy = [i.name for i in targets if i.down_reason == "restart" and i.down_until > t + 1]
            if busy:
                raise PreconditionFailed(f"a restart of {', '.join(busy)} is already in progress",
                                         check="no_restart_in_progress")
            for k, inst in enumerate(targets):  # rolling: one instance out of rotation at a time
                start = t + 1 + k * RESTART_S
                change(inst.name, "restart", None, {"out_of_rotation_from_tick": start,
                                                    "back_at_tick": start + RESTART_S})
                inst.down_from, inst.down_until, inst.down_reason = start, start + RESTART_S, "restart"
            for f in self.active_faults():
                # The leak's trigger is modelled as in-process state that does not survive a restart: restarting
                # the service ends any leak on it; restarting one instance ends only a leak on that instance.
                if f.kind == "memory_leak" and f.service == svc.name and p.instance in (None, f.instance):
                    f.resolved_tick, f.resolved_by = t, action
            result = {"restarted": [i.name for i in targets], "done_at_tick": t + 1 + len(targets) * RESTART_S}
            self._event(svc, t, p.instance, "info", f"rolling restart of {len(targets)} instance(s) requested")
        elif isinstance(p, ScaleParams):
            before = len(svc.instances)
            if p.replicas == before:
                raise PreconditionFailed(f"{svc.name} already has {before} replicas", check="replicas_differ")
            spec = SPEC[svc.name]
            if p.replicas > before:
                for _ in range(p.replicas - before):
                    inst = _new_instance(spec, svc.next_index, ready_at=t + 1 + WARMUP_S)
                    svc.next_index += 1
                    svc.instances.append(inst)
                    change(inst.name, "instance", None, {"ready_at_tick": inst.ready_at})
            else:
                removed = svc.instances[p.replicas:]
                remaining_weight = sum(i.weight for i in svc.instances[: p.replicas])
                if remaining_weight <= 0:
                    raise PreconditionFailed("scaling down would leave only instances with traffic weight 0",
                                             check="other_instances_keep_weight")
                del svc.instances[p.replicas:]
                for inst in removed:
                    change(inst.name, "instance", "running", None)
                    for f in self.active_faults():
                        if f.service == svc.name and f.instance == inst.name:
                            f.resolved_tick, f.resolved_by = t, action
            change(svc.name, "replicas", before, p.replicas)
            prior = {"replicas": before}
            result = {"replicas": p.replicas, "instances": [i.name for i in svc.instances]}
            self._event(svc, t, None, "info", f"scaled from {before} to {p.replicas} replicas")
        elif isinstance(p, RollbackParams):
            versions = [d.version for d in svc.history]
            if p.to_version is not None:
                if p.to_version == svc.version:
                    raise PreconditionFailed(f"{svc.name} already runs version {p.to_version}",
                                             check="previous_version_exists")
                if p.to_version not in versions:
                    raise PreconditionFailed(f"version {p.to_version} was never deployed to {svc.name}",
                                             history=versions, check="previous_version_exists")
                target = p.to_version
            else:
                earlier = [v for v in reversed(versions) if v != svc.version]
                if not earlier:
                    raise PreconditionFailed(f"{svc.name} has no previous version to roll back to", history=versions,
                                             check="previous_version_exists")
                target = earlier[0]
            change(svc.name, "version", svc.version, target)
            prior = {"version": svc.version}
            svc.history.append(Deploy(version=target, tick=t, kind="rollback"))
            result = {"from_version": svc.version, "to_version": target}
            svc.version = target
            self._event(svc, t, None, "info", f"rolled back to version {target}", version=target)
        elif isinstance(p, FlagParams):
            if p.flag not in svc.flags:
                raise NotFound(f"{svc.name} has no feature flag {p.flag!r}", known=sorted(svc.flags),
                               check="flag_exists")
            if svc.flags[p.flag] == p.enabled:
                raise PreconditionFailed(f"{svc.name}.{p.flag} is already {str(p.enabled).lower()}",
                                         check="flag_differs")
            change(svc.name, f"flags.{p.flag}", svc.flags[p.flag], p.enabled)
            prior = {"enabled": svc.flags[p.flag]}
            svc.flags[p.flag] = p.enabled
            result = {"flag": p.flag, "enabled": p.enabled}
            self._event(svc, t, None, "info", f"feature flag {p.flag} set to {str(p.enabled).lower()}")
        elif isinstance(p, ShiftParams):
            inst = self.instance(svc, p.instance)
            if abs(inst.weight - p.weight) < 1e-12:
                raise PreconditionFailed(f"{inst.name} already has traffic weight {p.weight}", check="weight_differs")
            others = sum(i.weight for i in svc.instances if i is not inst)
            if others + p.weight <= 0:
                raise PreconditionFailed("that would leave no instance of the service with traffic weight > 0",
                                         check="other_instances_keep_weight")
            change(inst.name, "weight", inst.weight, p.weight)
            prior = {"weight": inst.weight}
            inst.weight = p.weight
            total = others + p.weight
            result = {"instance": inst.name, "weight": p.weight,
                      "traffic_share": {i.name: round(i.weight / total, 4) for i in svc.instances}}
            self._event(svc, t, inst.name, "info", f"traffic weight set to {p.weight}")
        else:
            result = self.diagnostics(svc.name)
        return {"changes": changes, "before": prior, "result": result}

    def diagnostics(self, service: str) -> dict[str, Any]:
        """What an operator can observe about one service (no fault ground truth)."""
        svc = self.service(service)
        spec = SPEC[service]
        t = self.state.tick
        return {
            "service": service, "tick": t, "version": svc.version,
            "deploy_history": [d.model_dump() for d in svc.history[-10:]],
            "flags": dict(svc.flags), "replicas": len(svc.instances), "reachable": svc.reachable,
            "slo": _slo(service, svc.error_ratio, svc.p99_ms),
            "instances": [_instance_view(i, spec, t) for i in svc.instances],
            "dependencies": [{"service": e.callee, "enabled": self.edge_enabled(e), "calls_per_request": e.calls,
                              "timeout_ms": e.timeout_ms,
                              "error_ratio": round(self.state.services[e.callee].error_ratio, 5),
                              "p99_ms": round(self.state.services[e.callee].p99_ms, 2)}
                             for e in OUT_EDGES[service]],
            "callers": [e.caller for e in IN_EDGES[service]],
            "recent": [{"tick": r[0], "rps": round(r[1], 2), "error_ratio": round(r[2], 5), "p50_ms": round(r[3], 2),
                        "p99_ms": round(r[4], 2)} for r in svc.recent[-60:]],
            "recent_logs": list(svc.events[-RECENT_EVENTS:]),
        }

    # ---- views -------------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The observable state (GET /state): no fault ground truth."""
        s = self.state
        t = s.tick
        return {
            "tick": t, "sim_time_s": t * TICK_S, "seed": s.seed, "base_rps": s.base_rps, "hop_delay_s": s.hop_delay,
            "services": {name: {
                "version": svc.version, "replicas": len(svc.instances), "flags": dict(svc.flags),
                "reachable": svc.reachable, "rps": round(svc.rps, 3), "error_ratio": round(svc.error_ratio, 6),
                "p50_ms": round(svc.p50_ms, 3), "p99_ms": round(svc.p99_ms, 3),
                "slo": _slo(name, svc.error_ratio, svc.p99_ms),
                "deploy_history": [d.model_dump() for d in svc.history[-10:]],
                "instances": [_instance_view(i, SPEC[name], t) for i in svc.instances],
            } for name, svc in s.services.items()},
            "edges": [{"caller": e.caller, "callee": e.callee, "calls_per_request": e.calls,
                       "enabled": self.edge_enabled(e)} for e in EDGES],
        }

    def slo_report(self) -> dict[str, dict[str, Any]]:
        return {name: _slo(name, svc.error_ratio, svc.p99_ms) for name, svc in self.state.services.items()}

    # ---- shadow ------------------------------------------------------------------------------------------------------

    def shadow(self, action: str | None, params: dict[str, Any] | None, horizon_s: int) -> dict[str, Any]:
        """Predict the SLO effect of an action (and of doing nothing) over horizon_s, on forks; self is untouched."""
        if isinstance(horizon_s, bool) or not isinstance(horizon_s, int) or not 1 <= horizon_s <= MAX_HORIZON_S:
            raise InvalidRequest(f"horizon_s must be an integer in [1, {MAX_HORIZON_S}]")
        if action in (None, "none"):
            action = None
        elif action in READ_ONLY_ACTIONS:
            parse_action(action, params or {})
            self.service((params or {}).get("service", ""))
            action = None  # read-only: the prediction is the counterfactual
        before = self.slo_report()
        without = self.fork()
        with_action = None
        applied = None
        if action is not None:
            with_action = self.fork()
            applied = with_action.apply(action, params or {})
        # judged on the second half of the horizon: past the action's own transient (a rolling restart), and long
        # enough to average over periodic trouble (a leak that OOM-kills every half minute)
        window = min(horizon_s, max(10, horizon_s // 2))
        outcome_without = _run_forward(without, horizon_s, window)
        outcome_with = _run_forward(with_action, horizon_s, window) if with_action is not None else None

        services: dict[str, Any] = {}
        for name in SPEC:
            entry: dict[str, Any] = {"before": before[name], "without_action": outcome_without[name]}
            if outcome_with is not None:
                entry["with_action"] = outcome_with[name]
            services[name] = entry
        all_before = all(v["met"] for v in before.values())
        all_without = all(v["met"] for v in outcome_without.values())
        summary: dict[str, Any] = {"slo_met_before": all_before, "slo_met_without_action": all_without,
                                   "violations_before": sorted(n for n, v in before.items() if not v["met"]),
                                   "violations_without_action": sorted(n for n, v in outcome_without.items()
                                                                       if not v["met"])}
        if outcome_with is not None:
            all_with = all(v["met"] for v in outcome_with.values())
            viol_with = sorted(n for n, v in outcome_with.items() if not v["met"])
            summary.update({"slo_met_with_action": all_with, "violations_with_action": viol_with,
                            "verdict": _verdict(outcome_without, outcome_with)})
        return {"tick": self.state.tick, "horizon_s": horizon_s, "window_s": window, "action": action,
                "params": params or {}, "changes": applied["changes"] if applied else [], "summary": summary,
                "services": services}


# --------------------------------------------------------------------------------------------------------------------


def catalogue() -> dict[str, Any]:
    """What can be done to the fleet: actions (JSON schema of their parameters), fault kinds, services and flags."""
    return {
        "actions": {name: {"read_only": name in READ_ONLY_ACTIONS, "alias_of": ACTION_ALIASES.get(name),
                           "params_schema": model.model_json_schema()}
                    for name, model in ACTION_PARAMS.items()},
        "faults": {kind: {"params": {p: {"default": d, "min": lo, "max": hi} for p, (d, lo, hi) in params.items()}
                          | ({"version": {"default": "next minor version"}} if kind == "bad_deploy" else {}),
                          "instance_targetable": kind in INSTANCE_FAULTS}
                   for kind, params in FAULT_PARAMS.items()},
        "services": {s.name: {"flags": dict(s.flags), "dependencies": [e.callee for e in OUT_EDGES[s.name]],
                              "callers": [e.caller for e in IN_EDGES[s.name]],
                              "slo": {"error_ratio_max": s.slo_error_ratio, "p99_ms_max": s.slo_p99_ms}}
                     for s in SERVICES},
        "limits": {"max_replicas": MAX_REPLICAS, "max_horizon_s": MAX_HORIZON_S, "tick_s": TICK_S},
    }


def _all_calls_ok(calls: float, p_fail: float) -> float:
    """P(no failing call) when a request makes `calls` calls on average: floor(calls) certain calls plus one more
    with probability frac(calls); each call fails the request with probability p_fail."""
    whole = math.floor(calls)
    return (1.0 - p_fail) ** whole * (1.0 - (calls - whole) * p_fail)


def _new_instance(spec: ServiceSpec, index: int, ready_at: int) -> Instance:
    return Instance(name=f"{spec.name}-{index}", ready_at=ready_at, memory_mb=spec.mem_base_mb)


def _bump(version: str) -> str:
    parts = version.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return ".".join([parts[0], str(int(parts[1]) + 1), "0"])
    return version + "-next"


def _slo(name: str, error_ratio: float, p99_ms: float) -> dict[str, Any]:
    spec = SPEC[name]
    return {"error_ratio": round(error_ratio, 6), "p99_ms": round(p99_ms, 3),
            "error_ratio_max": spec.slo_error_ratio, "p99_ms_max": spec.slo_p99_ms,
            "met": error_ratio <= spec.slo_error_ratio and p99_ms <= spec.slo_p99_ms}


def _instance_view(inst: Instance, spec: ServiceSpec, t: int) -> dict[str, Any]:
    state = "serving"
    if t < inst.ready_at:
        state = "starting"
    elif inst.down_from <= t < inst.down_until:
        state = "restarting" if inst.down_reason == "restart" else "crashed"
    elif not inst.up:
        state = "unreachable"
    return {"name": inst.name, "state": state, "up": inst.up, "weight": inst.weight, "rps": round(inst.rps, 3),
            "cpu_ratio": round(inst.cpu, 4), "memory_mb": round(inst.memory_mb, 1),
            "memory_limit_mb": spec.mem_limit_mb, "error_ratio": round(inst.error_ratio, 6),
            "p50_ms": round(inst.p50_ms, 3), "p99_ms": round(inst.p99_ms, 3), "restarts": inst.restarts,
            "oom_kills": inst.oom_kills}


def _run_forward(fleet: Fleet, horizon_s: int, window: int) -> dict[str, dict[str, Any]]:
    """Simulate horizon_s ticks; per service: mean over the last `window` ticks and the worst tick seen."""
    peak_err = dict.fromkeys(SPEC, 0.0)
    peak_p99 = dict.fromkeys(SPEC, 0.0)
    sums = {name: [0.0, 0.0] for name in SPEC}
    for k in range(horizon_s):
        fleet.step(1, accumulate=False, log=False)
        for name, svc in fleet.state.services.items():
            peak_err[name] = max(peak_err[name], svc.error_ratio)
            peak_p99[name] = max(peak_p99[name], svc.p99_ms)
            if k >= horizon_s - window:
                sums[name][0] += svc.error_ratio
                sums[name][1] += svc.p99_ms
    fleet.pending_events.clear()
    out: dict[str, dict[str, Any]] = {}
    for name in SPEC:
        slo = _slo(name, sums[name][0] / window, sums[name][1] / window)
        slo["peak_error_ratio"] = round(peak_err[name], 6)
        slo["peak_p99_ms"] = round(peak_p99[name], 3)
        out[name] = slo
    return out


def _verdict(without: dict[str, dict[str, Any]], with_action: dict[str, dict[str, Any]]) -> str:
    """'recovers' | 'improves' | 'no_effect' | 'worsens', by SLO violations then by entry-point badness."""
    def badness(o: dict[str, dict[str, Any]]) -> tuple[int, float]:
        viol = sum(1 for v in o.values() if not v["met"])
        entry = o[ENTRY]
        return viol, entry["error_ratio"] / SPEC[ENTRY].slo_error_ratio + entry["p99_ms"] / SPEC[ENTRY].slo_p99_ms

    b_wo, b_w = badness(without), badness(with_action)
    if b_w[0] == 0 and b_wo[0] > 0:
        return "recovers"
    if b_w[0] < b_wo[0] or (b_w[0] == b_wo[0] and b_w[1] < b_wo[1] * 0.9):
        return "improves"
    if b_w[0] > b_wo[0] or b_w[1] > b_wo[1] * 1.1:
        return "worsens"
    return "no_effect"

"""HTTP server of the sandbox fleet (Starlette + uvicorn).

Everything that touches the live fleet runs on the event-loop thread, between awaits, so requests and ticks never
interleave inside a mutation. Actions are applied to a fork and the fork is adopted only when it succeeds, so a
refused or failing action leaves the live state exactly as it was. Shadow runs simulate a fork in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pilothouse.fleet.errors import (
    FleetError,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    StateFileError,
    Unauthorized,
)
from pilothouse.fleet.journal import Journal
from pilothouse.fleet.metrics import FleetCollector
from pilothouse.fleet.model import ACTIONS, READ_ONLY_ACTIONS, Fleet, catalogue, parse_action
from pilothouse.fleet.store import OPS_LOG, SERVICE_LOG, JsonLog, StateStore

Clock = Literal["realtime", "manual"]
PERSIST_EVERY_TICKS = 10
MAX_ADVANCE_S = 3600
MAX_CATCH_UP_TICKS = 5


class FleetRuntime:
    """The live fleet with its journal, files and clock."""

    def __init__(self, fleet: Fleet, journal: Journal, state_dir: Path | None, *, clock: Clock = "realtime",
                 speed: float = 1.0, token: str | None = None, service_log: Path | None = None) -> None:
        if speed <= 0:
            raise InvalidRequest("speed must be > 0")
        self.fleet = fleet
        self.journal = journal
        self.clock = clock
        self.speed = speed
        self.token = token
        self.store = StateStore(state_dir) if state_dir is not None else None
        self.service_log = JsonLog(service_log or state_dir / SERVICE_LOG) if state_dir is not None or service_log \
            else None
        self.ops_log = JsonLog(state_dir / OPS_LOG) if state_dir is not None else None
        self._since_persist = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(lambda: self.fleet))

    @classmethod
    def open(cls, state_dir: Path, *, seed: int, base_rps: float, hop_delay: int, **kwargs: Any) -> FleetRuntime:
        """Resume from state_dir when it holds a state file, else create a fresh fleet there."""
        doc = StateStore(state_dir).load()
        if doc is None:
            rt = cls(Fleet.create(seed=seed, base_rps=base_rps, hop_delay=hop_delay), Journal(), state_dir, **kwargs)
            rt.ops(event="fleet_created", seed=seed, base_rps=base_rps, hop_delay=hop_delay)
        else:
            try:
                fleet = Fleet.from_dict(doc["fleet"])
                journal = Journal.model_validate(doc.get("journal", {}))
            except (KeyError, ValueError, FleetError) as e:
                raise StateFileError(f"{state_dir} holds a state file this version cannot read ({e}); move it "
                                     "away to start a fresh fleet") from e
            rt = cls(fleet, journal, state_dir, **kwargs)
            rt.ops(event="fleet_resumed", tick=fleet.state.tick, seed=fleet.state.seed)
        rt.persist()
        return rt

    # ---- bookkeeping ---------------------------------------------------------------------------------------------

    def ops(self, **record: Any) -> None:
        if self.ops_log is not None:
            self.ops_log.write([record])

    def flush_events(self) -> None:
        events = self.fleet.pending_events
        if events and self.service_log is not None:
            self.service_log.write(events)
        self.fleet.pending_events = []

    def persist(self, durable: bool = True) -> None:
        if self.store is not None:
            self.store.save({"fleet": self.fleet.to_dict(), "journal": self.journal.model_dump(mode="json")},
                            durable=durable)
        self._since_persist = 0

    def advance(self, ticks: int) -> None:
        self.fleet.step(ticks)
        self.flush_events()
        self._since_persist += ticks
        if self._since_persist >= PERSIST_EVERY_TICKS:
            self.persist(durable=False)

    def adopt(self, fork: Fleet) -> None:
        """Make a successfully changed fork the live fleet, keeping events, and persist durably."""
        fork.pending_events = self.fleet.pending_events + fork.pending_events
        self.fleet = fork
        self.flush_events()
        self.persist()

    def close(self) -> None:
        self.persist()
        for sink in (self.service_log, self.ops_log):
            if sink is not None:
                sink.close()

    async def run_clock(self) -> None:
        """Advance one tick per 1/speed wall seconds; after a stall, catch up a few ticks and skip the rest."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.speed
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            due = int((loop.time() - next_at) / interval) + 1
            self.advance(min(due, MAX_CATCH_UP_TICKS))
            next_at += due * interval


# --------------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------------


def _error(e: FleetError) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise InvalidRequest(f"body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    return body


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise InvalidRequest(f"query parameter {name} must be true or false, got {value!r}")


def create_app(rt: FleetRuntime) -> Starlette:
    def guard(request: Request) -> None:
        if rt.token is None:
            return
        header = request.headers.get("authorization", "")
        supplied = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(supplied.encode(), rt.token.encode()):
            raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>' (the fleet's access token)")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "tick": rt.fleet.state.tick, "clock": rt.clock})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(rt.registry), media_type=CONTENT_TYPE_LATEST)

    async def state(request: Request) -> Response:
        return JSONResponse(rt.fleet.snapshot())

    async def catalog(request: Request) -> Response:
        return JSONResponse(catalogue())

    async def faults(request: Request) -> Response:
        return JSONResponse(rt.fleet.faults_view())

    async def inject(request: Request) -> Response:
        guard(request)
        body = await _body(request)
        unknown = set(body) - {"kind", "service", "instance", "params"}
        if unknown:
            raise InvalidRequest(f"unknown field(s) {sorted(unknown)}; expected kind, service, instance, params")
        if not isinstance(body.get("kind"), str) or not isinstance(body.get("service"), str):
            raise InvalidRequest("kind and service are required strings")
        if body.get("params") is not None and not isinstance(body["params"], dict):
            raise InvalidRequest("params must be a JSON object")
        if body.get("instance") is not None and not isinstance(body["instance"], str):
            raise InvalidRequest("instance must be a string")
        fork = rt.fleet.fork()
        fault = fork.inject(body["kind"], body["service"], body.get("instance"), body.get("params"))
        rt.adopt(fork)
        rt.ops(event="fault_injected", fault=fault.model_dump(mode="json"))
        return JSONResponse({"fault": {**fault.model_dump(mode="json"), "active": True}}, status_code=201)

    async def clear_one(request: Request) -> Response:
        guard(request)
        fork = rt.fleet.fork()
        fault = fork.clear_fault(request.path_params["fault_id"])
        rt.adopt(fork)
        rt.ops(event="fault_cleared", fault_id=fault.id)
        return JSONResponse({"fault": {**fault.model_dump(mode="json"), "active": False}})

    async def clear_all(request: Request) -> Response:
        guard(request)
        body = await _body(request)
        service = body.get("service")
        if service is not None and not isinstance(service, str):
            raise InvalidRequest("service must be a string")
        fork = rt.fleet.fork()
        cleared = fork.clear_all(service)
        rt.adopt(fork)
        rt.ops(event="faults_cleared", fault_ids=[f.id for f in cleared])
        return JSONResponse({"cleared": [f.model_dump(mode="json") for f in cleared]})

    async def action(request: Request) -> Response:
        guard(request)
        name = request.path_params["action"]
        if name not in ACTIONS:
            raise NotFound(f"unknown action {name!r}", known=list(ACTIONS))
        dry_run = _flag(request, "dry_run")
        key = Journal.check_key(request.headers.get("idempotency-key"))
        params = await _body(request)
        parse_action(name, params)  # malformed requests are refused before the journal sees them
        tick = rt.fleet.state.tick
        base = {"key": key, "action": name, "params": params, "dry_run": dry_run}
        if dry_run:
            fork = rt.fleet.fork()
            try:
                outcome = fork.apply(name, params)
            except PreconditionFailed as e:
                return JSONResponse({**base, **e.to_dict(), "applied": False, "tick": tick}, status_code=409)
            return JSONResponse({**base, "applied": False, "tick": tick, **outcome})
        earlier = rt.journal.lookup(key, name, params, tick)
        if earlier is not None:
            rt.persist(durable=False)
            return JSONResponse(earlier.body, status_code=earlier.status, headers={"Idempotent-Replayed": "true"})
        fork = rt.fleet.fork()
        try:
            outcome = fork.apply(name, params)
        except PreconditionFailed as e:
            body = {**base, **e.to_dict(), "applied": False, "tick": tick}
            rt.journal.record(key, name, params, 409, body, applied=False, tick=tick)
            rt.persist()
            rt.ops(event="action_refused", key=key, action=name, params=params, reason=e.reason)
            return JSONResponse(body, status_code=409)
        body = {**base, "applied": name not in READ_ONLY_ACTIONS, "tick": tick, **outcome}
        rt.journal.record(key, name, params, 200, body, applied=True, tick=tick)
        if name in READ_ONLY_ACTIONS:
            rt.persist()
        else:
            rt.adopt(fork)  # persists fleet and journal together, durably, before we answer
        rt.ops(event="action_applied", key=key, action=name, params=params, changes=outcome["changes"])
        return JSONResponse(body)

    async def actions_log(request: Request) -> Response:
        return JSONResponse(rt.journal.view(request.query_params.get("key")))

    async def shadow(request: Request) -> Response:
        body = await _body(request)
        unknown = set(body) - {"action", "params", "horizon_s"}
        if unknown:
            raise InvalidRequest(f"unknown field(s) {sorted(unknown)}; expected action, params, horizon_s")
        act = body.get("action")
        params = body.get("params") or {}
        if act is not None and not isinstance(act, str):
            raise InvalidRequest("action must be a string or null")
        if not isinstance(params, dict):
            raise InvalidRequest("params must be a JSON object")
        if act not in (None, "none"):
            parse_action(act, params)
        horizon = body.get("horizon_s", 120)
        fork = rt.fleet.fork()  # taken on the loop thread; simulated in a worker so ticks keep flowing
        prediction = await run_in_threadpool(fork.shadow, act, params, horizon)
        return JSONResponse(prediction)

    async def advance(request: Request) -> Response:
        guard(request)
        if rt.clock != "manual":
            raise PreconditionFailed("POST /advance needs a fleet started with --clock manual")
        body = await _body(request)
        seconds = body.get("seconds", 1)
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= MAX_ADVANCE_S:
            raise InvalidRequest(f"seconds must be an integer in [1, {MAX_ADVANCE_S}]")
        rt.advance(seconds)
        rt.persist()
        return JSONResponse({"tick": rt.fleet.state.tick})

    def wrap(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except FleetError as e:
                response = _error(e)
            if request.url.path != "/metrics":
                rt.ops(event="http", method=request.method, path=request.url.path,
                       query=str(request.query_params) or None, status=response.status_code,
                       idempotency_key=request.headers.get("idempotency-key"),
                       duration_ms=round((time.perf_counter() - started) * 1000, 2))
            return response
        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(rt.run_clock()) if rt.clock == "realtime" else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            rt.close()

    routes = [
        Route("/health", wrap(health), methods=["GET"]),
        Route("/metrics", wrap(metrics), methods=["GET"]),
        Route("/state", wrap(state), methods=["GET"]),
        Route("/catalog", wrap(catalog), methods=["GET"]),
        Route("/faults", wrap(faults), methods=["GET"]),
        Route("/faults", wrap(inject), methods=["POST"]),
        Route("/faults/clear", wrap(clear_all), methods=["POST"]),
        Route("/faults/{fault_id}", wrap(clear_one), methods=["DELETE"]),
        Route("/actions/log", wrap(actions_log), methods=["GET"]),
        Route("/actions/{action}", wrap(action), methods=["POST"]),
        Route("/shadow", wrap(shadow), methods=["POST"]),
        Route("/advance", wrap(advance), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)

"""``pilothouse demo``: the whole loop on real monitoring, with a human (or named users) at both gates.

It starts the local stack, the sandbox fleet, the six services, and real Prometheus + Alertmanager scraping the fleet
and sending webhooks to the sensing gateway — the path a deployment uses. Then it injects a fault and follows it:
fault → alerts → incident → hypotheses → waiting for validation → pending action → waiting for approval → executed →
verified → resolved.

Interactive: it prints the console URL and the demo accounts' passwords and waits for people to decide.
Unattended (tests, CI): ``--validate-as USER --approve-as USER [--approve-as USER] --out FILE`` — the named users log in
to the console's HTTP API with their own credentials, exactly as a person would (no back door), and policy still
decides whether their approvals suffice. The JSON report has time_to_detect_s, time_to_hypothesis_s,
top_hypothesis_correct, time_to_authorization_s, time_to_recovery_s, recovered, max_executions_per_action and
ledger_verified.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pilothouse.stack import humans, lifecycle, monitoring, procs
from pilothouse.stack.config import Settings
from pilothouse.stack.info import StackInfo

SERVICES = ("ledger", "sensing", "reasoning", "policy", "actuator", "console")
FLEET_PORT = 19100
LEDGER_WRITER = "pilothouse_ledger_writer"
GATEWAY_PORT = 8470
CONSOLE_PORT = 8420
OBS_PORTS = {"sensing": 9470, "reasoning": 19130, "policy": 19135, "actuator": 19140, "ledger": 19150,
             "console": 9420}
DEMO_USERS = humans.DEMO_HUMANS  # console accounts = the people enrolled with signing keys by `stack up`


@dataclass(frozen=True)
class Scenario:
    """A fault to inject, the service that is its root cause, and the catalogue action that fixes it."""

    fault: dict[str, Any]
    root_cause: str
    fix: str
    summary: str


SCENARIOS = {
    "bad-deploy": Scenario({"kind": "bad_deploy", "service": "checkout", "params": {"error_rate": 0.4}},
                           "checkout", "rollback_deploy", "a new checkout version fails 40% of its requests"),
    "cpu-saturation": Scenario({"kind": "cpu_saturation", "service": "productcatalog", "params": {"factor": 4}},
                               "productcatalog", "scale_replicas", "productcatalog needs 4x the CPU per request"),
    "failing-dependency": Scenario({"kind": "failing_dependency", "service": "redis"}, "redis",
                                   "toggle_feature_flag", "redis stops accepting connections"),
    # slow enough that memory stays above 85% of the limit for longer than the alert's `for: 6s` before the OOM kill
    # (at 12 MB/s cart crossed 85% and was killed within ~4 s, again and again, and no alert ever fired)
    "memory-leak": Scenario({"kind": "memory_leak", "service": "cart", "params": {"leak_mb_per_s": 3}}, "cart",
                            "restart_service", "cart leaks memory until it is OOM-killed"),
}

# The CD system's deploy notifications, ingested through the gateway's generic webhook as change events.
DEPLOY_RULES = """\
name: deploys
kind: change
fields:
  service: deployment.service
  timestamp: {path: deployment.finished_at, format: epoch_s}
  body: {path: deployment.description}
  attributes:
    fields:
      change_type: {const: deploy}
      version: {path: deployment.version}
      actor: {path: actor}
"""

STAGES = ["fault injected", "alerts", "incident", "hypotheses", "waiting for validation", "pending action",
          "waiting for approval", "authorized", "executed", "verified", "resolved"]


class DemoFailed(Exception):
    """The demo could not complete a stage (the message says which and why)."""


# ------------------------------------------------------------------------------------------------------------------
# set-up: keys, accounts, processes
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class DemoSecrets:
    """Keys and passwords generated once per data directory (0600 file), reused by later runs."""

    policy_key: str
    ledger_key: str
    pseudonym_key: str
    gateway_token: str
    session_secret: str
    passwords: dict[str, str]
    cd_token: str = ""

    @classmethod
    def load_or_create(cls, path: Path) -> "DemoSecrets":
        if path.exists():
            loaded = cls(**json.loads(path.read_text()))
            if loaded.cd_token:
                return loaded
            loaded.cd_token = secrets.token_urlsafe(24)  # added later: extend an older secrets file
            path.write_text(json.dumps(loaded.__dict__, indent=2))
            return loaded
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        def raw_key() -> str:
            k = Ed25519PrivateKey.generate()
            return base64.b64encode(k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())).decode()

        s = cls(policy_key=raw_key(), ledger_key=raw_key(), pseudonym_key=secrets.token_urlsafe(32),
                gateway_token=secrets.token_urlsafe(24), session_secret=secrets.token_urlsafe(48),
                passwords={u: secrets.token_urlsafe(12) for u in DEMO_USERS}, cd_token=secrets.token_urlsafe(24))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(s.__dict__, f, indent=2)
        return s

    def public_key(self, which: str) -> tuple[str, str]:
        """(key_id, base64 raw public key) of the policy or ledger signing key."""
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from pilothouse.bus.authorization import key_id, load_private_key

        pub = load_private_key(getattr(self, f"{which}_key")).public_key()
        return key_id(pub), base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def write_users_file(path: Path, demo: DemoSecrets) -> None:
    """The console's local accounts with argon2id hashes of the generated passwords."""
    from argon2 import PasswordHasher

    ph = PasswordHasher()
    users = [{"id": u, "display": u.replace("-", " ").title(), "roles": roles,
              "password_hash": ph.hash(demo.passwords[u])} for u, roles in DEMO_USERS.items()]
    import yaml

    path.write_text(yaml.safe_dump({"users": users}, sort_keys=False))
    path.chmod(0o600)


def service_env(svc: str, info: StackInfo, demo: DemoSecrets, work: Path,
                overrides: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The environment one service process gets: its own Kafka principal and its settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PILOTHOUSE_")}
    env.update(info.env(svc))
    if svc == "sensing":  # the CD system's mapping rules must exist wherever this environment is used
        work.mkdir(parents=True, exist_ok=True)
        (work / "deploys.rules.yaml").write_text(DEPLOY_RULES)
    policy_kid, policy_pub = demo.public_key("policy")
    human_keys = str(humans.ensure_human_keys(Settings().data_dir))  # the people's public keys (stack up made them)
    _, ledger_pub = demo.public_key("ledger")
    dsn = info.postgres_dsn
    extra = {
        "sensing": {
            "PILOTHOUSE_SENSING_GATEWAY_PORT": str(GATEWAY_PORT),
            "PILOTHOUSE_SENSING_TOKENS": json.dumps({"alertmanager": demo.gateway_token,
                                                     "generic:deploys": demo.cd_token}),
            "PILOTHOUSE_SENSING_MAPPING_RULES": json.dumps({"deploys": str(work / "deploys.rules.yaml")}),
            "PILOTHOUSE_SENSING_PROMETHEUS_URL": monitoring.prometheus_url(Settings()),
            "PILOTHOUSE_SENSING_DATA_DIR": str(work / "sensing"),
            "PILOTHOUSE_SENSING_GROUP_WINDOW_S": "300",
            # compare against the healthy baseline the demo guarantees (see _healthy_baseline), not older runs: the
            # evidence window opens 60 s before the first alert (>= 8 s after the fault), and 90 s before that is
            # still inside the default 150 s baseline (120 s reached back into the fleet's restart)
            "PILOTHOUSE_SENSING_PRE_INCIDENT_WINDOW_S": "90",
            "PILOTHOUSE_REDACTION_PSEUDONYM_KEY": demo.pseudonym_key,
        },
        "reasoning": {"PILOTHOUSE_LLM_BASE_URL": info.llm_base_url, "PILOTHOUSE_LLM_MODEL": info.llm_model},
        "policy": {
            "PILOTHOUSE_POLICY_SIGNING_KEY": demo.policy_key,
            "PILOTHOUSE_POLICY_OPA_URL": info.opa_url,
            "PILOTHOUSE_POLICY_POSTGRES_DSN": dsn,
            "PILOTHOUSE_POLICY_HUMAN_KEYS": human_keys,
            # The sandbox's risk budgets renew hourly (production default: daily), so a few demo and benchmark runs
            # in a day do not spend a service's budget for the rest of it (a restart costs 10 of cart's 40).
            "PILOTHOUSE_POLICY_BUDGET_WINDOW_H": "1",
        },
        "actuator": {
            "PILOTHOUSE_ACTUATOR_POSTGRES_DSN": dsn,
            "PILOTHOUSE_ACTUATOR_TRUSTED_KEYS": json.dumps({policy_kid: policy_pub}),
            "PILOTHOUSE_ACTUATOR_FLEET_URL": f"http://127.0.0.1:{FLEET_PORT}",
            "PILOTHOUSE_ACTUATOR_HUMAN_KEYS": human_keys,
        },
        "ledger": {
            "PILOTHOUSE_LEDGER_POSTGRES_DSN": info.postgres_dsn_for(LEDGER_WRITER),
            "PILOTHOUSE_LEDGER_POSTGRES_ADMIN_DSN": info.postgres_admin_dsn,
            "PILOTHOUSE_LEDGER_POSTGRES_WRITER_ROLE": LEDGER_WRITER,
            "PILOTHOUSE_LEDGER_SIGNING_KEY": demo.ledger_key,
            "PILOTHOUSE_LEDGER_TRUSTED_KEYS": json.dumps({"pilothouse-ledger": ledger_pub}),
            "PILOTHOUSE_LEDGER_CHECKPOINT_DIR": str(work / "ledger-checkpoints"),
            "PILOTHOUSE_LEDGER_CHECKPOINT_INTERVAL_S": "5",
        },
        "console": {
            "PILOTHOUSE_CONSOLE_PORT": str(CONSOLE_PORT),
            "PILOTHOUSE_CONSOLE_USERS_FILE": str(work / "console-users.yaml"),
            "PILOTHOUSE_CONSOLE_SESSION_SECRET": demo.session_secret,
            "PILOTHOUSE_CONSOLE_SECURE_COOKIES": "false",
            "PILOTHOUSE_CONSOLE_HUMAN_KEYS": human_keys,
        },
    }[svc]
    env.update(extra)
    env.update((overrides or {}).get(svc, {}))
    return env


def start_processes(settings: Settings, info: StackInfo, demo: DemoSecrets, work: Path, say,
                    overrides: dict[str, dict[str, str]] | None = None) -> None:
    """Start the fleet and the six services (each in its own session, logs under <data>/logs)."""
    py = sys.executable
    fleet_dir = work / "fleet"
    fleet_dir.mkdir(parents=True, exist_ok=True)
    if not procs.find(settings.run_dir, "fleet"):
        procs.start("fleet", [py, "-m", "pilothouse.fleet", "--port", str(FLEET_PORT), "--state-dir", str(fleet_dir)],
                    run_dir=settings.run_dir, log_path=settings.logs_dir / "fleet.log", cwd=work)
    _wait_http(f"http://127.0.0.1:{FLEET_PORT}/health", "fleet", settings.logs_dir / "fleet.log")
    say(f"fleet      http://127.0.0.1:{FLEET_PORT}/state")
    write_users_file(work / "console-users.yaml", demo)
    for svc in SERVICES:
        name = f"svc-{svc}"
        if not procs.find(settings.run_dir, name):
            procs.start(name, [py, "-m", f"pilothouse.{svc}"], run_dir=settings.run_dir,
                        log_path=settings.logs_dir / f"{svc}.log", cwd=work,
                        env=service_env(svc, info, demo, work, overrides))
    for svc in SERVICES:
        _wait_http(f"http://127.0.0.1:{OBS_PORTS[svc]}/health", svc, settings.logs_dir / f"{svc}.log", timeout_s=120)
        say(f"{svc:<10} healthy (metrics http://127.0.0.1:{OBS_PORTS[svc]}/metrics)")
    monitoring.start(
        settings,
        scrape_targets={"fleet": [f"127.0.0.1:{FLEET_PORT}"],
                        "pilothouse": [f"127.0.0.1:{p}" for p in OBS_PORTS.values()]},
        webhook_url=f"http://127.0.0.1:{GATEWAY_PORT}/v1/alerts/alertmanager",
        webhook_token=demo.gateway_token,
    )
    say(f"prometheus {monitoring.prometheus_url(settings)}  alertmanager {monitoring.alertmanager_url(settings)}")


def stop_processes(settings: Settings) -> dict[str, str]:
    """Stop the demo's processes (the stack itself stays up; `pilothouse stack down` stops it)."""
    out = {}
    monitoring.stop(settings)
    for name in [f"svc-{s}" for s in reversed(SERVICES)] + ["fleet"]:
        out[name] = procs.stop(settings.run_dir, name, timeout_s=30)
    return out


def forget_demo_state(settings: Settings, info: StackInfo, work: Path, say) -> None:
    """``--fresh``: stop the demo's processes and forget what makes a repeated run differ from the first one — the
    correlator's state (its Faust changelog topics and local store: otherwise the same alert re-opens the last run's
    incident) and the sandbox fleet's state. Kept on purpose: the ledger (the audit trail only grows), the policy's
    risk budgets and approvals (an earlier run's actions really did spend them), keys and passwords."""
    import shutil

    from pilothouse.bus import admin as bus_admin
    from pilothouse.sensing.config import SensingSettings

    stop_processes(settings)
    prefix = SensingSettings.model_fields["app_id"].default + "-"
    cfg = info.kafka_config("admin")
    gone = bus_admin.delete_topics(cfg, bus_admin.topic_names(cfg, prefix=prefix))
    for sub in ("sensing", "fleet"):
        shutil.rmtree(work / sub, ignore_errors=True)
    say(f"== fresh start: deleted {len(gone)} correlator topic(s) ({prefix}*), the correlator's local store and the "
        f"fleet's state; kept the ledger, risk budgets and keys")


def _wait_http(url: str, name: str, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.5)
    raise DemoFailed(f"{name} did not become healthy within {timeout_s:.0f}s ({last}); see {log}:\n"
                     f"{procs.log_tail(log, 15)}")


# ------------------------------------------------------------------------------------------------------------------
# following the loop on the topics (as the admin principal: read-only observation)
# ------------------------------------------------------------------------------------------------------------------
WATCHED = {
    "pilothouse.sensing.alerts.v2": "alert",
    "pilothouse.sensing.incidents.v1": "incident",
    "pilothouse.reasoning.hypotheses.v1": "hypotheses",
    "pilothouse.reasoning.proposals.v1": "proposal",
    "pilothouse.console.hypothesis-validations.v1": "validation",
    "pilothouse.policy.decisions.v1": "decision",
    "pilothouse.policy.pending-actions.v1": "pending",
    "pilothouse.actuator.shadow-results.v1": "shadow",
    "pilothouse.console.approvals.v1": "approval",
    "pilothouse.policy.authorized-actions.v1": "authorized",
    "pilothouse.actuator.executions.v1": "executed",
    "pilothouse.actuator.verifications.v1": "verified",
}


@dataclass
class Observed:
    """Everything seen since the fault, in arrival order, with the wall time it was seen."""

    events: list[tuple[float, str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, record: Any) -> None:
        now = time.time()
        with self.lock:  # an AlertsReceived holds a request's alerts: each is seen as an "alert"
            self.events.extend((now, kind, r) for r in (record.alerts if kind == "alert" else [record]))

    def of(self, kind: str) -> list[tuple[float, Any]]:
        with self.lock:
            return [(t, r) for t, k, r in self.events if k == kind]


class Watcher(threading.Thread):
    """Reads every loop topic from 'now' on (as the admin principal, read-only) and records what it sees."""

    def __init__(self, info: StackInfo):
        super().__init__(name="demo-watcher", daemon=True)
        from pilothouse.bus.config import BusSettings
        from pilothouse.bus.reader import TopicReader

        settings = BusSettings(bootstrap_servers=info.kafka.bootstrap_servers, username="admin",
                               password=info.password("admin"), client_id="pilothouse-demo")
        self.reader = TopicReader(settings, WATCHED, start="latest", group_id=f"demo.{uuid.uuid4().hex}")
        self.observed = Observed()
        self.ready = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        if self.reader.wait_assigned(60):
            self.ready.set()
        while not self._stop.is_set():
            got = self.reader.poll(0.2)
            if got is not None:
                self.observed.add(WATCHED[got[0]], got[1])
        self.reader.close()

    def stop(self) -> None:
        self._stop.set()


class ConsoleUser:
    """A person using the console's HTTP API with their own credentials and their own signing key
    (``<data>/humans/<id>.key``): decisions are signed here, never by the console."""

    def __init__(self, base_url: str, username: str, password: str):
        from pilothouse.bus.attestation import load_human_key

        self.username = username
        self.key = load_human_key(humans.key_path(Settings().data_dir, username))
        self.client = httpx.Client(base_url=base_url, timeout=15)
        r = self.client.post("/api/session", json={"username": username, "password": password})
        if r.status_code != 200:
            raise DemoFailed(f"{username} cannot log in to the console: {r.status_code} {r.text[:200]}")
        self.csrf = r.json()["csrf_token"]

    def post(self, path: str, body: dict) -> httpx.Response:
        """Send a decision; asked to sign (428), check the statement says what ``body`` asks, sign, send again."""
        from pilothouse.bus.attestation import answer_statement

        r = self.client.post(path, json=body, headers={"X-CSRF-Token": self.csrf})
        if r.status_code != 428:
            return r
        expect = {k: body[k] for k in ("decision", "action_hash", "verdict") if k in body}
        signed = answer_statement(self.key, r.json()["statement"], expect)
        return self.client.post(path, json={**body, **signed}, headers={"X-CSRF-Token": self.csrf})

    def get(self, path: str) -> httpx.Response:
        return self.client.get(path)


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------
def wait_for(what: str, predicate, timeout_s: float, poll_s: float = 0.25):
    """Poll ``predicate`` until it returns something truthy; DemoFailed after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll_s)
    raise DemoFailed(f"timed out after {timeout_s:.0f}s waiting for: {what}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, inject the scenario's fault and follow it to the end; returns the report."""
    say = (lambda m: print(m, flush=True)) if not args.quiet else (lambda m: None)
    scenario = SCENARIOS[args.scenario]
    settings = Settings()
    say("== starting the local stack")
    lifecycle.up(settings, log=lambda m: None)
    info = StackInfo.load()
    work = settings.data_dir / "demo"
    work.mkdir(parents=True, exist_ok=True)
    demo = DemoSecrets.load_or_create(work / "secrets.json")
    overrides = {"reasoning": {"PILOTHOUSE_REASONING_LLM_ENABLED": "false"}} if args.no_llm else None
    if args.fresh:
        forget_demo_state(settings, info, work, say)
    elif args.restart:
        stop_processes(settings)
    start_processes(settings, info, demo, work, say, overrides)
    fleet = httpx.Client(base_url=f"http://127.0.0.1:{FLEET_PORT}", timeout=30)
    console_url = f"http://127.0.0.1:{CONSOLE_PORT}"
    fleet.post("/faults/clear", json={})
    _healthy_baseline(fleet, args.baseline_s, say)

    watcher = Watcher(info)
    watcher.start()
    if not watcher.ready.wait(60):
        raise DemoFailed("could not subscribe to the loop's topics")
    time.sleep(1.0)  # let the partition assignment settle at 'latest'
    obs = watcher.observed
    report: dict[str, Any] = {"scenario": args.scenario, "fault": scenario.fault, "expected_root_cause":
                              scenario.root_cause, "console_url": console_url}
    t0 = time.time()
    r = fleet.post("/faults", json=scenario.fault)
    if r.status_code != 201:
        raise DemoFailed(f"fleet refused the fault: {r.status_code} {r.text[:300]}")
    say(f"\n== fault injected: {scenario.summary}")
    if scenario.fault["kind"] == "bad_deploy":
        announce_deploy(fleet, scenario.fault["service"], demo.cd_token, say)
    say(f"   console: {console_url}   (accounts and passwords: {work / 'secrets.json'}; each person signs their "
        f"decisions with their own key: load {humans.humans_dir(settings.data_dir)}/<account>.key in the console's "
        f"header once)")

    def stage(name: str, detail: str = "") -> None:
        say(f"[{time.time() - t0:6.1f}s] {name:<24} {detail}")

    tmo = args.stage_timeout
    wait_for("alerts from Alertmanager", lambda: obs.of("alert"), tmo)
    stage("alerts", ", ".join(sorted({f"{a.labels.get('alertname', '')}:{a.service}" for _, a in obs.of("alert")}))[:100])

    def incident():
        for t, inc in obs.of("incident"):
            if scenario.root_cause in inc.services or inc.primary_service in _callers_or_self(fleet, scenario):
                return t, inc
        return None

    t_inc, inc = wait_for("an incident", incident, tmo)
    report["incident_id"] = inc.incident_id
    report["time_to_detect_s"] = round(t_inc - t0, 2)
    stage("incident", f"{inc.incident_id} {inc.title[:60]!r} services={list(inc.services)}")

    def supported():
        for t, h in obs.of("hypotheses"):
            if h.incident_id == inc.incident_id and h.outcome == "supported" and h.hypotheses:
                return t, h
        return None

    t_hyp, hyps = wait_for("a supported hypothesis", supported, tmo)
    top = hyps.hypotheses[0]
    report["time_to_hypothesis_s"] = round(t_hyp - t0, 2)
    report["top_hypothesis"] = {"root_cause_service": top.root_cause_service, "origin": top.origin,
                                "confidence": round(top.confidence, 3), "llm_status": hyps.llm_status}
    report["top_hypothesis_correct"] = top.root_cause_service == scenario.root_cause
    stage("hypotheses", f"top: {top.root_cause_service} ({top.origin}, confidence {top.confidence:.2f}, "
                        f"llm {hyps.llm_status})")

    stage("waiting for validation", f"hypothesis {top.hypothesis_id}")
    validated: list[str] = []  # hypothesis ids the unattended responder validated, in order
    user = ConsoleUser(console_url, args.validate_as, demo.passwords[args.validate_as]) if args.validate_as else None

    def validate(h) -> None:
        assert user is not None
        wait_for("the console to show the hypothesis",
                 lambda: user.get(f"/api/incidents/{inc.incident_id}").status_code == 200, tmo)
        resp = wait_for("the console to accept the validation", lambda: _accepted(user.post(
            f"/api/hypotheses/{h.hypothesis_id}/decision",
            {"verdict": "validated", "comment": "demo: evidence and checks reviewed"})), 60, 1.0)
        validated.append(h.hypothesis_id)
        stage("validated", f"{h.root_cause_service} ({h.fault_kind}) by {args.validate_as} "
                           f"({resp.get('status', 'recorded')})")

    if user is not None:
        validate(top)
    else:
        say(f"   open {console_url}/incidents/{inc.incident_id} and validate the hypothesis")
        wait_for("a human validation", lambda: [v for _, v in obs.of("validation")
                                                if v.hypothesis_id == top.hypothesis_id], args.human_timeout, 1.0)

    def pending():
        for t, p in obs.of("pending"):
            if p.incident_id == inc.incident_id and (p.hypothesis_id in validated or user is None):
                return t, p
        if user is not None:
            # As a responder watching the console would: when the engine refines its top hypothesis (the same
            # service with another fault kind is a new hypothesis, e.g. errors first, memory growth later), the
            # refined one needs its own gate-1 validation before its actions can be decided.
            latest = [h for _, h in obs.of("hypotheses") if h.incident_id == inc.incident_id
                      and h.outcome == "supported" and h.hypotheses]
            if latest and latest[-1].hypotheses[0].hypothesis_id not in validated:
                validate(latest[-1].hypotheses[0])
        return None

    t_pend, pend = wait_for("a pending action", pending, tmo)
    stage("pending action", f"{pend.action_type} {pend.target} params={pend.params_json} "
                            f"needs {pend.approvers_needed} approver(s)")
    shadow = [s for _, s in obs.of("shadow") if s.action_id == pend.action_id]
    if shadow:
        stage("shadow prediction", shadow[-1].summary[:100])

    stage("waiting for approval", f"action {pend.action_id} hash {pend.action_hash[:12]}…")
    approvers = list(args.approve_as or [])
    if approvers:
        for name in approvers:
            if [a for _, a in obs.of("authorized") if a.action_id == pend.action_id]:
                break  # policy already has enough approvals
            user = ConsoleUser(console_url, name, demo.passwords[name])
            wait_for("the console to show the pending action",
                     lambda: user.get(f"/api/actions/{pend.action_id}").status_code == 200, tmo)
            r = user.post(f"/api/actions/{pend.action_id}/decision",
                          {"decision": "approve", "action_hash": pend.action_hash, "comment": "demo approval"})
            stage("approved" if r.status_code < 300 else "approval refused", f"by {name}: {r.status_code} "
                  f"{(r.json().get('error') or r.json().get('status', '')) if r.content else ''}"[:120])
            time.sleep(1.0)
    else:
        say(f"   open {console_url}/actions/{pend.action_id} and approve (two different approvers if asked)")

    def authorized():
        for t, a in obs.of("authorized"):
            if a.action_id == pend.action_id:
                return t, a
        return None

    t_auth, auth = wait_for("the authorization", authorized, args.human_timeout if not approvers else tmo)
    report["time_to_authorization_s"] = round(t_auth - t0, 2)
    report["approvals"] = list(auth.approval_ids)
    stage("authorized", f"signed by {auth.key_id}, {len(auth.approval_ids)} approval(s)")

    def executed():
        return [(t, e) for t, e in obs.of("executed") if e.action_id == pend.action_id]

    execs = wait_for("the execution", executed, tmo)
    stage("executed", f"{execs[0][1].outcome} {execs[0][1].reason[:80]}")

    def verified():
        return [(t, v) for t, v in obs.of("verified") if v.action_id == pend.action_id]

    ver = wait_for("the verification", verified, tmo + 120)
    stage("verified", f"{ver[0][1].outcome} ({', '.join(c.name + ('✓' if c.passed else '✗') for c in ver[0][1].checks)})")

    def slo_met():
        state = fleet.get("/state").json()["services"]
        return all(s["slo"]["met"] for s in state.values())

    try:
        wait_for("the fleet to meet its SLOs again", slo_met, tmo)
        report["time_to_recovery_s"] = round(time.time() - t0, 2)
        report["recovered"] = True
        stage("resolved", "every service meets its SLO")
    except DemoFailed:
        report["time_to_recovery_s"] = None
        report["recovered"] = False
        stage("NOT resolved", "the fleet still misses an SLO")
    log = fleet.get("/actions/log").json()
    report["max_executions_per_action"] = max((e["executions"] for e in log["entries"]), default=0)
    report["executions"] = {e["key"]: e["executions"] for e in log["entries"]}
    report["validated_hypotheses"] = validated
    report["stage_times_ms"] = _stage_times(obs, inc, hyps, pend, auth)
    report["timeline"] = _timeline(obs, inc.incident_id, t0)
    report["ledger_verified"] = _verify_ledger(service_env("ledger", info, demo, work), say)
    watcher.stop()
    return report


def _ms(ts) -> int:
    return int(ts.timestamp() * 1000)


def _timeline(obs: Observed, incident_id: str, t0: float) -> list[dict[str, Any]]:
    """Every record of the incident the demo saw, in arrival order: what it was, when its producer stamped it and
    when the demo saw it (ms after the fault), so a slow hop is visible without reading service logs."""
    out = []
    with obs.lock:
        events = list(obs.events)
    for seen, kind, rec in events:
        if getattr(rec, "incident_id", None) != incident_id:
            continue
        stamped = getattr(rec, "occurred_at", None)
        out.append({"kind": kind, "seen_ms": int((seen - t0) * 1000),
                    "occurred_ms": int((stamped.timestamp() - t0) * 1000) if stamped else None,
                    "detail": str(getattr(rec, "action_type", None) or getattr(rec, "outcome", None)
                                  or getattr(rec, "status", None) or "")[:40]})
    return out


def _stage_times(obs: Observed, inc, hyps, pend, auth) -> dict[str, int | None]:
    """Producer timestamps (ms) of each stage, from the records themselves (all producers share this clock)."""
    alerts = [a for _, a in obs.of("alert") if a.service in inc.services]
    # the validation of the hypothesis the pending action serves (the top one, or its refinement)
    validation = [v for _, v in obs.of("validation") if v.hypothesis_id == pend.hypothesis_id]
    executed = [e for _, e in obs.of("executed") if e.action_id == pend.action_id]
    verified = [v for _, v in obs.of("verified") if v.action_id == pend.action_id]
    opened = min((i.occurred_at for _, i in obs.of("incident") if i.incident_id == inc.incident_id),
                 default=inc.occurred_at)
    # the alert the pending action came from: its first proposal <- hypotheses <- incident update (last alert)
    proposals = sorted((p for _, p in obs.of("proposal") if p.action_id == pend.action_id), key=lambda p: p.occurred_at)
    causes = {h.event_id: h.causation_id for _, h in obs.of("hypotheses")}
    updates = {i.event_id: i for _, i in obs.of("incident")}
    trigger = None
    if proposals:
        first = proposals[0]
        update = updates.get(first.causation_id) or updates.get(causes.get(first.causation_id, ""))
        trigger = update.last_seen if update is not None else None
    return {
        "first_alert_received": min((_ms(a.received_at) for a in alerts), default=None),
        "incident_opened": _ms(opened),
        "hypotheses_proposed": _ms(hyps.occurred_at),
        "hypothesis_validated": _ms(validation[0].occurred_at) if validation else None,
        "action_first_proposed": _ms(proposals[0].occurred_at) if proposals else None,
        "action_trigger_alert": _ms(trigger) if trigger else None,
        "approval_requested": _ms(pend.occurred_at),
        "authorized": _ms(auth.occurred_at),
        "executed": _ms(executed[0].occurred_at) if executed else None,
        "verified": _ms(verified[0].occurred_at) if verified else None,
    }


def announce_deploy(fleet: httpx.Client, service: str, token: str, say) -> None:
    """Play the CD system: the fleet just rolled out a new version of ``service``; tell the gateway, as a pipeline
    would (a deploy notification is evidence any SRE would look at first)."""
    version = fleet.get("/state").json()["services"][service]["version"]
    body = {"actor": "fleet-cd", "deployment": {"service": service, "version": version, "finished_at": time.time(),
                                                "description": f"Rolled out {service} {version}"}}
    r = httpx.post(f"http://127.0.0.1:{GATEWAY_PORT}/v1/webhooks/deploys", json=body,
                   headers={"Authorization": f"Bearer {token}"}, timeout=10)
    say(f"   CD system announced the deploy of {service} {version}: HTTP {r.status_code}")


def _healthy_baseline(fleet: httpx.Client, seconds: float, say) -> None:
    """Let monitoring see the fleet healthy for ``seconds`` before the fault: anomaly detection compares the incident
    with the window before it, and a window still holding an earlier fault would hide the new one."""
    say(f"== collecting a healthy baseline ({seconds:.0f} s of every service meeting its SLO)")
    healthy_since = None
    deadline = time.monotonic() + seconds + 300
    while time.monotonic() < deadline:
        met = all(s["slo"]["met"] for s in fleet.get("/state").json()["services"].values())
        now = time.monotonic()
        healthy_since = (healthy_since or now) if met else None
        if healthy_since is not None and now - healthy_since >= seconds:
            return
        time.sleep(1.0)
    raise DemoFailed("the fleet did not stay within its SLOs long enough to take a baseline")


def _accepted(r: httpx.Response) -> dict | None:
    if r.status_code < 300:
        return r.json()
    if r.status_code in (404, 409):  # not visible to the console yet: try again
        return None
    raise DemoFailed(f"console refused: {r.status_code} {r.text[:300]}")


def _callers_or_self(fleet: httpx.Client, scenario: Scenario) -> set[str]:
    services = fleet.get("/catalog").json()["services"]
    out = {scenario.root_cause}
    frontier = {scenario.root_cause}
    while frontier:
        nxt = {c for s in frontier for c in services.get(s, {}).get("callers", [])} - out
        out |= nxt
        frontier = nxt
    return out


def _verify_ledger(env: dict[str, str], say) -> bool:
    """Run `pilothouse ledger verify` (Kafka + Postgres + checkpoints) with the ledger's settings, once it caught up."""
    import subprocess

    time.sleep(6)  # one checkpoint interval
    out = subprocess.run([sys.executable, "-m", "pilothouse", "ledger", "verify"], env=env, capture_output=True,
                         text=True, timeout=300)
    say(f"ledger verify: exit {out.returncode}: {(out.stdout or out.stderr).strip().splitlines()[-1:]}")
    return out.returncode == 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``pilothouse demo [--scenario NAME] [--validate-as U] [--approve-as U ...] [--out FILE]``."""
    ap = argparse.ArgumentParser(prog="pilothouse demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="bad-deploy")
    ap.add_argument("--validate-as", help="console user who validates the top hypothesis (unattended)")
    ap.add_argument("--approve-as", action="append", help="console user who approves (repeat for two-person)")
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    ap.add_argument("--stage-timeout", type=float, default=240.0, help="seconds each automatic stage may take")
    ap.add_argument("--human-timeout", type=float, default=1800.0, help="seconds to wait for people to decide")
    ap.add_argument("--baseline-s", type=float, default=150.0, help="healthy seconds monitoring sees before the fault")
    ap.add_argument("--stop", action="store_true", help="stop the demo's processes (fleet, services, monitoring)")
    ap.add_argument("--restart", action="store_true", help="restart the demo's processes first (new settings)")
    ap.add_argument("--fresh", action="store_true",
                    help="like --restart, and forget the correlator's and fleet's state from earlier runs (the ledger "
                         "and the policy's risk budgets are kept)")
    ap.add_argument("--no-llm", action="store_true", help="reasoning without the model (deterministic engine only)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.stop:
        print(json.dumps(stop_processes(Settings()), indent=2))
        return 0
    for u in [args.validate_as, *(args.approve_as or [])]:
        if u and u not in DEMO_USERS:
            print(f"pilothouse demo: unknown demo user {u!r} (known: {', '.join(DEMO_USERS)})", file=sys.stderr)
            return 2
    try:
        report = run(args)
    except DemoFailed as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps({"scenario": args.scenario, "error": str(e)}, indent=2) + "\n")
        return 1
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print("\n" + text)
    ok = report["recovered"] and report["top_hypothesis_correct"] and report["ledger_verified"] and \
        report["max_executions_per_action"] <= 1
    return 0 if ok else 1

"""`stack up` / `status` / `down` / catalogue apply: the orchestration of the four components.

up: check prerequisites → load or create stack.json (generated credentials) → provision the components (in parallel;
cached after the first run) → start what is not running → wait until each is healthy → apply the topic catalogue.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pilothouse.bus import admin as bus_admin
from pilothouse.bus.catalogue import load_catalogue
from pilothouse.stack import humans, kafka, llm, opa, postgres, procs
from pilothouse.stack.config import LOCAL_LLM_MODEL, Settings
from pilothouse.stack.errors import MissingPrerequisite, NotProvisioned, StackError
from pilothouse.stack.info import KafkaInfo, LlmInfo, OpaInfo, PostgresInfo, StackInfo, new_password
from pilothouse.stack.plan import BrokerPlan, derive_plan

COMPONENTS = ("kafka", "postgres", "opa", "llm")


def _cluster_id() -> str:
    while True:  # Kafka's own rule: a cluster id must not start with '-' (it would parse as an option)
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def broker_plan() -> BrokerPlan:
    """The plan derived from services/bus/catalogue.yaml."""
    return derive_plan(load_catalogue())


def _llm_info(settings: Settings) -> LlmInfo:
    if settings.external_llm:
        return LlmInfo(base_url=settings.llm_base_url.rstrip("/"), model=settings.llm_model, external=True)
    return LlmInfo(base_url=settings.local_llm_base_url, model=LOCAL_LLM_MODEL, external=False)


def load_or_create_info(settings: Settings, principals: tuple[str, ...]) -> tuple[StackInfo, bool]:
    """stack.json, created with fresh credentials on first run; new catalogue principals get a password.

    Returns (info, whether the file was written).
    """
    data_dir = settings.data_dir.resolve()
    try:
        current = StackInfo.load(data_dir)
    except NotProvisioned:
        leftovers = [
            p for p in (kafka.log_dirs(data_dir) / "meta.properties", data_dir / "postgres" / "data" / "PG_VERSION")
            if p.exists()
        ]  # fmt: skip
        if leftovers:
            raise StackError(
                f"{data_dir} holds stack state ({leftovers[0]}) but no stack.json with its credentials; restore "
                f"stack.json, or run `pilothouse stack down` and delete {data_dir} to start from scratch"
            ) from None
        users = {"admin": new_password(), **{p: new_password() for p in principals}}
        info = StackInfo(
            data_dir=data_dir,
            kafka=KafkaInfo(
                bootstrap_servers=f"{settings.host}:{settings.kafka_port}", cluster_id=_cluster_id(), users=users
            ),
            postgres=PostgresInfo(
                host=settings.host,
                port=settings.postgres_port,
                database=postgres.DATABASE,
                user=postgres.ROLE,
                password=new_password(),
                roles={r: new_password() for r in postgres.ROLES},
            ),
            opa=OpaInfo(url=opa.url(settings)),
            llm=_llm_info(settings),
        )
        info.save()
        return info, True
    missing = [p for p in principals if p not in current.kafka.users]
    missing_roles = [r for r in postgres.ROLES if r not in current.postgres.roles]
    llm_info = _llm_info(settings)
    if not missing and not missing_roles and llm_info == current.llm:
        return current, False
    data = current.to_plain()  # rebuild through validation (model_copy would skip it)
    data["kafka"]["users"].update({p: new_password() for p in missing})
    data["postgres"]["roles"].update({r: new_password() for r in missing_roles})
    data["llm"] = llm_info.model_dump()
    info = StackInfo.model_validate(data)
    info.save()
    return info, True


def check_prerequisites(settings: Settings) -> None:
    """Fail fast, before any long step, on what is certainly missing (raises the first MissingPrerequisite)."""
    kafka.find_java()
    postgres.find_bindir()
    if not kafka.classpath_complete(kafka.lib_dir(settings)):
        if shutil.which("mvn") is None:
            raise MissingPrerequisite("maven (mvn), needed once to fetch the Kafka jars", kafka.MAVEN_FIX)
    opa_bin = opa.binary(settings)
    if not opa_bin.is_file():
        opa.find_go()


@dataclass
class UpResult:
    info: StackInfo
    components: dict[str, str] = field(default_factory=dict)  # name -> "started" | "already running" | "external"
    provisioned: list[str] = field(default_factory=list)
    report: bus_admin.ApplyReport | None = None
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _exclusive(settings: Settings, what: str, wait_s: float = 600.0):
    """One `up`/`down` at a time per data directory (two concurrent `up`s would race for the ports): wait for it."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.run_dir / "stack.lock", "w") as lock:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"another `pilothouse stack` command has held {settings.run_dir / 'stack.lock'} for "
                        f"{wait_s:.0f}s; rerun `{what}` when it is done"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def up(settings: Settings | None = None, log: Callable[[str], None] = lambda _m: None) -> UpResult:
    """Provision (first run), start and check every component, then apply the catalogue. Idempotent."""
    settings = settings or Settings()
    check_prerequisites(settings)  # before creating anything under the data directory
    with _exclusive(settings, "pilothouse stack up"):
        return _up(settings, log)


def _up(settings: Settings, log: Callable[[str], None]) -> UpResult:
    t0 = time.monotonic()
    plan = broker_plan()
    if settings.external_llm:  # check before stack.json is rewritten to point at it
        h = llm.health(settings, settings.llm_base_url.rstrip("/"), settings.llm_model, True)
        if not h["healthy"]:
            raise StackError(f"external LLM server {settings.llm_base_url} is not usable: {h.get('error')}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o711)  # others may traverse (PostgreSQL's OS user must) but not list
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.chmod(0o700)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    info, _ = load_or_create_info(settings, plan.principals)
    result = UpResult(info=info)
    # The demo people's signing keys (private: <data>/humans/<id>.key; public: the registry policy reads).
    humans.ensure_human_keys(settings.data_dir)

    # Provision in parallel: each step is a download or a build in a subprocess (cached after the first run).
    java = kafka.find_java()
    pg_bin = postgres.find_bindir()
    with ThreadPoolExecutor(max_workers=4) as pool:
        f_kafka = pool.submit(kafka.provision_classpath, settings)
        f_opa = pool.submit(opa.provision, settings)
        f_llm = None if settings.external_llm else pool.submit(llm.provision, settings)
        f_pg = pool.submit(postgres.provision, settings, info, pg_bin)
        errors: list[BaseException] = []
        outcomes = {}
        for name, fut in (("kafka", f_kafka), ("opa", f_opa), ("llm", f_llm), ("postgres", f_pg)):
            if fut is None:
                continue
            try:
                outcomes[name] = fut.result()
            except BaseException as e:  # noqa: BLE001 - collected, the first is re-raised below
                errors.append(e)
    if errors:
        missing = [e for e in errors if isinstance(e, MissingPrerequisite)]
        raise (missing or errors)[0]
    lib, fetched = outcomes["kafka"]
    if fetched:
        result.provisioned.append("kafka jars")
    opa_bin, built = outcomes["opa"]
    if built:
        result.provisioned.append("opa binary")
    if outcomes.get("postgres"):
        result.provisioned.append("postgres cluster")
    if "llm" in outcomes:
        llm_bin, model, installed = outcomes["llm"]
        result.provisioned.extend(installed)
    if kafka.configure(settings, info, java, lib):
        result.provisioned.append("kafka storage")
    result.timings["provision_s"] = round(time.monotonic() - t0, 2)
    what = f": {', '.join(result.provisioned)}" if result.provisioned else " (all cached)"
    log(f"provisioned in {result.timings['provision_s']:.1f}s{what}")

    procs_started = {
        "kafka": kafka.start(settings, java, lib),
        "postgres": postgres.start(settings, pg_bin),
        "opa": opa.start(settings, opa_bin),
    }
    if not settings.external_llm:
        procs_started["llm"] = llm.start(settings, llm_bin, model)
    for name, proc in procs_started.items():
        result.components[name] = "started" if proc is not None else "already running"
    if settings.external_llm:
        result.components["llm"] = "external"

    postgres.wait_ready(settings, info, procs_started["postgres"])
    log(f"postgres ready on {settings.host}:{settings.postgres_port} ({result.components['postgres']})")
    opa.wait_ready(settings, procs_started["opa"])
    log(f"opa      ready on {opa.url(settings)} ({result.components['opa']})")
    if not settings.external_llm:
        llm.wait_ready(settings, procs_started["llm"])
    log(f"llm      ready at {info.llm_base_url} model {info.llm_model} ({result.components['llm']})")
    kafka.wait_ready(settings, info, procs_started["kafka"])
    log(f"kafka    ready on {info.kafka.bootstrap_servers} ({result.components['kafka']})")
    result.timings["ready_s"] = round(time.monotonic() - t0, 2)

    result.report = apply_catalogue(info, plan)
    result.timings["total_s"] = round(time.monotonic() - t0, 2)
    return result


def apply_catalogue(info: StackInfo | None = None, plan: BrokerPlan | None = None) -> bus_admin.ApplyReport:
    """Apply services/bus/catalogue.yaml to the running broker (users, ACLs, topics); idempotent."""
    info = info or StackInfo.load()
    plan = plan or broker_plan()
    missing = [p for p in plan.principals if p not in info.kafka.users]
    if missing:
        raise StackError(f"stack.json has no password for {', '.join(missing)}: run `pilothouse stack up`")
    return bus_admin.apply_catalogue(
        info.kafka_config("admin"),
        topics=plan.topics,
        grants=plan.grants,
        passwords={p: info.password(p) for p in plan.principals},
    )


def status(settings: Settings | None = None) -> dict[str, dict]:
    """Health of every component: {"kafka": {"healthy": bool, "pid":..., "port":..., ...}, ...}."""
    settings = settings or Settings()
    try:
        info: StackInfo | None = StackInfo.load(settings.data_dir)
    except NotProvisioned:
        info = None
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            "kafka": pool.submit(kafka.health, settings, info),
            "postgres": pool.submit(postgres.health, settings, info),
            "opa": pool.submit(opa.health, settings),
        }
        if info is not None:
            futures["llm"] = pool.submit(llm.health, settings, info.llm_base_url, info.llm_model, info.llm.external)
        out = {name: f.result() for name, f in futures.items()}
    if info is None:
        out["llm"] = {"healthy": False, "pid": None, "port": settings.llm_port, "error": "not provisioned"}
    return out


def down(settings: Settings | None = None) -> dict[str, str]:
    """Stop every component the stack started (signal, wait, then SIGKILL). Returns name -> outcome."""
    settings = settings or Settings()
    signals = {
        "kafka": kafka.STOP_SIGNAL,
        "postgres": postgres.STOP_SIGNAL,
        "opa": opa.STOP_SIGNAL,
        "llm": llm.STOP_SIGNAL,
    }
    if not settings.run_dir.is_dir():
        return {n: "not running" for n in signals}
    with _exclusive(settings, "pilothouse stack down"), ThreadPoolExecutor(max_workers=4) as pool:
        futures = {n: pool.submit(procs.stop, settings.run_dir, n, sig=s, timeout_s=30.0) for n, s in signals.items()}
        return {n: f.result() for n, f in futures.items()}

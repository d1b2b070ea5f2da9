"""Apache Kafka (KRaft, single combined node) from Maven Central jars, SASL/SCRAM + ACLs, on 127.0.0.1.

Provisioning resolves the broker classpath once into `<cache>/kafka/<version>/lib` (Maven's local repository under
`<cache>/m2`), formats storage once under `<data>/kafka` with the admin SCRAM credential, and runs `kafka.Kafka`.
Readiness and all admin work go through `pilothouse.bus.admin` (the bus package owns the Kafka client).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path
from string import Template

from pilothouse.bus import admin as bus_admin
from pilothouse.stack import procs
from pilothouse.stack.config import KAFKA_VERSION, LOG4J_VERSION, Settings
from pilothouse.stack.errors import ComponentFailed, MissingPrerequisite, StackError
from pilothouse.stack.info import StackInfo

NAME = "kafka"
STOP_SIGNAL = signal.SIGTERM  # controlled shutdown
READY_TIMEOUT_S = 120.0
TEMPLATES = Path(__file__).with_name("templates")
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
JAVA_FIX = "apt-get install -y openjdk-17-jre-headless"
MAVEN_FIX = "apt-get install -y maven"


def java_major(java: str) -> int | None:
    """Major version of `java` (17 for "17.0.15"), or None if it cannot run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major  # "1.8" -> 8


def find_java() -> str:
    """Path of a Java 17+ runtime, or MissingPrerequisite."""
    java = shutil.which("java")
    if java is None:
        raise MissingPrerequisite("java 17+ (not on PATH)", JAVA_FIX)
    major = java_major(java)
    if major is None or major < 17:
        raise MissingPrerequisite(f"java 17+ ({java} is version {major})", JAVA_FIX)
    return java


def lib_dir(settings: Settings) -> Path:
    return settings.cache_dir / "kafka" / KAFKA_VERSION / "lib"


def classpath_complete(lib: Path) -> bool:
    jar = lib / f"kafka_2.13-{KAFKA_VERSION}.jar"
    if not (lib / ".complete").is_file() or not jar.is_file():
        return False
    try:
        with zipfile.ZipFile(jar) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return {"kafka/Kafka.class", "kafka/tools/StorageTool.class"} <= names


def provision_classpath(settings: Settings) -> tuple[Path, bool]:
    """Ensure the broker classpath is cached; returns (lib dir, whether it was downloaded now)."""
    lib = lib_dir(settings)
    if classpath_complete(lib):
        return lib, False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MissingPrerequisite("maven (mvn), needed once to fetch the Kafka jars from Maven Central", MAVEN_FIX)
    work = lib.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pom = Template((TEMPLATES / "kafka-pom.xml").read_text()).substitute(
        kafka_version=KAFKA_VERSION, log4j_version=LOG4J_VERSION
    )
    (work / "pom.xml").write_text(pom)
    cmd = [
        mvn, "-B", "-q", f"-Dmaven.repo.local={settings.cache_dir / 'm2'}",
        f"{DEPENDENCY_PLUGIN}:copy-dependencies", "-DincludeScope=runtime", "-DoutputDirectory=lib",
    ]  # fmt: skip
    try:
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise MissingPrerequisite(
            "network access to Maven Central (fetching the Kafka jars timed out after 15 min)",
            "allow HTTPS to repo.maven.apache.org, then rerun `pilothouse stack up`",
        ) from None
    if out.returncode != 0:
        last = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()][-3:]
        raise MissingPrerequisite(
            f"the Kafka jars from Maven Central (mvn failed: {' | '.join(last)[:400]})",
            "check HTTPS access to repo.maven.apache.org (and Maven proxy settings), then rerun `pilothouse stack up`",
        )
    (work / "lib" / ".complete").write_text(KAFKA_VERSION)
    shutil.rmtree(lib, ignore_errors=True)
    (work / "lib").rename(lib)
    shutil.rmtree(work, ignore_errors=True)
    if not classpath_complete(lib):
        raise StackError(f"the Kafka classpath in {lib} lacks kafka/Kafka.class or StorageTool; delete it and retry")
    return lib, True


def log_dirs(data_dir: Path) -> Path:
    """The local broker's ``log.dirs`` (its partitions) under a stack's data directory."""
    return data_dir / "kafka" / "data"


def server_logs(data_dir: Path) -> Path:
    """The local broker's own logs (server.log, the GC log) under a stack's data directory."""
    return data_dir / "logs" / "kafka"


def _paths(settings: Settings) -> dict[str, Path]:
    base = settings.data_dir / "kafka"
    return {
        "base": base,
        "log_dirs": log_dirs(settings.data_dir),
        "properties": base / "server.properties",
        "log4j": base / "log4j2.properties",
        "logs": server_logs(settings.data_dir),
        "stdout": settings.logs_dir / "kafka.out",
    }


def configure(settings: Settings, info: StackInfo, java: str, lib: Path) -> bool:
    """Write server.properties (0600) and format storage once. Returns True if storage was formatted now."""
    p = _paths(settings)
    p["base"].mkdir(parents=True, exist_ok=True)
    p["base"].chmod(0o700)  # config with the admin password, and the metadata log with the SCRAM credentials
    p["logs"].mkdir(parents=True, exist_ok=True)
    admin_password = info.password("admin")
    text = Template((TEMPLATES / "server.properties").read_text()).substitute(
        kafka_version=KAFKA_VERSION,
        host=settings.host,
        port=settings.kafka_port,
        controller_port=settings.kafka_controller_port,
        log_dirs=p["log_dirs"],
        admin_password=admin_password,
    )
    _write_private(p["properties"], text)
    shutil.copyfile(TEMPLATES / "log4j2.properties", p["log4j"])
    if (p["log_dirs"] / "meta.properties").is_file():
        return False
    cmd = [
        java, "-cp", f"{lib}/*", f"-Dlog4j2.configurationFile={p['log4j']}", f"-Dkafka.logs.dir={p['logs']}",
        "kafka.tools.StorageTool", "format", "-t", info.kafka.cluster_id, "-c", str(p["properties"]),
        "--ignore-formatted", "--add-scram", f"SCRAM-SHA-256=[name=admin,password={admin_password}]",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise ComponentFailed(f"kafka storage format failed: {' | '.join(detail)}")
    return True


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def start(settings: Settings, java: str, lib: Path):
    """Start the broker detached; returns the Popen (or None if one is already running)."""
    if procs.find(settings.run_dir, NAME):
        return None
    p = _paths(settings)
    # ZGC: its pauses do not grow with the heap or what survives (under 0.1 ms here); its marking and relocation
    # run beside the broker's threads. Under G1, tuned as far as it goes (Kafka's start-script settings: 20 ms pause
    # target, IHOP 35 %; a fixed 1 GB eden, so that a young pause came every 80-135 s and not every 2-10 s; tenuring
    # threshold 1, so that the ~37 MB the broker keeps from its start was not copied at every young collection),
    # each young collection still stopped the broker for 42-62 ms (its 2 GC threads share a core with the gateway).
    # That was two in every 120 s half-rate phase of the sensing bench, each stopping every producer and consumer
    # at once: each made a window of 74-97 ms p99 (every stage slow together), in 5 of 5 runs. Under ZGC
    # (session 14): no stop of 1 ms or more in the phase, no allocation stall, a proactive cycle every 22-46 s
    # (~240 MB live, ~250 ms of concurrent work). Its cost is some CPU: the broker's share at full speed was
    # 0.17-0.26 of a core, against 0.15-0.18 under G1.
    # -UseCodeCacheFlushing: JDK 17's sweeper threw compiled request-path code away between bursts of load (one
    # sweep under the sensing bench zombified 9,101 nmethods; the broker's compiled methods fell from 4,189 to
    # 3,006) and the JIT, on a starved core, compiled it again for minutes. The code cache is 240 MB; the broker
    # uses under 20 MB of it.
    # GC log as Kafka's start script writes it (kafkaServer-gc.log, beside server.log), with every safepoint (each
    # stops the broker's request threads, a GC pause or not): the sensing bench reads the stops that fell in its
    # latency phase from it.
    argv = [
        java, "-Xms2g", "-Xmx2g", "-XX:+UseZGC", "-XX:-UseCodeCacheFlushing",
        f"-Xlog:gc*,safepoint:file={p['logs']}/kafkaServer-gc.log:time,uptimemillis,tags:filecount=10,filesize=20M",
        "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={p['log4j']}", f"-Dkafka.logs.dir={p['logs']}",
        "-cp", f"{lib}/*", "kafka.Kafka", str(p["properties"]),
    ]  # fmt: skip
    return procs.start(NAME, argv, run_dir=settings.run_dir, log_path=p["stdout"], cwd=p["base"])


def wait_ready(settings: Settings, info: StackInfo, proc) -> None:
    """Block until the broker answers an authenticated admin metadata request."""
    p = _paths(settings)

    def alive() -> bool:
        return proc.poll() is None if proc is not None else procs.find(settings.run_dir, NAME) is not None

    try:
        bus_admin.wait_until_ready(info.kafka_config("admin"), READY_TIMEOUT_S, is_alive=alive)
    except bus_admin.KafkaAdminError as e:
        tail = procs.log_tail(p["logs"] / "server.log", 3) or procs.log_tail(p["stdout"], 3)
        raise ComponentFailed(f"kafka did not become ready: {e}; see {p['logs']}/server.log:\n{tail}") from e


def health(settings: Settings, info: StackInfo | None) -> dict:
    """Status of the broker: process, port, version, and an authenticated metadata probe."""
    running = procs.find(settings.run_dir, NAME)
    out: dict = {
        "healthy": False,
        "pid": running.pid if running else None,
        "port": settings.kafka_port,
        "version": KAFKA_VERSION,
    }
    if info is None:
        out["error"] = "not provisioned"
        return out
    try:
        md = bus_admin.probe_metadata(info.kafka_config("admin"), timeout_s=5.0)
    except bus_admin.KafkaAdminError as e:
        out["error"] = str(e)
        return out
    out.update(healthy=True, cluster_id=md["cluster_id"], topics=md["topics"])
    if running is None:
        out["note"] = "answering, but not started by this stack (no pid file)"
    return out

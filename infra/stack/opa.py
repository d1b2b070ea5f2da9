"""Open Policy Agent, built once with `go install` into `<cache>/bin`, serving `<repo>/policies` with --watch."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from pilothouse.stack import procs
from pilothouse.stack.config import OPA_VERSION, Settings
from pilothouse.stack.errors import ComponentFailed, MissingPrerequisite

NAME = "opa"
STOP_SIGNAL = signal.SIGTERM
READY_TIMEOUT_S = 60.0
MODULE = "github.com/open-policy-agent/opa"
GO_FIX = "sudo infra/install-prereqs.sh (installs Go 1.26 from the Go module proxy; Debian 12's golang-go is too old)"
MIN_GO_MINOR = 21  # toolchain switching (GOTOOLCHAIN=auto) exists since Go 1.21
GO_CANDIDATES = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")


def binary(settings: Settings) -> Path:
    return settings.cache_dir / "bin" / "opa"


def binary_version(path: Path) -> str | None:
    """The version an opa binary reports, or None."""
    try:
        out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^Version:\s*(\S+)", out.stdout, re.M)
    return m.group(1) if m else None


def go_minor(go: str) -> int | None:
    """Minor version of a Go toolchain (26 for go1.26.8), or None if it does not run."""
    try:
        out = subprocess.run([go, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"go1\.(\d+)", out.stdout)
    return int(m.group(1)) if m else None


def find_go() -> str:
    """A Go >= 1.21: it fetches the toolchain OPA's go.mod asks for (1.26) from the module proxy by itself."""
    found = [g for g in (shutil.which("go"), *GO_CANDIDATES) if g and os.access(g, os.X_OK)]
    for go in found:
        minor = go_minor(go)
        if minor is not None and minor >= MIN_GO_MINOR:
            return go
    what = f"go >= 1.{MIN_GO_MINOR} (needed once to build OPA {OPA_VERSION}; " + (
        f"found only {', '.join(found)}, too old)" if found else "not on PATH nor in /usr/local/go)"
    )
    raise MissingPrerequisite(what, GO_FIX)


def provision(settings: Settings) -> tuple[Path, bool]:
    """Ensure `<cache>/bin/opa` is OPA_VERSION; returns (path, whether it was built now)."""
    opa = binary(settings)
    if opa.is_file() and binary_version(opa) == OPA_VERSION:
        return opa, False
    go = find_go()
    opa.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOBIN": str(opa.parent),
        "CGO_ENABLED": os.environ.get("CGO_ENABLED", "0"),
        # Debian's go.env pins GOTOOLCHAIN=local; OPA's go.mod needs a newer toolchain than distributions ship.
        "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "auto"),
    }
    try:
        out = subprocess.run(
            [go, "install", f"{MODULE}@v{OPA_VERSION}"], env=env, capture_output=True, text=True, timeout=1800
        )
    except subprocess.TimeoutExpired:
        raise MissingPrerequisite(
            "OPA build (go install timed out after 30 min)", "check access to proxy.golang.org, then rerun"
        ) from None
    if out.returncode != 0:
        last = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()][-3:]
        raise MissingPrerequisite(
            f"OPA {OPA_VERSION} via go install (failed: {' | '.join(last)[:400]})",
            "check access to the Go module proxy (proxy.golang.org), then rerun `pilothouse stack up`",
        )
    got = binary_version(opa)
    if got != OPA_VERSION:
        raise ComponentFailed(f"go install produced {opa} reporting version {got!r}, expected {OPA_VERSION}")
    return opa, True


def url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.opa_port}"


def start(settings: Settings, opa: Path):
    if procs.find(settings.run_dir, NAME):
        return None
    settings.policies_dir.mkdir(parents=True, exist_ok=True)
    # --log-level-request debug: OPA writes two access-log lines per request at info by default (~500 bytes per
    # decision, ~20 GB/day at 500 decisions/s, and CPU per decision); logged at debug they are filtered out, while
    # reload errors and other events stay at info. --ignore: *_test.rego files are for `opa test`, not the server
    # (a broken test file no longer blocks reloading an edited policy). Keep in step with local_opa_server in
    # services/policy/adapters/opa.py, which the policy benchmark and tests start.
    argv = [
        str(opa), "run", "--server", "--addr", f"{settings.host}:{settings.opa_port}",
        "--skip-version-check", "--log-level-request", "debug", "--ignore", "*_test.rego",
        "--optimize-store-for-read-speed", "--watch", str(settings.policies_dir),
    ]  # fmt: skip
    # Measured by the policy benchmark: less GC and one scheduler thread cut OPA's CPU per decision on 2 cores.
    env = {**os.environ, "GOGC": os.environ.get("GOGC", "400"), "GOMAXPROCS": os.environ.get("GOMAXPROCS", "1")}
    return procs.start(
        NAME, argv, run_dir=settings.run_dir, log_path=settings.logs_dir / "opa.log", cwd=settings.data_dir, env=env
    )


def _get_health(settings: Settings, timeout_s: float) -> httpx.Response:
    return httpx.get(f"{url(settings)}/health", timeout=timeout_s)


def wait_ready(settings: Settings, proc) -> None:
    log = settings.logs_dir / "opa.log"
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ComponentFailed(
                f"opa exited (code {proc.returncode}) — a policy in {settings.policies_dir} may not compile; "
                f"see {log}:\n{procs.log_tail(log)}"
            )
        try:
            if _get_health(settings, 2.0).status_code == 200:
                return
            last = "health not 200"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(0.2)
    raise ComponentFailed(f"opa not healthy after {READY_TIMEOUT_S:.0f}s ({last}); see {log}")


def health(settings: Settings) -> dict:
    running = procs.find(settings.run_dir, NAME)
    out: dict = {
        "healthy": False,
        "pid": running.pid if running else None,
        "port": settings.opa_port,
        "version": OPA_VERSION,
        "url": url(settings),
    }
    try:
        resp = _get_health(settings, 3.0)
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    if resp.status_code != 200:
        out["error"] = f"GET /health returned {resp.status_code}"
        return out
    out["healthy"] = True
    return out

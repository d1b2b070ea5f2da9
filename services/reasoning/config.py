"""Settings of the reasoning service (``PILOTHOUSE_REASONING_*``) and of its LLM (``PILOTHOUSE_LLM_*``).

Read once, in ``__main__`` (or by ``pilothouse eval rca --with-llm``). Kafka comes from BusSettings
(``PILOTHOUSE_KAFKA_*``). The API key is a SecretStr so it never appears in a repr or a log line.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TOPIC_INCIDENTS = "pilothouse.sensing.incidents.v1"
TOPIC_VALIDATIONS = "pilothouse.console.hypothesis-validations.v1"
TOPIC_HYPOTHESES = "pilothouse.reasoning.hypotheses.v1"
TOPIC_PROPOSALS = "pilothouse.reasoning.proposals.v1"


class LlmSettings(BaseSettings):
    """Any OpenAI-compatible server: vLLM in production, the local stack's llama-server by default."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_LLM_", frozen=True, extra="ignore")

    base_url: str = "http://127.0.0.1:18080/v1"
    model: str = "smollm2-135m"
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=45.0, gt=0, le=600,
                            description="per HTTP attempt (connect + read); the local CPU model needs ~30 s")
    max_retries: int = Field(default=0, ge=0, le=5,
                             description="retries after a timeout/5xx/429/connection error (vLLM on a GPU: 2)")
    backoff_s: float = Field(default=0.5, ge=0, le=10)
    circuit_failures: int = Field(default=3, ge=1, le=100, description="consecutive failures that open the circuit")
    circuit_reset_s: float = Field(default=60.0, gt=0, description="open circuit: wait this long before one probe")
    max_tokens: int = Field(default=800, ge=64, le=8192, description="completion tokens per call")
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 7


class Settings(BaseSettings):
    """What the reasoning service consumes and produces, and the bounds it enforces."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_REASONING_", frozen=True, extra="ignore")

    llm_enabled: bool = Field(default=True, description="false = kill switch for the model: engine-only hypotheses")
    # cost bounds: an alert storm must not become an unbounded LLM bill
    max_llm_calls_per_incident: int = Field(default=3, ge=0, le=100, description="over all versions of one incident")
    max_llm_tokens_per_incident: int = Field(default=6000, ge=0, description="prompt + completion, all versions")
    max_llm_calls_per_minute: int = Field(default=20, ge=0, description="process-wide")
    max_llm_tokens_per_hour: int = Field(default=200_000, ge=0, description="process-wide")
    max_prompt_evidence: int = Field(default=10, ge=1, le=200, description="strongest items shown to the model")
    max_prompt_chars: int = Field(default=3300, ge=1000, le=200_000,
                                  description="prompt size bound (the local server has 2048 tokens per slot)")
    max_llm_hypotheses: int = Field(default=1, ge=1, le=5,
                                    description="1 fits the local 2048-token slot; 3 on a production server")
    engine_hypotheses: int = Field(default=3, ge=1, le=10, description="top engine candidates turned into hypotheses")
    support_bar: float = Field(default=0.5, gt=0, lt=1, description="confidence a supported hypothesis needs")

    group_id: str = Field(default="pilothouse.reasoning.incidents", pattern=r"^pilothouse\.reasoning\.|^test\.")
    transactional_id: str = Field(default="pilothouse.reasoning.tx-0", pattern=r"^pilothouse\.reasoning\.|^test\.")
    topic_incidents: str = TOPIC_INCIDENTS
    topic_validations: str = TOPIC_VALIDATIONS
    topic_hypotheses: str = TOPIC_HYPOTHESES
    topic_proposals: str = TOPIC_PROPOSALS
    observability_port: int = Field(default=19130, ge=0, le=65535)
    log_level: str = "INFO"
    # the model call happens inside a Kafka transaction (60 s timeout): the whole LLM budget must fit well inside it
    transaction_budget_s: float = Field(default=50.0, gt=0, le=55)

    @model_validator(mode="after")
    def _cost_bounds_are_consistent(self) -> Settings:
        if self.max_llm_calls_per_incident and not self.max_llm_tokens_per_incident:
            raise ValueError("max_llm_tokens_per_incident must be > 0 when calls are allowed")
        return self


def check_llm_fits_transaction(settings: Settings, llm: LlmSettings) -> None:
    """The worst-case model time (every attempt timing out, plus backoff) must fit the transaction budget."""
    worst = llm.timeout_s * (llm.max_retries + 1) + llm.backoff_s * (2 ** llm.max_retries)
    if settings.llm_enabled and worst > settings.transaction_budget_s:
        raise ValueError(
            f"LLM worst case {worst:.0f}s (timeout_s={llm.timeout_s} x {llm.max_retries + 1} attempts + backoff) "
            f"exceeds transaction_budget_s={settings.transaction_budget_s:.0f}s; lower PILOTHOUSE_LLM_TIMEOUT_S or "
            "PILOTHOUSE_LLM_MAX_RETRIES")

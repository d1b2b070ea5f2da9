"""Settings of the sensing service (environment prefix ``PILOTHOUSE_SENSING_``), read once in ``__main__``.

Kafka connection settings come from :class:`pilothouse.bus.config.BusSettings` (``PILOTHOUSE_KAFKA_*``) and the
redactor's from :class:`pilothouse.sensing.redaction.RedactionSettings` (``PILOTHOUSE_REDACTION_*``).

Nested values (tokens, mapping-rule files, Prometheus queries) are given as JSON in the environment, e.g.
``PILOTHOUSE_SENSING_TOKENS='{"alertmanager": "sha256:9f86d0...", "generic:datadog": "s3cret-token"}'``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Topic defaults are the catalogue's; tests point them at ``test.<uuid>`` topics.
ALERTS_TOPIC = "pilothouse.sensing.alerts.v2"
TELEMETRY_TOPIC = "pilothouse.sensing.telemetry.v1"
INCIDENTS_TOPIC = "pilothouse.sensing.incidents.v1"

#: The Online Boutique graph the sandbox fleet simulates (infra/fleet/README.md, "Graph"): caller -> callees.
DEFAULT_DEPENDENCY_MAP = Path(__file__).with_name("dependencies.yaml")


def token_digest(token: str) -> str:
    """What a presented bearer token is compared against: ``sha256:<hex>`` of its UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


class SensingSettings(BaseSettings):
    """Everything the sensing service needs besides Kafka and redaction settings."""

    model_config = SettingsConfigDict(env_prefix="PILOTHOUSE_SENSING_", frozen=True, extra="ignore")

    # ---- gateway ----------------------------------------------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8470, ge=0, le=65535)
    observability_port: int = Field(9470, ge=0, le=65535)
    tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="source -> bearer token, or its digest 'sha256:<hex>'. Sources: alertmanager, grafana, "
        "pagerduty, pagerduty_change, otlp_logs, generic:<mapping name>. A source without a token is refused.",
    )
    mapping_rules: dict[str, Path] = Field(
        default_factory=dict, description="generic mapping name -> rules YAML file (served at /v1/webhooks/<name>)"
    )
    max_body_bytes: int = Field(5 * 1024 * 1024, gt=0)
    max_in_flight: int = Field(64, gt=0, description="requests being handled at once; beyond it: 429")
    ack_timeout_s: float = Field(5.0, gt=0, description="how long a request waits for the broker's ack; then 503")
    retry_after_s: int = Field(5, gt=0, description="Retry-After for 429/503 answers")

    # ---- topics -----------------------------------------------------------------------------------------------
    alerts_topic: str = ALERTS_TOPIC
    telemetry_topic: str = TELEMETRY_TOPIC
    incidents_topic: str = INCIDENTS_TOPIC

    # ---- correlation ------------------------------------------------------------------------------------------
    app_id: str = Field("pilothouse-sensing-correlator", description="Faust app id; must start pilothouse-sensing-")
    correlator_observability_port: int = Field(9471, ge=0, le=65535)
    internal_replication_factor: int = Field(1, ge=1, description="replication of Faust's changelog topics")
    # Faust stops fetching while a commit (which flushes the producer) runs. Measured here (bench sensing): 5 s gave
    # ~10-25% more alerts/s but a p99 alert->incident latency of ~5 s (the stall of a long commit); 1 s gave p99
    # ~0.2 s. Latency matters more for incidents. Any interval is replay-safe after a crash.
    commit_interval_s: float = Field(1.0, gt=0, description="how often the correlator commits offsets")
    batch_max: int = Field(500, gt=0, le=10_000, description="most alerts the correlator applies as one batch "
                           "(one state write and one update per changed incident per batch); a batch never waits "
                           "for more alerts than are already queued")
    gather_max_ms: float = Field(
        5.0, ge=0, le=1000, description="while the log holds alerts beyond those taken, the correlator waits at most "
        "this long for them to join the batch (never when the log holds nothing more)")
    fetch_max_wait_ms: int = Field(
        10, ge=1, le=1500, description="how long a fetch of the correlator's consumer waits at the broker for data; "
        "records of other partitions wait behind it (Faust's fixed 1500 ms stalled the correlator for up to 1.5 s)")
    output_compression: Literal["none", "lz4", "zstd", "gzip", "snappy"] = Field(
        "lz4", description="compression of the correlator's state (changelog) and incident records. Each update "
        "carries the whole incident (its state record, twice: before and after); lz4 cuts those bytes ~8x, and the "
        "broker's CPU with them (bench sensing: p50 alert->incident latency 34 -> 25 ms). Faust replays the "
        "changelog through aiokafka, which needs cramjam for lz4/zstd/snappy (installed with pilothouse)")
    full_gc_idle_s: float = Field(
        0.5, gt=0, description="the correlator makes its full garbage collections itself, once it has had no alert "
        "for this long (CPython's own, under load, stopped the stream for 56-90 ms each: see "
        "pilothouse.bus.runtime.CollectionSchedule)")
    full_gc_max_interval_s: float = Field(
        600.0, ge=60, description="and at the latest this long after the last one, whatever the load")
    data_dir: Path = Path("/tmp/pilothouse-sensing")
    dependency_map: Path = DEFAULT_DEPENDENCY_MAP
    group_window_s: int = Field(900, gt=0, description="an alert joins an open incident seen within this window")
    reopen_window_s: int = Field(1800, ge=0, description="a resolved incident whose alert fires again reopens")
    topology_hops: int = Field(1, ge=0, le=3, description="services this many dependency hops apart are grouped")
    max_alerts_per_incident: int = Field(500, gt=0)

    # ---- evidence ---------------------------------------------------------------------------------------------
    prometheus_url: str | None = Field(None, description="Prometheus base URL; unset: no metric evidence")
    prometheus_queries: dict[str, str] = Field(
        default_factory=lambda: {
            "error_ratio": 'max by (service) (fleet_service_error_ratio{service=~"$services"})',
            "p99_latency_s": "histogram_quantile(0.99, sum by (service, le) "
            '(rate(fleet_request_duration_seconds_bucket{service=~"$services"}[1m])))',
            "cpu_usage_ratio": 'max by (service) (fleet_cpu_usage_ratio{service=~"$services"})',
            "memory_usage_ratio": 'max by (service) (fleet_memory_bytes{service=~"$services"} '
                                  '/ on (service) group_left fleet_memory_limit_bytes{service=~"$services"})',
        },
        description="signal -> PromQL; $services is replaced by a regex alternation of the incident's services",
    )
    prometheus_context_queries: dict[str, str] = Field(
        default_factory=lambda: {"replicas": 'max by (service) (fleet_replicas{service=~"$services"})'},
        description="attribute -> instant PromQL (one value per `service` label) added to that service's metric "
        "evidence, e.g. its current replica count, which a scale-out must start from; with kube-state-metrics: "
        "'max by (service) (label_replace(kube_deployment_spec_replicas{deployment=~\"$services\"}, "
        "\"service\", \"$1\", \"deployment\", \"(.*)\"))'",
    )
    prometheus_reference_exclude_query: str | None = Field(
        'max by (service) (ALERTS{service=~"$services"})',
        description="range PromQL (value > 0 per `service` label while the service was alerting): those times are left "
        "out of the pre-incident reference, so an earlier incident does not become the baseline; unset: keep them",
    )
    prometheus_timeout_s: float = Field(2.0, gt=0)
    prometheus_step_s: int = Field(15, gt=0)
    pre_incident_window_s: int = Field(1800, gt=0)
    evidence_refresh_s: int = Field(30, ge=0, description="metric evidence is re-queried at most this often")
    telemetry_buffer_per_service: int = Field(2000, gt=0)

    @field_validator("app_id")
    @classmethod
    def _app_id_prefix(cls, value: str) -> str:
        # The sensing principal may only create topics/groups under this prefix (changelog topics included).
        if not value.startswith("pilothouse-sensing-"):
            raise ValueError("app_id must start with 'pilothouse-sensing-' (the sensing principal's ACL prefix)")
        return value

    @field_validator("tokens")
    @classmethod
    def _tokens_nonempty(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for source, token in value.items():
            if len(token.get_secret_value()) < 16:
                raise ValueError(f"token for {source!r} is shorter than 16 characters")
        return value

    def token_digests(self) -> dict[str, str]:
        """source -> ``sha256:<hex>`` (plain tokens are hashed here, so only digests stay in memory)."""
        out = {}
        for source, token in self.tokens.items():
            raw = token.get_secret_value()
            out[source] = raw.lower() if raw.startswith("sha256:") and len(raw) == 71 else token_digest(raw)
        return out

"""``python -m pilothouse.reasoning`` (``pilothouse reasoning``): wiring only.

Settings: ``PILOTHOUSE_REASONING_*`` and ``PILOTHOUSE_LLM_*`` (see config.py and README.md); Kafka:
``PILOTHOUSE_KAFKA_*`` (BusSettings).
"""

from __future__ import annotations

import argparse
import sys

from pilothouse.bus.actions import load_actions
from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PilothouseError
from pilothouse.bus.service import ServiceRuntime
from pilothouse.bus.transactions import TransactionalProcessor
from pilothouse.reasoning.adapters.llm import CircuitBreaker, LlmClient
from pilothouse.reasoning.config import LlmSettings, Settings, check_llm_fits_transaction
from pilothouse.reasoning.handlers import ModelStep, ReasoningHandlers

RECORDS = {"incidents": "pilothouse.sensing.IncidentUpdated", "validations": "pilothouse.console.HypothesisValidated"}


def build(settings: Settings, llm: LlmSettings, bus: BusSettings) -> ServiceRuntime:
    """Assemble the reasoning process: one transactional consume → produce loop (one incident per transaction,
    so the model call always fits the transaction timeout)."""
    check_llm_fits_transaction(settings, llm)
    catalogue = load_actions()
    client = None
    if settings.llm_enabled:
        client = LlmClient(llm.base_url, llm.model, api_key=llm.api_key.get_secret_value() if llm.api_key else None,
                           timeout_s=llm.timeout_s, max_retries=llm.max_retries, backoff_s=llm.backoff_s,
                           breaker=CircuitBreaker(llm.circuit_failures, llm.circuit_reset_s))
    handlers = ReasoningHandlers(settings, ModelStep(settings, llm, client, catalogue), catalogue)
    processor = TransactionalProcessor(
        bus, group_id=settings.group_id, transactional_id=settings.transactional_id, batch_size=1,
        handlers={settings.topic_incidents: handlers.on_incident,
                  settings.topic_validations: handlers.on_validation},
        expected_records={settings.topic_incidents: RECORDS["incidents"],
                          settings.topic_validations: RECORDS["validations"]})
    runtime = ServiceRuntime("reasoning", settings.observability_port, log_level=settings.log_level)
    runtime.add_worker("reason", processor.run, stop=processor.stop, close=processor.close)
    if client is not None:
        runtime.add_closer(client.close)
    return runtime


def main(argv: list[str] | None = None) -> int:
    """Run the reasoning service until SIGTERM. Exit codes: 0 stopped cleanly, 1 a worker failed, 2 bad settings."""
    argparse.ArgumentParser(prog="pilothouse reasoning",
                            description="Run the reasoning service (settings from PILOTHOUSE_REASONING_*, "
                                        "PILOTHOUSE_LLM_* and PILOTHOUSE_KAFKA_*).").parse_args(argv)
    try:
        settings = Settings()
        llm = LlmSettings()
        bus = BusSettings(client_id="pilothouse-reasoning")
        runtime = build(settings, llm, bus)
    except (PilothouseError, ValueError) as e:
        print(f"pilothouse reasoning: cannot start: {e}", file=sys.stderr)
        return 2
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())

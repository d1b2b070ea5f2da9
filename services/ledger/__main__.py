"""``python -m pilothouse.ledger`` (``pilothouse ledger run``): wiring only.

Settings: ``PILOTHOUSE_LEDGER_*`` (see config.py and README.md); Kafka: ``PILOTHOUSE_KAFKA_*`` (BusSettings).
Workers: appender, mirror (when a Postgres DSN is set), checkpointer (when a signing key is set).
"""

from __future__ import annotations

import argparse
import base64
import sys
import uuid

from pilothouse.bus.config import BusSettings
from pilothouse.bus.errors import PilothouseError
from pilothouse.bus.producer import BusProducer
from pilothouse.bus.runtime import configure_logging
from pilothouse.bus.service import ServiceRuntime
from pilothouse.ledger.adapters.checkpoint_file import CheckpointFile
from pilothouse.ledger.adapters.kafka import CheckpointPublisher, TopicReader, open_appender
from pilothouse.ledger.adapters.postgres import PostgresLedgerMirror
from pilothouse.ledger.config import Settings
from pilothouse.ledger.domain import CheckpointSigner
from pilothouse.ledger.handlers import ChainFollower
from pilothouse.ledger.workers import AppenderWorker, CheckpointWorker, MirrorWorker


def signer_from(settings: Settings) -> CheckpointSigner | None:
    if settings.signing_key is None:
        return None
    return CheckpointSigner.from_seed(settings.signing_key_name,
                                      base64.b64decode(settings.signing_key.get_secret_value()))


def build(settings: Settings, bus: BusSettings, *, workers: tuple[str, ...] = ("appender", "mirror", "checkpointer")
          ) -> ServiceRuntime:
    """Assemble the ledger process. ``workers`` picks which to run (all by default; tests run them one by one)."""
    dsn = settings.postgres_dsn.get_secret_value() if settings.postgres_dsn else None
    if "mirror" in workers and dsn is None:
        raise PilothouseError("the mirror needs PILOTHOUSE_LEDGER_POSTGRES_DSN")
    if "checkpointer" in workers and settings.signing_key is None:
        raise PilothouseError("the checkpointer needs PILOTHOUSE_LEDGER_SIGNING_KEY (base64 Ed25519 seed)")
    producer = BusProducer(bus)
    runtime = ServiceRuntime("ledger", settings.observability_port, log_level=settings.log_level)

    def mirror_store(purpose: str) -> PostgresLedgerMirror:
        assert dsn is not None
        return PostgresLedgerMirror(dsn, schema=settings.postgres_schema, consumer_group=settings.group(purpose))

    if "mirror" in workers or "checkpointer" in workers:
        if dsn is not None:
            owner = settings.postgres_admin_dsn.get_secret_value() if settings.postgres_admin_dsn else dsn
            with PostgresLedgerMirror(owner, schema=settings.postgres_schema) as m:
                m.migrate(writer_role=settings.postgres_writer_role)

    if "appender" in workers:
        proc = open_appender(bus, chain=settings.chain, decision_topics=settings.decision_topics,
                             topic_entries=settings.topic_entries, group_id=settings.group("appender"),
                             transactional_id=settings.transactional_id, producer=producer,
                             window=settings.recover_window, batch_size=settings.batch_size,
                             timeout_s=settings.startup_timeout_s)
        appender = AppenderWorker(proc)
        runtime.add_worker("appender", appender.run, stop=appender.stop, close=appender.close)

    if "mirror" in workers:
        def reader_from(offsets: dict[int, int]) -> TopicReader:
            return TopicReader(bus, settings.topic_entries, group_id=settings.group(f"mirror.{uuid.uuid4().hex[:8]}"),
                               producer=producer, start=lambda p, low, high: offsets.get(p, 0))

        mirror = MirrorWorker(reader_from, mirror_store("mirror"), topic=settings.topic_entries,
                              batch=settings.mirror_batch_size)
        runtime.add_worker("mirror", mirror.run, stop=mirror.stop, close=mirror.close)

    if "checkpointer" in workers:
        signer = signer_from(settings)
        if signer is None:
            raise PilothouseError("the checkpointer needs PILOTHOUSE_LEDGER_SIGNING_KEY (base64 Ed25519 seed)")
        reader = TopicReader(bus, settings.topic_entries,
                             group_id=settings.group(f"checkpointer.{uuid.uuid4().hex[:8]}"), producer=producer,
                             start=lambda p, low, high: low)
        checkpointer = CheckpointWorker(
            reader, ChainFollower(settings.chain), signer, file=CheckpointFile(settings.checkpoint_dir),
            publisher=CheckpointPublisher(producer, settings.topic_checkpoints),
            mirror=mirror_store("checkpoints") if dsn else None,
            every=settings.checkpoint_every_entries, interval_s=settings.checkpoint_interval_s)
        runtime.add_worker("checkpointer", checkpointer.run, stop=checkpointer.stop, close=checkpointer.close)

    runtime.add_closer(lambda: producer.flush(10.0))
    return runtime


def main(argv: list[str] | None = None) -> int:
    """Run the ledger until SIGTERM. Exit codes: 0 stopped cleanly, 1 a worker failed, 2 cannot start."""
    ap = argparse.ArgumentParser(prog="pilothouse ledger run",
                                 description="Run the ledger service (settings from PILOTHOUSE_LEDGER_* and "
                                             "PILOTHOUSE_KAFKA_*).")
    ap.add_argument("--workers", default="appender,mirror,checkpointer",
                    help="comma-separated subset of appender,mirror,checkpointer")
    args = ap.parse_args(argv)
    chosen = tuple(w.strip() for w in args.workers.split(",") if w.strip())
    unknown = set(chosen) - {"appender", "mirror", "checkpointer"}
    if unknown or not chosen:
        print(f"pilothouse ledger: unknown workers {sorted(unknown)}", file=sys.stderr)
        return 2
    try:
        settings = Settings()
        bus = BusSettings(client_id="pilothouse-ledger")
        configure_logging("ledger", settings.log_level)  # start-up (fencing, chain recovery) logs too
        runtime = build(settings, bus, workers=chosen)
    except (PilothouseError, ValueError) as e:
        print(f"pilothouse ledger: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. the Kafka client refusing its configuration: say so, exit 2
        print(f"pilothouse ledger: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())

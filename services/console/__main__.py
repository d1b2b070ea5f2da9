"""``python -m pilothouse.console`` (``pilothouse console``): run the approval console, or make a password hash.

    pilothouse console [serve]          run it (settings PILOTHOUSE_CONSOLE_*, Kafka PILOTHOUSE_KAFKA_*)
    pilothouse console hash-password    read a password (twice, no echo; or one line on stdin) and print its argon2id hash

Wiring only: settings, identity, read model, consumer loop, producer, web server, runtime.
"""

from __future__ import annotations

import getpass
import sys


def hash_password_main(argv: list[str]) -> int:
    from pilothouse.console.auth import hash_password

    if argv and argv[0] in ("-h", "--help"):
        print("usage: pilothouse console hash-password   (prompts; or pipe one line on stdin)")
        return 0
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            print("pilothouse console hash-password: the two passwords differ; nothing printed", file=sys.stderr)
            return 2
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    try:
        print(hash_password(first))
    except ValueError as e:
        print(f"pilothouse console hash-password: {e}", file=sys.stderr)
        return 2
    return 0


def serve(argv: list[str]) -> int:
    import uvicorn
    from pydantic import ValidationError

    from pilothouse.bus.config import BusSettings
    from pilothouse.bus.consumer import ConsumerLoop
    from pilothouse.bus.errors import PilothouseError
    from pilothouse.bus.producer import BusProducer
    from pilothouse.bus.service import ServiceRuntime
    from pilothouse.console.auth import LocalAccounts
    from pilothouse.console.config import ConsoleSettings
    from pilothouse.console.domain import ReadModel
    from pilothouse.console.handlers import build_handlers
    from pilothouse.console.publish import BusDecisionSink
    from pilothouse.console.web import Console
    from pilothouse.bus.attestation import HumanKeyRegistry

    try:
        settings = ConsoleSettings()
        bus = BusSettings()
        identity = LocalAccounts.from_file(settings.users_file)
        if settings.human_keys is not None:  # refuse a bad registry at start, not at the first decision
            HumanKeyRegistry.from_file(settings.human_keys)
        if bus.security_protocol.startswith("SASL") and (not bus.username or bus.password is None):
            print("pilothouse console: set PILOTHOUSE_KAFKA_USERNAME and PILOTHOUSE_KAFKA_PASSWORD (the console "
                  "principal's credentials)", file=sys.stderr)
            return 2
    except ValidationError as e:
        print(f"pilothouse console: bad settings: {e}", file=sys.stderr)
        return 2
    except PilothouseError as e:
        print(f"pilothouse console: {e}", file=sys.stderr)
        return 2

    model = ReadModel()
    producer = BusProducer(bus)
    handlers, expected = build_handlers(model, settings.topics)
    loop = ConsumerLoop(bus, group_id=settings.consumer_group, handlers=handlers, dlq_producer=producer,
                        expected_records=expected, auto_offset_reset=settings.auto_offset_reset)
    console = Console(settings, model, BusDecisionSink(producer, settings.output_topics), identity)
    server = uvicorn.Server(uvicorn.Config(console.app, host=settings.host, port=settings.port, log_level="warning",
                                           timeout_graceful_shutdown=3, proxy_headers=False))

    def stop_web() -> None:
        console.stopping.set()
        server.should_exit = True

    runtime = ServiceRuntime("console", settings.observability_port, log_level=settings.log_level)
    runtime.add_worker("read-model", loop.run, stop=loop.stop, close=loop.close)
    runtime.add_worker("web", server.run, stop=stop_web)
    runtime.add_closer(producer.close)
    runtime.health.add("web", lambda: server.started)
    return runtime.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``pilothouse console [serve|hash-password]``."""
    argv = sys.argv[1:] if argv is None else argv
    sub, rest = (argv[0], argv[1:]) if argv else ("serve", [])
    if sub in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if sub == "hash-password":
        return hash_password_main(rest)
    if sub == "serve":
        return serve(rest)
    print(f"pilothouse console: unknown subcommand {sub!r} (serve|hash-password)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pilothouse.sensing [all|gateway|correlator]`` — wiring only.

* ``gateway``: the ingest HTTP gateway (uvicorn on ``gateway_port``) + /metrics and /health on ``observability_port``.
* ``correlator``: the Faust correlation worker (:mod:`pilothouse.sensing.app_faust`), /metrics + /health on
  ``correlator_observability_port``.
* ``all`` (default): the gateway in this process and the correlator as a child process (Faust wants the main thread
  and its own event loop); if either ends, both stop.

Settings from the environment: ``PILOTHOUSE_SENSING_*`` (SensingSettings), ``PILOTHOUSE_KAFKA_*`` (BusSettings),
``PILOTHOUSE_REDACTION_*`` (RedactionSettings).
"""

from __future__ import annotations

import gc
import subprocess
import sys

from pydantic import ValidationError

from pilothouse.bus.errors import ConfigurationError


def run_gateway(child: subprocess.Popen | None = None) -> int:
    import uvicorn

    from pilothouse.bus.config import BusSettings
    from pilothouse.bus.runtime import watch_gc
    from pilothouse.bus.service import ServiceRuntime
    from pilothouse.sensing.config import SensingSettings
    from pilothouse.sensing.gateway import build_gateway
    from pilothouse.sensing.redaction import RedactionSettings, Redactor

    settings = SensingSettings()
    gateway = build_gateway(settings, BusSettings(), Redactor.from_settings(RedactionSettings()))
    # What lives as long as the gateway (the redaction rule sets above all) is left out of the cyclic collector's
    # full collections from here on: walking it paused every request (as gc.freeze() did for the correlator).
    gc.freeze()
    watch_gc()
    server = uvicorn.Server(uvicorn.Config(gateway.app, host=settings.gateway_host, port=settings.gateway_port,
                                           log_config=None, access_log=False))

    def stop_server() -> None:
        server.should_exit = True

    runtime = ServiceRuntime("sensing-gateway", settings.observability_port)
    runtime.add_worker("gateway", server.run, stop=stop_server, close=lambda: gateway.producer.close(10))
    if child is not None:
        runtime.add_worker("correlator", child.wait, stop=child.terminate,
                           close=lambda: child.wait(30))
    return runtime.run()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ConfigurationError as e:  # bad settings or rules: one clear line, exit 2, never a stack trace
        print(f"pilothouse sensing: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or e.title}: {err['msg']}" for err in e.errors())
        print(f"pilothouse sensing: invalid settings ({e.title}): {problems}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argv[0] if argv else "all"
    if mode == "gateway":
        return run_gateway()
    if mode == "correlator":
        from pilothouse.sensing.app_faust import main as correlator_main

        return correlator_main(argv[1:])
    if mode == "all":
        child = subprocess.Popen([sys.executable, "-m", "pilothouse.sensing", "correlator"])
        try:
            return run_gateway(child)
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait(30)
    print("usage: python -m pilothouse.sensing [all|gateway|correlator]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

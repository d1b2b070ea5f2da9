"""The OPA adapter: evaluates the policy bundle's entrypoints through opa-python-client.

One :class:`OpaPolicyEngine` holds one ``OpaClient`` and therefore one ``requests.Session``: HTTP keep-alive reuses the
TCP connection, which is what keeps the per-decision overhead small (see benchmarks/policy.py). SDK and HTTP errors are
translated into the project's errors: transient ones into :class:`PolicyEngineUnavailable` (retryable), everything
else into :class:`PolicyEvaluationFailed` (permanent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from opa_client import OpaClient
from opa_client.errors import ConnectionsError, PolicyNotFoundError
from pydantic import SecretStr, ValidationError

from pilothouse.policy.domain import (
    ENTRYPOINTS,
    Decision,
    DecisionRecord,
    PolicyEngineUnavailable,
    PolicyEvaluationFailed,
    PolicyInput,
    PolicyInputInvalid,
    document_schemas,
    input_digest,
    parse_policy_input,
    record_decision,
    render_readme,
)

Entrypoint = Literal["proposal", "approvals"]

#: Data path of the bundle revision (policies/pilothouse/config/data.json).
REVISION_PATH = "pilothouse/config/bundle_revision"


class OpaPolicyEngine:
    """Evaluates decisions against a running OPA server (``opa run --server policies/``)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8181,
        *,
        timeout_s: float = 1.0,
        retries: int = 0,
        token: SecretStr | None = None,
        ssl: bool = False,
    ) -> None:
        # retries=0: the caller owns retries (bounded backoff on PolicyEngineUnavailable), so one slow OPA is not
        # hidden behind urllib3's own retry loop.
        self._client = OpaClient(
            host=host,
            port=port,
            timeout=timeout_s,
            retries=retries,
            ssl=ssl,
            token=token.get_secret_value() if token is not None else None,
        )
        # Policy decisions must never be routed through an HTTP proxy picked up from the environment (HTTP_PROXY,
        # .netrc): a proxy could see or alter authorization traffic. Not consulting the environment also removes
        # per-request proxy/netrc lookups from the hot path. opa-python-client has no option for it, so set it on
        # the requests.Session it owns.
        self._client._session.trust_env = False
        self.endpoint = f"{'https' if ssl else 'http'}://{host}:{port}"
        #: Process id of the OPA server when :func:`local_opa_server` started it (benchmarks read its CPU time).
        self.server_pid: int | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> OpaPolicyEngine:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyInputInvalid(f"OPA url must look like http://host:port, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 8181)
        return cls(parts.hostname, port, ssl=parts.scheme == "https", **kwargs)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def close(self) -> None:
        self._client.close_connection()

    def __enter__(self) -> OpaPolicyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_until_ready(self, timeout_s: float = 10.0) -> None:
        """Block until OPA reports healthy with its bundles loaded, or raise PolicyEngineUnavailable."""
        try:
            self._client.wait_for_ready(timeout=timeout_s, interval=0.05, query={"bundles": True})
        except ConnectionsError as e:
            raise PolicyEngineUnavailable(f"OPA at {self.endpoint} not ready: {e.message}") from e

    # -- evaluation -----------------------------------------------------------------------------------------------

    def evaluate(self, path: str, input_document: dict[str, Any]) -> Any:
        """POST ``input_document`` to ``/v1/data/<path>`` and return ``result``; undefined results are errors."""
        return self._query(path, input_document, None)["result"]

    def evaluate_with_metrics(self, path: str, input_document: dict[str, Any]) -> tuple[Any, dict[str, int]]:
        """Like :meth:`evaluate`, also returning OPA's own timers (``timer_rego_query_eval_ns`` ...)."""
        body = self._query(path, input_document, {"metrics": "true"})
        return body["result"], dict(body.get("metrics", {}))

    def _query(self, path: str, input_document: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
        package, _, rule = path.rpartition("/")
        try:
            body = self._client.query_rule(input_document, package_path=package, rule_name=rule, query_params=params)
        except (requests.ConnectionError, requests.Timeout, ConnectionsError) as e:
            raise PolicyEngineUnavailable(f"OPA at {self.endpoint} unreachable: {e}") from e
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            code, detail = _opa_error(e.response)
            # OPA's own evaluation errors (conflicting rule values, builtin errors) come back as 500 internal_error:
            # the same input under the same bundle fails the same way, so retrying cannot help.
            if code == "internal_error":
                raise PolicyEvaluationFailed(f"OPA could not evaluate {path}: {detail}") from e
            if status >= 500 or status == 429:
                raise PolicyEngineUnavailable(f"OPA answered {status} for {path}: {detail}") from e
            raise PolicyEvaluationFailed(f"OPA refused {path} ({status} {code}): {detail}") from e
        except (requests.RequestException, ValueError) as e:  # ValueError: a body that is not JSON
            raise PolicyEvaluationFailed(f"OPA answer for {path} unreadable: {e}") from e
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyEvaluationFailed(f"{path} is undefined in OPA: is the pilothouse bundle loaded?")
        return body

    def decide(self, entrypoint: Entrypoint, policy_input: PolicyInput) -> DecisionRecord:
        """Evaluate one entrypoint and return the validated decision with its replay data (id, input hash)."""
        if entrypoint not in ENTRYPOINTS:
            raise PolicyInputInvalid(f"unknown entrypoint {entrypoint!r}; use one of {sorted(ENTRYPOINTS)}")
        document = policy_input.to_opa()
        result = self.evaluate(ENTRYPOINTS[entrypoint], document)
        try:
            decision = Decision.model_validate(result)
        except ValidationError as e:
            raise PolicyEvaluationFailed(f"OPA returned an invalid {entrypoint} decision: {e}") from e
        if decision.entrypoint != entrypoint:
            raise PolicyEvaluationFailed(f"asked {entrypoint}, OPA answered for {decision.entrypoint}")
        return record_decision(policy_input, decision, digest=input_digest(document))

    def decide_proposal(self, policy_input: PolicyInput) -> DecisionRecord:
        return self.decide("proposal", policy_input)

    def decide_approvals(self, policy_input: PolicyInput) -> DecisionRecord:
        return self.decide("approvals", policy_input)

    def bundle_revision(self) -> str:
        try:
            return str(self._client.get_data(REVISION_PATH)["result"])
        except PolicyNotFoundError as e:
            raise PolicyEvaluationFailed(f"{REVISION_PATH} missing in OPA: {e.message}") from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise PolicyEngineUnavailable(f"OPA at {self.endpoint} unreachable: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# A private OPA server for tests, benchmarks and one-off evaluations (the local stack runs its own).
# ----------------------------------------------------------------------------------------------------------------

OPA_CANDIDATES = (Path.home() / ".cache/pilothouse/bin/opa", Path("/tmp/gobin/opa"))


def find_opa_binary() -> Path | None:
    """``~/.cache/pilothouse/bin/opa``, else ``/tmp/gobin/opa``, else ``opa`` on PATH; None when there is none."""
    for candidate in OPA_CANDIDATES:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("opa")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_opa_server(policies: Path, *, binary: Path | None = None, ready_timeout_s: float = 30.0) -> Iterator[OpaPolicyEngine]:
    """Run ``opa run --server --addr 127.0.0.1:<free port> <policies>`` and yield an engine connected to it."""
    opa = binary or find_opa_binary()
    if opa is None:
        raise PolicyEngineUnavailable("no opa binary: build it with `pilothouse stack up` or put opa on PATH")
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(opa), "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error", "--skip-version-check",
             str(policies)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        engine = OpaPolicyEngine("127.0.0.1", port)
        engine.server_pid = proc.pid
        try:
            try:
                engine.wait_until_ready(ready_timeout_s)
            except PolicyEngineUnavailable as e:
                log.seek(0)
                raise PolicyEngineUnavailable(f"{e}; opa said: {log.read().decode(errors='replace')[-2000:]}") from e
            yield engine
        finally:
            engine.close()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _opa_error(response: requests.Response | None) -> tuple[str, str]:
    """(OPA error code, message with the first detailed error) from an error response."""
    if response is None:
        return "", "no response"
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200]
    if not isinstance(body, dict):
        return "", str(body)[:200]
    message = str(body.get("message", ""))
    details = [d.get("message", "") for d in body.get("errors", []) if isinstance(d, dict)]
    if details:
        message = f"{message}: {details[0]}"
    return str(body.get("code", "")), message[:1000]


# ----------------------------------------------------------------------------------------------------------------
# Command line: `pilothouse policy decide|schema ...`
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``decide``: evaluate an input document file against OPA and print the decision record (exit 0; 2 for a bad
    input, 3 when OPA is unavailable or returns no valid decision). ``schema``: print the input/decision JSON schemas,
    or with ``--readme PATH`` rewrite (or ``--check``) the generated blocks of policies/README.md."""
    parser = argparse.ArgumentParser(prog="pilothouse policy", description="Evaluate and document pilothouse policy")
    sub = parser.add_subparsers(dest="command", required=True)
    decide = sub.add_parser("decide", help="evaluate an input document against the OPA server")
    decide.add_argument("entrypoint", choices=sorted(ENTRYPOINTS))
    decide.add_argument("--input", required=True, help="path to the input JSON document, or - for stdin")
    decide.add_argument("--opa-url", default="http://127.0.0.1:8181")
    schema = sub.add_parser("schema", help="print or render the input and decision schemas")
    schema.add_argument("--readme", type=Path, help="rewrite the generated blocks of this README")
    schema.add_argument("--check", action="store_true", help="with --readme: exit 1 if the README is out of date")
    args = parser.parse_args(argv)

    if args.command == "schema":
        return _schema_command(args.readme, args.check)
    try:
        raw = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
        policy_input = parse_policy_input(raw)
    except (OSError, PolicyInputInvalid) as e:
        print(f"input refused: {e}", file=sys.stderr)
        return 2
    try:
        with OpaPolicyEngine.from_url(args.opa_url) as engine:
            record = engine.decide(args.entrypoint, policy_input)
    except (PolicyEngineUnavailable, PolicyEvaluationFailed) as e:
        print(f"no decision: {e}", file=sys.stderr)
        return 3
    print(record.model_dump_json(indent=2))
    return 0


def _schema_command(readme: Path | None, check: bool) -> int:
    if readme is None:
        print(json.dumps(document_schemas(), indent=2, sort_keys=True))
        return 0
    current = readme.read_text(encoding="utf-8")
    rendered = render_readme(current)
    if check:
        if rendered != current:
            print(f"{readme} is out of date: run `pilothouse policy schema --readme {readme}`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

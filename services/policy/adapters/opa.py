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
import ssl as ssl_module
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
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
    canonical_json,
    document_schemas,
    parse_policy_input,
    record_decision,
    render_readme,
    sha256_hex,
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
        # The decision hot path does not go through requests: one persistent HTTP/1.1 keep-alive connection
        # (http.client) carrying pre-serialised bytes costs a fraction of requests' per-call work (see
        # benchmarks/policy.py). opa-python-client stays for readiness and data reads.
        headers = f"Host: {host}:{port}\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
        if token is not None:
            headers += f"Authorization: Bearer {token.get_secret_value()}\r\n"
        self._conn = KeepAliveConnection(host, port, timeout_s=timeout_s, tls=ssl, headers=headers.encode("latin-1"))
        self._conn_lock = threading.Lock()
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
        with self._conn_lock:
            self._conn.close()
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
        return self._query(path, orjson.dumps(input_document), "")["result"]

    def evaluate_json(self, path: str, input_json: bytes) -> Any:
        """Like :meth:`evaluate` for an input already serialised (e.g. canonically, as :meth:`decide` sends it)."""
        return self._query(path, input_json, "")["result"]

    def evaluate_with_metrics(self, path: str, input_document: dict[str, Any]) -> tuple[Any, dict[str, int]]:
        """Like :meth:`evaluate`, also returning OPA's own timers (``timer_rego_query_eval_ns`` ...)."""
        body = self._query(path, orjson.dumps(input_document), "?metrics=true")
        return body["result"], dict(body.get("metrics", {}))

    def _post(self, url: str, body: bytes) -> tuple[int, bytes]:
        """One POST on the kept-alive connection. A connection the server closed while idle is reopened once:
        a data query has no side effects, so sending it again is safe."""
        with self._conn_lock:
            for attempt in (1, 2):
                try:
                    return self._conn.post(url, body)
                except StaleConnection as e:
                    if attempt == 2:
                        raise PolicyEngineUnavailable(f"OPA at {self.endpoint} closed the connection: {e}") from e
                except (OSError, ValueError) as e:  # timeouts, refused connections, a garbled answer
                    self._conn.close()
                    raise PolicyEngineUnavailable(f"OPA at {self.endpoint} unreachable: {e}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _query(self, path: str, input_json: bytes, params: str) -> dict[str, Any]:
        status, data = self._post(f"/v1/data/{path}{params}", b'{"input":' + input_json + b"}")
        if status != 200:
            code, detail = _opa_error_body(data)
            # OPA's own evaluation errors (conflicting rule values, builtin errors) come back as 500 internal_error:
            # the same input under the same bundle fails the same way, so retrying cannot help.
            if code == "internal_error":
                raise PolicyEvaluationFailed(f"OPA could not evaluate {path}: {detail}")
            if status >= 500 or status == 429:
                raise PolicyEngineUnavailable(f"OPA answered {status} for {path}: {detail}")
            raise PolicyEvaluationFailed(f"OPA refused {path} ({status} {code}): {detail}")
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise PolicyEvaluationFailed(f"OPA answer for {path} unreadable: {e}") from e
        if not isinstance(body, dict) or "result" not in body:
            raise PolicyEvaluationFailed(f"{path} is undefined in OPA: is the pilothouse bundle loaded?")
        return body

    def decide(self, entrypoint: Entrypoint, policy_input: PolicyInput) -> DecisionRecord:
        """Evaluate one entrypoint and return the validated decision with its replay data (id, input hash).

        The input is serialised once, canonically: the same bytes are sent to OPA and hashed (``input_hash``)."""
        if entrypoint not in ENTRYPOINTS:
            raise PolicyInputInvalid(f"unknown entrypoint {entrypoint!r}; use one of {sorted(ENTRYPOINTS)}")
        canonical = canonical_json(policy_input.to_opa())
        result = self._query(ENTRYPOINTS[entrypoint], canonical, "")["result"]
        try:
            decision = Decision.model_validate(result)
        except ValidationError as e:
            raise PolicyEvaluationFailed(f"OPA returned an invalid {entrypoint} decision: {e}") from e
        if decision.entrypoint != entrypoint:
            raise PolicyEvaluationFailed(f"asked {entrypoint}, OPA answered for {decision.entrypoint}")
        return record_decision(policy_input, decision, digest=sha256_hex(canonical))

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


class StaleConnection(Exception):
    """The server closed a kept-alive connection before answering (safe to resend a read-only query once)."""


class KeepAliveConnection:
    """A minimal HTTP/1.1 client for one server: persistent connection, TCP_NODELAY, request head and body sent in
    one write, Content-Length or chunked answers. Not thread-safe (the engine holds a lock around it).

    Why not requests or http.client: per decision they cost 0.3-0.6 ms of client CPU (header objects, email-parser
    response headers, two writes per request), comparable to OPA's evaluation itself (benchmarks/policy.py)."""

    MAX_BODY = 8 * 1024 * 1024

    def __init__(self, host: str, port: int, *, timeout_s: float, tls: bool, headers: bytes):
        self.host, self.port, self.timeout_s, self.tls, self.headers = host, port, timeout_s, tls, headers
        self._sock: socket.socket | None = None
        self._buf = b""

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._buf = None, b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl_module.create_default_context().wrap_socket(sock, server_hostname=self.host)
        return sock

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reused = self._sock is not None
        if self._sock is None:
            self._sock = self._connect()
        request = b"POST " + path.encode("ascii") + b" HTTP/1.1\r\n" + self.headers + \
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        try:
            self._sock.sendall(request)
            return self._read_response()
        except (ConnectionResetError, BrokenPipeError, _Closed) as e:
            self.close()
            if reused:
                raise StaleConnection(str(e) or type(e).__name__) from e
            raise ConnectionResetError(f"connection closed before an answer: {e}") from e
        except BaseException:
            self.close()  # never reuse a connection left in the middle of a response
            raise

    def _fill(self) -> None:
        assert self._sock is not None
        chunk = self._sock.recv(65536)
        if not chunk:
            raise _Closed("server closed the connection")
        self._buf += chunk

    def _read_until(self, marker: bytes) -> bytes:
        while True:
            at = self._buf.find(marker)
            if at >= 0:
                head, self._buf = self._buf[:at], self._buf[at + len(marker):]
                return head
            if len(self._buf) > 65536:
                raise ValueError("HTTP header section too long")
            self._fill()

    def _read_exactly(self, n: int) -> bytes:
        if n > self.MAX_BODY:
            raise ValueError(f"HTTP body of {n} bytes is too large")
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _read_response(self) -> tuple[int, bytes]:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, _, header_text = head.partition("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in header_text.split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";", 1)[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")  # no trailers are sent by OPA; consume the final CRLF
                    break
                body += self._read_exactly(size)
                self._read_until(b"\r\n")
                if len(body) > self.MAX_BODY:
                    raise ValueError("HTTP body too large")
        else:
            body = self._read_exactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body


class _Closed(Exception):
    pass


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
def local_opa_server(policies: Path, *, binary: Path | None = None, ready_timeout_s: float = 30.0,
                     watch: bool = False) -> Iterator[OpaPolicyEngine]:
    """Run ``opa run --server --addr 127.0.0.1:<free port> <policies>`` and yield an engine connected to it.
    ``watch``: also ``--watch``, so that edited policy and data files are reloaded without a restart."""
    opa = binary or find_opa_binary()
    if opa is None:
        raise PolicyEngineUnavailable("no opa binary: build it with `pilothouse stack up` or put opa on PATH")
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(opa), "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error", "--skip-version-check",
             # The stack's flags (infra/stack/opa.py): no access log, test files not loaded.
             "--log-level-request", "debug", "--ignore", "*_test.rego",
             # Data (config) read from an AST store needs no conversion per read: ~6% fewer allocations/decision.
             "--optimize-store-for-read-speed", *(["--watch"] if watch else []), str(policies)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # OPA allocates ~1.4-2.4k objects per decision; collecting 4x less often cut its CPU per decision by
            # ~15% on our 2-vCPU machines (benchmarks/policy.py) for a few MiB more heap. One sequential client per
            # server: GOMAXPROCS=1 saves another 10-18% (less scheduler spinning between requests).
            env={**os.environ, "GOGC": os.environ.get("GOGC", "400"), "GOMAXPROCS": os.environ.get("GOMAXPROCS", "1")},
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


def _opa_error_body(data: bytes) -> tuple[str, str]:
    """(OPA error code, message with the first detailed error) from an error response body."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "", data[:200].decode("utf-8", errors="replace")
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
    or with ``--readme PATH`` rewrite (or ``--check``) the generated blocks of policies/README.md.
    ``run``, ``replay`` and ``keygen`` are handed to :mod:`pilothouse.policy.cli` (the ``pilothouse policy``
    command may point at either)."""
    if argv and argv[0] in ("run", "replay", "keygen", "-h", "--help"):
        from pilothouse.policy.cli import main as cli_main  # noqa: PLC0415 - only for these subcommands

        return cli_main(argv)
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

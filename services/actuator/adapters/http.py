"""JSON over HTTP (httpx) for executors: one client per target, SDK errors translated into pilothouse errors.

Unreachable targets, timeouts and 5xx answers are RetryableError (the action may or may not have been applied: the
caller retries with the same Idempotency-Key, which the target deduplicates). Other answers are returned as they are
for the executor to interpret (a 409 precondition failure is an answer, not an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from pilothouse.bus.errors import PermanentError, RetryableError


class TargetUnavailable(RetryableError):
    """The target did not answer, timed out or answered 5xx."""


class TargetAnswerInvalid(PermanentError):
    """The target answered something that is not a JSON object."""


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed", "").lower() == "true"


class JsonHttpClient:
    """A small JSON client bound to one base URL (thread-safe: httpx.Client is)."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout_s: float = 10.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> HttpAnswer:
        """Send one request; TargetUnavailable on transport errors and 5xx, TargetAnswerInvalid on non-JSON."""
        try:
            r = self._client.request(method, path, content=None if json is None else orjson.dumps(json),
                                     params=params, headers={"Content-Type": "application/json", **(headers or {})})
        except httpx.HTTPError as e:
            raise TargetUnavailable(f"{method} {self.base_url}{path}: {type(e).__name__}: {e}") from e
        text = r.text
        if r.status_code >= 500:
            raise TargetUnavailable(f"{method} {self.base_url}{path}: HTTP {r.status_code}: {text[:300]}")
        try:
            body = orjson.loads(r.content) if r.content else {}
        except orjson.JSONDecodeError as e:
            raise TargetAnswerInvalid(f"{method} {path}: HTTP {r.status_code}, not JSON: {text[:200]!r}") from e
        if not isinstance(body, dict):
            raise TargetAnswerInvalid(f"{method} {path}: HTTP {r.status_code}, JSON is not an object")
        return HttpAnswer(r.status_code, body, {k.lower(): v for k, v in r.headers.items()}, text)

    def close(self) -> None:
        self._client.close()

"""The one LLM client: any OpenAI-compatible server (vLLM in production, llama.cpp's llama-server locally).

Structured output uses the one portable request form, ``response_format={"type": "json_schema", ...}``; the answer
is validated again here with jsonschema (llama.cpp does not enforce number ranges, and a server may ignore the
schema entirely). Each HTTP attempt has a timeout, retries are bounded (timeouts, connection errors, 5xx, 429 only),
and a circuit breaker stops calling a server that keeps failing. SDK errors become project errors:
:class:`LlmUnavailable` (retryable) and :class:`LlmInvalidOutput` (permanent).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema
import orjson

from pilothouse.bus.errors import PermanentError, RetryableError


class LlmUnavailable(RetryableError):
    """The server did not answer usefully in time (connection refused, timeout, 5xx, 429)."""


class CircuitOpen(LlmUnavailable):
    """Too many consecutive failures: the client does not call the server until the reset time has passed."""


class LlmInvalidOutput(PermanentError):
    """The server answered, but not with JSON that matches the schema (or with a 4xx refusal)."""


class CircuitBreaker:
    """Closed → (``failures`` consecutive failures) → open → (``reset_s``) → one probe (half-open) → closed/open.

    Thread-safe; the clock is injectable so tests need no sleeps.
    """

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic):
        self.threshold = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """closed | open | half_open."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half_open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        """May a call go out now? In half-open state exactly one probe is let through."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._clock() - self._opened_at < self.reset_s or self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self._consecutive, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._consecutive += 1
            if self._probing or self._consecutive >= self.threshold:
                self._opened_at = self._clock()
            self._probing = False


@dataclass(frozen=True, slots=True)
class LlmResult:
    """A validated answer and what it cost."""

    data: dict[str, Any]
    model: str                    # the model the server says answered (falls back to the requested name)
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float             # all attempts, wall clock
    attempts: int
    finish_reason: str

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LlmClient:
    """Chat completions with a JSON schema; one instance per process (it holds the connection pool and breaker)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 20.0,
                 max_retries: int = 1, backoff_s: float = 0.5, breaker: CircuitBreaker | None = None,
                 sleep: Callable[[float], None] = time.sleep, transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.breaker = breaker or CircuitBreaker(3, 60.0)
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, transport=transport,
                                  timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def complete_json(self, messages: Sequence[Mapping[str, str]], schema: Mapping[str, Any], *,
                      schema_name: str, validate_with: Mapping[str, Any] | None = None,
                      max_tokens: int, sampling: Mapping[str, float | int]) -> LlmResult:
        """Ask for JSON matching ``schema``; validate the answer against ``validate_with`` (default: ``schema``).

        Raises CircuitOpen without calling when the breaker is open, LlmUnavailable after the bounded retries,
        LlmInvalidOutput when the answer is not schema-valid JSON. Every failure counts against the breaker.
        """
        if not self.breaker.allow():
            raise CircuitOpen(f"circuit open after repeated failures of {self.base_url}; not calling")
        body = {
            "model": self.model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {"name": schema_name, "schema": schema,
                                                                         "strict": True}},
            **dict(sampling),
        }
        t0 = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._http.post("/chat/completions", json=body)
            except httpx.TimeoutException as e:
                err: Exception = LlmUnavailable(f"LLM timed out after {self._http.timeout.read}s ({type(e).__name__})")
            except httpx.HTTPError as e:
                err = LlmUnavailable(f"LLM unreachable: {type(e).__name__}: {e}")
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    err = LlmUnavailable(f"LLM answered HTTP {resp.status_code}: {resp.text[:200]}")
                elif resp.status_code >= 400:
                    self.breaker.failure()
                    raise LlmInvalidOutput(f"LLM refused the request: HTTP {resp.status_code}: {resp.text[:200]}")
                else:
                    try:
                        result = self._parse(resp, validate_with or schema, t0, attempt)
                    except LlmInvalidOutput:
                        self.breaker.failure()
                        raise
                    self.breaker.success()
                    return result
            if attempt > self.max_retries:
                self.breaker.failure()
                raise err
            self._sleep(self.backoff_s * 2 ** (attempt - 1))

    def _parse(self, resp: httpx.Response, schema: Mapping[str, Any], t0: float, attempts: int) -> LlmResult:
        try:
            envelope = resp.json()
            choice = envelope["choices"][0]
            content = choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("message.content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise LlmInvalidOutput(f"not an OpenAI chat completion: {type(e).__name__}: {e}") from e
        finish = str(choice.get("finish_reason") or "")
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError as e:
            hint = " (cut off at max_tokens)" if finish == "length" else ""
            raise LlmInvalidOutput(f"answer is not JSON{hint}: {e}") from e
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda x: list(x.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "(root)"
            raise LlmInvalidOutput(f"answer does not match the schema at {where}: {errors[0].message[:200]}")
        usage = envelope.get("usage") or {}
        return LlmResult(data=data, model=str(envelope.get("model") or self.model),
                         prompt_tokens=_int(usage.get("prompt_tokens")),
                         completion_tokens=_int(usage.get("completion_tokens")),
                         latency_ms=(time.perf_counter() - t0) * 1000.0, attempts=attempts, finish_reason=finish)


def _int(v: Any) -> int:
    return v if isinstance(v, int) and v >= 0 else 0

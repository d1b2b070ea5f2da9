"""The exception hierarchy of pilothouse.

Every subsystem raises subclasses of :class:`PilothouseError`. Adapters translate SDK errors (librdkafka, psycopg,
HTTP clients) into :class:`RetryableError` (try again later: broker unavailable, timeout) or :class:`PermanentError`
(trying again cannot help: undecodable bytes, invalid record, authorization denied), with ``raise ... from e``.
"""

from __future__ import annotations


class PilothouseError(Exception):
    """Root of every error pilothouse raises on purpose."""


class RetryableError(PilothouseError):
    """A transient failure: the same operation may succeed later (bounded retries apply)."""


class PermanentError(PilothouseError):
    """A failure that retrying cannot fix; the input goes to a dead-letter topic with the reason."""


class ConfigurationError(PermanentError):
    """Settings, catalogue or schema files are inconsistent; raised at start-up, never mid-stream."""


class SchemaError(ConfigurationError):
    """A schema file is invalid, unsafe (e.g. an array of null) or incompatible."""


class DecodeError(PermanentError):
    """Bytes on a topic do not decode against a known schema."""


class OversizedMessage(PermanentError):
    """A message exceeds the configured size limit; it is refused before decoding or sending."""


class RecordInvalid(PermanentError):
    """A record does not match the schema of the topic it is sent to (wrong type or invalid fields)."""


class NotAuthorized(PermanentError):
    """The broker refused the operation for this principal (ACL)."""


class DeliveryFailed(RetryableError):
    """The broker did not acknowledge a produced message in time, or reported a transient error."""

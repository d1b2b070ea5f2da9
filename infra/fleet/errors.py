"""Errors of the sandbox fleet.

The fleet is a stand-alone program (the demo and test target), not one of the six services, so it does not depend on
the bus package; its errors have their own root. Each carries the HTTP status the server answers with.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error the fleet raises on purpose."""

    status = 500
    code = "fleet_error"

    def __init__(self, reason: str, **details: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"error": self.code, "reason": self.reason, **self.details}


class InvalidRequest(FleetError):
    """The request is malformed: unknown parameter, wrong type, value out of range."""

    status = 422
    code = "invalid_request"


class NotFound(FleetError):
    """The named service, instance, fault or action does not exist."""

    status = 404
    code = "not_found"


class PreconditionFailed(FleetError):
    """The request is well-formed but cannot apply to the current state (e.g. rollback with no previous version)."""

    status = 409
    code = "precondition_failed"


class StateFileError(FleetError):
    """The persisted state file exists but cannot be read; the fleet refuses to start rather than overwrite it."""

    code = "state_file_unreadable"


class MissingIdempotencyKey(InvalidRequest):
    """An action call came without its Idempotency-Key header."""

    status = 400
    code = "missing_idempotency_key"


class Unauthorized(FleetError):
    """The fleet was started with an access token and the request did not carry it."""

    status = 401
    code = "unauthorized"

"""One error hierarchy with stable machine-readable codes.

Every refusal names the cause and, in `hint`, the fix. The HTTP API maps `status` to the
response code; the CLI prints `error: <message> (hint: <hint>)` and exits non-zero.
Third-party exceptions are translated into these where they enter dbplane.
"""

from __future__ import annotations


class DbplaneError(Exception):
    code = "internal_error"
    status = 500

    def __init__(self, message: str, hint: str = "", *, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code:
            self.code = code
        if status:
            self.status = status

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InvalidInput(DbplaneError):
    code = "invalid_input"
    status = 400


class NotFound(DbplaneError):
    code = "not_found"
    status = 404


class Conflict(DbplaneError):
    code = "conflict"
    status = 409


class CapacityError(DbplaneError):
    """Not enough hosts, zones or ports to place what was asked for."""
    code = "insufficient_capacity"
    status = 409


class StoreUnavailable(DbplaneError):
    code = "store_unavailable"
    status = 503


class PlatformNotRunning(DbplaneError):
    code = "platform_not_running"
    status = 503


class MemberFailed(DbplaneError):
    """A member's Patroni keeps exiting (e.g. initdb failed because the disk is full)."""
    code = "member_failed"
    status = 500

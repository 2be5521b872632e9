"""Domain errors: what went wrong, in words a caller can act on (no gRPC, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (e.g. `messages[3].content`) and what is wrong."""

    field: str
    description: str


class MemstoreError(Exception):
    """Base of every error a caller may see; `reason` is a stable UPPER_SNAKE code."""

    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(MemstoreError):
    """The request is malformed; `violations` names each bad field."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: list[FieldViolation] | FieldViolation,
        *,
        reason: str | None = None,
    ) -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else violations
        message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message, reason=reason)

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> InvalidArgument:
        """One bad field."""
        return cls(FieldViolation(field, description), reason=reason)


class UnsupportedMediaType(InvalidArgument):
    """A REST body sent as other than JSON in UTF-8, or compressed; `violations` names the
    header (`Content-Type`, `Content-Encoding`). gRPC never raises it: its frames are
    protobuf."""

    default_reason = "UNSUPPORTED_MEDIA_TYPE"


class NotFound(MemstoreError):
    """The named resource does not exist (or is soft-deleted and hidden)."""

    default_reason = "NOT_FOUND"


class AlreadyExists(MemstoreError):
    """The id is taken."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(MemstoreError):
    """The system is not in the state the request needs (e.g. the named user is missing)."""

    default_reason = "FAILED_PRECONDITION"


class Unavailable(MemstoreError):
    """The database cannot be reached; nothing was written, the call may be retried."""

    default_reason = "DATABASE_UNAVAILABLE"


class DeadlineExceeded(MemstoreError):
    """The caller's deadline passed; the query was cancelled."""

    default_reason = "DEADLINE_EXCEEDED"


class RequestTimeout(DeadlineExceeded):
    """An HTTP request's head or body did not arrive in the time the server allows it."""

    default_reason = "REQUEST_TIMEOUT"


class UnreadableValue(MemstoreError):
    """A value stored in the database cannot be read into Python (e.g. a time past 9999).

    The server's fault, not the caller's: the request was valid, the stored row is not.
    """

    default_reason = "STORED_VALUE_UNREADABLE"


class Unauthenticated(MemstoreError):
    """The call carries no API key, or one that is unknown, revoked or malformed."""

    default_reason = "API_KEY_INVALID"


class ResourceExhausted(MemstoreError):
    """The server is overloaded or a limit was hit."""

    default_reason = "RESOURCE_EXHAUSTED"


class RequestTooLarge(ResourceExhausted):
    """The request is larger than the server accepts (16 MiB)."""

    default_reason = "REQUEST_TOO_LARGE"


class RequestHeadTooLarge(RequestTooLarge):
    """An HTTP request's head (request line and headers) is larger than the server reads."""

    default_reason = "REQUEST_HEAD_TOO_LARGE"


class UrlTooLong(RequestTooLarge):
    """An HTTP request's target (path and query) is longer than the server reads."""

    default_reason = "URI_TOO_LONG"


class Unimplemented(MemstoreError):
    """The call names a method the server does not serve (gRPC: no such service or method)."""

    default_reason = "METHOD_NOT_FOUND"

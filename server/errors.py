"""Domain errors, and the one place that maps them to gRPC status codes (AIP-193 details)."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

#: ErrorInfo.domain of every error memstore returns.
ERROR_DOMAIN = "memstore"


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


class Unauthenticated(MemstoreError):
    """The call carries no API key, or one that is unknown, revoked or malformed."""

    default_reason = "API_KEY_INVALID"


class ResourceExhausted(MemstoreError):
    """The server is overloaded or a limit was hit."""

    default_reason = "RESOURCE_EXHAUSTED"


#: The one map from domain errors to gRPC status codes.
STATUS_CODES: dict[type[MemstoreError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    MemstoreError: grpc.StatusCode.INTERNAL,
}


def status_code(error: MemstoreError) -> grpc.StatusCode:
    """The gRPC code of a domain error (the nearest class in STATUS_CODES)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_rpc_status(error: MemstoreError) -> grpc.Status:
    """A grpc.Status with google.rpc ErrorInfo (and BadRequest for bad fields) attached."""
    code = status_code(error)
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    details.append(info)
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    status = status_pb2.Status(code=_CODE_NUMBERS[code], message=error.message, details=details)
    return rpc_status.to_status(status)


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: code_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self_ = TypeVar("Self_")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: MemstoreError) -> None:
    status = to_rpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _unexpected(method: str, exc: Exception) -> MemstoreError:
    # Never leak a stack trace or driver text to the caller; log it instead.
    log.exception("unexpected error in %s", method, exc_info=exc)
    return MemstoreError("internal error; see the server log", reason="INTERNAL")


def unary_errors(
    handler: Callable[[Self_, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Self_, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Maps domain errors raised by a unary handler to their gRPC status."""

    @functools.wraps(handler)
    async def wrapper(
        self: Self_, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Resp:
        try:
            return await handler(self, request, context)
        except MemstoreError as error:
            await _abort(context, error)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, _unexpected(handler.__qualname__, exc))
        raise AssertionError("unreachable: abort raises")

    return wrapper


def stream_errors(
    handler: Callable[[Self_, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Self_, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """Maps domain errors raised while a server stream is iterated to their gRPC status."""

    @functools.wraps(handler)
    async def wrapper(
        self: Self_, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in handler(self, request, context):
                yield item
        except MemstoreError as error:
            await _abort(context, error)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, _unexpected(handler.__qualname__, exc))

    return wrapper


def _is_abort(exc: Exception) -> bool:
    # context.abort() raises grpc.aio.AbortError; it must pass through untouched.
    return isinstance(exc, grpc.aio.AbortError)

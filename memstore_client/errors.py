"""Typed exceptions for gRPC failures, carrying ErrorInfo's reason and BadRequest's fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, as the server's BadRequest names it."""

    field: str
    description: str


class MemstoreError(Exception):
    """Base of every error the client raises for a failed call.

    Attributes:
        code: the gRPC status code.
        message: what the server said was wrong.
        reason: ErrorInfo.reason, a stable UPPER_SNAKE code to branch on ("" when absent).
        field_violations: the BadRequest violations (INVALID_ARGUMENT), else empty.
        request_id: the call's `x-request-id` (the server's log names it on the call's
            access line), "" when the call never reached the server.
        page_token: for a stream that gave up (list_chunked, the exports), the token that
            resumes it after the last chunk it delivered: pass it as `page_token` to
            `user.export` / `memory.export_*` ("" when no chunk came, or for a unary call).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        field_violations: list[FieldViolation] | None = None,
        code: grpc.StatusCode | None = None,
        request_id: str = "",
        page_token: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field_violations = list(field_violations or [])
        self.request_id = request_id
        self.page_token = page_token
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} [{self.reason}]" if self.reason else text


class InvalidArgument(MemstoreError):
    """A field breaks a rule; field_violations names each."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ArgumentTypeError(InvalidArgument, TypeError):
    """An argument of the wrong type (e.g. an int user_id), refused before any call is made;
    both an InvalidArgument and a TypeError."""


class NotFound(MemstoreError):
    """No such user, session or message."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemstoreError):
    """The id is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MemstoreError):
    """The request needs another state (e.g. the named user does not exist)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ClientClosed(FailedPrecondition, ValueError):
    """A call on a client after its close(), or one in flight (or sleeping before a retry)
    when close() came; both a FailedPrecondition and a ValueError (as Python's own closed
    files)."""

    def __init__(self) -> None:
        super().__init__(
            "this client was closed: make a new one to call again", reason="CLIENT_CLOSED"
        )


class Unavailable(MemstoreError):
    """The server or its database cannot be reached, after the client's own retries.

    Safe to retry later blindly: reads, the streams (from the error's page_token), and
    `memory.add` of messages whose uuids you set (a message without one gets a new random
    uuid at each call, so resending it may store it twice). Not the other writes: the
    server may have committed before the answer was lost, so after a `user.add` the user
    may exist (a retry then raises AlreadyExists); read the state back first.
    """

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MemstoreError):
    """The call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(MemstoreError):
    """The API key is missing or not valid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MemstoreError):
    """The API key may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(MemstoreError):
    """A limit was hit (e.g. the message is too large)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(MemstoreError):
    """A server bug; the server log has the details."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MemstoreError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> MemstoreError:
    """The typed exception of a failed call (AioRpcError, or a sync call's RpcError)."""
    call: Any = error
    code: grpc.StatusCode = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    message = (call.details() if hasattr(call, "details") else "") or ""
    reason, violations = "", []
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        status = None  # details that contradict the status line: keep code and message
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    cls = _BY_CODE.get(code, MemstoreError)
    return cls(
        message,
        reason=reason,
        field_violations=violations,
        code=code,
        request_id=_request_id(call),
    )


#: The trailing metadata key by which memstore answers each call's request id.
REQUEST_ID_KEY = "x-request-id"


def _request_id(call: Any) -> str:
    # A failed call's trailing metadata (sync and aio alike), where the server put its id.
    trailing = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return ""

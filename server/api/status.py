"""The one map from domain errors to gRPC status codes, the one abort, and the two decorators."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemstoreError,
    NotFound,
    RequestHeadTooLarge,
    RequestTimeout,
    RequestTooLarge,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UnreadableValue,
    UnsupportedMediaType,
    UrlTooLong,
)

log = logging.getLogger(__name__)

#: ErrorInfo.domain of every error memstore returns.
ERROR_DOMAIN = "memstore"

#: The one map from domain errors to status codes: gRPC's, and HTTP's for Zep's REST API
#: (server/rest). The HTTP column is Zep's: a taken id and a missing user are 400, as Zep's
#: servers answer them and its SDKs expect (docs/zep-compat.md).
_CODES: dict[type[MemstoreError], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    UnsupportedMediaType: (grpc.StatusCode.INVALID_ARGUMENT, 415),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, 400),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ResourceExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    RequestTooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    # Only Zep's REST API refuses these (server/rest/protocol.py): gRPC's core bounds its own.
    RequestHeadTooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 431),
    UrlTooLong: (grpc.StatusCode.RESOURCE_EXHAUSTED, 414),
    RequestTimeout: (grpc.StatusCode.DEADLINE_EXCEEDED, 408),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    # Only gRPC raises it (serving/services.py): a REST path no route serves is a 404.
    Unimplemented: (grpc.StatusCode.UNIMPLEMENTED, 501),
    # A stored row the driver cannot read: the request was fine, so not INVALID_ARGUMENT.
    UnreadableValue: (grpc.StatusCode.INTERNAL, 500),
    MemstoreError: (grpc.StatusCode.INTERNAL, 500),
}

#: Domain error -> gRPC status code (the first column of the one map).
STATUS_CODES: dict[type[MemstoreError], grpc.StatusCode] = {
    cls: codes[0] for cls, codes in _CODES.items()
}


def _codes(error: MemstoreError) -> tuple[grpc.StatusCode, int]:
    # The nearest class in the map.
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return _CODES[MemstoreError]


def status_code(error: MemstoreError) -> grpc.StatusCode:
    """The gRPC code of a domain error (the nearest class in the map)."""
    return _codes(error)[0]


def http_status(error: MemstoreError) -> int:
    """The HTTP status of a domain error on Zep's REST API (the nearest class in the map)."""
    return _codes(error)[1]


#: UTF-8 bytes of an error's message, sent twice (grpc-message, percent-encoded: up to 3
#: bytes each, and in the Status), and of its BadRequest's violations. A client drops
#: trailers past 8 KiB (grpc.max_metadata_size; past 16 KiB always) and answers
#: RESOURCE_EXHAUSTED in place of the error: 1000 bad messages made 280 KB of violations.
MAX_MESSAGE_BYTES = 512
MAX_VIOLATION_BYTES = 2048
_FIELD_BYTES = 256
_DESCRIPTION_BYTES = 384


def to_rpc_status(error: MemstoreError) -> grpc.Status:
    """A grpc.Status with google.rpc ErrorInfo (and BadRequest for bad fields) attached, cut
    to fit a client's trailers: the message, and the violations past the first that fit."""
    code = status_code(error)
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    details.append(info)
    message = error.message
    if isinstance(error, InvalidArgument):
        bad_request = _bad_request(error)
        listed, total = len(bad_request.field_violations), len(error.violations)
        if listed < total:
            message = _cut(message, MAX_MESSAGE_BYTES - 64)
            message += f" ({total} violations; the first {listed} are in the BadRequest)"
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    message = _cut(message, MAX_MESSAGE_BYTES)
    # StatusCode.value is (number, name): the one source of the numeric code.
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(status)


def _bad_request(error: InvalidArgument) -> error_details_pb2.BadRequest:
    """The violations of `error`, each cut, as many as MAX_VIOLATION_BYTES hold (one at least)."""
    found = error_details_pb2.BadRequest()
    budget = MAX_VIOLATION_BYTES
    for v in error.violations:
        one = error_details_pb2.BadRequest.FieldViolation(
            field=_cut(v.field, _FIELD_BYTES), description=_cut(v.description, _DESCRIPTION_BYTES)
        )
        budget -= one.ByteSize() + 3  # its tag and length
        if budget < 0 and found.field_violations:
            break
        found.field_violations.append(one)
    return found


def _cut(text: str, most: int) -> str:
    """`text` in at most `most` bytes of UTF-8, ending in "..." when cut."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= most:
        return text
    return raw[: most - 3].decode("utf-8", "ignore") + "..."


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self_ = TypeVar("Self_")


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: MemstoreError) -> NoReturn:
    """Ends the call with the status of `error` (code, message and google.rpc details)."""
    status = to_rpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


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
            await abort(context, error)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await abort(context, _unexpected(handler.__qualname__, exc))

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
            await abort(context, error)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await abort(context, _unexpected(handler.__qualname__, exc))

    return wrapper


def _is_abort(exc: Exception) -> bool:
    # context.abort() raises grpc.aio.AbortError; it must pass through untouched.
    return isinstance(exc, grpc.aio.AbortError)

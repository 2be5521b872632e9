"""One table gives each domain error its gRPC code and its HTTP status (Zep's choices)."""

from __future__ import annotations

import grpc
import pytest

from server.api.status import http_status, status_code
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
    UnsupportedMediaType,
    UrlTooLong,
)


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (InvalidArgument.field("x", "bad"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (
            UnsupportedMediaType.field("Content-Type", "is text/plain"),
            grpc.StatusCode.INVALID_ARGUMENT,
            415,
        ),
        (AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS, 400),
        (
            FailedPrecondition("no user", reason="USER_NOT_FOUND"),
            grpc.StatusCode.FAILED_PRECONDITION,
            400,
        ),
        (NotFound("gone"), grpc.StatusCode.NOT_FOUND, 404),
        (Unauthenticated("who?"), grpc.StatusCode.UNAUTHENTICATED, 401),
        (
            ResourceExhausted("busy", reason="SERVER_OVERLOADED"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            429,
        ),
        (RequestTooLarge("big"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        (RequestHeadTooLarge("big head"), grpc.StatusCode.RESOURCE_EXHAUSTED, 431),
        (UrlTooLong("long URL"), grpc.StatusCode.RESOURCE_EXHAUSTED, 414),
        (RequestTimeout("slow body"), grpc.StatusCode.DEADLINE_EXCEEDED, 408),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE, 503),
        (DeadlineExceeded("slow"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (MemstoreError("bug"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_each_error_has_its_grpc_code_and_http_status(
    error: MemstoreError, code: grpc.StatusCode, status: int
) -> None:
    assert (status_code(error), http_status(error)) == (code, status)

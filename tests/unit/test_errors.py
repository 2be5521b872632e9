"""The error map: codes, ErrorInfo and BadRequest details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from server import errors
from server.api import status as grpc_status


def _details(status: grpc.Status) -> tuple[status_pb2.Status, list[object]]:
    [(key, raw)] = [(k, v) for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    assert key
    decoded = status_pb2.Status.FromString(raw)
    out: list[object] = []
    for any_ in decoded.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out.append(msg)
    return decoded, out


def test_invalid_argument_carries_error_info_and_field_violations() -> None:
    error = errors.InvalidArgument(
        [
            errors.FieldViolation("user_id", "is required"),
            errors.FieldViolation("messages[3].content", "too long"),
        ]
    )
    status = grpc_status.to_rpc_status(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in status.details and "messages[3].content" in status.details
    decoded, details = _details(status)
    assert decoded.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, bad = details
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "memstore")
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("user_id", "is required"),
        ("messages[3].content", "too long"),
    ]


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (errors.NotFound("no user"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (errors.AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
        (
            errors.FailedPrecondition("x", reason="USER_NOT_FOUND"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "USER_NOT_FOUND",
        ),
        (errors.Unavailable("db down"), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (errors.MemstoreError("boom"), grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
def test_other_errors_carry_error_info_only(
    error: errors.MemstoreError, code: grpc.StatusCode, reason: str
) -> None:
    status = grpc_status.to_rpc_status(error)
    assert status.code == code
    assert status.details == error.message
    _, details = _details(status)
    assert len(details) == 1
    assert isinstance(details[0], error_details_pb2.ErrorInfo)
    assert details[0].reason == reason

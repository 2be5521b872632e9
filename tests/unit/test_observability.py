"""The request id survives both ways a handler can abort, bad caller ids are replaced, and the
plain-text log keeps the id and one line per record."""

from __future__ import annotations

import logging
import sys
from typing import Any

import grpc
import pytest

from server.api.status import to_rpc_status
from server.errors import NotFound
from server.serving.log_format import TextFormatter, request_id
from server.serving.observability import _Context, _request_id


class _Recording:
    """Just enough of a servicer context to see what abort() is given."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.aborted: tuple[Any, ...] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        self.aborted = (code, details, tuple(trailing))
        raise grpc.aio.AbortError()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


async def test_abort_and_abort_with_status_keep_the_request_id() -> None:
    status = to_rpc_status(NotFound("user 'x' not found", reason="USER_NOT_FOUND"))
    for abort in ("abort", "abort_with_status"):
        raw = _Recording()
        context = _Context(raw, "rid-1")  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AbortError):
            if abort == "abort":
                await context.abort(status.code, status.details, status.trailing_metadata)
            else:
                await context.abort_with_status(status)
        assert raw.aborted is not None
        code, details, trailing = raw.aborted
        assert code == grpc.StatusCode.NOT_FOUND and details == "user 'x' not found"
        keys = [key for key, _ in trailing]
        assert keys == ["grpc-status-details-bin", "x-request-id"]
        assert ("x-request-id", "rid-1") in trailing


@pytest.mark.parametrize("sent", ["", "has space", "x" * 129, "tab\there"])
def test_unusable_caller_ids_are_replaced(sent: str) -> None:
    rid = _request_id(_Recording((("x-request-id", sent),)))  # type: ignore[arg-type]
    assert rid != sent and len(rid) == 32


def test_a_printable_caller_id_is_kept() -> None:
    assert _request_id(_Recording((("x-request-id", "req-7/a"),))) == "req-7/a"  # type: ignore[arg-type]


def test_text_lines_carry_the_request_id_and_stay_one_line() -> None:
    # The plain-text form wrote no request id, and a message or traceback with line breaks
    # wrote lines of their own: a reader takes each for a record, and a caller's text could
    # forge one.
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        failure = sys.exc_info()
    record = logging.LogRecord(
        "memstore.access",
        logging.ERROR,
        __file__,
        1,
        "id %s\r\nFAKE INFO x\u2028y",
        ("a",),
        failure,
    )
    record.request_id = "trace-7"
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1, line
    assert " ERROR memstore.access request_id=trace-7: id a\\r\\nFAKE INFO x\\u2028y | " in line
    assert "Traceback (most recent call last):\\n" in line and "ValueError: first\\nsecond" in line
    token = request_id.set("")
    try:
        # No id: no empty field either.
        plain = TextFormatter().format(logging.LogRecord("x", logging.INFO, "", 1, "m", (), None))
    finally:
        request_id.reset(token)
    assert plain.endswith(" INFO x: m")

"""End-to-end tests over a real gRPC channel, and the helpers they share."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message as ProtoMessage
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from psycopg import sql

from memstore.v1 import resources_pb2, session_service_pb2_grpc, user_service_pb2_grpc

#: AIP-193: ErrorInfo.reason is a stable UPPER_SNAKE code.
REASON_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
Code = grpc.StatusCode
Users = user_service_pb2_grpc.UserServiceStub
Sessions = session_service_pb2_grpc.SessionServiceStub
P = TypeVar("P", bound=ProtoMessage)


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct from a dict (None becomes null_value)."""
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


def as_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict (numbers come back as floats, which compare equal to ints)."""
    return dict(json_format.MessageToDict(value))


def msg(content: str, role_type: int = resources_pb2.ROLE_TYPE_USER, **kw: Any) -> Any:
    """A Message to send with AddMemory."""
    return resources_pb2.Message(content=content, role_type=role_type, **kw)  # type: ignore[arg-type]


def _unpack(status: status_pb2.Status, kind: type[P]) -> list[P]:
    found: list[P] = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            item = kind()
            detail.Unpack(item)
            found.append(item)
    return found


def _names(path: str, field: str) -> bool:
    # `messages[1]` names `messages[1].content`; `metadata` names `metadata.key`.
    return path == field or path.startswith((field + ".", field + "["))


async def rpc_error(
    call: Awaitable[object],
    code: grpc.StatusCode,
    *,
    field: str | Iterable[str] | None = None,
    reason: str | None = None,
) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with `code`, an ErrorInfo, and (for bad input) a BadRequest.

    `field` is the name (or acceptable names) of the violated field that the BadRequest must
    carry; it is required for INVALID_ARGUMENT so every validation test names its field.
    """
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    assert error.details(), "the error message must say what was wrong"
    # AioRpcError has the code(), details() and trailing_metadata() that from_call reads.
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status details on {code.name}: {error.details()}"
    infos = _unpack(status, error_details_pb2.ErrorInfo)
    assert len(infos) == 1, f"expected one ErrorInfo, got {infos}"
    assert infos[0].domain == "memstore"
    assert REASON_RE.match(infos[0].reason), infos[0].reason
    if reason is not None:
        assert infos[0].reason == reason
    if code == Code.INVALID_ARGUMENT:
        assert field is not None, "name the field an INVALID_ARGUMENT test expects"
    if field is not None:
        wanted = [field] if isinstance(field, str) else list(field)
        paths = [
            v.field
            for bad in _unpack(status, error_details_pb2.BadRequest)
            for v in bad.field_violations
        ]
        assert any(_names(p, f) for p in paths for f in wanted), (
            f"expected a violation of {wanted}, got {paths}: {error.details()}"
        )
    return error


async def count_rows(database_url: str, table: str) -> int:
    """How many rows a data table holds, live or soft-deleted (bypasses the API)."""
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(query)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def tamper(token: str) -> str:
    """The token with one character in its middle changed (still URL-safe text)."""
    mid = len(token) // 2
    new = "A" if token[mid] != "A" else "B"
    return token[:mid] + new + token[mid + 1 :]


async def walk(
    call: Callable[[Any], Awaitable[Any]], request: Any, rows_field: str
) -> tuple[list[Any], list[int]]:
    """All rows of a list RPC, following next_page_token; also the page sizes."""
    rows: list[Any] = []
    sizes: list[int] = []
    while True:
        page = await call(request)
        got = list(getattr(page, rows_field))
        rows += got
        sizes.append(len(got))
        if not page.next_page_token:
            return rows, sizes
        request.page_token = page.next_page_token

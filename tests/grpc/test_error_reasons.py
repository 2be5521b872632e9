"""ErrorInfo reasons are API (AIP-193): each failure a client may branch on has its own."""

from __future__ import annotations

import uuid

import grpc
import pytest
from psycopg_pool import TooManyRequests

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.api.status import status_code
from server.errors import ResourceExhausted
from server.serving import auth
from server.store.translate import translated
from tests.grpc import Code, Sessions, Users, msg, rpc_error


async def test_each_failure_has_its_stable_reason(users: Users, sessions: Sessions) -> None:
    await users.CreateUser(us.CreateUserRequest(user_id="ann"))
    await users.CreateUser(us.CreateUserRequest(user_id="bob"))
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s1", user_id="ann", messages=[msg("hi")])
    )
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="gone"))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="gone"))

    cases: list[tuple[object, grpc.StatusCode, str]] = [
        (users.GetUser(us.GetUserRequest(user_id="nobody")), Code.NOT_FOUND, "USER_NOT_FOUND"),
        (
            users.CreateUser(us.CreateUserRequest(user_id="ann")),
            Code.ALREADY_EXISTS,
            "USER_ALREADY_EXISTS",
        ),
        (
            sessions.GetSession(ss.GetSessionRequest(session_id="none")),
            Code.NOT_FOUND,
            "SESSION_NOT_FOUND",
        ),
        (
            sessions.GetSession(ss.GetSessionRequest(session_id="gone")),
            Code.NOT_FOUND,
            "SESSION_DELETED",
        ),
        (
            sessions.UpdateSession(ss.UpdateSessionRequest(session_id="gone")),
            Code.NOT_FOUND,
            "SESSION_DELETED",
        ),
        (
            sessions.CreateSession(ss.CreateSessionRequest(session_id="s1")),
            Code.ALREADY_EXISTS,
            "SESSION_ALREADY_EXISTS",
        ),
        (
            sessions.CreateSession(ss.CreateSessionRequest(session_id="gone")),
            Code.ALREADY_EXISTS,
            "SESSION_DELETED",
        ),
        (
            sessions.CreateSession(ss.CreateSessionRequest(user_id="nobody")),
            Code.FAILED_PRECONDITION,
            "USER_NOT_FOUND",
        ),
        (
            sessions.UndeleteSession(ss.UndeleteSessionRequest(session_id="s1")),
            Code.FAILED_PRECONDITION,
            "SESSION_NOT_DELETED",
        ),
        (
            sessions.AddMemory(
                ss.AddMemoryRequest(session_id="s1", user_id="bob", messages=[msg("x")])
            ),
            Code.FAILED_PRECONDITION,
            "SESSION_USER_MISMATCH",
        ),
        (
            sessions.GetMessage(ss.GetMessageRequest(session_id="s1", uuid=str(uuid.uuid4()))),
            Code.NOT_FOUND,
            "MESSAGE_NOT_FOUND",
        ),
    ]
    for call, code, reason in cases:
        await rpc_error(call, code, reason=reason)  # type: ignore[arg-type]
    await rpc_error(
        users.ListUsers(us.ListUsersRequest(page_token="garbage")),
        Code.INVALID_ARGUMENT,
        field="page_token",
        reason="INVALID_PAGE_TOKEN",
    )
    await rpc_error(
        users.GetUser(us.GetUserRequest(user_id="")),
        Code.INVALID_ARGUMENT,
        field="user_id",
        reason="INVALID_ARGUMENT",
    )


def test_auth_and_overload_reasons_map_to_their_codes() -> None:
    # This suite's server runs open; tests/security/ drives these over the wire against a
    # server that requires keys, and against a pool with a bounded queue.
    with pytest.raises(ResourceExhausted) as overloaded, translated():
        raise TooManyRequests("the pool's queue is full")
    cases = [
        (auth.missing(), Code.UNAUTHENTICATED, "API_KEY_MISSING"),
        (auth.invalid(), Code.UNAUTHENTICATED, "API_KEY_INVALID"),
        (overloaded.value, Code.RESOURCE_EXHAUSTED, "SERVER_OVERLOADED"),
    ]
    for error, code, reason in cases:
        assert (status_code(error), error.reason) == (code, reason)

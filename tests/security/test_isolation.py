"""Project b's key on project a's ids: every RPC behaves exactly as if the ids did not exist."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.fix_security import Caller
from tests.grpc import Code, msg, rpc_error, struct, tamper

Probe = Callable[[Caller], Awaitable[Any]]


def _probes(ids: dict[str, str]) -> dict[str, Probe]:
    """Every RPC that names an existing resource, aimed at `ids`."""
    user, session, gone, message = ids["user"], ids["session"], ids["gone"], ids["uuid"]
    patch = struct({"x": 1})
    return {
        "GetUser": lambda c: c.users.GetUser(us.GetUserRequest(user_id=user), metadata=c.metadata),
        "UpdateUser": lambda c: c.users.UpdateUser(
            us.UpdateUserRequest(user_id=user, email="e@x.org", metadata=patch),
            metadata=c.metadata,
        ),
        "DeleteUser": lambda c: c.users.DeleteUser(
            us.DeleteUserRequest(user_id=user), metadata=c.metadata
        ),
        "ListUserSessions": lambda c: c.users.ListUserSessions(
            us.ListUserSessionsRequest(user_id=user), metadata=c.metadata
        ),
        "ListUsers": lambda c: c.users.ListUsers(us.ListUsersRequest(), metadata=c.metadata),
        "ListUsersChunked": lambda c: _drain(
            c.users.ListUsersChunked(us.ListUsersChunkedRequest(), metadata=c.metadata)
        ),
        "GetSession": lambda c: c.sessions.GetSession(
            ss.GetSessionRequest(session_id=session), metadata=c.metadata
        ),
        "GetSession(show_deleted)": lambda c: c.sessions.GetSession(
            ss.GetSessionRequest(session_id=gone, show_deleted=True), metadata=c.metadata
        ),
        "UpdateSession": lambda c: c.sessions.UpdateSession(
            ss.UpdateSessionRequest(session_id=session, metadata=patch), metadata=c.metadata
        ),
        "DeleteSession": lambda c: c.sessions.DeleteSession(
            ss.DeleteSessionRequest(session_id=session), metadata=c.metadata
        ),
        "UndeleteSession": lambda c: c.sessions.UndeleteSession(
            ss.UndeleteSessionRequest(session_id=gone), metadata=c.metadata
        ),
        "ListSessions(user)": lambda c: c.sessions.ListSessions(
            ss.ListSessionsRequest(user_id=user, show_deleted=True), metadata=c.metadata
        ),
        "ListSessions": lambda c: c.sessions.ListSessions(
            ss.ListSessionsRequest(show_deleted=True), metadata=c.metadata
        ),
        "GetMemory": lambda c: c.sessions.GetMemory(
            ss.GetMemoryRequest(session_id=session), metadata=c.metadata
        ),
        "ListMessages": lambda c: c.sessions.ListMessages(
            ss.ListMessagesRequest(session_id=session), metadata=c.metadata
        ),
        "GetMessage": lambda c: c.sessions.GetMessage(
            ss.GetMessageRequest(session_id=session, uuid=message), metadata=c.metadata
        ),
        "UpdateMessage": lambda c: c.sessions.UpdateMessage(
            ss.UpdateMessageRequest(session_id=session, uuid=message, metadata=patch),
            metadata=c.metadata,
        ),
        "ClearMemory": lambda c: c.sessions.ClearMemory(
            ss.ClearMemoryRequest(session_id=session), metadata=c.metadata
        ),
        "AddMemory(user)": lambda c: c.sessions.AddMemory(
            ss.AddMemoryRequest(session_id=session, user_id=user, messages=[msg("x")]),
            metadata=c.metadata,
        ),
        "CreateSession(user)": lambda c: c.sessions.CreateSession(
            ss.CreateSessionRequest(session_id=session + "-new", user_id=user),
            metadata=c.metadata,
        ),
    }


async def _drain(call: Any) -> list[Any]:
    return [chunk async for chunk in call]


async def _outcome(probe: Probe, caller: Caller, ids: dict[str, str]) -> Any:
    """What a caller sees: the response as JSON, or the status, with the ids blanked out."""
    try:
        result = await probe(caller)
    except grpc.aio.AioRpcError as error:
        text = error.details() or ""
        for role, value in ids.items():
            text = text.replace(value, f"<{role}>")
        return ("error", error.code(), text)
    results = result if isinstance(result, list) else [result]
    return ("ok", [json_format.MessageToDict(r) for r in results])


async def _seed(a: Caller) -> dict[str, str]:
    """Project a's user, live session with three messages, and soft-deleted session."""
    await a.users.CreateUser(
        us.CreateUserRequest(user_id="alice", metadata=struct({"plan": "pro"})),
        metadata=a.metadata,
    )
    added = await a.sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="s1", user_id="alice", messages=[msg("one"), msg("two"), msg("three")]
        ),
        metadata=a.metadata,
    )
    await a.sessions.CreateSession(
        ss.CreateSessionRequest(session_id="gone", user_id="alice"), metadata=a.metadata
    )
    await a.sessions.DeleteSession(ss.DeleteSessionRequest(session_id="gone"), metadata=a.metadata)
    return {"user": "alice", "session": "s1", "gone": "gone", "uuid": added.messages[0].uuid}


async def test_every_rpc_with_another_projects_key_sees_nothing(a: Caller, b: Caller) -> None:
    theirs = await _seed(a)
    absent = {"user": "nobody", "session": "nosuch", "gone": "nogone", "uuid": str(uuid.uuid4())}
    for name, probe in _probes(theirs).items():
        seen = await _outcome(probe, b, theirs)
        expected = await _outcome(_probes(absent)[name], b, absent)
        assert seen == expected, f"{name}: b on a's ids {seen} != b on absent ids {expected}"
        if seen[0] == "error":
            assert seen[1] in (Code.NOT_FOUND, Code.FAILED_PRECONDITION), (name, seen)
    # Nothing of a's changed: its user, sessions and messages are as they were.
    user = (await a.users.GetUser(us.GetUserRequest(user_id="alice"), metadata=a.metadata)).user
    assert json_format.MessageToDict(user.metadata) == {"plan": "pro"}
    assert user.email == "" and user.session_count == 1
    session = await a.sessions.GetSession(
        ss.GetSessionRequest(session_id="s1"), metadata=a.metadata
    )
    assert session.session.message_count == 3
    await rpc_error(
        a.sessions.GetSession(ss.GetSessionRequest(session_id="gone"), metadata=a.metadata),
        Code.NOT_FOUND,
        reason="SESSION_DELETED",
    )
    listed = await a.sessions.ListMessages(
        ss.ListMessagesRequest(session_id="s1"), metadata=a.metadata
    )
    assert [m.content for m in listed.messages] == ["one", "two", "three"]


async def test_same_ids_in_two_projects_are_two_resources(a: Caller, b: Caller) -> None:
    await _seed(a)
    await b.users.CreateUser(
        us.CreateUserRequest(user_id="alice", metadata=struct({"plan": "free"})),
        metadata=b.metadata,
    )
    await b.sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s1", user_id="alice", messages=[msg("b's")]),
        metadata=b.metadata,
    )
    mine = (await b.users.GetUser(us.GetUserRequest(user_id="alice"), metadata=b.metadata)).user
    theirs = (await a.users.GetUser(us.GetUserRequest(user_id="alice"), metadata=a.metadata)).user
    assert json_format.MessageToDict(mine.metadata) == {"plan": "free"}
    assert json_format.MessageToDict(theirs.metadata) == {"plan": "pro"}
    # Counts, lists and totals see one project each.
    assert (mine.session_count, theirs.session_count) == (1, 1)
    for caller, users, total, contents in ((a, 1, 1, ["one", "two", "three"]), (b, 1, 1, ["b's"])):
        listed = await caller.users.ListUsers(us.ListUsersRequest(), metadata=caller.metadata)
        assert len(listed.users) == users
        sessions = await caller.sessions.ListSessions(
            ss.ListSessionsRequest(), metadata=caller.metadata
        )
        assert sessions.total_size == total
        messages = await caller.sessions.ListMessages(
            ss.ListMessagesRequest(session_id="s1"), metadata=caller.metadata
        )
        assert [m.content for m in messages.messages] == contents
    # A privacy delete in b removes b's alice only.
    await b.users.DeleteUser(us.DeleteUserRequest(user_id="alice"), metadata=b.metadata)
    kept = await a.sessions.GetMemory(ss.GetMemoryRequest(session_id="s1"), metadata=a.metadata)
    assert kept.found and len(kept.messages) == 3


async def _two_pages(caller: Caller) -> dict[str, str]:
    """A first-page token of every paged RPC, each over two rows of the same ids."""
    md = caller.metadata
    for user_id in ("u1", "u2"):
        await caller.users.CreateUser(us.CreateUserRequest(user_id=user_id), metadata=md)
        for n in (1, 2):
            await caller.sessions.AddMemory(
                ss.AddMemoryRequest(
                    session_id=f"{user_id}-s{n}", user_id=user_id, messages=[msg("a"), msg("b")]
                ),
                metadata=md,
            )
    users = await caller.users.ListUsers(us.ListUsersRequest(page_size=1), metadata=md)
    chunks = caller.users.ListUsersChunked(us.ListUsersChunkedRequest(chunk_size=1), metadata=md)
    chunk = await chunks.read()
    chunks.cancel()
    sessions = await caller.sessions.ListSessions(ss.ListSessionsRequest(page_size=1), metadata=md)
    user_sessions = await caller.users.ListUserSessions(
        us.ListUserSessionsRequest(user_id="u1", page_size=1), metadata=md
    )
    messages = await caller.sessions.ListMessages(
        ss.ListMessagesRequest(session_id="u1-s1", page_size=1), metadata=md
    )
    return {
        "users": users.next_page_token,
        "chunk": chunk.next_page_token,
        "sessions": sessions.next_page_token,
        "user_sessions": user_sessions.next_page_token,
        "messages": messages.next_page_token,
    }


def _resume(token: str) -> dict[str, Callable[[Caller], Awaitable[Any]]]:
    """Every paged RPC resumed from `token`, with the same filters the token was minted for."""
    return {
        "users": lambda c: c.users.ListUsers(
            us.ListUsersRequest(page_size=1, page_token=token), metadata=c.metadata
        ),
        "chunk": lambda c: _drain(
            c.users.ListUsersChunked(
                us.ListUsersChunkedRequest(chunk_size=1, page_token=token), metadata=c.metadata
            )
        ),
        "sessions": lambda c: c.sessions.ListSessions(
            ss.ListSessionsRequest(page_size=1, page_token=token), metadata=c.metadata
        ),
        "user_sessions": lambda c: c.users.ListUserSessions(
            us.ListUserSessionsRequest(user_id="u1", page_size=1, page_token=token),
            metadata=c.metadata,
        ),
        "messages": lambda c: c.sessions.ListMessages(
            ss.ListMessagesRequest(session_id="u1-s1", page_size=1, page_token=token),
            metadata=c.metadata,
        ),
    }


async def test_page_and_chunk_tokens_do_not_cross_projects(a: Caller, b: Caller) -> None:
    tokens = await _two_pages(a)
    await _two_pages(b)  # b has rows with the very same ids and order
    assert all(tokens.values()), tokens
    for name, token in tokens.items():
        # The token works where it was minted ...
        await _resume(token)[name](a)
        # ... and is refused in the other project, though the query is otherwise identical.
        await rpc_error(
            _resume(token)[name](b),
            Code.INVALID_ARGUMENT,
            field="page_token",
            reason="INVALID_PAGE_TOKEN",
        )
        await rpc_error(
            _resume(tamper(token))[name](a),
            Code.INVALID_ARGUMENT,
            field="page_token",
            reason="INVALID_PAGE_TOKEN",
        )
    # A chunk token and a ListUsers token interchange within a project, never across.
    await _resume(tokens["chunk"])["users"](a)
    await rpc_error(
        _resume(tokens["chunk"])["users"](b),
        Code.INVALID_ARGUMENT,
        field="page_token",
        reason="INVALID_PAGE_TOKEN",
    )


async def test_concurrent_reads_of_two_projects_never_mix(a: Caller, b: Caller) -> None:
    # Concurrent GetUser calls share one statement (server/store/coalesce.py): a batch that
    # holds both projects' calls must still answer each from its own project.
    for caller, plan in ((a, "a-plan"), (b, "b-plan")):
        for user_id in ("shared", f"only-{caller.project}"):
            await caller.users.CreateUser(
                us.CreateUserRequest(user_id=user_id, metadata=struct({"plan": plan})),
                metadata=caller.metadata,
            )

    async def get(caller: Caller, user_id: str) -> Any:
        return await _outcome(
            lambda c: c.users.GetUser(us.GetUserRequest(user_id=user_id), metadata=c.metadata),
            caller,
            {},
        )

    calls = [
        (caller, user_id)
        for _ in range(20)
        for caller in (a, b)
        for user_id in ("shared", "only-a", "only-b")
    ]
    results = await asyncio.gather(*(get(caller, user_id) for caller, user_id in calls))
    for (caller, user_id), result in zip(calls, results, strict=True):
        if user_id in ("shared", f"only-{caller.project}"):
            assert result[0] == "ok", (caller.project, user_id, result)
            assert result[1][0]["user"]["metadata"] == {"plan": f"{caller.project}-plan"}
        else:
            assert result == ("error", Code.NOT_FOUND, f"user '{user_id}' not found")

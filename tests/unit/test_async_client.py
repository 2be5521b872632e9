"""The asyncio client against a scripted in-process gRPC server: retries, resume, metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc as ss_grpc
from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc as us_grpc
from memstore_client import AsyncMemstore, RetryPolicy, Unavailable

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)


class _Users(us_grpc.UserServiceServicer):
    """GetUser fails `failures` times with UNAVAILABLE; the stream drops once mid-way."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, Any, dict[str, str]]] = []

    def _record(self, name: str, request: Any, context: Any) -> None:
        self.calls.append((name, request, dict(context.invocation_metadata())))

    async def GetUser(self, request: Any, context: Any) -> us.GetUserResponse:
        self._record("GetUser", request, context)
        if self.failures > 0:
            self.failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable")
        return us.GetUserResponse(user=resources_pb2.User(user_id=request.user_id))

    async def ListUsersChunked(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self._record("ListUsersChunked", request, context)
        if not request.page_token:
            yield us.ListUsersChunkedResponse(
                users=[resources_pb2.User(user_id="a")], next_page_token="after-a"
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
        yield us.ListUsersChunkedResponse(users=[resources_pb2.User(user_id="b")])


class _Sessions(ss_grpc.SessionServiceServicer):
    """AddMemory as the server does it, by uuid; the first `lost` answers never arrive."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.requests: list[Any] = []
        self.stored: dict[str, resources_pb2.Message] = {}

    async def AddMemory(self, request: Any, context: Any) -> ss.AddMemoryResponse:
        self.requests.append(request)
        for m in request.messages:
            if m.uuid not in self.stored:
                sequence = len(self.stored) + 1
                self.stored[m.uuid] = resources_pb2.Message(
                    uuid=m.uuid, content=m.content, sequence=sequence
                )
        if self.lost > 0:
            # Committed, but the connection died before the answer: UNAVAILABLE.
            self.lost -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable")
        return ss.AddMemoryResponse(messages=[self.stored[m.uuid] for m in request.messages])


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[AsyncMemstore, _Users, _Sessions]]:
    server = grpc.aio.server()
    users, sessions = _Users(failures=2), _Sessions(lost=2)
    us_grpc.add_UserServiceServicer_to_server(users, server)
    ss_grpc.add_SessionServiceServicer_to_server(sessions, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with AsyncMemstore(f"127.0.0.1:{port}", api_key="sk-1", retry=FAST) as client:
        yield client, users, sessions
    await server.stop(None)


async def test_get_is_retried_and_sends_the_bearer_key(scripted) -> None:
    client, users, _ = scripted
    assert (await client.user.get("alice")).user_id == "alice"
    assert [name for name, _, _ in users.calls] == ["GetUser"] * 3
    assert all(md.get("authorization") == "Bearer sk-1" for _, _, md in users.calls)


async def test_get_gives_up_after_max_attempts(scripted) -> None:
    client, users, _ = scripted
    users.failures = 10
    with pytest.raises(Unavailable) as caught:
        await client.user.get("alice")
    assert caught.value.message == "database unavailable"
    assert len(users.calls) == FAST.max_attempts


async def test_add_memory_is_retried_without_duplicates(scripted) -> None:
    client, _, sessions = scripted
    added = await client.memory.add("s", [{"content": "hi"}, {"content": "there"}])
    assert len(sessions.requests) == 3
    assert all(r == sessions.requests[0] for r in sessions.requests)
    assert [m.content for m in sessions.stored.values()] == ["hi", "there"]
    assert [(m.content, m.sequence) for m in added] == [("hi", 1), ("there", 2)]


async def test_add_memory_gives_up_after_max_attempts(scripted) -> None:
    client, _, sessions = scripted
    sessions.lost = 10
    with pytest.raises(Unavailable):
        await client.memory.add("s", [{"content": "hi"}])
    assert len(sessions.requests) == FAST.max_attempts
    assert len(sessions.stored) == 1


async def test_a_dropped_stream_resumes_from_the_last_token(scripted) -> None:
    client, users, _ = scripted
    chunks = [[u.user_id for u in chunk] async for chunk in client.user.list_chunked(10)]
    assert chunks == [["a"], ["b"]]
    tokens = [request.page_token for name, request, _ in users.calls]
    assert tokens == ["", "after-a"]

"""The Python client (asyncio and sync) against the real server over a real channel."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from memstore_client import (
    AlreadyExists,
    AsyncMemstore,
    ClientClosed,
    FailedPrecondition,
    InvalidArgument,
    Memstore,
    Message,
    NotFound,
    RetryPolicy,
    Unavailable,
)


@pytest.fixture
async def client(grpc_port: int, clean_db: str) -> AsyncIterator[AsyncMemstore]:
    async with AsyncMemstore(f"127.0.0.1:{grpc_port}", api_key="sk-test") as c:
        yield c


async def test_users_round_trip_like_zep(client: AsyncMemstore) -> None:
    before = datetime.now(UTC)
    alice = await client.user.add("alice", email="a@example.com", metadata={"plan": "pro", "n": 2})
    assert alice.metadata == {"plan": "pro", "n": 2} and alice.created_at >= before
    with pytest.raises(AlreadyExists) as taken:
        await client.user.add("alice")
    assert taken.value.reason == "USER_ALREADY_EXISTS"
    updated = await client.user.update("alice", last_name="Liddell", metadata={"plan": None})
    assert updated.metadata == {"n": 2} and updated.last_name == "Liddell"
    assert updated.email == "a@example.com"
    assert (await client.user.get("alice")).last_name == "Liddell"
    for i in range(4):
        await client.user.add(f"u{i}")
    page = await client.user.list(limit=3)
    assert [u.user_id for u in page.users] == ["alice", "u0", "u1"] and page.next_cursor
    rest = await client.user.list(limit=3, cursor=page.next_cursor)
    assert [u.user_id for u in rest.users] == ["u2", "u3"] and rest.next_cursor is None
    chunks = [c async for c in client.user.list_chunked(chunk_size=2)]
    assert [[u.user_id for u in c] for c in chunks] == [["alice", "u0"], ["u1", "u2"], ["u3"]]
    await client.user.delete("alice")
    with pytest.raises(NotFound) as missing:
        await client.user.get("alice")
    assert missing.value.reason == "USER_NOT_FOUND"


async def test_sessions_and_memory_round_trip_like_zep(client: AsyncMemstore) -> None:
    await client.user.add("bob")
    session = await client.memory.add_session("s1", user_id="bob", metadata={"topic": "food"})
    assert session.user_id == "bob" and session.deleted_at is None
    with pytest.raises(FailedPrecondition):
        await client.memory.add_session("s2", user_id="nobody")
    added = await client.memory.add(
        "s1",
        [
            Message(role="Bob", role_type="user", content="I am vegetarian."),
            {"role": "agent", "role_type": "assistant", "content": "Noted!", "metadata": {"x": 1}},
        ],
    )
    assert [m.sequence for m in added] == [1, 2] and all(m.uuid for m in added)
    memory = await client.memory.get("s1")
    assert memory.found and memory.session is not None and memory.session.message_count == 2
    assert [(m.role_type, m.content) for m in memory.messages] == [
        ("user", "I am vegetarian."),
        ("assistant", "Noted!"),
    ]
    assert memory.messages[1].metadata == {"x": 1}
    assert not (await client.memory.get("unknown")).found
    updated = await client.memory.update_session("s1", {"mood": "good"})
    assert updated.metadata == {"topic": "food", "mood": "good"}
    assert [s.session_id for s in await client.user.get_sessions("bob")] == ["s1"]
    for i in range(3):
        await client.memory.add_session(f"t{i}")
    page = await client.memory.list_sessions(page_size=2, page_number=2)
    assert page.total_size == 4 and [s.session_id for s in page.sessions] == ["t1", "t2"]
    assert await client.memory.delete("s1") == 2
    with pytest.raises(NotFound) as deleted:
        await client.memory.get_session("s1")
    assert deleted.value.reason == "SESSION_DELETED"
    assert (await client.memory.get_session("s1", show_deleted=True)).deleted_at is not None


async def test_invalid_arguments_carry_the_field(client: AsyncMemstore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await client.memory.add("s1", [Message(content="a\x00b")])
    assert [v.field for v in caught.value.field_violations] == ["messages[0].content"]
    with pytest.raises(NotFound) as missing:
        await client.user.get("nobody")
    assert re.fullmatch("[0-9a-f]{32}", missing.value.request_id)
    with pytest.raises(InvalidArgument) as unknown:
        await client.memory.add("s1", [Message(content="x", role_type="robot")])
    assert [v.field for v in unknown.value.field_violations] == ["messages[0].role_type"]


async def test_exports_stream_every_row_with_resume_tokens(client: AsyncMemstore) -> None:
    for sid in ("a", "b"):
        await client.memory.add(sid, [Message(content=f"{sid}{i}") for i in range(3)])
    chunks = [c async for c in client.memory.export_messages(chunk_size=4)]
    assert [[(m.session_id, m.message.content) for m in c] for c, _ in chunks] == [
        [("a", "a0"), ("a", "a1"), ("a", "a2"), ("b", "b0")],
        [("b", "b1"), ("b", "b2")],
    ]
    assert chunks[0][1] and not chunks[1][1]
    resumed = [c async for c in client.memory.export_messages(4, chunks[0][1])]
    assert [m.message.content for c, _ in resumed for m in c] == ["b1", "b2"]
    sessions = [s.session_id async for c, _ in client.memory.export_sessions() for s in c]
    assert sessions == ["a", "b"]


async def test_sync_client_works_from_a_thread(grpc_port: int, clean_db: str) -> None:
    def run() -> list[str]:
        with Memstore(f"127.0.0.1:{grpc_port}", api_key="sk-test") as sync:
            sync.user.add("carol")
            sync.memory.add("c1", [{"content": "hello", "role_type": "user"}], user_id="carol")
            assert sync.memory.get("c1", lastn=1).messages[0].content == "hello"
            with pytest.raises(NotFound) as missing:
                sync.user.get("dave")
            # The id the server's access line names, to find the call in its log.
            assert re.fullmatch("[0-9a-f]{32}", missing.value.request_id)
            return [u.user_id for chunk in sync.user.list_chunked() for u in chunk]

    assert await asyncio.to_thread(run) == ["carol"]


async def test_a_call_after_close_is_a_memstore_error_saying_so(
    grpc_port: int, clean_db: str
) -> None:
    # grpc raised its own errors here (sync ValueError, aio UsageError), past `except
    # MemstoreError`.
    client = AsyncMemstore(f"127.0.0.1:{grpc_port}", api_key="sk-test")
    await client.user.add("erin")
    await client.close()
    with pytest.raises(ClientClosed, match="closed") as unary:
        await client.user.get("erin")
    assert unary.value.reason == "CLIENT_CLOSED" and isinstance(unary.value, ValueError)
    with pytest.raises(ClientClosed):
        [u async for chunk in client.user.list_chunked() for u in chunk]

    def run() -> None:
        sync = Memstore(f"127.0.0.1:{grpc_port}", api_key="sk-test")
        assert sync.user.get("erin").user_id == "erin"
        sync.close()
        with pytest.raises(ClientClosed):
            sync.user.get("erin")
        with pytest.raises(ClientClosed):
            [u for chunk in sync.user.list_chunked() for u in chunk]

    await asyncio.to_thread(run)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server_is_unavailable_after_retries() -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    async with AsyncMemstore(f"127.0.0.1:{_closed_port()}", retry=retry, timeout=5) as client:
        with pytest.raises(Unavailable):
            await client.user.get("alice")


async def test_messages_pages_clear_and_undelete(client: AsyncMemstore) -> None:
    await client.memory.add("s", [Message(content=f"m{i}") for i in range(5)])
    page = await client.memory.list_messages("s", page_size=3)
    assert [m.content for m in page.messages] == ["m0", "m1", "m2"] and page.next_page_token
    rest = await client.memory.list_messages("s", page_size=3, page_token=page.next_page_token)
    assert [m.sequence for m in rest.messages] == [4, 5] and rest.next_page_token is None
    assert await client.memory.clear("s") == 5
    assert (await client.memory.get("s")).messages == []
    await client.memory.delete("s")
    restored = await client.memory.undelete_session("s")
    assert restored.deleted_at is None and restored.message_count == 0
    with pytest.raises(FailedPrecondition) as live:
        await client.memory.undelete_session("s")
    assert live.value.reason == "SESSION_NOT_DELETED"


async def test_search_and_recall_like_zep(client: AsyncMemstore, store, embed) -> None:
    await client.user.add("zoe")
    await client.memory.add(
        "zoe-trip",
        [Message("Our flight LX318 to Zurich leaves at 7", role="zoe", role_type="user")],
        user_id="zoe",
    )
    await client.memory.add(
        "zoe-now",
        [Message("When does my Zurich flight leave?", role="zoe", role_type="user")],
        user_id="zoe",
    )
    await embed()
    found = await client.memory.search("LX318", user_id="zoe", search_type="full_text")
    assert [r.message.content for r in found.results] == ["Our flight LX318 to Zurich leaves at 7"]
    hit = found.results[0]
    assert hit.session_id == "zoe-trip" and hit.user_id == "zoe" and hit.score > 0
    assert hit.message.created_at is not None
    hybrid = await client.memory.search("Zurich flight", user_id="zoe", limit=1)
    assert len(hybrid.results) == 1 and hybrid.semantic == store.vectors
    with pytest.raises(InvalidArgument) as bad:
        await client.memory.search("", user_id="zoe")
    assert bad.value.field_violations[0].field == "text"
    with pytest.raises(InvalidArgument, match="search_type: must be one of"):
        await client.memory.search("x", search_type="fuzzy")
    memory = await client.memory.get("zoe-now", relevant_limit=3)
    assert [r.session_id for r in memory.relevant_messages] == ["zoe-trip"]
    assert "zoe: Our flight LX318 to Zurich leaves at 7" in memory.context
    assert (await client.memory.get("zoe-now", relevant_limit=0)).relevant_messages == []


async def test_sync_client_searches(grpc_port: int, clean_db: str) -> None:
    def run() -> list[str]:
        with Memstore(f"127.0.0.1:{grpc_port}") as c:
            c.memory.add("s", [Message("the kettle is broken", role="ann")])
            found = c.memory.search("kettle", search_type="full_text")
            return [r.message.content for r in found.results]

    assert await asyncio.to_thread(run) == ["the kettle is broken"]

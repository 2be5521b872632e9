"""What the client could not do before issue 14, against the real server: follow
list_sessions' tokens, filter sessions, read and update one message, clear metadata."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from memstore_client import AsyncMemstore, InvalidArgument, Memstore, NotFound


@pytest.fixture
async def client(grpc_port: int, clean_db: str) -> AsyncIterator[AsyncMemstore]:
    async with AsyncMemstore(f"127.0.0.1:{grpc_port}") as c:
        yield c


async def test_list_sessions_follows_tokens_and_filters(client: AsyncMemstore) -> None:
    await client.user.add("ann")
    for i in range(5):
        meta = {"team": "red" if i % 2 else "blue"}
        await client.memory.add_session(f"s{i}", user_id="ann" if i < 4 else None, metadata=meta)
    middle = datetime.now(UTC)
    await client.memory.add_session("late", metadata={"team": "red"})
    await client.memory.delete("s0")

    seen, token = [], None
    while True:
        page = await client.memory.list_sessions(2, page_token=token)
        assert page.total_size == 5
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
        if token is None:
            break
    assert seen == ["s1", "s2", "s3", "s4", "late"]

    red = await client.memory.list_sessions(metadata_contains={"team": "red"})
    assert [s.session_id for s in red.sessions] == ["s1", "s3", "late"]
    with_deleted = await client.memory.list_sessions(user_id="ann", show_deleted=True)
    assert [s.session_id for s in with_deleted.sessions] == ["s0", "s1", "s2", "s3"]
    assert with_deleted.sessions[0].deleted_at is not None
    before = await client.memory.list_sessions(created_before=middle, order_by="created_at desc")
    assert [s.session_id for s in before.sessions] == ["s4", "s3", "s2", "s1"]
    after = await client.memory.list_sessions(created_after=middle, updated_after=middle)
    assert [s.session_id for s in after.sessions] == ["late"]
    assert (await client.memory.list_sessions(updated_before=middle)).total_size == 4
    with pytest.raises(InvalidArgument) as both:
        await client.memory.list_sessions(2, 2, page_token=page.next_page_token or "x")
    assert both.value.field_violations[0].field in ("page_number", "page_token")


async def test_get_and_update_one_message(client: AsyncMemstore) -> None:
    added = await client.memory.add("s", [{"content": "hi", "metadata": {"k": 1, "j": 2}}])
    uuid = added[0].uuid
    assert (await client.memory.get_message("s", uuid)).content == "hi"
    merged = await client.memory.update_message("s", uuid, {"j": None, "n": 3})
    assert merged.metadata == {"k": 1, "n": 3}
    cleared = await client.memory.update_message("s", uuid, clear_metadata=True)
    assert cleared.metadata == {} and (await client.memory.get_message("s", uuid)).metadata == {}
    with pytest.raises(NotFound) as missing:
        await client.memory.get_message("s", "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162")
    assert missing.value.reason == "MESSAGE_NOT_FOUND"


async def test_clear_session_and_user_metadata(client: AsyncMemstore) -> None:
    await client.user.add("bo", email="b@example.com", metadata={"plan": "pro"})
    user = await client.user.update("bo", first_name="Bo", clear_metadata=True)
    assert user.metadata == {} and user.first_name == "Bo" and user.email == "b@example.com"
    await client.memory.add_session("s", metadata={"a": 1})
    assert (await client.memory.update_session("s", clear_metadata=True)).metadata == {}
    with pytest.raises(InvalidArgument) as both:
        await client.memory.update_session("s", {"b": 2}, clear_metadata=True)
    assert both.value.field_violations[0].field == "clear_metadata"


async def test_user_sessions_by_page(client: AsyncMemstore) -> None:
    await client.user.add("cy")
    for i in range(3):
        await client.memory.add_session(f"c{i}", user_id="cy")
    first = await client.user.list_sessions("cy", page_size=2)
    assert [s.session_id for s in first.sessions] == ["c0", "c1"] and first.next_page_token
    rest = await client.user.list_sessions("cy", 2, first.next_page_token)
    assert [s.session_id for s in rest.sessions] == ["c2"] and rest.next_page_token is None


async def test_the_sync_client_does_the_same(grpc_port: int, clean_db: str) -> None:
    def run() -> None:
        with Memstore(f"127.0.0.1:{grpc_port}") as client:
            added = client.memory.add("s", [{"content": "x", "metadata": {"a": 1}}])
            message = client.memory.update_message("s", added[0].uuid, clear_metadata=True)
            assert message.metadata == {}
            page = client.memory.list_sessions(1, show_deleted=True, metadata_contains={})
            assert page.total_size == 1 and page.next_page_token is None

    await asyncio.to_thread(run)

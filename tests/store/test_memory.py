"""Store: memory — AddMemory upsert and revival, concurrency, reads, message updates, clears."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from server import off_loop
from server.api import answer_size
from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import MetadataChange, NewMessage, StoredJson
from server.errors import FailedPrecondition, InvalidArgument, NotFound
from server.store import Store

#: A byte budget no page here reaches.
NO_BUDGET = 1 << 40


def msg(content: str, role_type: str = "user", **metadata: object) -> NewMessage:
    return NewMessage(role="speaker", role_type=role_type, content=content, metadata=metadata)


async def test_add_memory_creates_session_and_orders_messages(store: Store, clean_db: str) -> None:
    session, added = await store.add_memory(
        P, "s", None, [msg("one", "system", k=1), msg("two", "assistant"), msg("three")]
    )
    assert session.session_id == "s" and session.user_id is None
    assert session.message_count == 3
    assert [m.sequence for m in added] == [1, 2, 3]
    assert [m.content for m in added] == ["one", "two", "three"]
    assert [m.role_type for m in added] == ["system", "assistant", "user"]
    assert added[0].metadata == {"k": 1}
    assert len({m.uuid for m in added}) == 3
    assert session.last_message_at == added[-1].created_at
    session, more = await store.add_memory(P, "s", None, [msg("four")])
    assert [m.sequence for m in more] == [4]
    assert session.message_count == 4


async def test_add_memory_user_rules(store: Store, clean_db: str) -> None:
    with pytest.raises(FailedPrecondition, match="ghost") as info:
        await store.add_memory(P, "s", "ghost", [msg("x")])
    assert info.value.reason == "USER_NOT_FOUND"
    await store.create_user(P, "u", "", "", "", {})
    await store.create_user(P, "v", "", "", "", {})
    session, _ = await store.add_memory(P, "s", "u", [msg("x")])
    assert session.user_id == "u"
    await store.add_memory(P, "s", None, [msg("y")])  # no user named: fine
    await store.add_memory(P, "s", "u", [msg("z")])
    with pytest.raises(FailedPrecondition) as info:
        await store.add_memory(P, "s", "v", [msg("w")])
    assert info.value.reason == "SESSION_USER_MISMATCH"
    await store.create_session(P, "anon", None, {})
    with pytest.raises(FailedPrecondition) as info:
        await store.add_memory(P, "anon", "u", [msg("w")])
    assert info.value.reason == "SESSION_USER_MISMATCH"
    session, messages = await store.get_memory(P, "s", 10)
    assert session is not None and [m.content for m in messages] == ["x", "y", "z"]


async def test_add_memory_revives_deleted_session_not_its_messages(
    store: Store, clean_db: str
) -> None:
    await store.add_memory(P, "s", None, [msg("old1"), msg("old2")])
    await store.delete_session(P, "s")
    session, added = await store.add_memory(P, "s", None, [msg("new")])
    assert session.deleted_at is None
    assert session.message_count == 1
    assert added[0].sequence == 3  # sequences are never reused
    _, messages = await store.get_memory(P, "s", 10)
    assert [m.content for m in messages] == ["new"]


async def test_add_memory_rejects_empty_and_bad_values(store: Store, clean_db: str) -> None:
    with pytest.raises(InvalidArgument):
        await store.add_memory(P, "s", None, [])
    with pytest.raises(InvalidArgument):
        await store.add_memory(P, "s", None, [msg("x", role_type="wizard")])
    with pytest.raises(InvalidArgument):
        await store.add_memory(P, "s", None, [msg("nul \x00 byte")])
    assert await store.get_memory(P, "s", 10) == (None, [])  # nothing half-written


async def test_concurrent_add_memory_on_one_new_session(store: Store, clean_db: str) -> None:
    calls = 20
    results = await asyncio.gather(
        *(
            store.add_memory(P, "hot", None, [msg(f"{c}:{i}") for i in range(5)])
            for c in range(calls)
        )
    )
    sequences = sorted(m.sequence for _, added in results for m in added)
    assert sequences == list(range(1, 101))
    for _, added in results:  # each call's messages keep their order and are contiguous
        assert [m.content.split(":")[1] for m in added] == ["0", "1", "2", "3", "4"]
        assert [m.sequence for m in added] == list(range(added[0].sequence, added[0].sequence + 5))
    session, messages = await store.get_memory(P, "hot", 1000)
    assert session is not None and session.message_count == 100
    assert [m.sequence for m in messages] == list(range(1, 101))
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute("SELECT count(*) FROM sessions")
        assert await cur.fetchone() == (1,)


async def test_get_memory_last_n_oldest_first(store: Store, clean_db: str) -> None:
    await store.add_memory(P, "s", None, [msg(str(i)) for i in range(10)])
    await store.add_memory(P, "other", None, [msg("not mine")])
    session, messages = await store.get_memory(P, "s", 3)
    assert session is not None and session.message_count == 10
    assert [m.content for m in messages] == ["7", "8", "9"]
    assert await store.get_memory(P, "ghost", 3) == (None, [])
    await store.create_session(P, "empty", None, {})
    session, messages = await store.get_memory(P, "empty", 3)
    assert session is not None and session.session_id == "empty" and messages == []


async def test_list_messages_pages_live_messages(store: Store, clean_db: str) -> None:
    _, added = await store.add_memory(P, "s", None, [msg(str(i)) for i in range(5)])
    page = await store.list_messages(P, "s", None, 2, budget=NO_BUDGET)
    assert [m.content for m in page.items] == ["0", "1"] and page.has_more
    await store.add_memory(P, "s", None, [msg("5")])
    page = await store.list_messages(P, "s", page.items[-1].sequence, 3, budget=NO_BUDGET)
    assert [m.content for m in page.items] == ["2", "3", "4"] and page.has_more
    page = await store.list_messages(P, "s", page.items[-1].sequence, 3, budget=NO_BUDGET)
    assert [m.content for m in page.items] == ["5"] and not page.has_more
    await store.clear_memory(P, "s")
    empty = await store.list_messages(P, "s", None, 3, budget=NO_BUDGET)
    assert empty.items == [] and not empty.has_more
    assert added[0].uuid


async def test_list_messages_ends_a_page_where_its_messages_pass_the_byte_budget(
    store: Store, clean_db: str
) -> None:
    # Ten messages of 300,000 bytes: a page of 10 holds those the messages before which hold
    # less than the budget (four of 1 MiB), the first always; rows follow it (`cut`).
    await store.add_memory(P, "s", None, [msg("x" * 300_000) for _ in range(10)])
    pages = []
    after = None
    while True:
        page = await store.list_messages(P, "s", after, 10, budget=1 << 20)
        pages.append((len(page.items), page.has_more, page.cut))
        if not page.has_more:
            break
        after = page.items[-1].sequence
    assert pages == [(4, True, True), (4, True, True), (2, False, False)]
    one = await store.list_messages(P, "s", None, 10, budget=1)
    assert (len(one.items), one.has_more, one.cut) == (1, True, True)
    by_number = await store.list_messages(P, "s", None, 3, offset=4, budget=1 << 20)
    assert [m.sequence for m in by_number.items] == [5, 6, 7] and not by_number.cut
    whole = await store.list_messages(P, "s", None, 10, budget=NO_BUDGET)
    assert (len(whole.items), whole.has_more, whole.cut) == (10, False, False)


async def test_get_memory_stops_reading_its_window_at_the_byte_budget(
    store: Store, clean_db: str
) -> None:
    # GetMemory's window is read newest first while the messages after one hold less than
    # the budget of content bytes (the newest always): lastn 1000 of messages of 1 MiB was read
    # whole, 1 GB, to be refused. `cut` says it stopped short of lastn with more stored. Both
    # statements: the coalesced one (relevant_limit 0 on plain PostgreSQL; with recall too) and
    # get_memory's (Citus, or no kept recall).
    await store.create_user(P, "u", "", "", "", {})
    await store.add_memory(P, "s", "u", [msg(f"{i}" + "é" * 150_000) for i in range(10)])

    async def window(lastn: int, budget: int | None, limit: int = 0) -> tuple[list[int], bool]:
        found = await store.get_memory_with_recall(
            P, "s", lastn, limit=limit, window=6, model="any-model", budget=budget
        )
        assert found.session is not None and found.session.message_count == 10
        return [m.sequence for m in found.messages], found.cut

    # 300,003 bytes each (é is two, and "{}" of metadata): before the 5th newest, 1,200,012
    # >= 1 MiB.
    assert await window(1000, 1 << 20) == ([7, 8, 9, 10], True)
    assert await window(1000, 1 << 20, limit=5) == ([7, 8, 9, 10], True)
    assert await window(4, 1 << 20) == ([7, 8, 9, 10], False)
    assert await window(3, 1 << 20) == ([8, 9, 10], False)
    assert await window(1000, 1) == ([10], True)
    assert await window(1000, NO_BUDGET) == (list(range(1, 11)), False)
    assert await window(1000, None) == (list(range(1, 11)), False)  # no budget: read whole
    assert await window(1000, None, limit=5) == (list(range(1, 11)), False)
    # Concurrent calls with a budget and without share a batch (plain PostgreSQL) and each
    # gets its own window.
    together = await asyncio.gather(window(1000, None), window(1000, 1), window(2, None))
    assert together == [(list(range(1, 11)), False), ([10], True), ([9, 10], False)]
    _, whole = await store.get_memory(P, "s", 1000)
    assert len(whole) == 10
    _, cut = await store.get_memory(P, "s", 1000, budget=600_007)  # before the 3rd: 600,006
    assert [m.sequence for m in cut] == [8, 9, 10]
    await store.create_session(P, "empty", None, {})
    empty = await store.get_memory_with_recall(
        P, "empty", 6, limit=0, window=6, model="any-model", budget=1
    )
    assert empty.session is not None and empty.messages == [] and not empty.cut


async def test_list_messages_absent_or_deleted_session(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound):
        await store.list_messages(P, "ghost", None, 10, budget=NO_BUDGET)
    await store.add_memory(P, "s", None, [msg("x")])
    await store.delete_session(P, "s")
    with pytest.raises(NotFound):
        await store.list_messages(P, "s", None, 10, budget=NO_BUDGET)


async def test_get_and_update_message(store: Store, clean_db: str) -> None:
    _, added = await store.add_memory(P, "s", None, [msg("x", tags=["a"], nested={"k": 1})])
    target = added[0]
    assert await store.get_message(P, "s", target.uuid) == target
    updated = await store.update_message(
        P, "s", target.uuid, MetadataChange({"tags": ["b"], "nested": {"k": None, "j": 2}})
    )
    assert updated.metadata == {"tags": ["b"], "nested": {"j": 2}}
    assert updated.updated_at > target.updated_at
    assert updated.created_at == target.created_at and updated.sequence == target.sequence
    session = await store.get_session(P, "s", False)
    assert session.updated_at == updated.updated_at  # a memory change touches the session
    replaced = await store.update_message(P, "s", target.uuid, MetadataChange({}, replace=True))
    assert replaced.metadata == {}


async def test_message_not_found_cases(store: Store, clean_db: str) -> None:
    _, added = await store.add_memory(P, "s", None, [msg("x"), msg("y")])
    await store.add_memory(P, "t", None, [msg("z")])
    uuid = added[0].uuid
    for session_id, key in [("s", "not-a-uuid"), ("s", "0" * 32 + "x"), ("t", uuid)]:
        with pytest.raises(NotFound):
            await store.get_message(P, session_id, key)
        with pytest.raises(NotFound):
            await store.update_message(P, session_id, key, MetadataChange({"a": 1}))
    await store.clear_memory(P, "s")
    with pytest.raises(NotFound):
        await store.get_message(P, "s", uuid)
    _, again = await store.add_memory(P, "s", None, [msg("w")])
    await store.delete_session(P, "s")
    with pytest.raises(NotFound):
        await store.get_message(P, "s", again[0].uuid)
    with pytest.raises(NotFound):
        await store.update_message(P, "s", again[0].uuid, MetadataChange({"a": 1}))


async def test_clear_memory(store: Store, clean_db: str) -> None:
    await store.add_memory(P, "s", None, [msg("a"), msg("b")])
    assert await store.clear_memory(P, "s") == 2
    session = await store.get_session(P, "s", False)
    assert session.deleted_at is None and session.message_count == 0
    assert (await store.get_memory(P, "s", 10))[1] == []
    assert await store.clear_memory(P, "s") == 0
    _, added = await store.add_memory(P, "s", None, [msg("c")])
    assert added[0].sequence == 3
    with pytest.raises(NotFound):
        await store.clear_memory(P, "ghost")
    await store.delete_session(P, "s")
    with pytest.raises(NotFound):
        await store.clear_memory(P, "s")


async def test_a_large_reads_metadata_carries_its_stored_length(
    store: Store, clean_db: str
) -> None:
    # Past OFF_LOOP_BYTES of JSON the store parses a result in a thread, and hands each object
    # over with its stored text's length (StoredJson), which an answer weighs it by instead of
    # printing it on the loop (answer_size.text_at_least; about 8 ms for 256 KiB of floats).
    metadata = {"vector": [0.5] * 15_000}
    stored = len(json.dumps(metadata))  # as jsonb prints it: {"vector": [0.5, 0.5, ...]}
    rows = off_loop.OFF_LOOP_BYTES // stored + 1
    await store.add_memory(
        P, "wide", None, [msg(f"m{i}", vector=metadata["vector"]) for i in range(rows)]
    )
    _, messages = await store.get_memory(P, "wide", rows)
    assert [m.metadata for m in messages] == [metadata] * rows
    assert all(isinstance(m.metadata, StoredJson) for m in messages)
    assert [m.metadata.text_bytes for m in messages] == [stored] * rows  # type: ignore[attr-defined]
    weighed = answer_size.text_at_least(messages, 1 << 40)
    assert weighed == sum(len(m.content) + len(m.role) + stored for m in messages)
    # A small read is parsed as psycopg reads it: plain objects, weighed by their print.
    _, small = await store.get_memory(P, "wide", 1)
    assert type(small[0].metadata) is dict

"""Store: sessions — create, soft delete and restore, merge-update, filtered listing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import MetadataChange, NewMessage, Session, SessionQuery
from server.errors import AlreadyExists, FailedPrecondition, NotFound
from server.store import Store


def msg(content: str) -> NewMessage:
    return NewMessage(role="r", role_type="user", content=content, metadata={})


async def test_create_and_get_session(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {})
    created = await store.create_session(P, "s", "u", {"topic": "x", "nil": None})
    assert created.user_id == "u"
    assert created.metadata == {"topic": "x"}
    assert created.deleted_at is None and created.last_message_at is None
    assert created.message_count == 0
    assert created.created_at == created.updated_at
    assert await store.get_session(P, "s", show_deleted=False) == created
    anonymous = await store.create_session(P, "anon", None, {})
    assert anonymous.user_id is None


async def test_create_session_for_unknown_user(store: Store, clean_db: str) -> None:
    with pytest.raises(FailedPrecondition, match="ghost") as info:
        await store.create_session(P, "s", "ghost", {})
    assert info.value.reason == "USER_NOT_FOUND"
    # Nothing half-written: on Citus the session is inserted before its user is checked.
    with pytest.raises(NotFound):
        await store.get_session(P, "s", show_deleted=True)


async def test_create_session_taken_naming_an_unknown_user_says_taken(
    store: Store, clean_db: str
) -> None:
    # One answer on both engines: the id is checked first (on plain PostgreSQL the insert
    # that finds it taken never reaches the foreign key; on Citus the user is checked after).
    await store.create_session(P, "s", None, {})
    with pytest.raises(AlreadyExists) as info:
        await store.create_session(P, "s", "ghost", {})
    assert info.value.reason == "SESSION_ALREADY_EXISTS"


async def test_create_session_taken(store: Store, clean_db: str) -> None:
    await store.create_session(P, "s", None, {})
    with pytest.raises(AlreadyExists, match="session 's' already exists") as info:
        await store.create_session(P, "s", None, {})
    assert info.value.reason == "SESSION_ALREADY_EXISTS"


async def test_create_session_taken_by_soft_deleted(store: Store, clean_db: str) -> None:
    await store.create_session(P, "s", None, {})
    await store.delete_session(P, "s")
    with pytest.raises(AlreadyExists, match="soft-deleted") as info:
        await store.create_session(P, "s", None, {})
    assert info.value.reason == "SESSION_DELETED"
    assert "UndeleteSession" in info.value.message
    assert "AddMemory" in info.value.message


async def test_soft_delete_and_undelete(store: Store, clean_db: str) -> None:
    await store.add_memory(P, "s", None, [msg("a"), msg("b"), msg("c")])
    assert await store.delete_session(P, "s") == 3
    with pytest.raises(NotFound):
        await store.get_session(P, "s", show_deleted=False)
    hidden = await store.get_session(P, "s", show_deleted=True)
    assert hidden.deleted_at is not None and hidden.message_count == 0
    assert await store.get_memory(P, "s", 10) == (None, [])
    with pytest.raises(NotFound):
        await store.delete_session(P, "s")
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(
            "SELECT count(DISTINCT m.deleted_at), bool_and(m.deleted_at = s.deleted_at)"
            " FROM messages m JOIN sessions s USING (project_id, session_id)"
        )
        assert await cur.fetchone() == (1, True)  # kept, with the session's timestamp

    restored = await store.undelete_session(P, "s")
    assert restored.deleted_at is None
    assert restored.message_count == 0
    assert await store.get_session(P, "s", show_deleted=False) == restored
    session, messages = await store.get_memory(P, "s", 10)
    assert session is not None and messages == []  # the messages stay deleted


async def test_undelete_errors(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound):
        await store.undelete_session(P, "ghost")
    await store.create_session(P, "live", None, {})
    with pytest.raises(FailedPrecondition) as info:
        await store.undelete_session(P, "live")
    assert info.value.reason == "SESSION_NOT_DELETED"


async def test_delete_session_unknown(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound, match="session 'ghost' not found"):
        await store.delete_session(P, "ghost")


async def test_update_session_merges_and_replaces(store: Store, clean_db: str) -> None:
    before = await store.create_session(P, "s", None, {"a": {"b": 1, "c": 2}, "d": [1]})
    merged = await store.update_session(P, "s", MetadataChange({"a": {"c": None}, "d": [2]}))
    assert merged.metadata == {"a": {"b": 1}, "d": [2]}
    assert merged.updated_at > before.updated_at
    replaced = await store.update_session(P, "s", MetadataChange({"x": 1}, replace=True))
    assert replaced.metadata == {"x": 1}


async def test_update_session_absent_or_deleted(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound, match="not found"):
        await store.update_session(P, "ghost", MetadataChange({"a": 1}))
    await store.create_session(P, "s", None, {})
    await store.delete_session(P, "s")
    with pytest.raises(NotFound, match="soft-deleted"):
        await store.update_session(P, "s", MetadataChange({"a": 1}))


async def _make_sessions(store: Store, clean_db: str) -> None:
    """Six sessions with known created/updated times and metadata."""
    await store.create_user(P, "u", "", "", "", {})
    await store.create_user(P, "v", "", "", "", {})
    for i, (user, color) in enumerate(
        [("u", "red"), ("v", "blue"), ("u", "blue"), (None, "red"), ("u", "red"), ("v", "red")]
    ):
        await store.create_session(P, f"s{i}", user, {"color": color, "n": i})
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        # created_at: s0 oldest .. s5 newest; updated_at in another order; s2 and s3 tie.
        # Times computed here, one row per statement: the same SQL runs on Citus, which
        # refuses a non-immutable function over a column in an UPDATE.
        for i in range(6):
            await conn.execute(
                "UPDATE sessions SET created_at = %s, updated_at = %s WHERE session_id = %s",
                (
                    datetime(2024, 1, 1 + (2 if i == 3 else i), tzinfo=UTC),
                    datetime(2024, 2, 1 + (10 - i) % 4, tzinfo=UTC),
                    f"s{i}",
                ),
            )
    await store.delete_session(P, "s5")


def ids(sessions: list[Session]) -> list[str]:
    return [s.session_id for s in sessions]


async def _all_pages(store: Store, query: SessionQuery, size: int) -> list[str]:
    page = await store.list_sessions(P, query, None, None, size)
    found = ids(page.items)
    while page.has_more:
        last = page.items[-1]
        at = last.created_at if query.order_field == "created_at" else last.updated_at
        page = await store.list_sessions(P, query, (at, last.session_id), None, size)
        found += ids(page.items)
    return found


async def test_list_sessions_orders(store: Store, clean_db: str) -> None:
    await _make_sessions(store, clean_db)
    assert await _all_pages(store, SessionQuery(), 2) == ["s0", "s1", "s2", "s3", "s4"]
    desc = SessionQuery(descending=True)
    assert await _all_pages(store, desc, 2) == ["s4", "s3", "s2", "s1", "s0"]
    # updated_at offsets (10 - i) % 4: s0->2, s1->1, s2->0, s3->3, s4->2.
    by_update = SessionQuery(order_field="updated_at")
    assert await _all_pages(store, by_update, 2) == ["s2", "s1", "s0", "s4", "s3"]
    by_update_desc = SessionQuery(order_field="updated_at", descending=True)
    assert await _all_pages(store, by_update_desc, 1) == ["s3", "s4", "s0", "s1", "s2"]


async def test_list_sessions_filters(store: Store, clean_db: str) -> None:
    await _make_sessions(store, clean_db)
    every = await _all_pages(store, SessionQuery(show_deleted=True), 10)
    assert every == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert await _all_pages(store, SessionQuery(user_id="u"), 10) == ["s0", "s2", "s4"]
    assert await _all_pages(store, SessionQuery(user_id="v", show_deleted=True), 1) == [
        "s1",
        "s5",
    ]
    red = SessionQuery(metadata_contains={"color": "red"})
    assert await _all_pages(store, red, 10) == ["s0", "s3", "s4"]
    s0 = await store.get_session(P, "s0", False)
    window = SessionQuery(
        created_after=s0.created_at + timedelta(days=1),  # inclusive
        created_before=s0.created_at + timedelta(days=4),  # exclusive
    )
    assert await _all_pages(store, window, 10) == ["s1", "s2", "s3"]
    s2 = await store.get_session(P, "s2", False)
    updated = SessionQuery(
        updated_after=s2.updated_at + timedelta(days=1),
        updated_before=s2.updated_at + timedelta(days=3),
    )
    assert await _all_pages(store, updated, 10) == ["s0", "s1", "s4"]


async def test_list_sessions_total_size_and_offset(store: Store, clean_db: str) -> None:
    await _make_sessions(store, clean_db)
    query = SessionQuery(metadata_contains={"color": "red"}, show_deleted=True)
    first = await store.list_sessions(P, query, None, 0, 2)
    assert (ids(first.items), first.has_more, first.total_size) == (["s0", "s3"], True, 4)
    second = await store.list_sessions(P, query, None, 2, 2)
    assert (ids(second.items), second.has_more, second.total_size) == (["s4", "s5"], False, 4)
    beyond = await store.list_sessions(P, query, None, 10, 2)
    assert (beyond.items, beyond.has_more, beyond.total_size) == ([], False, 4)
    # On the keyset path the total still counts every match, not just what follows.
    last = first.items[-1]
    keyset = await store.list_sessions(P, query, (last.created_at, last.session_id), None, 2)
    assert keyset.total_size == 4 and ids(keyset.items) == ["s4", "s5"]


async def test_list_sessions_keyset_survives_inserts_and_deletes(
    store: Store, clean_db: str
) -> None:
    for i in range(6):
        await store.create_session(P, f"k{i}", None, {})
    page = await store.list_sessions(P, SessionQuery(), None, None, 2)
    seen = ids(page.items)
    await store.delete_session(P, "k0")  # seen
    await store.delete_session(P, "k3")  # not yet seen
    await store.create_session(P, "k9", None, {})
    while page.has_more:
        last = page.items[-1]
        page = await store.list_sessions(
            P, SessionQuery(), (last.created_at, last.session_id), None, 2
        )
        seen += ids(page.items)
    assert seen == ["k0", "k1", "k2", "k4", "k5", "k9"]

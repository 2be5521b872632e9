"""Store: users — create, get, merge-update, cascade delete, keyset listing."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import MetadataChange, NewMessage, UserChanges
from server.errors import AlreadyExists, NotFound
from server.store import Store


def msg(content: str) -> NewMessage:
    return NewMessage(role="r", role_type="user", content=content, metadata={})


async def test_create_and_get_user(store: Store, clean_db: str) -> None:
    created = await store.create_user(P, "alice", "a@x.io", "Alice", "Liddell", {"tier": "gold"})
    assert (created.user_id, created.email, created.first_name, created.last_name) == (
        "alice",
        "a@x.io",
        "Alice",
        "Liddell",
    )
    assert created.metadata == {"tier": "gold"}
    assert created.session_count == 0
    assert created.created_at == created.updated_at
    fetched = await store.get_user(P, "alice")
    assert fetched == created


async def test_create_user_strips_null_metadata(store: Store, clean_db: str) -> None:
    user = await store.create_user(P, "u", "", "", "", {"a": None, "b": {"c": None, "d": 1}})
    assert user.metadata == {"b": {"d": 1}}


async def test_create_user_twice_is_already_exists(store: Store, clean_db: str) -> None:
    await store.create_user(P, "bob", "", "", "", {})
    with pytest.raises(AlreadyExists, match="user 'bob' already exists"):
        await store.create_user(P, "bob", "", "", "", {})


async def test_get_unknown_user_is_not_found(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound, match="user 'ghost'"):
        await store.get_user(P, "ghost")


async def test_session_count_counts_live_sessions(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {})
    for sid in ("s1", "s2", "s3"):
        await store.create_session(P, sid, "u", {})
    await store.delete_session(P, "s2")
    assert (await store.get_user(P, "u")).session_count == 2


async def test_update_user_changes_only_given_fields(store: Store, clean_db: str) -> None:
    before = await store.create_user(P, "u", "e@x", "F", "L", {"k": 1})
    after = await store.update_user(P, "u", UserChanges(first_name="G", last_name=""))
    assert (after.email, after.first_name, after.last_name) == ("e@x", "G", "")
    assert after.metadata == {"k": 1}
    assert after.updated_at > before.updated_at
    assert after.created_at == before.created_at


async def test_update_user_merges_metadata(store: Store, clean_db: str) -> None:
    await store.create_user(
        P,
        "u",
        "",
        "",
        "",
        {"keep": 1, "drop": 2, "nested": {"a": 1, "b": 2}, "list": [1, 2, 3], "s": "x"},
    )
    patch = {"drop": None, "nested": {"b": None, "c": 3}, "list": [9], "s": {"now": "object"}}
    user = await store.update_user(P, "u", UserChanges(metadata=MetadataChange(patch)))
    assert user.metadata == {
        "keep": 1,
        "nested": {"a": 1, "c": 3},
        "list": [9],
        "s": {"now": "object"},
    }


async def test_update_user_merge_into_scalar_strips_nested_nulls(
    store: Store, clean_db: str
) -> None:
    await store.create_user(P, "u", "", "", "", {"a": 5})
    patch = {"a": {"x": None, "y": {"z": None, "w": 1}}}
    user = await store.update_user(P, "u", UserChanges(metadata=MetadataChange(patch)))
    assert user.metadata == {"a": {"y": {"w": 1}}}


async def test_update_user_replace_metadata(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {"old": 1})
    cleared = await store.update_user(P, "u", UserChanges(metadata=MetadataChange({}, True)))
    assert cleared.metadata == {}
    replaced = await store.update_user(
        P, "u", UserChanges(metadata=MetadataChange({"new": 2, "gone": None}, replace=True))
    )
    assert replaced.metadata == {"new": 2}


async def test_update_unknown_user_is_not_found(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound):
        await store.update_user(P, "ghost", UserChanges(email="x"))


async def test_concurrent_updates_of_different_keys_all_survive(
    store: Store, clean_db: str
) -> None:
    await store.create_user(P, "u", "", "", "", {"base": True})
    await asyncio.gather(
        *(
            store.update_user(P, "u", UserChanges(metadata=MetadataChange({f"k{i}": i})))
            for i in range(20)
        )
    )
    user = await store.get_user(P, "u")
    assert user.metadata == {"base": True, **{f"k{i}": i for i in range(20)}}


async def test_delete_user_cascades_in_one_go(store: Store, clean_db: str) -> None:
    await store.create_user(P, "gone", "", "", "", {})
    await store.create_user(P, "stays", "", "", "", {})
    await store.add_memory(P, "g1", "gone", [msg("a"), msg("b")])
    await store.add_memory(P, "g2", "gone", [msg("c")])
    await store.create_session(P, "g3", "gone", {})
    await store.add_memory(P, "g4", "gone", [msg("d")])
    await store.delete_session(P, "g4")  # soft-deleted rows go too
    await store.add_memory(P, "other", "stays", [msg("e")])

    counts = await store.delete_user(P, "gone")

    assert (counts.sessions, counts.messages) == (4, 4)
    with pytest.raises(NotFound):
        await store.get_user(P, "gone")
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM sessions WHERE session_id LIKE 'g_'),"
            " (SELECT count(*) FROM messages WHERE session_id LIKE 'g_'),"
            " (SELECT count(*) FROM messages)"
        )
        assert await cur.fetchone() == (0, 0, 1)
    # The id is free again.
    again = await store.create_user(P, "gone", "", "", "", {})
    assert again.session_count == 0


async def test_delete_unknown_user_is_not_found(store: Store, clean_db: str) -> None:
    with pytest.raises(NotFound):
        await store.delete_user(P, "ghost")


async def test_list_users_pages_without_skips_or_repeats(store: Store, clean_db: str) -> None:
    for i in range(7):
        await store.create_user(P, f"u{i}", "", "", "", {})
    seen: list[str] = []
    page = await store.list_users(P, None, 3)
    assert page.has_more
    seen += [u.user_id for u in page.items]
    # Between pages: delete an unseen user and a seen one, add new users.
    await store.delete_user(P, "u4")
    await store.delete_user(P, "u0")
    await store.create_user(P, "late1", "", "", "", {})
    while page.has_more:
        last = page.items[-1]
        page = await store.list_users(P, (last.created_at, last.user_id), 3)
        seen += [u.user_id for u in page.items]
        if "late2" not in seen and len(seen) > 4:
            await store.create_user(P, "late2", "", "", "", {})
    assert seen == ["u0", "u1", "u2", "u3", "u5", "u6", "late1", "late2"]
    assert len(seen) == len(set(seen))


async def test_list_users_ties_break_on_user_id(store: Store, clean_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        await conn.execute(
            "INSERT INTO users (project_id, user_id, created_at, updated_at)"
            " SELECT 1, 'u' || i, '2024-01-01', '2024-01-01' FROM generate_series(1, 5) i"
        )
    first = await store.list_users(P, None, 2)
    last = first.items[-1]
    rest = await store.list_users(P, (last.created_at, last.user_id), 10)
    ids = [u.user_id for u in first.items + rest.items]
    assert ids == ["u1", "u2", "u3", "u4", "u5"]
    assert not rest.has_more


async def test_list_user_sessions(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {})
    await store.create_user(P, "v", "", "", "", {})
    for sid in ("a", "b", "c", "d"):
        await store.create_session(P, sid, "u", {})
    await store.create_session(P, "other", "v", {})
    await store.delete_session(P, "b")
    page = await store.list_user_sessions(P, "u", None, 2)
    assert [s.session_id for s in page.items] == ["a", "c"]
    assert page.has_more
    last = page.items[-1]
    page = await store.list_user_sessions(P, "u", (last.created_at, last.session_id), 2)
    assert [s.session_id for s in page.items] == ["d"]
    assert not page.has_more


async def test_list_user_sessions_empty_and_unknown(store: Store, clean_db: str) -> None:
    await store.create_user(P, "lonely", "", "", "", {})
    page = await store.list_user_sessions(P, "lonely", None, 10)
    assert page.items == [] and not page.has_more
    with pytest.raises(NotFound, match="user 'ghost'"):
        await store.list_user_sessions(P, "ghost", None, 10)


async def test_delete_user_chosen_as_a_deadlocks_victim_runs_again(
    store: Store, clean_db: str
) -> None:
    # Another transaction holds one of the user's sessions, DeleteUser (holding the user)
    # waits for it, and then that transaction asks for the user: a lock cycle. PostgreSQL
    # ends one of the two; DeleteUser, which waited first, is the one its detector ends on
    # plain PostgreSQL. Its transaction was rolled back whole: it runs again and deletes.
    await store.create_user(P, "u", "", "", "", {})
    await store.create_session(P, "s", "u", {})
    async with await psycopg.AsyncConnection.connect(clean_db) as other:
        await other.execute("SELECT 1 FROM sessions WHERE session_id = 's' FOR UPDATE")
        delete = asyncio.create_task(store.delete_user(P, "u"))
        await asyncio.sleep(0.3)  # DeleteUser holds the user and waits for the session
        assert not delete.done()
        try:
            await other.execute("SELECT 1 FROM users WHERE user_id = 'u' FOR KEY SHARE")
        except psycopg.errors.DeadlockDetected:
            await other.rollback()  # Citus may end this side instead: DeleteUser goes on
        else:
            await other.commit()
        deleted = await asyncio.wait_for(delete, 30)
    assert deleted.sessions == 1
    with pytest.raises(NotFound):
        await store.get_user(P, "u")

"""Store: each user's session_count, kept in user_session_counts (migration 0010) by every
session write in its own transaction, stays the number of the user's live sessions: after
each kind of write, under concurrent writes of one user's sessions, and after the migration
backfills it. Runs on plain PostgreSQL and, with `make test-citus`, on a Citus cluster, where
the count is on the user's shard and the sessions on theirs (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, Session, User, UserChanges
from server.errors import MemstoreError
from server.store import Store


def msg(content: str) -> NewMessage:
    return NewMessage(role="r", role_type="user", content=content, metadata={})


async def live_sessions(url: str, user_id: str) -> int:
    """What session_count must be: the user's live sessions, counted in the table."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM sessions WHERE project_id = %s AND user_id = %s"
            " AND deleted_at IS NULL",
            (P, user_id),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def assert_counted(store: Store, url: str, user_id: str, expected: int) -> None:
    """Every read of the user answers `expected`, the number of its live sessions."""
    assert await live_sessions(url, user_id) == expected
    assert (await store.get_user(P, user_id)).session_count == expected
    assert (await store.update_user(P, user_id, UserChanges())).session_count == expected
    listed = {u.user_id: u.session_count for u in (await store.list_users(P, None, 100)).items}
    assert listed[user_id] == expected
    records = {r[0]: r[7] for r in (await store.list_user_records(P, None, 100)).items}
    assert records[user_id] == expected


async def test_every_session_write_keeps_the_count(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {})
    await store.create_user(P, "v", "", "", "", {})
    await assert_counted(store, clean_db, "u", 0)
    await store.create_session(P, "c1", "u", {})  # CreateSession
    await store.create_session(P, "free", None, {})  # no user: counted nowhere
    await assert_counted(store, clean_db, "u", 1)
    await store.add_memory(P, "a1", "u", [msg("new session")])  # AddMemory making one
    await store.add_memory(P, "a1", "u", [msg("again")])  # ...and appending: no change
    await store.add_memory(P, "c1", None, [msg("first message")])
    await assert_counted(store, clean_db, "u", 2)
    await store.delete_session(P, "c1")  # DeleteSession
    await assert_counted(store, clean_db, "u", 1)
    await store.undelete_session(P, "c1")  # UndeleteSession
    await assert_counted(store, clean_db, "u", 2)
    await store.delete_session(P, "a1")
    await store.add_memory(P, "a1", None, [msg("revives")])  # AddMemory reviving it
    await assert_counted(store, clean_db, "u", 2)
    await store.delete_session(P, "a1")
    await store.add_memory(P, "a1", "u", [msg("revives, naming the user")])
    await assert_counted(store, clean_db, "u", 2)
    await store.delete_session(P, "a1")
    # A pure retry of a stored message does not revive a deleted session.
    _, added = await store.add_memory(P, "c1", None, [msg("x")])
    await store.delete_session(P, "c1")
    retry = NewMessage(role="r", role_type="user", content="x", metadata={}, uuid=added[0].uuid)
    await store.add_memory(P, "c1", None, [retry])
    await assert_counted(store, clean_db, "u", 0)
    with pytest.raises(MemstoreError):  # another user's session: refused, nothing counted
        await store.add_memory(P, "a1", "v", [msg("not mine")])
    await assert_counted(store, clean_db, "v", 0)
    await assert_counted(store, clean_db, "u", 0)
    await store.create_session(P, "v1", "v", {})
    await store.delete_user(P, "u")  # the count goes with the user
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute("SELECT user_id, session_count FROM user_session_counts")
        assert await cur.fetchall() == [("v", 1)]
    again = await store.create_user(P, "u", "", "", "", {})
    assert again.session_count == 0 and (await store.get_user(P, "u")).session_count == 0


async def test_restore_counts_the_live_sessions_it_writes(store: Store, clean_db: str) -> None:
    now = datetime.now(UTC)
    users = [User("r1", "", "", "", {}, now, now, 0), User("r2", "", "", "", {}, now, now, 0)]

    def session(sid: str, user_id: str, *, deleted: bool) -> Session:
        return Session(sid, user_id, {}, now, now, now if deleted else None, 0, None)

    sessions = [
        session("r1-a", "r1", deleted=False),
        session("r1-b", "r1", deleted=False),
        session("r1-c", "r1", deleted=True),
        session("r2-a", "r2", deleted=True),
    ]
    await store.restore(P, users, sessions, [])
    await store.restore(P, users, sessions, [])  # a resumed restore: all existing, no change
    await assert_counted(store, clean_db, "r1", 2)
    await assert_counted(store, clean_db, "r2", 0)
    await store.undelete_session(P, "r2-a")
    await assert_counted(store, clean_db, "r2", 1)


@pytest.mark.parametrize("seed", [1, 2])
async def test_the_count_stays_exact_under_concurrent_session_writes(
    store: Store, clean_db: str, seed: int
) -> None:
    # One user's sessions made, appended to, deleted, undeleted and revived by many calls at
    # once (several on the same new session): each write counts inside its own transaction,
    # so whatever order they commit in, the count is the number of live sessions.
    rng = random.Random(seed)
    await store.create_user(P, "hot", "", "", "", {})
    ids = [f"s{i}" for i in range(12)]

    async def one(op: str, sid: str) -> None:
        try:
            if op == "add":
                await store.add_memory(P, sid, rng.choice(["hot", None]), [msg(op)])
            elif op == "create":
                await store.create_session(P, sid, "hot", {})
            elif op == "delete":
                await store.delete_session(P, sid)
            else:
                await store.undelete_session(P, sid)
        except MemstoreError as exc:
            # Refusals of the state the session is in; nothing else may fail.
            reasons = {"SESSION_NOT_FOUND", "SESSION_DELETED", "SESSION_NOT_DELETED"}
            reasons |= {"SESSION_ALREADY_EXISTS", "SESSION_USER_MISMATCH"}
            assert exc.reason in reasons, exc

    for _ in range(4):
        ops = [
            one(rng.choice(["add", "add", "create", "delete", "delete", "undelete"]), sid)
            for sid in rng.choices(ids, k=40)
        ]
        await asyncio.gather(*ops)
        await assert_counted(store, clean_db, "hot", await live_sessions(clean_db, "hot"))
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute("SELECT count(*) FROM sessions")
        row = await cur.fetchone()
    assert row is not None and row[0] > 0


async def test_concurrent_add_memory_on_new_sessions_counts_each_once(
    store: Store, clean_db: str
) -> None:
    await store.create_user(P, "u", "", "", "", {})
    # 10 new sessions, 4 concurrent first calls on each: each session is made once, counted
    # once.
    calls = [
        store.add_memory(P, f"n{i}", "u", [msg(f"{i}:{c}")]) for c in range(4) for i in range(10)
    ]
    await asyncio.gather(*calls)
    await assert_counted(store, clean_db, "u", 10)
    await asyncio.gather(*(store.delete_session(P, f"n{i}") for i in range(0, 10, 2)))
    await asyncio.gather(
        *(store.add_memory(P, f"n{i}", None, [msg("back")]) for i in range(0, 10, 4) for _ in "ab")
    )
    await assert_counted(store, clean_db, "u", 8)


async def test_migration_backfills_the_counts(store: Store, clean_db: str) -> None:
    # A database migrated before 0010 holds sessions and no counts: applying 0010 counts them.
    await store.create_user(P, "u", "", "", "", {})
    await store.create_user(P, "w", "", "", "", {})
    for i in range(5):
        await store.create_session(P, f"u{i}", "u", {})
    await store.create_session(P, "w0", "w", {})
    await store.delete_session(P, "u0")
    await store.delete_session(P, "w0")
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("DROP TABLE user_session_counts")
        await conn.execute("DELETE FROM schema_migrations WHERE name LIKE '0010%%'")
    await store.migrate()
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(
            "SELECT user_id, session_count FROM user_session_counts ORDER BY user_id"
        )
        assert await cur.fetchall() == [("u", 4), ("w", 0)]
    await assert_counted(store, clean_db, "u", 4)
    await store.undelete_session(P, "w0")
    await assert_counted(store, clean_db, "w", 1)

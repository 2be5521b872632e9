"""Store: AddMemory with caller-chosen message uuids — retries that append nothing twice."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.errors import AlreadyExists, InvalidArgument
from server.store import Store
from tests.fix_db import has_lock_waiter


def msg(content: str, message_uuid: str | None = None, **metadata: object) -> NewMessage:
    return NewMessage("kai", "user", content, metadata, message_uuid)


def uuids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def rows(url: str, session_id: str) -> list[tuple[str, int, bool]]:
    """(uuid, sequence, deleted) of every stored message of a session, by sequence."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT uuid::text, sequence, deleted_at IS NOT NULL FROM messages"
            " WHERE session_id = %s ORDER BY sequence",
            [session_id],
        ).fetchall()
    return [(str(u), int(s), bool(d)) for u, s, d in found]


def queued(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM embedding_queue").fetchone()
    assert row is not None
    return int(row[0])


async def test_a_retry_answers_as_the_first_call_and_changes_nothing(
    store: Store, clean_db: str
) -> None:
    a, b = uuids(2)
    first_session, first = await store.add_memory(P, "s", None, [msg("one", a, k=1), msg("two", b)])
    assert [m.uuid for m in first] == [a, b]
    assert [m.sequence for m in first] == [1, 2]
    before_queue = queued(clean_db)
    session, again = await store.add_memory(P, "s", None, [msg("one", a, k=1), msg("two", b)])
    assert again == first
    assert session == first_session  # not counted, not touched
    assert queued(clean_db) == before_queue  # not queued for embedding twice
    # No sequence was reserved by the retry: the next message follows without a gap.
    session, more = await store.add_memory(P, "s", None, [msg("three")])
    assert [m.sequence for m in more] == [3]
    assert session.message_count == 3
    assert [r[1] for r in rows(clean_db, "s")] == [1, 2, 3]


async def test_server_made_uuids_are_canonical_and_distinct(store: Store, clean_db: str) -> None:
    _, added = await store.add_memory(P, "s", None, [msg("one"), msg("two")])
    assert all(str(uuid.UUID(m.uuid)) == m.uuid for m in added)
    assert added[0].uuid != added[1].uuid


async def test_a_partial_overlap_appends_only_the_new_messages_in_order(
    store: Store, clean_db: str
) -> None:
    a, b, c, d = uuids(4)
    await store.add_memory(P, "s", None, [msg("a", a), msg("b", b)])
    session, added = await store.add_memory(P, "s", None, [msg("c", c), msg("b", b), msg("d", d)])
    # One answer per request message, in request order; the new ones follow the session's last.
    assert [(m.uuid, m.sequence) for m in added] == [(c, 3), (b, 2), (d, 4)]
    assert session.message_count == 4
    assert session.last_message_at == added[0].created_at
    assert [r[0] for r in rows(clean_db, "s")] == [a, b, c, d]


@pytest.mark.parametrize("size", [64, 65])
async def test_a_partial_overlap_appends_the_new_messages_at_either_side_of_the_citus_cut(
    store: Store, clean_db: str, size: int
) -> None:
    # On Citus a call of up to CITUS_ROUTED_MESSAGES (64) messages runs as router
    # statements, a larger one as add_memory; both answer alike (and on plain PostgreSQL).
    kept, new = uuids(size), uuids(size)
    await store.add_memory(P, "s", None, [msg(f"k{i}", u) for i, u in enumerate(kept)])
    retried = [msg(f"k{i}", u) for i, u in enumerate(kept)][: size // 2]
    request = [msg(f"n{i}", u) for i, u in enumerate(new)][: size - len(retried)] + retried
    session, added = await store.add_memory(P, "s", None, request)
    fresh = size - len(retried)
    expected = [(u, size + 1 + i) for i, u in enumerate(new[:fresh])]
    assert [(m.uuid, m.sequence) for m in added] == expected + [
        (u, 1 + i) for i, u in enumerate(kept[: len(retried)])
    ]
    assert session.message_count == size + fresh
    assert len(rows(clean_db, "s")) == size + fresh


async def test_a_uuid_holding_another_message_is_already_exists_and_writes_nothing(
    store: Store, clean_db: str
) -> None:
    a, b = uuids(2)
    before, _ = await store.add_memory(P, "s", None, [msg("a", a)])
    with pytest.raises(AlreadyExists, match=r"messages\[1\]\.uuid") as info:
        await store.add_memory(P, "s", None, [msg("b", b), msg("not a", a)])
    assert info.value.reason == "MESSAGE_ALREADY_EXISTS"
    assert rows(clean_db, "s") == [(a, 1, False)]
    after, _ = await store.add_memory(P, "s", None, [msg("a", a)])
    assert after == before
    # Metadata may have changed since (UpdateMessage): a retry still answers as stored.
    _, same = await store.add_memory(P, "s", None, [msg("a", a, other=True)])
    assert same[0].metadata == {}


async def test_a_uuid_given_twice_in_one_request_is_invalid(store: Store, clean_db: str) -> None:
    (a,) = uuids(1)
    with pytest.raises(InvalidArgument, match="uuid"):
        await store.add_memory(P, "s", None, [msg("a", a), msg("b", a)])
    assert rows(clean_db, "s") == []


async def test_uuids_are_unique_per_session(store: Store, clean_db: str) -> None:
    (a,) = uuids(1)
    _, one = await store.add_memory(P, "s1", None, [msg("a", a)])
    _, two = await store.add_memory(P, "s2", None, [msg("a", a)])
    assert one[0].uuid == two[0].uuid == a
    assert rows(clean_db, "s1") == rows(clean_db, "s2") == [(a, 1, False)]


async def test_a_retry_into_a_deleted_session_leaves_it_deleted(
    store: Store, clean_db: str
) -> None:
    a, b = uuids(2)
    await store.add_memory(P, "s", None, [msg("a", a)])
    await store.delete_session(P, "s")
    # A pure retry changes nothing: the session stays deleted, as the caller left it.
    session, again = await store.add_memory(P, "s", None, [msg("a", a)])
    assert session.deleted_at is not None and session.message_count == 0
    assert [m.sequence for m in again] == [1]
    # A new message restores the session; the deleted one stays deleted and is not counted.
    session, added = await store.add_memory(P, "s", None, [msg("a", a), msg("b", b)])
    assert session.deleted_at is None and session.message_count == 1
    assert [m.sequence for m in added] == [1, 2]
    assert rows(clean_db, "s") == [(a, 1, True), (b, 2, False)]


async def test_concurrent_retries_append_each_message_once(store: Store, clean_db: str) -> None:
    batch = [msg(f"m{i}", u) for i, u in enumerate(uuids(5))]
    answers = await asyncio.gather(*(store.add_memory(P, "new", None, batch) for _ in range(8)))
    first = answers[0][1]
    assert all(added == first for _, added in answers)
    assert [m.sequence for m in first] == [1, 2, 3, 4, 5]
    assert [r[1] for r in rows(clean_db, "new")] == [1, 2, 3, 4, 5]
    session, _ = await store.add_memory(P, "new", None, batch)
    assert session.message_count == 5


async def test_a_retry_that_waited_for_the_first_call_finds_its_messages(
    store: Store, clean_db: str
) -> None:
    # Deterministic: the retry takes its snapshot, then waits for the session's row lock,
    # which the first call holds until it commits the same uuid. The retry must find it.
    (a,) = uuids(1)
    await store.add_memory(P, "s", None, [msg("before")])
    async with await psycopg.AsyncConnection.connect(clean_db) as first:
        await first.execute("SELECT 1 FROM sessions WHERE session_id = 's' FOR UPDATE")
        retry = asyncio.ensure_future(store.add_memory(P, "s", None, [msg("a", a)]))
        for _ in range(500):
            if await has_lock_waiter(clean_db):
                break
            await asyncio.sleep(0.02)
        await first.execute(
            "INSERT INTO messages (project_id, session_id, sequence, uuid, role, role_type,"
            " content) SELECT 1, 's', next_sequence, %s, 'kai', 'user', 'a' FROM sessions"
            " WHERE session_id = 's'",
            [a],
        )
        await first.execute(
            "UPDATE sessions SET next_sequence = next_sequence + 1,"
            " message_count = message_count + 1 WHERE session_id = 's'"
        )
        await first.commit()
        session, added = await retry
    assert [(m.uuid, m.sequence) for m in added] == [(a, 2)]
    assert session.message_count == 2
    assert rows(clean_db, "s")[1:] == [(a, 2, False)]


async def _same_call_at_once(store: Store, url: str, session_id: str, user_id: str | None) -> None:
    """8 concurrent AddMemory calls of the same 3 new caller-chosen uuids: each answers the
    same messages, stored once, after the session's last one."""
    before = len(rows(url, session_id))
    batch = [msg(f"m{i}", u) for i, u in enumerate(uuids(3))]
    answers = await asyncio.gather(
        *(store.add_memory(P, session_id, user_id, batch) for _ in range(8))
    )
    first = answers[0][1]
    assert all(added == first for _, added in answers), session_id
    assert [m.sequence for m in first] == [before + 1, before + 2, before + 3]
    assert len(rows(url, session_id)) == before + 3


async def test_concurrent_retries_on_every_append_path_append_each_message_once(
    store: Store, clean_db: str
) -> None:
    # The paths that append inside a transaction, where a uuid key violation aborts it (the
    # rerun must not run in it): calls naming a user on Citus (the store checks the user in
    # the call's transaction) and the revival of a soft-deleted session (both engines).
    await store.create_user(P, "u", "", "", "", {})
    for round_ in range(4):
        await _same_call_at_once(store, clean_db, f"new-{round_}", "u")  # made for the user
        await _same_call_at_once(store, clean_db, f"new-{round_}", "u")  # appended, naming it
        for owner in ("u", None):
            session_id = f"deleted-{round_}-{owner}"
            await store.add_memory(P, session_id, owner, [msg("first")])
            await store.delete_session(P, session_id)
            await _same_call_at_once(store, clean_db, session_id, owner)  # revived
            session = await store.get_session(P, session_id, False)
            assert session.message_count == 3
    user = await store.get_user(P, "u")
    assert user.session_count == 8

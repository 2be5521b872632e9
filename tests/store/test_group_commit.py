"""Store: concurrent AddMemory calls share one commit, and a failing call harms no other."""

from __future__ import annotations

import asyncio

import psycopg

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.errors import AlreadyExists, FailedPrecondition
from server.store import Store


def msg(content: str, uuid: str | None = None) -> NewMessage:
    return NewMessage(role="speaker", role_type="user", content=content, metadata={}, uuid=uuid)


async def _xmins(url: str) -> dict[str, int]:
    # The transaction that wrote each message, by content: calls of one batch share one.
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT content, xmin::text::bigint FROM messages")
        return {str(c): int(x) for c, x in await cur.fetchall()}


async def test_calls_that_arrive_together_share_one_transaction(
    store: Store, clean_db: str
) -> None:
    # Gathered in one loop iteration: the first goes out alone, the rest share one batch.
    calls = [store.add_memory(P, f"s{i % 5}", None, [msg(f"m{i}")]) for i in range(12)]
    answered = await asyncio.gather(*calls)
    xmins = await _xmins(clean_db)
    assert len(xmins) == 12
    if not store.citus:
        # Some calls shared a commit. On Citus each call commits alone (docs/scaling.md), and
        # xmins of different workers are not comparable anyway.
        assert len(set(xmins.values())) < 12
    # Each call was answered with its own message.
    for i, (session, added) in enumerate(answered):
        assert session.session_id == f"s{i % 5}" and [m.content for m in added] == [f"m{i}"]
    for s in range(5):
        _, stored = await store.get_memory(P, f"s{s}", 100)
        assert [m.sequence for m in stored] == list(range(1, len(stored) + 1))
        # Concurrent calls promise no order among themselves (two batches may commit in
        # either order); each call's messages are all there, once.
        assert sorted(m.content for m in stored) == sorted(f"m{i}" for i in range(s, 12, 5))


async def test_a_failing_call_fails_alone_and_writes_nothing(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {})
    await store.add_memory(
        P, "taken", None, [msg("first", uuid="00000000-0000-4000-8000-000000000001")]
    )
    good = [store.add_memory(P, f"g{i}", "u", [msg(f"good{i}")]) for i in range(6)]
    bad_user = store.add_memory(P, "b1", "ghost", [msg("bad-user")])
    bad_uuid = store.add_memory(
        P, "taken", None, [msg("other", uuid="00000000-0000-4000-8000-000000000001")]
    )
    got = await asyncio.gather(
        good[0], bad_user, *good[1:3], bad_uuid, *good[3:], return_exceptions=True
    )
    assert isinstance(got[1], FailedPrecondition) and got[1].reason == "USER_NOT_FOUND"
    assert isinstance(got[4], AlreadyExists) and got[4].reason == "MESSAGE_ALREADY_EXISTS"
    oks = [g for i, g in enumerate(got) if i not in (1, 4)]
    assert all(not isinstance(g, BaseException) for g in oks), oks
    contents = set(await _xmins(clean_db))
    assert contents == {"first"} | {f"good{i}" for i in range(6)}  # nothing of the failures
    assert await store.get_memory(P, "b1", 10) == (None, [])
    # The connections that ran the failed batch serve later batches: no statement they
    # had queued for preparing before the failure is missing now.
    for r in range(8):
        bad = store.add_memory(P, f"x{r}", "ghost", [msg("never")])
        more = [store.add_memory(P, f"g{i}", "u", [msg(f"r{r}-{i}")]) for i in range(7)]
        got = await asyncio.gather(bad, *more, return_exceptions=True)
        assert isinstance(got[0], FailedPrecondition)
        assert all(not isinstance(g, BaseException) for g in got[1:]), got


async def test_concurrent_batches_on_shared_sessions_lose_and_repeat_nothing(
    database_url: str, clean_db: str
) -> None:
    # A pool of its own with a long wait for a connection: on Citus every call commits alone
    # (no shared commits there), and 30 writers queued on 3 rows outwaited the fixture's 5 s
    # on a loaded machine. What this test asserts is that nothing is lost or repeated.
    store = await Store.open(database_url, min_size=1, max_size=10, timeout=60)
    await store.check_vectors()  # which engine (Citus or not), as migrate finds it
    try:
        rounds = 3
        # Many writers over few sessions, in several waves: batches overlap on the same rows.
        for r in range(rounds):
            await asyncio.gather(
                *(store.add_memory(P, f"hot{i % 3}", None, [msg(f"r{r}-{i}")]) for i in range(30))
            )
        for s in range(3):
            session, stored = await store.get_memory(P, f"hot{s}", 1000)
            assert session is not None and session.message_count == len(stored) == 10 * rounds
            assert [m.sequence for m in stored] == list(range(1, 10 * rounds + 1))
            assert len({m.content for m in stored}) == 10 * rounds
    finally:
        await store.close()


async def test_calls_naming_a_user_share_a_commit_and_count_new_sessions_once(
    store: Store, clean_db: str
) -> None:
    # An agent names its user on every turn. Appends to its live sessions share commits as
    # any others do; a call that makes a session makes it alone, so no batch holds the
    # user's session count while it waits for other sessions (test_session_counts.py).
    await store.create_user(P, "agent-user", "", "", "", {})
    for s in range(4):
        await store.add_memory(P, f"live{s}", "agent-user", [msg(f"first{s}")])
    calls = [store.add_memory(P, f"live{i % 4}", "agent-user", [msg(f"m{i}")]) for i in range(12)]
    calls += [store.add_memory(P, f"new{i}", "agent-user", [msg(f"n{i}")]) for i in range(4)]
    answered = await asyncio.gather(*calls)
    assert [s.user_id for s, _ in answered] == ["agent-user"] * 16
    xmins = await _xmins(clean_db)
    assert len(xmins) == 4 + 16
    if not store.citus:
        appended = {xmins[f"m{i}"] for i in range(12)}
        assert len(appended) < 12, "appends naming a user committed one by one"
    assert (await store.get_user(P, "agent-user")).session_count == 8
    for s in range(4):
        _, stored = await store.get_memory(P, f"live{s}", 100)
        expected = [f"first{s}", *sorted(f"m{i}" for i in range(s, 12, 4))]
        assert [stored[0].content, *sorted(m.content for m in stored[1:])] == expected


async def test_a_batch_appending_twice_to_a_users_session_never_waits_for_the_user(
    store: Store, clean_db: str
) -> None:
    # DeleteUser locks the user (FOR UPDATE), then the user's sessions. A batch that appended
    # to one session twice in its transaction had PostgreSQL check the session's foreign key
    # to its user at the second append (it checks every update of a row version its own
    # transaction wrote, keys changed or not), locking the user after the session: DeleteUser
    # and the batch then waited on each other, and PostgreSQL ended one as a deadlock's
    # victim (tests/reliability/test_races.py::test_delete_user_races_add_memory, about one
    # run in ten). An append names no user here: it needs no lock on one.
    await store.create_user(P, "owner", "", "", "", {})
    await store.add_memory(P, "theirs", "owner", [msg("first")])
    async with await psycopg.AsyncConnection.connect(clean_db) as deleter:
        # DeleteUser's first step (lock_user), held.
        await deleter.execute("SELECT 1 FROM users WHERE user_id = 'owner' FOR UPDATE")
        # Gathered in one loop iteration: the first goes out alone, the rest share a batch.
        appends = asyncio.gather(
            *(store.add_memory(P, "theirs", None, [msg(f"m{i}")]) for i in range(5))
        )
        done, _ = await asyncio.wait([appends], timeout=5)
        await deleter.rollback()
    assert done, "the appends waited for the user's lock"
    answered = await appends
    assert sorted(m.content for _, added in answered for m in added) == [f"m{i}" for i in range(5)]
    _, stored = await store.get_memory(P, "theirs", 10)
    assert [m.sequence for m in stored] == list(range(1, 7))

"""Store: Restore racing other writes of the same sessions keeps every count exact.

A Restore's messages may name a session that a concurrent call (another Restore of an
overlapping batch, an AddMemory) is making: whatever each call answers, every session's
message_count and next_sequence, and every user's session_count, must agree with the rows.
A row another call stores while a Restore runs is compared as any stored row, and Restores
of one project take turns (so require_empty holds).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime

import psycopg

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import Message, NewMessage, Session, User
from server.errors import MemstoreError
from server.store import Store
from tests.fix_db import SESSIONS_OFF_THEIR_ROWS, empty_data_tables, lock_waiters
from tests.polling import until

NOW = datetime(2026, 1, 1, tzinfo=UTC)
#: Rounds of the mixed race: the old restore_messages drifted in 3 runs of 4 at 30.
ROUNDS = 30
#: What the mixed race's calls may answer besides success.
EXPECTED_REASONS = {
    "RESTORE_CONFLICT",  # a Restore's rows after another call changed them
    "SESSION_DELETED",
    "SESSION_NOT_DELETED",
    "SESSION_NOT_FOUND",
}


def message(sid: str, sequence: int, *, deleted: bool = False) -> Message:
    return Message(
        str(uuid.uuid5(uuid.NAMESPACE_OID, f"{sid}/{sequence}")), sid, sequence, "kai", "user",
        f"{sid} {sequence}", {}, NOW, NOW, NOW if deleted else None,
    )  # fmt: skip


def session(sid: str, user_id: str | None, *, deleted: bool = False) -> Session:
    return Session(sid, user_id, {}, NOW, NOW, NOW if deleted else None, 0, None)


def drift(url: str) -> list[tuple[object, ...]]:
    """Every session and user whose kept count disagrees with its rows (none, if exact)."""
    with psycopg.connect(url) as conn:
        sessions = conn.execute(SESSIONS_OFF_THEIR_ROWS).fetchall()
        # Each table read alone: Citus joins no users to sessions (placed by other columns).
        live = dict(
            conn.execute(
                "SELECT user_id, count(*) FROM sessions"
                " WHERE user_id IS NOT NULL AND deleted_at IS NULL GROUP BY user_id"
            ).fetchall()
        )
        kept = dict(conn.execute("SELECT user_id, session_count FROM user_session_counts"))
        users = [u for (u,) in conn.execute("SELECT user_id FROM users")]
    counts = [(u, kept.get(u, 0), live.get(u, 0)) for u in users]
    return [*sessions, *(c for c in counts if c[1] != c[2])]


async def _outcome(call: Awaitable[object]) -> object:
    try:
        return await call
    except MemstoreError as error:
        return error


async def test_restore_counts_messages_in_a_session_another_restore_commits_meanwhile(
    store: Store, clean_db: str
) -> None:
    # First: a Restore of session s with message 1, pinned before its commit (its message into
    # another session waits for a row lock this test holds). Second: a Restore of messages 1
    # and 2 into s, as a resent batch of the same backup: its insert waits for the first's
    # message 1, and s is committed while its statement runs. Its messages must be counted
    # in s as the rows stand, or the call refused.
    await store.restore(P, [], [session("held", None)], [])
    first = [message("s", 1), message("held", 1)]
    with psycopg.connect(clean_db) as holder:
        holder.execute("SELECT 1 FROM sessions WHERE session_id = 'held' FOR UPDATE")
        pinned = asyncio.create_task(store.restore(P, [], [session("s", None)], first))
        assert await until(lambda: _waiters(clean_db, 1))
        second = asyncio.create_task(
            _outcome(store.restore(P, [], [], [message("s", 1), message("s", 2)]))
        )
        await until(lambda: _done_or_waiting(second, clean_db, 2))
        holder.rollback()  # the first Restore goes on and commits
    await pinned
    outcome = await second
    assert drift(clean_db) == []
    if not isinstance(outcome, MemstoreError):
        assert (await store.get_session(P, "s", show_deleted=False)).message_count == 2
    else:
        assert outcome.reason == "SESSION_NOT_FOUND", outcome


async def _waiters(url: str, n: int) -> bool:
    return await lock_waiters(url) >= n


async def _done_or_waiting(task: asyncio.Task[object], url: str, n: int) -> bool:
    return task.done() or await lock_waiters(url) >= n


async def _client(
    store: Store, seed: int, sessions: list[Session], messages: list[Message]
) -> list[object]:
    """One client restoring the backup in batches of its own split."""
    local = random.Random(seed)
    # Sessions and messages in one batch, or the sessions first, or the messages in two
    # halves, or the messages before their sessions (refused unless another client made
    # them): messages often reach a session another client is making.
    cut = local.randrange(1, len(messages))
    batches = {
        "whole": [(sessions, messages)],
        "apart": [(sessions, []), ([], messages)],
        "halves": [(sessions, messages[:cut]), ([], messages[cut:])],
        "early": [([], messages), (sessions, messages)],
    }[local.choice(["whole", "apart", "halves", "early"])]
    return [await _outcome(store.restore(P, [], s, m)) for s, m in batches]


async def _writer(store: Store, seed: int, ids: list[str]) -> object:
    """One AddMemory, ClearMemory, DeleteSession or UndeleteSession of the backup's sessions."""
    local = random.Random(seed)
    await asyncio.sleep(local.random() * 0.02)
    sid = local.choice(ids)
    op = local.choice(["add", "clear", "delete", "undelete"])
    if op == "add":
        new = [NewMessage("kai", "user", f"added {seed}", {})]
        return await _outcome(store.add_memory(P, sid, None, new))
    if op == "clear":
        return await _outcome(store.clear_memory(P, sid))
    if op == "delete":
        return await _outcome(store.delete_session(P, sid))
    return await _outcome(store.undelete_session(P, sid))


async def test_overlapping_restores_racing_session_writes_keep_every_count(
    store: Store, clean_db: str
) -> None:
    # Rounds of one backup restored by several clients at once, each in batches of its own
    # split (a resumed or doubled restore), while AddMemory, ClearMemory, DeleteSession and
    # UndeleteSession hit the same sessions: after each round no count has drifted.
    rng = random.Random(7)
    for round_ in range(ROUNDS):
        user = User(f"u{round_}", "", "", "", {}, NOW, NOW, 0)
        await store.restore(P, [user], [], [])
        ids = [f"r{round_}-s{i}" for i in range(4)]
        sessions = [session(sid, user.user_id, deleted=i == 3) for i, sid in enumerate(ids)]
        messages = [
            message(sid, n, deleted=i == 3 or n % 4 == 0)
            for i, sid in enumerate(ids)
            for n in range(1, 9)
        ]
        calls = [_client(store, rng.randrange(1 << 30), sessions, messages) for _ in range(4)]
        calls += [_writer(store, rng.randrange(1 << 30), ids) for _ in range(4)]
        outcomes = await asyncio.gather(*calls)
        assert drift(clean_db) == [], round_
        # Refusals the calls document, never a deadlock's UNAVAILABLE (on Citus too, where
        # Restores of one project take turns: docs/scaling.md, "Lock order").
        flat = [o for each in outcomes for o in (each if isinstance(each, list) else [each])]
        reasons = [o.reason for o in flat if isinstance(o, MemstoreError)]
        assert set(reasons) <= EXPECTED_REASONS, reasons


async def test_restores_of_the_same_new_rows_in_opposite_orders_never_deadlock(
    store: Store, clean_db: str
) -> None:
    # Two Restores of the same new users and sessions, one listing them backwards (two
    # backups' orders, or a resent batch sorted otherwise): each insert takes the rows' keys
    # as it goes, so in request order the two met in the middle and one of them was cancelled
    # as a deadlock (UNAVAILABLE). In key order, one waits for the other and then finds its
    # rows stored.
    for round_ in range(3):
        users = [User(f"o{round_}-u{i:03}", "", "", "", {}, NOW, NOW, 0) for i in range(300)]
        sessions = [session(f"o{round_}-s{i:03}", u.user_id) for i, u in enumerate(users)]
        forward = _outcome(store.restore(P, users, sessions, []))
        backward = _outcome(store.restore(P, users[::-1], sessions[::-1], []))
        outcomes = await asyncio.gather(forward, backward)
        assert not [o for o in outcomes if isinstance(o, MemstoreError)], (round_, outcomes)
        created = sorted(o.users.created for o in outcomes if not isinstance(o, MemstoreError))
        assert created == [0, 300], (round_, outcomes)
        assert drift(clean_db) == [], round_


async def test_a_restore_a_deadlock_ends_runs_again_and_writes_everything(
    store: Store, clean_db: str
) -> None:
    # Another transaction holds session d2 and then asks for d1, which a Restore of messages
    # into d1 and d2 has locked (sessions in key order) while it waits for d2: a deadlock.
    # On Citus DeleteUser takes a user's sessions so, in no order. The Restore waited
    # first, so its check (deadlock_timeout) finds the cycle first and it is the victim:
    # rolled back, it must run again once the other commits, not answer UNAVAILABLE.
    # When the other's check ran first instead (the other is the victim), the round proves
    # nothing and the next one tries again.
    for round_ in range(5):
        first, second = f"d{round_}-1", f"d{round_}-2"
        await store.restore(P, [], [session(first, None), session(second, None)], [])
        batch = [message(first, 1), message(second, 1), message(second, 2)]
        async with await psycopg.AsyncConnection.connect(clean_db) as other:
            await other.execute("SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", [second])
            restoring = asyncio.create_task(_outcome(store.restore(P, [], [], batch)))
            assert await until(lambda: _waiters(clean_db, 1))
            try:
                await other.execute(
                    "SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", [first]
                )
            except psycopg.errors.DeadlockDetected:
                restore_was_the_victim = False
            else:
                restore_was_the_victim = True
        outcome = await restoring
        assert not isinstance(outcome, MemstoreError), (round_, outcome)
        assert outcome.messages.created == 3, (round_, outcome)
        got = [(await store.get_session(P, sid, False)).message_count for sid in (first, second)]
        assert got == [1, 2], round_
        assert drift(clean_db) == [], round_
        if restore_was_the_victim:
            return
    raise AssertionError("the Restore was never the deadlock's victim in 5 rounds")


def user(user_id: str, email: str = "") -> User:
    return User(user_id, email, "", "", {}, NOW, NOW, 0)


async def test_restores_into_an_empty_project_take_turns_so_only_the_first_finds_it_empty(
    store: Store, clean_db: str
) -> None:
    # Two backups restored with require_empty into one empty project at once. The first is
    # pinned after its check, before its commit: its insert of user "held" waits for a
    # transaction of this test that inserted the same key. The second must wait for the
    # first and then find the project taken: checking beside the first's uncommitted rows,
    # it saw none, and both answered OK with two backups in one project.
    with psycopg.connect(clean_db) as holder:
        holder.execute("INSERT INTO users (project_id, user_id) VALUES (%s, 'held')", [P])
        first = asyncio.create_task(
            store.restore(P, [user("a"), user("held")], [], [], require_empty=True)
        )
        assert await until(lambda: _waiters(clean_db, 1))
        second = asyncio.create_task(
            _outcome(store.restore(P, [user("b")], [], [], require_empty=True))
        )
        assert await until(lambda: _done_or_waiting(second, clean_db, 2))
        holder.rollback()  # the first Restore goes on and commits
    assert (await first).users.created == 2
    outcome = await second
    assert isinstance(outcome, MemstoreError), outcome
    assert outcome.reason == "PROJECT_NOT_EMPTY", outcome
    with psycopg.connect(clean_db) as conn:
        assert sorted(u for (u,) in conn.execute("SELECT user_id FROM users")) == ["a", "held"]


async def _restore_past(
    store: Store,
    url: str,
    insert: str,
    batch: tuple[list[User], list[Session], list[Message]],
    **values: object,
) -> object:
    """The batch restored while another transaction inserts one of its keys and commits.

    The other transaction (a CreateUser, CreateSession or AddMemory making the same id)
    has inserted its row: Restore's comparison does not see it, and its insert
    waits for that transaction. The other commits then, so the insert skips the key.
    """
    with psycopg.connect(url) as other:
        other.execute(insert, {"project_id": P, "at": NOW, **values})
        restoring = asyncio.create_task(_outcome(store.restore(P, *batch)))
        assert await until(lambda: _waiters(url, 1))
        other.commit()
    return await restoring


async def test_a_user_another_call_commits_during_the_insert_is_compared_again(
    store: Store, clean_db: str
) -> None:
    # Before, the call answered OK with the user neither created nor existing: the backup's
    # values were lost without a word.
    insert = (
        "INSERT INTO users (project_id, user_id, email, created_at, updated_at)"
        " VALUES (%(project_id)s, 'shared', 'other@example.com', %(at)s, %(at)s)"
    )
    batch = ([user("own"), user("shared")], [session("s", "shared")], [message("s", 1)])
    outcome = await _restore_past(store, clean_db, insert, batch)
    assert isinstance(outcome, MemstoreError), outcome
    assert outcome.reason == "RESTORE_CONFLICT", outcome
    assert "users[1] (shared) exists with another email" in str(outcome), outcome
    with psycopg.connect(clean_db) as conn:  # nothing of the batch written
        assert [u for (u,) in conn.execute("SELECT user_id FROM users")] == ["shared"]
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    # The same values count as existing.
    await empty_data_tables(clean_db)
    same = insert.replace("'other@example.com'", "''")
    done = await _restore_past(store, clean_db, same, batch)
    assert not isinstance(done, MemstoreError), done
    assert (done.users.created, done.users.existing) == (1, 1), done
    assert (done.sessions.created, done.messages.created) == (1, 1), done
    assert drift(clean_db) == []


async def test_a_session_another_call_commits_during_the_insert_is_compared_again(
    store: Store, clean_db: str
) -> None:
    # Before, the call answered OK with the session neither created nor existing, and its
    # messages went into the other call's session.
    insert = (
        "INSERT INTO sessions (project_id, session_id, metadata, created_at, updated_at)"
        " VALUES (%(project_id)s, 'shared', '{\"backup\": \"other\"}', %(at)s, %(at)s)"
    )
    batch = ([user("own")], [session("shared", "own")], [message("shared", 1)])
    outcome = await _restore_past(store, clean_db, insert, batch)
    assert isinstance(outcome, MemstoreError), outcome
    assert outcome.reason == "RESTORE_CONFLICT", outcome
    assert "sessions[0] (shared) exists with another user_id, metadata" in str(outcome), outcome
    with psycopg.connect(clean_db) as conn:  # nothing of the batch written
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    # The same values count as existing, and the messages go into it.
    await empty_data_tables(clean_db)
    same = insert.replace('\'{"backup": "other"}\'', "'{}'")
    done = await _restore_past(store, clean_db, same, ([], [session("shared", None)], batch[2]))
    assert not isinstance(done, MemstoreError), done
    assert (done.sessions.created, done.sessions.existing, done.messages.created) == (0, 1, 1)
    assert (await store.get_session(P, "shared", show_deleted=False)).message_count == 1
    assert drift(clean_db) == []


async def test_a_message_another_call_commits_during_the_insert_is_compared_again(
    store: Store, clean_db: str
) -> None:
    # No call of memstore inserts a message without locking its session first, as Restore
    # does before its messages (so this waits at the insert only with the row inserted by
    # hand); the check after the insert covers messages as it covers users and sessions.
    insert = (
        "INSERT INTO messages (project_id, session_id, sequence, uuid, role, role_type,"
        " content, created_at, updated_at)"
        " VALUES (%(project_id)s, 'shared', 1, %(uuid)s, 'kai', 'user', 'other', %(at)s, %(at)s)"
    )
    uuid_ = message("shared", 1).uuid
    await store.restore(P, [], [session("shared", None)], [])
    batch = ([], [], [message("shared", 1)])
    outcome = await _restore_past(store, clean_db, insert, batch, uuid=uuid_)
    assert isinstance(outcome, MemstoreError), outcome
    assert outcome.reason == "RESTORE_CONFLICT", outcome
    assert "messages[0] (shared #1) exists with another content" in str(outcome), outcome
    # The same values count as existing (the session's count is left to the other call).
    same = insert.replace("'other'", "'shared 1'")
    await empty_data_tables(clean_db)
    await store.restore(P, [], [session("shared", None)], [])
    batch = ([], [], [message("shared", 1), message("shared", 2)])
    done = await _restore_past(store, clean_db, same, batch, uuid=uuid_)
    assert not isinstance(done, MemstoreError), done
    assert (done.messages.created, done.messages.existing) == (1, 1), done


async def test_a_restored_user_of_deleted_sessions_only_has_its_count_row(
    store: Store, clean_db: str
) -> None:
    # Without the row, the first revival inserted it, and the insert's check of the user
    # came after the session's lock: the reverse of DeleteUser's order, a deadlock on Citus
    # (an audit: 13 of 24 revivals racing DeleteUser failed UNAVAILABLE).
    user = User("del-only", "", "", "", {}, NOW, NOW, 0)
    await store.restore(P, [user], [session("gone", "del-only", deleted=True)], [])
    with psycopg.connect(clean_db) as conn:
        rows = conn.execute(
            "SELECT session_count FROM user_session_counts WHERE user_id = 'del-only'"
        ).fetchall()
    assert rows == [(0,)]
    await store.undelete_session(P, "gone")
    assert drift(clean_db) == []

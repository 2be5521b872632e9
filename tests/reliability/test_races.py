"""Many clients racing on one user and one session: the outcome is one a serial order gives.

Each test fires conflicting calls at once, then checks what every call answered against
what the database holds: nothing acknowledged is lost, nothing is applied twice, and the
answers can be put in one order that explains the final state.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any

import grpc
import psycopg

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb
from tests.fix_db import has_lock_waiter
from tests.grpc import Sessions, Users, as_dict, msg, struct
from tests.reliability import record

Code = grpc.StatusCode
TIMEOUT = 30


async def _outcome(call: Awaitable[Any]) -> Any:
    """The reply, or the status code of the error."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error.code()


def _lifecycle_calls(sessions: Sessions, sid: str) -> list[tuple[str, Any]]:
    """Eight creates, deletes and undeletes of one session id."""
    create = spb.CreateSessionRequest(session_id=sid)
    delete = spb.DeleteSessionRequest(session_id=sid)
    undelete = spb.UndeleteSessionRequest(session_id=sid)
    return (
        [("create", lambda: sessions.CreateSession(create, timeout=TIMEOUT))] * 8
        + [("delete", lambda: sessions.DeleteSession(delete, timeout=TIMEOUT))] * 8
        + [("undelete", lambda: sessions.UndeleteSession(undelete, timeout=TIMEOUT))] * 8
    )


async def test_create_delete_undelete_race(sessions: Sessions) -> None:
    for round_ in range(4):
        sid = f"race-{round_}"
        calls = _lifecycle_calls(sessions, sid)
        random.Random(round_).shuffle(calls)
        results = await asyncio.gather(*(_outcome(call()) for _, call in calls))
        by_kind: dict[str, list[Any]] = {"create": [], "delete": [], "undelete": []}
        for (kind, _), result in zip(calls, results, strict=True):
            by_kind[kind].append(result)
        ok = {k: sum(not isinstance(r, Code) for r in v) for k, v in by_kind.items()}
        # Sessions are never hard-deleted here, so exactly one create can succeed.
        assert ok["create"] == 1, by_kind["create"]
        assert {r for r in by_kind["create"] if isinstance(r, Code)} <= {Code.ALREADY_EXISTS}
        assert {r for r in by_kind["delete"] if isinstance(r, Code)} <= {Code.NOT_FOUND}
        undelete_errors = {r for r in by_kind["undelete"] if isinstance(r, Code)}
        assert undelete_errors <= {Code.NOT_FOUND, Code.FAILED_PRECONDITION}
        # Live -> deleted -> live ...: deletes and undeletes alternate, starting with a delete.
        assert ok["delete"] - ok["undelete"] in (0, 1), ok
        got = await sessions.GetSession(
            spb.GetSessionRequest(session_id=sid, show_deleted=True), timeout=TIMEOUT
        )
        assert got.session.HasField("deleted_at") == (ok["delete"] - ok["undelete"] == 1)


async def test_add_memory_races_delete_session(sessions: Sessions, clean_db: str) -> None:
    async def adder(t: int) -> list[Any]:
        replies = []
        for k in range(10):
            request = spb.AddMemoryRequest(
                session_id="busy", messages=[msg(f"{t}-{k}-0"), msg(f"{t}-{k}-1")]
            )
            replies.append(await sessions.AddMemory(request, timeout=TIMEOUT))
        return replies

    async def deleter() -> list[Any]:
        results = []
        for _ in range(6):
            await asyncio.sleep(random.uniform(0, 0.05))
            request = spb.DeleteSessionRequest(session_id="busy")
            results.append(await _outcome(sessions.DeleteSession(request, timeout=TIMEOUT)))
        return results

    *adds, deletes = await asyncio.gather(*(adder(t) for t in range(6)), deleter())
    acked = {m.uuid: m for replies in adds for reply in replies for m in reply.messages}
    assert len(acked) == 6 * 10 * 2
    # The two messages of one call are adjacent, in the request's order.
    for replies in adds:
        for reply in replies:
            first, second = reply.messages
            assert second.sequence == first.sequence + 1
    assert {d for d in deletes if isinstance(d, Code)} <= {Code.NOT_FOUND}
    with psycopg.connect(clean_db) as conn:
        rows = conn.execute(
            "SELECT uuid::text, sequence, content, deleted_at IS NOT NULL FROM messages"
            " WHERE session_id = 'busy' ORDER BY sequence"
        ).fetchall()
        session = conn.execute(
            "SELECT message_count, deleted_at IS NOT NULL FROM sessions WHERE session_id = 'busy'"
        ).fetchone()
    # Nothing acknowledged is lost or stored twice.
    assert sorted(r[0] for r in rows) == sorted(acked)
    assert all(acked[u].content == c and acked[u].sequence == s for u, s, c, _ in rows)
    deleted = [r for r in rows if r[3]]
    live = [r for r in rows if not r[3]]
    # A serial order: each delete hid everything added before it, nothing added after it.
    assert not deleted or not live or max(r[1] for r in deleted) < min(r[1] for r in live)
    assert sum(d.deleted_messages for d in deletes if not isinstance(d, Code)) == len(deleted)
    assert session is not None
    assert session[0] == len(live)
    assert not (session[1] and live), "a deleted session with live messages"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396, the rule UpdateUser and UpdateSession promise."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _patches(seed: int, count: int) -> list[dict[str, Any]]:
    # Each patch also sets "i" to its own number, so that each changes the row: an update
    # that changes nothing keeps updated_at (the protos' promise,
    # tests/grpc/test_users.py::test_an_update_that_changes_nothing_keeps_updated_at), and
    # its place in the commit order is then not in the row to replay.
    rng = random.Random(seed)
    values: list[Any] = [None, 1, "x", [1, 2], {"n": 1}, {"n": None, "m": 2}, {"n": {"o": 3}}]
    return [
        {
            "i": i,
            **{k: rng.choice(values) for k in rng.sample(["a", "b", "c", "d"], rng.randint(1, 3))},
        }
        for i in range(count)
    ]


async def test_concurrent_merges_replay_in_commit_order(users: Users, sessions: Sessions) -> None:
    await users.CreateUser(upb.CreateUserRequest(user_id="merged"), timeout=TIMEOUT)
    await sessions.CreateSession(spb.CreateSessionRequest(session_id="merged"), timeout=TIMEOUT)
    cases = {
        "user": (
            _patches(1, 40),
            lambda p: users.UpdateUser(
                upb.UpdateUserRequest(user_id="merged", metadata=struct(p)), timeout=TIMEOUT
            ),
            lambda r: r.user,
        ),
        "session": (
            _patches(2, 40),
            lambda p: sessions.UpdateSession(
                spb.UpdateSessionRequest(session_id="merged", metadata=struct(p)), timeout=TIMEOUT
            ),
            lambda r: r.session,
        ),
    }
    for name, (patches, call, resource) in cases.items():
        replies = await asyncio.gather(*(call(p) for p in patches))
        # No two updates that change the row share a time (on Citus they did while
        # updated_at was greatest(clock, last) with the clock read before the row lock): the
        # order is known.
        times = [resource(r).updated_at.ToNanoseconds() for r in replies]
        assert len(set(times)) == len(times), name
        applied = sorted(
            zip(replies, patches, strict=True),
            key=lambda rp: resource(rp[0]).updated_at.ToNanoseconds(),
        )
        # Each answer is the previous one with its own patch applied: the updates ran one
        # at a time, in the order of their updated_at, and none was lost.
        state: Any = {}
        for reply, patch in applied:
            state = merge_patch(state, patch)
            assert as_dict(resource(reply).metadata) == state, name
        if name == "user":
            final = await users.GetUser(upb.GetUserRequest(user_id="merged"), timeout=TIMEOUT)
            assert as_dict(final.user.metadata) == state


async def _appends(sessions: Sessions, session_ids: list[str], user_id: str, tag: str) -> list[Any]:
    """AddMemory of one message to each session in turn; the replies or error codes."""
    return [
        await _outcome(
            sessions.AddMemory(
                spb.AddMemoryRequest(session_id=sid, user_id=user_id, messages=[msg(f"{tag}{k}")]),
                timeout=TIMEOUT,
            )
        )
        for k, sid in enumerate(session_ids)
    ]


async def test_delete_user_races_add_memory(
    users: Users, sessions: Sessions, clean_db: str
) -> None:
    await users.CreateUser(upb.CreateUserRequest(user_id="leaving"), timeout=TIMEOUT)
    await _appends(sessions, ["s0"], "leaving", "first")

    async def delete() -> Any:
        await asyncio.sleep(0.05)
        return await _outcome(users.DeleteUser(upb.DeleteUserRequest(user_id="leaving")))

    *results, deleted = await asyncio.gather(
        # New sessions of the user, and appends to them, naming the user.
        *(
            _appends(sessions, [f"n{t}-{k % 2}" for k in range(6)], "leaving", f"n{t}")
            for t in range(4)
        ),
        # Appends to the user's first session naming nobody: after the delete they create
        # a new session s0 that belongs to nobody.
        *(_appends(sessions, ["s0"] * 6, "", f"a{t}") for t in range(2)),
        delete(),
    )
    assert not isinstance(deleted, Code), deleted
    replies = [r for rs in results for r in rs]
    codes = {r for r in replies if isinstance(r, Code)}
    # After the delete, a call naming the user finds no such user; nothing else fails.
    assert codes <= {Code.FAILED_PRECONDITION}, codes
    acked = {m.uuid for r in replies if not isinstance(r, Code) for m in r.messages}
    with psycopg.connect(clean_db) as conn:
        stored = {str(r[0]) for r in conn.execute("SELECT uuid FROM messages").fetchall()}
        owned = conn.execute("SELECT count(*) FROM sessions WHERE user_id = 'leaving'").fetchone()
        user = conn.execute("SELECT count(*) FROM users WHERE user_id = 'leaving'").fetchone()
    assert owned == (0,) and user == (0,)
    assert stored <= acked
    # Every acknowledged message (and the first one) either survives (added after the delete,
    # to the new ownerless s0) or was counted by the delete that removed it.
    assert len(acked) + 1 - len(stored) == deleted.deleted_messages, (acked, stored, deleted)
    record(
        "races",
        delete_user_removed_messages=deleted.deleted_messages,
        delete_user_removed_sessions=deleted.deleted_sessions,
        messages_after_delete=len(stored),
    )


async def test_delete_and_clear_hide_a_message_appended_while_they_waited(
    sessions: Sessions, clean_db: str
) -> None:
    # The race of test_add_memory_races_delete_session, made deterministic: a transaction
    # appends a message the way AddMemory does (under the session's row lock) while
    # DeleteSession or ClearMemory waits for that lock. Hiding the messages in the statement
    # that waited would leave it live: that statement's snapshot predates the append.
    for name in ("DeleteSession", "ClearMemory"):
        sid = f"held-{name}"
        await sessions.AddMemory(
            spb.AddMemoryRequest(session_id=sid, messages=[msg("before")]), timeout=TIMEOUT
        )
        async with await psycopg.AsyncConnection.connect(clean_db) as appender:
            await appender.execute("SELECT 1 FROM sessions WHERE session_id = %s FOR UPDATE", [sid])
            request = spb.DeleteSessionRequest(session_id=sid)
            call = getattr(sessions, name)(
                request if name == "DeleteSession" else spb.ClearMemoryRequest(session_id=sid),
                timeout=TIMEOUT,
            )
            pending = asyncio.ensure_future(call)
            for _ in range(500):
                if await has_lock_waiter(clean_db):
                    break
                await asyncio.sleep(0.02)
            await appender.execute(
                "INSERT INTO messages (project_id, session_id, sequence, content)"
                " SELECT 1, session_id, next_sequence, 'meanwhile' FROM sessions"
                " WHERE session_id = %s",
                [sid],
            )
            await appender.execute(
                "UPDATE sessions SET next_sequence = next_sequence + 1,"
                " message_count = message_count + 1 WHERE session_id = %s",
                [sid],
            )
            await appender.commit()
            reply = await pending
        # The delete (or clear) came after the append: it hid both messages.
        assert reply.deleted_messages == 2, name
        with psycopg.connect(clean_db) as conn:
            live = conn.execute(
                "SELECT content FROM messages WHERE session_id = %s AND deleted_at IS NULL",
                [sid],
            ).fetchall()
        assert live == [], (name, live)

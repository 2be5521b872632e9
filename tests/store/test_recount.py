"""`memstore recount`: every user's kept count of live sessions checked against the rows, and
those off corrected, while session writes go on (plain PostgreSQL and, under `make
test-citus`, the Citus cluster).

The count is off only where a node lost part of a committed write (docs/scaling.md, "An
asynchronous standby promoted"); the tests put it off by hand.
"""

from __future__ import annotations

import asyncio
import json
import os

import psycopg

from server.domain import DEFAULT_PROJECT_ID as P
from server.store import Store
from tests.fix_db import lock_waiters
from tests.polling import until
from tests.processes import run_memstore


async def _made(store: Store, users: int, sessions: int) -> None:
    for u in range(users):
        await store.create_user(P, f"u{u}", "", "", "", {})
        for s in range(sessions):
            await store.create_session(P, f"u{u}s{s}", f"u{u}", {})


async def _rows(url: str) -> dict[str, int]:
    # The rows' counts, read as two reads (Citus joins no users to sessions): each user's
    # live sessions.
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        users = await (await conn.execute("SELECT user_id FROM users")).fetchall()
        live = await (
            await conn.execute(
                "SELECT user_id, count(*) FROM sessions WHERE deleted_at IS NULL"
                " AND user_id IS NOT NULL GROUP BY user_id"
            )
        ).fetchall()
    counts = {str(u): 0 for (u,) in users}
    counts.update({str(u): int(n) for u, n in live})
    return counts


async def _kept(store: Store, users: int) -> dict[str, int]:
    return {f"u{u}": (await store.get_user(P, f"u{u}")).session_count for u in range(users)}


async def test_recount_corrects_the_counts_that_are_off_and_only_those(
    store: Store, clean_db: str
) -> None:
    await _made(store, users=5, sessions=3)
    await store.delete_session(P, "u0s0")
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        # Off both ways, and a row gone (what a lost write leaves).
        await conn.execute(
            "UPDATE user_session_counts SET session_count = session_count + 2 WHERE user_id = 'u0'"
        )
        await conn.execute("UPDATE user_session_counts SET session_count = 0 WHERE user_id = 'u1'")
        await conn.execute("DELETE FROM user_session_counts WHERE user_id = 'u2'")
    assert await _kept(store, 5) == {"u0": 4, "u1": 0, "u2": 0, "u3": 3, "u4": 3}
    report = await store.recount_sessions(batch_size=2)
    assert (report.users, report.corrected) == (5, 3)
    assert await _kept(store, 5) == await _rows(clean_db) == {
        "u0": 2, "u1": 3, "u2": 3, "u3": 3, "u4": 3,
    }  # fmt: skip
    again = await store.recount_sessions()
    assert (again.users, again.corrected) == (5, 0)


async def test_recount_loses_no_session_write_made_while_it_runs(
    store: Store, clean_db: str
) -> None:
    # Writers make and delete sessions of the users whose counts are off while the recount
    # corrects them, one user at a time: afterwards every count equals the rows.
    users = 4
    await _made(store, users=users, sessions=2)
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("UPDATE user_session_counts SET session_count = session_count + 5")
    stop = asyncio.Event()

    async def write(u: int) -> int:
        n = 0
        while not stop.is_set():
            n += 1
            await store.create_session(P, f"u{u}w{n}", f"u{u}", {})
            if n % 3 == 0:
                await store.delete_session(P, f"u{u}w{n - 1}")
        return n

    writers = [asyncio.create_task(write(u)) for u in range(users)]
    try:
        corrected = 0
        for _ in range(3):
            corrected += (await store.recount_sessions(batch_size=1)).corrected
    finally:
        stop.set()
        made = await asyncio.gather(*writers)
    assert corrected >= users and min(made) > 1, (corrected, made)
    assert await _kept(store, users) == await _rows(clean_db)


async def test_recount_waits_for_a_session_write_under_way_and_counts_its_session(
    store: Store, clean_db: str
) -> None:
    # A session write of an off user, held open between its count and its commit (as every
    # session write does it: the session row, then the count row): the recount waits for
    # it, then counts its session. Counted before the write's commit and set after it, the
    # count would lose that session for good.
    await _made(store, users=1, sessions=2)
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute("UPDATE user_session_counts SET session_count = 9")
    async with await psycopg.AsyncConnection.connect(clean_db) as writer:
        await writer.execute(
            "INSERT INTO sessions (project_id, session_id, user_id) VALUES (1, 'held', 'u0')"
        )
        await writer.execute(
            "UPDATE user_session_counts SET session_count = session_count + 1 WHERE user_id = 'u0'"
        )
        recount = asyncio.create_task(store.recount_sessions())
        assert await until(lambda: _waits(clean_db), within=10), "the recount did not wait"
        await writer.commit()
    report = await recount
    assert (report.users, report.corrected) == (1, 1)
    assert await _kept(store, 1) == await _rows(clean_db) == {"u0": 3}


async def _waits(url: str) -> bool:
    return await lock_waiters(url) > 0


def test_memstore_recount_prints_what_it_found(clean_db: str) -> None:
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("INSERT INTO users (project_id, user_id) VALUES (1, 'a'), (1, 'b')")
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, user_id) VALUES (1, 's1', 'a')"
        )  # a session whose count was lost: none kept for 'a'
    env = {**os.environ, "DATABASE_URL": clean_db}
    run = run_memstore("recount", env=env)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    assert printed == {"corrected": 1, "orphaned_users": 0, "users": 2}
    with psycopg.connect(clean_db) as conn:
        kept = conn.execute("SELECT user_id, session_count FROM user_session_counts").fetchall()
    assert kept == [("a", 1)]

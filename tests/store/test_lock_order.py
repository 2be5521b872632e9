"""Store: every write locks sessions in one order, whatever the database's collation.

AddMemory's shared commits lock their sessions in Python's order of the ids (code points,
server/store/add_memory.py). DeleteUser and Restore lock theirs in a statement's ORDER BY,
which compared ids in the database's collation: on a database whose collation is not C
(en_US, or ICU's: most installs), "a" came before "B" there and after it in the batch, so a
batch and a DeleteUser or Restore over the same two sessions could each hold one and wait for
the other (PostgreSQL then ends one as a deadlock's victim, after a second). The statements
order by the ids' code points now (COLLATE "C"), as the batch does.

Each test pins the session Python puts first ("B") as an AddMemory would hold it, runs the
write, and checks whether the write took the other session ("a") before waiting: in one order
everywhere, it waits for "B" holding nothing of the two. They need a PostgreSQL with ICU: the
machine's PostgreSQL 15 (CI's external stage, and the Citus coordinator under `make
test-citus`, where the database made here is a plain one); the embedded PostgreSQL has none.

Within one session the order is the session's row, then its messages' (AddMemory,
ClearMemory, DeleteSession); the last test holds UpdateMessage to it, on every engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, suppress

import psycopg
import pytest
from psycopg import sql

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import MetadataChange, NewMessage
from server.errors import NotFound
from server.store import Store
from server.store.base import key
from server.store.queries import query
from tests.fix_db import has_lock_waiter, scratch_database
from tests.polling import until
from tests.store.test_restore_races import message

#: Python sorts "B" (U+0042) before "a" (U+0061); ICU's en-US collation, "a" first.
FIRST, SECOND = "B", "a"


#: CREATE DATABASE's options for a database whose collation is ICU's en-US.
ICU_EN_US = sql.SQL("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'")


@pytest.fixture
async def icu_store(server_url: str) -> AsyncIterator[tuple[Store, str]]:
    """A migrated store over a database whose collation is ICU's en-US, and its URL. Under
    `make test-citus` a plain database of the coordinator (migrate finds no citus extension
    in it): the statements this is about are plain PostgreSQL's."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(
                scratch_database(server_url, "memstore_icu", options=ICU_EN_US, cluster=False)
            )
        except psycopg.errors.FeatureNotSupported as exc:
            pytest.skip(
                f"this PostgreSQL has no ICU ({exc}; the embedded one), and this machine no "
                "locale but C: every database here compares ids by code points, as Python "
                "does. CI runs these on its PostgreSQL 15, which has ICU"
            )
        with psycopg.connect(url) as conn:  # the collation this test is about
            ordered = conn.execute("SELECT %s::text < %s::text", [SECOND, FIRST]).fetchone()
            assert ordered == (True,)
        store = await Store.open(url, min_size=1, max_size=4)
        try:
            await store.migrate()
            yield store, url
        finally:
            await store.close()


def _said(text: str) -> list[NewMessage]:
    return [NewMessage(role="kai", role_type="user", content=text, metadata={})]


async def _took_the_second_first(url: str, write: Callable[[], Awaitable[object]]) -> bool:
    """Whether `write`, while FIRST is held as AddMemory's upsert holds it, locked SECOND
    before it waited. The write then runs to its end."""
    async with await psycopg.AsyncConnection.connect(url) as holder:
        await holder.execute(
            "SELECT 1 FROM sessions WHERE session_id = %s FOR NO KEY UPDATE", [FIRST]
        )
        running = asyncio.ensure_future(write())
        try:
            assert await until(lambda: has_lock_waiter(url, cluster=False)), "it never waited"
            async with await psycopg.AsyncConnection.connect(url) as probe:
                try:
                    await probe.execute(
                        "SELECT 1 FROM sessions WHERE session_id = %s FOR NO KEY UPDATE NOWAIT",
                        [SECOND],
                    )
                except psycopg.errors.LockNotAvailable:
                    return True
                return False
        finally:
            await holder.rollback()
            with suppress(Exception):
                await asyncio.wait_for(running, 10)


async def test_delete_user_locks_sessions_in_the_batchs_order(
    icu_store: tuple[Store, str],
) -> None:
    store, url = icu_store
    await store.create_user(P, "owner", "", "", "", {})
    for sid in (FIRST, SECOND):
        await store.add_memory(P, sid, "owner", _said(f"in {sid}"))
    took = await _took_the_second_first(url, lambda: store.delete_user(P, "owner"))
    assert not took, "DeleteUser locked the sessions in another order than AddMemory's batches"
    for sid in (FIRST, SECOND):
        assert await store.get_memory(P, sid, 10) == (None, [])


async def test_restore_locks_sessions_in_the_batchs_order(icu_store: tuple[Store, str]) -> None:
    store, url = icu_store
    for sid in (FIRST, SECOND):
        await store.add_memory(P, sid, None, _said(f"in {sid}"))
    restored = [message(FIRST, 5), message(SECOND, 5)]
    took = await _took_the_second_first(url, lambda: store.restore(P, [], [], restored))
    assert not took, "Restore locked the sessions in another order than AddMemory's batches"
    for sid in (FIRST, SECOND):
        _, stored = await store.get_memory(P, sid, 10)
        assert [m.sequence for m in stored] == [1, 5]


async def test_update_message_waits_for_the_session_holding_no_message(
    store: Store, clean_db: str
) -> None:
    """ClearMemory locks a session, then soft-deletes its messages; UpdateMessage locked the
    message, then the session (to touch its updated_at). On one session the two each held
    what the other wanted, and PostgreSQL ended one as a deadlock's victim: UpdateMessage
    answered UNAVAILABLE (the fuzz on the Citus cluster, stop CI of 2026-12-03). Here a
    transaction runs ClearMemory's two statements around an UpdateMessage of the session."""
    url = clean_db
    await store.add_memory(P, "s", None, _said("hello"))
    _, [said] = await store.get_memory(P, "s", 10)
    params = key(P, session_id="s")
    async with await psycopg.AsyncConnection.connect(url) as clearing:
        cur = await clearing.execute(query("lock_live_session"), params)
        assert await cur.fetchone() is not None
        change = MetadataChange({"seen": True})
        updating = asyncio.ensure_future(store.update_message(P, "s", said.uuid, change))
        try:
            assert await until(lambda: has_lock_waiter(url)), "UpdateMessage never waited"
            # With the message held by UpdateMessage this waits on it: a cycle.
            cur = await clearing.execute(query("clear_memory"), params)
            assert await cur.fetchone() == (1,)
            await clearing.commit()
        finally:
            await clearing.rollback()
            with pytest.raises(NotFound, match=r"message '.*' not found"):
                await asyncio.wait_for(updating, 10)
    session, kept = await store.get_memory(P, "s", 10)
    assert session is not None and session.message_count == 0 and kept == []


async def test_update_message_lets_the_key_checks_of_a_vectors_write_go_by(
    store: Store, clean_db: str
) -> None:
    """The embedding worker's writes check their foreign keys (FOR KEY SHARE) of a message
    and of its session while UpdateMessage may hold them: FOR UPDATE waited for those checks,
    and on Citus, where the worker holds the message's before the session's, the two could
    each hold what the other wanted. UpdateMessage takes what its UPDATEs take, no more."""
    await store.add_memory(P, "s", None, _said("hello"))
    _, [said] = await store.get_memory(P, "s", 10)
    async with await psycopg.AsyncConnection.connect(clean_db) as checking:
        for table in ("sessions", "messages"):
            await checking.execute(
                f"SELECT 1 FROM {table} WHERE project_id = %s AND session_id = %s FOR KEY SHARE",
                [P, "s"],
            )
        change = MetadataChange({"seen": True})
        updated = await asyncio.wait_for(store.update_message(P, "s", said.uuid, change), 30)
        await checking.rollback()
    assert updated.metadata == {"seen": True}

"""Store: every write of a row's updated_at sets a time after the row's last one, so the
updates of one row are ordered by it, even when the clock is behind that time: a clock read
before the row lock (as Citus reads it, on the coordinator) or one that stepped back."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import MetadataChange, NewMessage, UserChanges
from server.store import Store

TICK = timedelta(microseconds=1)


def _ahead(url: str, *tables: str) -> datetime:
    """Moves the updated_at of every row of `tables` an hour ahead of the clock; returns it."""
    at = datetime.now(UTC) + timedelta(hours=1)
    with psycopg.connect(url) as conn:
        for table in tables:
            update = sql.SQL("UPDATE {} SET updated_at = %s").format(sql.Identifier(table))
            conn.execute(update, [at])
    return at


async def test_user_updates_pass_a_time_ahead_of_the_clock(store: Store, clean_db: str) -> None:
    await store.create_user(P, "u", "", "", "", {})
    ahead = _ahead(clean_db, "users")
    first = await store.update_user(P, "u", UserChanges(metadata=MetadataChange({"a": 1})))
    second = await store.update_user(P, "u", UserChanges(first_name="B"))
    # greatest(clock, last) gave both the same time: their order was lost.
    assert (first.updated_at, second.updated_at) == (ahead + TICK, ahead + 2 * TICK)
    assert (await store.get_user(P, "u")).updated_at == second.updated_at


async def test_session_writes_pass_a_time_ahead_of_the_clock(store: Store, clean_db: str) -> None:
    _, added = await store.add_memory(P, "s", None, [NewMessage("r", "user", "hello", {})])
    ahead = _ahead(clean_db, "sessions", "messages")
    times = [ahead]

    def after_last(at: datetime) -> None:
        assert at > times[-1], (times, at)
        times.append(at)

    after_last((await store.update_session(P, "s", MetadataChange({"k": 1}))).updated_at)
    session, _ = await store.add_memory(P, "s", None, [NewMessage("r", "user", "again", {})])
    after_last(session.updated_at)
    message = await store.update_message(P, "s", added[0].uuid, MetadataChange({"k": 2}))
    assert message.updated_at == ahead + TICK
    after_last((await store.get_session(P, "s", False)).updated_at)
    await store.clear_memory(P, "s")
    after_last((await store.get_session(P, "s", False)).updated_at)
    await store.delete_session(P, "s")
    deleted = await store.get_session(P, "s", True)
    # updated_at passes the last change; deleted_at is when the delete ran, by the clock (a
    # deleted_at "after the last change" of a time restored in 9999 was never purged).
    assert deleted.deleted_at is not None and deleted.deleted_at < ahead
    after_last(deleted.updated_at)
    after_last((await store.undelete_session(P, "s")).updated_at)
    # Each one microsecond past the one before: the clock, an hour behind, never won.
    assert [b - a for a, b in itertools.pairwise(times)] == [TICK] * 6

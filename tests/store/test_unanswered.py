"""A database that stops answering: the store's own bound on the answer.

The statement timeout is PostgreSQL's to enforce: a server that says nothing at all (a primary
stopped, a Citus worker stopped under its coordinator: tests/citus/test_grow.py) enforces
nothing, and the call waited for as long as the server stayed silent. Here a proxy between
the store and its PostgreSQL freezes the pooled connection mid-call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import UserChanges
from server.errors import DeadlineExceeded
from server.store import Store
from server.store.base import ANSWER_MARGIN_SECONDS, call_deadline
from tests.fix_proxy import FaultProxy

#: The store's statement timeout here (seconds).
TIMEOUT = 1.0


def _proxied(url: str) -> tuple[FaultProxy, str]:
    """A FaultProxy in front of `url`'s server, and the URL that reaches it through it."""
    params = conninfo_to_dict(url)
    host, port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
    proxy = FaultProxy(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else port)
    return proxy, make_conninfo(url, host="127.0.0.1", port=proxy.port, hostaddr="")


@pytest.fixture
async def through_proxy(clean_db: str, store: Store) -> AsyncIterator[tuple[FaultProxy, Store]]:
    """A store of one pooled connection, with a 1 s statement timeout, through a proxy."""
    await store.create_user(P, "u", "", "", "", {})
    proxy, url = _proxied(clean_db)
    st = await Store.open(url, min_size=1, max_size=1, statement_timeout=TIMEOUT)
    await st.check_vectors()
    try:
        yield proxy, st
    finally:
        proxy.close()
        await st.close()


async def test_a_database_that_stops_answering_ends_the_call_past_the_statement_timeout(
    through_proxy: tuple[FaultProxy, Store],
) -> None:
    proxy, st = through_proxy
    assert (await st.get_user(P, "u")).user_id == "u"
    proxy.freeze()
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        # Bounded here only so that the failure (a call that waits for ever) ends the test.
        await asyncio.wait_for(st.update_user(P, "u", UserChanges(email="a@x.io")), 30)
    took = time.monotonic() - start
    bound = TIMEOUT + ANSWER_MARGIN_SECONDS
    assert bound <= took < bound + 2, took
    assert f"did not answer within {bound:g}s" in str(caught.value)
    # One silent connection is not the database down (the health watcher's ping says that):
    # no other call is refused for it, and the next one takes a new connection (a frozen
    # proxy passes new ones) and is served.
    assert not st._health.down
    assert (await asyncio.wait_for(st.get_user(P, "u"), 10)).email == ""


async def test_a_call_whose_deadline_is_further_waits_past_the_bound(
    through_proxy: tuple[FaultProxy, Store], clean_db: str
) -> None:
    # A call with a deadline of its own runs its statements up to that deadline: the bound
    # on the answer must not end it at the statement timeout and margin instead.
    _, st = through_proxy
    assert (await st.get_user(P, "u")).user_id == "u"
    hold = TIMEOUT + ANSWER_MARGIN_SECONDS + 1.5
    async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
        await blocker.execute("SELECT 1 FROM users WHERE user_id = 'u' FOR UPDATE")

        async def update() -> str:
            call_deadline.set(time.monotonic() + hold + 10)
            user = await st.update_user(P, "u", UserChanges(email="late@x.io"))
            return user.email

        updating = asyncio.create_task(update())
        await asyncio.sleep(hold)
        assert not updating.done(), updating
        await blocker.rollback()
        assert await asyncio.wait_for(updating, 10) == "late@x.io"


async def test_a_call_cancelled_at_its_deadline_gives_its_connection_back_within_the_margin(
    through_proxy: tuple[FaultProxy, Store],
) -> None:
    # gRPC cancels a call at its deadline. psycopg then asks the server to cancel the
    # statement and waits for the answer on the silent connection, up to 5 s, before it
    # closes it: the pooled connection (the store's only one here) stayed taken that long
    # past the deadline, and every call behind it waited.
    proxy, st = through_proxy
    assert (await st.get_user(P, "u")).user_id == "u"
    proxy.freeze()

    async def update() -> None:
        call_deadline.set(time.monotonic() + TIMEOUT)
        await st.update_user(P, "u", UserChanges(email="a@x.io"))

    updating = asyncio.create_task(update())
    await asyncio.sleep(TIMEOUT)  # the deadline: gRPC cancels the handler's task
    assert not updating.done()
    cancelled = time.monotonic()
    updating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(updating, 30)
    held = time.monotonic() - cancelled
    assert held < ANSWER_MARGIN_SECONDS + 0.5, held
    # The connection was closed under the silent statement; the next call takes a new one.
    assert (await asyncio.wait_for(st.get_user(P, "u"), 10)).user_id == "u"

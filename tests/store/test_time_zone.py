"""Store: stored times read back whatever the database's TimeZone.

PostgreSQL prints a timestamptz in the session's TimeZone, and psycopg reads that text into a
datetime, which holds years 1 to 9999 only. memstore accepts times from 0001-01-01T00:00:00Z
to 9999-12-31T23:59:59.999999Z (Restore, filters), so in a TimeZone west of UTC the earliest
printed as a day of 1 BC, and east of it the latest as year 10000: every read of such a row
failed (INTERNAL, "a value stored in the database could not be read"). The store's
connections pin TimeZone to UTC (server/store/store.py), whatever the database or server sets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import Session
from server.store import Store
from tests.fix_db import scratch_database

EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


@pytest.fixture(params=["<-05>+05", "<+09>-09"], ids=["west", "east"])
async def zoned_store(server_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A migrated store over a database whose TimeZone is five hours west of UTC, or nine
    east (POSIX zones: no time zone files needed). A plain database under `make
    test-citus` too: the setting is the coordinator's session's either way."""
    with scratch_database(server_url, "memstore_tz", cluster=False) as url:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(url, autocommit=True) as conn:
            alter = sql.SQL("ALTER DATABASE {} SET TimeZone = {}")
            conn.execute(alter.format(sql.Identifier(str(name)), sql.Literal(request.param)))
        store = await Store.open(url, min_size=1, max_size=2)
        try:
            await store.migrate()
            yield store
        finally:
            await store.close()


async def test_the_first_and_last_times_memstore_accepts_read_back_in_any_time_zone(
    zoned_store: Store,
) -> None:
    sessions = [
        Session("earliest", None, {}, EARLIEST, EARLIEST, None, 0, None),
        Session("latest", None, {}, LATEST, LATEST, None, 0, None),
    ]
    await zoned_store.restore(P, [], sessions, [])
    for kept in sessions:
        got = await zoned_store.get_session(P, kept.session_id, False)
        assert (got.created_at, got.updated_at) == (kept.created_at, kept.updated_at)

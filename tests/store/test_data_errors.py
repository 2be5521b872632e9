"""psycopg's DataError: a value it cannot send is the caller's fault, one it cannot read ours."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.errors import InvalidArgument, MemstoreError, Unavailable, UnreadableValue
from server.store.translate import translated, worker_lost


async def test_a_result_value_psycopg_cannot_load_is_unreadable_not_invalid(
    database_url: str,
) -> None:
    # psycopg raises the same DataError, without a sqlstate, for a parameter it cannot dump
    # and for a result value it cannot load; only the second is the server's fault.
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for binary in (False, True):
            for value in ("infinity", "10000-01-01 00:00:00+00", "-infinity"):
                cur = conn.cursor(binary=binary)
                with pytest.raises(UnreadableValue) as caught, translated(field="payload"):
                    await cur.execute("SELECT %s::timestamptz", (value,))
                    await cur.fetchone()
                assert isinstance(caught.value.__cause__, psycopg.DataError)
                assert "stored in the database could not be read" in caught.value.message


async def test_a_parameter_psycopg_cannot_dump_stays_the_callers_field(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            with pytest.raises(InvalidArgument) as nul, translated(field="content"):
                await cur.execute("SELECT %s::text", ("a\x00b",))
            assert [v.field for v in nul.value.violations] == ["content"]
            assert "NUL" in nul.value.message
            # PostgreSQL's own data errors carry a sqlstate: the request's value, as before.
            for statement, params in (("SELECT %s::int", ("x",)), ("SELECT %s::int2", (10**6,))):
                with pytest.raises(InvalidArgument) as bad, translated(field="payload"):
                    await cur.execute(statement, params)
                    await cur.fetchone()
                assert isinstance(bad.value.__cause__, psycopg.DataError)
                assert bad.value.__cause__.sqlstate in ("22P02", "22003")
                assert [v.field for v in bad.value.violations] == ["payload"]


async def test_a_citus_worker_out_of_reach_is_unavailable_not_internal(database_url: str) -> None:
    # Citus says a worker it cannot reach (or whose connection it lost while preparing a
    # two-phase commit) as an internal error, XX000: it was INTERNAL with a traceback in the
    # log. An audit cut the link to a worker on a running cluster; here PostgreSQL raises
    # the same error as Citus words it.
    raise_as_citus = "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'XX000', MESSAGE = %s; END $$"
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for said in (
            "server closed the connection unexpectedly",
            "connection to the remote node 10.0.0.7:5432 failed with the following error: timeout",
            # A worker lost during a one-shard write's COMMIT (tests/citus/test_grow.py's
            # crashed worker met it).
            "could not commit transaction for shard 102029 on at least one active node",
            # libpq's words for a connection lost mid-command, passed on by Citus (a COMMIT
            # meeting the crashed worker over SSL, in 2 of 6 runs of tests/citus/test_grow.py).
            "SSL SYSCALL error: EOF detected",
            "could not receive data from server: Connection reset by peer",
            # A read over several shards (GetMemory's recall ranked in the request path)
            # whose transaction's connection to the crashed worker failed
            # (tests/citus/test_grow.py's health test met it).
            "failure on connection marked as essential: 10.0.0.7:5432",
        ):
            with pytest.raises(Unavailable) as lost, translated():
                await conn.execute(raise_as_citus.replace("%s", f"'{said}'"))  # type: ignore[arg-type]
            assert "Citus worker could not be reached" in lost.value.message
            assert worker_lost(lost.value), said
        # A connection Citus could not open to a worker comes as 08006 (an OperationalError):
        # also a worker lost, which GetMemory's recall tells from the coordinator's own loss
        # (tests/citus/test_grow.py, recall with a worker lost).
        refused = "connection to the remote node 10.0.0.7:5432 failed: Connection refused"
        with pytest.raises(Unavailable) as lost, translated():
            await conn.execute(  # type: ignore[arg-type]
                raise_as_citus.replace("'XX000'", "'08006'").replace("%s", f"'{refused}'")
            )
        assert worker_lost(lost.value)
        # The coordinator's own connection lost (libpq's words, no SQLSTATE) is not one.
        with pytest.raises(Unavailable) as gone, translated():
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        assert not worker_lost(gone.value)
        # Any other internal error stays INTERNAL.
        with pytest.raises(MemstoreError) as other, translated():
            await conn.execute(raise_as_citus.replace("%s", "'cache lookup failed'"))  # type: ignore[arg-type]
        assert not isinstance(other.value, Unavailable)
        assert other.value.message == "internal database error; see the server log"


async def test_a_deadlock_is_said_as_concurrent_writes_not_the_database_gone(
    database_url: str,
) -> None:
    # Two calls locking the same rows in opposite orders: the victim was "database
    # unavailable" (DATABASE_UNAVAILABLE), sending an operator to look at PostgreSQL.
    async with (
        await psycopg.AsyncConnection.connect(database_url) as a,
        await psycopg.AsyncConnection.connect(database_url) as b,
    ):
        # PostgreSQL looks for the deadlock after deadlock_timeout (1 s by default; only a
        # superuser may lower it).
        for conn, held in ((a, 7001), (b, 7002)):
            await conn.execute(f"SELECT pg_advisory_xact_lock({held})")

        async def cross(conn: psycopg.AsyncConnection[object], other: int) -> None:
            with translated():
                await conn.execute(f"SELECT pg_advisory_xact_lock({other})")

        outcomes = await asyncio.gather(cross(a, 7002), cross(b, 7001), return_exceptions=True)
    victims = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(victims) == 1 and isinstance(victims[0], Unavailable), outcomes
    assert victims[0].reason == "CONCURRENT_WRITES" and "deadlocked" in victims[0].message

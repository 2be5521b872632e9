"""The Store: every resource's methods over one psycopg connection pool, and the pool itself."""

from __future__ import annotations

import math
import os
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from server.errors import Unavailable
from server.store.add_memory import AddMemoryMethods
from server.store.admin import AdminMethods
from server.store.db import BoundedConnection, configure
from server.store.embeddings import EmbeddingMethods
from server.store.export import ExportMethods
from server.store.health import Listener
from server.store.messages import MessageMethods
from server.store.projects import ProjectMethods
from server.store.purge import PurgeMethods
from server.store.recall import RecallMethods
from server.store.recount import RecountMethods
from server.store.reindex import ReindexMethods
from server.store.restore import RestoreMethods
from server.store.search import SearchMethods
from server.store.sessions import SessionMethods
from server.store.snapshots import SnapshotMethods
from server.store.users import UserMethods

#: Milliseconds between PostgreSQL's checks that a client running a statement is still there.
_CONNECTION_CHECK_MS = 1000
#: Seconds Citus may take to connect to a worker for a call, at most (_session_options).
NODE_CONNECT_SECONDS = 5.0

#: Seconds the pool retries a lost connection in the background before leaving it to demand.
_RECONNECT_TIMEOUT = 1.0


class Store(
    UserMethods,
    SessionMethods,
    MessageMethods,
    AddMemoryMethods,
    EmbeddingMethods,
    ReindexMethods,
    RecallMethods,
    SearchMethods,
    ProjectMethods,
    ExportMethods,
    RestoreMethods,
    SnapshotMethods,
    AdminMethods,
    PurgeMethods,
    RecountMethods,
):
    """All reads and writes of memstore, over one connection pool.

    Each resource's methods come from its own module (users, sessions, messages, add_memory,
    embeddings, reindex, search, recall, kept_recall, projects, export, restore, snapshots,
    admin, purge, recount) and
    run the statements of the sql/*.sql file of the same name (add_memory's through
    append.py). Methods on a project's rows take its id first. Every
    method raises only server.errors domain errors (NotFound, AlreadyExists,
    FailedPrecondition, Unavailable, ...) and never lets a psycopg exception escape: each
    runs inside `translated()`.
    """

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout: float = 5.0,  # noqa: ASYNC109
        statement_timeout: float = 0.0,
        recall_timeout: float = 0.0,
        max_waiting: int = 0,
    ) -> Store:
        """Opens a pool (waiting until it is ready) and returns a store over it.

        `statement_timeout` (seconds, 0 for none) bounds every statement of a call that has
        no deadline of its own; PostgreSQL cancels a statement that runs longer.
        `recall_timeout` (seconds, 0 for none) bounds, on Citus, GetMemory's wait for the
        memories of the user's other sessions (RecallMethods.get_memory_with_recall).
        `max_waiting` bounds the calls queued for a connection (0: unbounded); past it a
        call fails at once with ResourceExhausted instead of queueing.

        Raises:
            Unavailable: the database cannot be reached within `timeout` (saying why, as
                PostgreSQL or libpq does), or `conninfo` is no URL libpq can read (at once).
        """
        _check_conninfo(conninfo)
        options = _session_options(conninfo, statement_timeout)
        pool = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            max_waiting=max_waiting,
            # The pool retries a lost connection with a doubling backoff (1 s, 2 s, 4 s ...),
            # which after a long outage would keep it empty long after PostgreSQL is back.
            # Giving up early lets it grow afresh on the next call once DatabaseHealth has
            # seen the server answer again.
            reconnect_timeout=_RECONNECT_TIMEOUT,
            kwargs=options,
            configure=configure,
            # A client-side bound on each answer, past the statement timeout (BoundedConnection).
            connection_class=BoundedConnection,
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=timeout)
            if min_size == 0:
                # A pool of no kept connection opens without trying one: try one now, so
                # that an unreachable database is said with its reason here too (with
                # --pool-min-size 0 it was "couldn't get a connection after 2.00 sec").
                async with pool.connection(timeout=timeout):
                    pass
        except (PoolTimeout, psycopg.Error) as exc:
            await pool.close()
            why = await _connect_error(conninfo, options, timeout)
            raise Unavailable(
                f"database unavailable: cannot connect within {timeout}s{why}"
            ) from exc
        except BaseException:
            # Cancelled while it waited (a Ctrl-C at start): its tasks, left reconnecting,
            # kept asyncio.run from ever returning. Their connection attempts are left after
            # a second (the pool's default waits five): the caller asked to stop.
            await pool.close(timeout=1.0)
            raise
        store = cls(pool)
        store.statement_timeout = statement_timeout
        store.recall_timeout = recall_timeout
        return store

    async def close(self) -> None:
        """Stops the database probe, releases the snapshots held, and closes the pool."""
        await self._health.close()
        await self.close_held_snapshots()
        await self._pool.close()

    def on_database_change(self, listener: Listener) -> None:
        """Calls `listener(False)` when the database is found down, `listener(True)` on return."""
        self._health.add_listener(listener)

    def pool_stats(self) -> dict[str, int]:
        """psycopg_pool's statistics (pool_size, pool_available, requests_waiting, ...), with
        usage_ms, the milliseconds calls have held connections, counted by the store."""
        return {**self._pool.get_stats(), "usage_ms": int(self.held_seconds * 1000)}


def _check_conninfo(conninfo: str) -> None:
    """Refuses a URL libpq cannot read, which the pool retried for its whole timeout."""
    try:
        conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        # libpq's message quotes the text it could not read, password and all: not repeated.
        said = str(exc).replace(f'"{conninfo}"', "the URL").replace(conninfo, "the URL").strip()
        raise Unavailable(
            f"the database URL is not a PostgreSQL URL or connection string ({said})"
        ) from None


async def _connect_error(conninfo: str, options: dict[str, Any], timeout: float) -> str:  # noqa: ASYNC109
    """Why one connection fails now, as PostgreSQL or libpq says it (": ..."), or "": the pool
    only times out, so a database that does not exist, a wrong password or a bad option all
    read "cannot connect"."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            conninfo, connect_timeout=max(1, math.ceil(timeout)), **options
        )
    except psycopg.Error as exc:
        return ": " + " ".join(str(exc).split())
    await conn.close()
    return ""


def _session_options(conninfo: str, statement_timeout: float) -> dict[str, Any]:
    # Sent at connect time (libpq `options`), so every pooled connection has them from the
    # start, after those the URL (or else PGOPTIONS) gives: given as a keyword they replaced
    # them, and a URL's `options=-csearch_path=tenant_a` was silently dropped, every tenant's
    # tables made and read in `public` (an audit). Ours come last, so they win where both
    # set one (the time zone below must be UTC).
    #
    # The connection check makes PostgreSQL abort the statement of a client that went
    # away (memstore killed mid-call) within a second, rather than run it on, and commit it
    # once its lock is free, after the caller was told the call failed (PostgreSQL 14+).
    #
    # JIT compilation off: it pays only for long analytic queries, and Citus's plans of
    # AddMemory's statement (subplans over intermediate results, estimated at 1,000 rows each)
    # passed jit_above_cost on every call, so each AddMemory on the cluster compiled and
    # optimised its expressions with LLVM: 280 ms a call against 31 ms without
    # (docs/scaling.md "JIT off").
    #
    # TimeZone UTC: PostgreSQL prints a timestamptz in the session's zone and psycopg reads
    # that text into a datetime (years 1-9999). memstore accepts 0001-01-01T00:00:00Z to
    # 9999-12-31T23:59:59.999999Z, which a zone west of UTC printed as 1 BC and one east of
    # it as year 10000: such rows could not be read, whatever the database's or server's
    # TimeZone set (tests/store/test_time_zone.py).
    #
    # On Citus, a connection to a worker not made within half the statement timeout (1 s at
    # least, NODE_CONNECT_SECONDS at most) fails the call as a worker not reached: with
    # Citus's default, 30 s, the statement timeout cancelled such a call first, and a
    # cancelled statement does not tell a silent worker from a slow statement
    # (server/store/fuse.py). Elsewhere the setting is a placeholder that nothing reads.
    # One the URL's options (or PGOPTIONS) set is kept: a cluster whose nodes connect slowly
    # (SSL under load, a distant worker) needs a longer one than the statement timeout gives.
    given = str(conninfo_to_dict(conninfo).get("options") or os.environ.get("PGOPTIONS", ""))
    options = [
        f"-c client_connection_check_interval={_CONNECTION_CHECK_MS}",
        "-c jit=off",
        "-c TimeZone=UTC",
    ]
    if statement_timeout > 0:
        # At least 1 ms: 0 would turn the limit off.
        options.append(f"-c statement_timeout={max(1, round(statement_timeout * 1000))}")
        connect = max(1.0, min(statement_timeout / 2, NODE_CONNECT_SECONDS))
        if "citus.node_connection_timeout" not in given:
            options.append(f"-c citus.node_connection_timeout={round(connect * 1000)}")
    return {"options": " ".join([given, *options] if given else options)}

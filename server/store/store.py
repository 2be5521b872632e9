"""Store: async methods over a psycopg connection pool, returning domain objects.

Every method takes the project id first, raises only server.errors domain
errors (NotFound, AlreadyExists, FailedPrecondition, Unavailable, ...), and
never lets a psycopg exception escape: each runs inside `translated()`.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from server.domain import MetadataChange, Page, PurgeReport, Session, SessionQuery, TimeKey
from server.errors import FailedPrecondition, Unavailable
from server.store import rows
from server.store.base import (
    factory,
    key,
    metadata_params,
    no_such_user,
    session_not_found,
    session_taken,
)
from server.store.db import fetch_all, fetch_one
from server.store.export import ExportMethods
from server.store.health import Listener
from server.store.listing import list_sessions_statements
from server.store.memory import MemoryMethods
from server.store.migrate import apply_migrations
from server.store.projects import KeyMethods
from server.store.queries import query
from server.store.search import SearchMethods
from server.store.users import UserMethods

#: Milliseconds between PostgreSQL's checks that a client running a statement is still there.
_CONNECTION_CHECK_MS = 1000

#: Seconds the pool retries a lost connection in the background before leaving it to demand.
_RECONNECT_TIMEOUT = 1.0


class Store(UserMethods, MemoryMethods, SearchMethods, KeyMethods, ExportMethods):
    """All reads and writes of users, sessions and messages.

    The user methods live in users.py and the memory methods in memory.py; this
    class adds the pool's lifecycle, migrations, sessions and the purge.
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
        max_waiting: int = 0,
    ) -> Store:
        """Opens a pool (waiting until it is ready) and returns a store over it.

        `statement_timeout` (seconds, 0 for none) bounds every statement of a call that has
        no deadline of its own; PostgreSQL cancels a statement that runs longer.
        `max_waiting` bounds the calls queued for a connection (0: unbounded); past it a
        call fails at once with ResourceExhausted instead of queueing.

        Raises:
            Unavailable: the database cannot be reached within `timeout`.
        """
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
            kwargs=_session_options(statement_timeout),
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            await pool.close()
            raise Unavailable(f"database unavailable: cannot connect within {timeout}s") from exc
        return cls(pool)

    async def close(self) -> None:
        """Stops the database probe and closes the pool."""
        await self._health.close()
        await self._pool.close()

    def on_database_change(self, listener: Listener) -> None:
        """Calls `listener(False)` when the database is found down, `listener(True)` on return."""
        self._health.add_listener(listener)

    async def ping(self) -> None:
        """One round trip; finding the database gone marks it down (see on_database_change).

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            await conn.execute(query("ping"))

    def pool_stats(self) -> dict[str, int]:
        """psycopg_pool's counters (pool_size, pool_available, requests_waiting, ...)."""
        return dict(self._pool.get_stats())

    async def migrate(self) -> list[str]:
        """Applies pending migrations under an advisory lock; returns the names applied.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            await conn.set_autocommit(True)
            # A migration may rewrite a large table: the per-call statement timeout is not
            # meant for it (RESET goes back to the connection's own default afterwards).
            await conn.execute(query("no_statement_timeout"))
            try:
                applied = await apply_migrations(conn)
            finally:
                await conn.execute(query("reset_statement_timeout"))
                await conn.set_autocommit(False)
        await self.check_vectors()
        return applied

    async def token_key(self) -> bytes:
        """The page-token HMAC key shared by every worker, created once and kept in the database.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = {"candidate": secrets.token_bytes(32)}
        async with self._connect(single=True) as conn:
            # A worker that loses the insert race may not see the winner's row in the same
            # statement's snapshot; the next statement does.
            for _ in range(3):
                row = await fetch_one(conn, "token_key", params)
                if row is not None:
                    return bytes(row["value"])
        raise Unavailable("database unavailable: cannot read the page-token key")

    # -- sessions --------------------------------------------------------------

    async def create_session(
        self, project_id: int, session_id: str, user_id: str | None, metadata: dict[str, object]
    ) -> Session:
        """Creates a session, optionally owned by an existing user.

        Raises:
            AlreadyExists: the session_id is taken (the message says when by a soft-deleted
                session, with reason SESSION_SOFT_DELETED).
            FailedPrecondition: the named user does not exist (reason USER_NOT_FOUND).
        """
        params = {
            **key(project_id, session_id=session_id),
            "user_id": user_id,
            "metadata": Jsonb(metadata),
        }
        async with self._connect(foreign_key=factory(no_such_user(user_id)), single=True) as conn:
            row = await fetch_one(conn, "create_session", params)
            if row is None:
                state = await fetch_one(conn, "session_state", params)
                raise session_taken(session_id, deleted=bool(state and state["deleted"]))
        return rows.session(row)

    async def get_session(self, project_id: int, session_id: str, show_deleted: bool) -> Session:
        """One session; a soft-deleted one only with show_deleted.

        Raises:
            NotFound: absent, or soft-deleted and not show_deleted.
        """
        params = {**key(project_id, session_id=session_id), "show_deleted": show_deleted}
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "get_session", params)
            if row is None:
                raise await self._session_missing(conn, project_id, session_id)
        return rows.session(row)

    async def update_session(
        self, project_id: int, session_id: str, change: MetadataChange
    ) -> Session:
        """Merges (or replaces) a live session's metadata in one statement.

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        params = {**key(project_id, session_id=session_id), **metadata_params(change)}
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "update_session", params)
            if row is None:
                raise await self._session_missing(conn, project_id, session_id)
        return rows.session(row)

    async def delete_session(self, project_id: int, session_id: str) -> int:
        """Soft-deletes the session and its live messages; returns how many messages.

        Raises:
            NotFound: the session is absent or already soft-deleted.
        """
        return await self._hide_in_live_session("delete_session", project_id, session_id)

    async def undelete_session(self, project_id: int, session_id: str) -> Session:
        """Restores a soft-deleted session; its deleted messages stay deleted.

        Raises:
            NotFound: the session does not exist.
            FailedPrecondition: the session is not deleted (reason SESSION_NOT_DELETED).
        """
        params = key(project_id, session_id=session_id)
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "undelete_session", params)
            if row is None:
                if await fetch_one(conn, "session_state", params) is None:
                    raise session_not_found(session_id)
                raise FailedPrecondition(
                    f"session '{session_id}' is not deleted", reason="SESSION_NOT_DELETED"
                )
        return rows.session(row)

    async def list_sessions(
        self,
        project_id: int,
        query: SessionQuery,
        after: TimeKey | None,
        offset: int | None,
        limit: int,
        *,
        count: bool = True,
    ) -> Page[Session]:
        """Keyset page (after) or OFFSET page (offset); total_size set when `count`.

        Counting reads every matching session, so later pages of one listing skip it and
        reuse the total of the first (ListSessions carries it in the page token).

        Raises:
            Unavailable: the database cannot be reached.
        """
        page_sql, count_sql, params = list_sessions_statements(query, after)
        params.update(project_id=project_id, limit=limit + 1, offset=offset or 0)
        if not count:
            async with self._connect(field="metadata_contains", single=True) as conn:
                found = await fetch_all(conn, page_sql, params)
            return Page([rows.session(r) for r in found[:limit]], has_more=len(found) > limit)
        # Page and count in one round trip and one snapshot.
        async with self._connect(field="metadata_contains") as conn, conn.pipeline():
            found = await fetch_all(conn, page_sql, params)
            total = await fetch_one(conn, count_sql, params)
        items = [rows.session(r) for r in found[:limit]]
        size = int(total["total"]) if total else 0
        return Page(items, has_more=len(found) > limit, total_size=size)

    # -- memory ----------------------------------------------------------------

    async def purge(self, retention: timedelta, batch_size: int = 1000) -> PurgeReport:
        """Hard-deletes soft-deleted sessions and messages older than `retention`, in batches.

        Each batch is its own short transaction, so the purge never holds locks for long.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "purge_cutoff", {"retention": retention})
        assert row is not None
        params = {"cutoff": row["cutoff"], "batch_size": batch_size}
        # Messages first: most expired messages belong to live sessions (ClearMemory).
        messages, _, message_batches = await self._purge_batches("purge_messages", params)
        sessions, cascaded, session_batches = await self._purge_batches("purge_sessions", params)
        return PurgeReport(
            sessions=sessions,
            messages=messages + cascaded,
            batches=message_batches + session_batches,
            details={"messages": messages, "sessions": sessions, "session_messages": cascaded},
        )

    async def _purge_batches(self, name: str, params: dict[str, Any]) -> tuple[int, int, int]:
        # Short transactions, one per batch, until a batch comes back short.
        rows_, others, batches = 0, 0, 0
        while True:
            async with self._connect(single=True) as conn:
                row = await fetch_one(conn, name, params)
            done = int(row["n"]) if row else 0
            rows_ += done
            others += int(row["others"]) if row else 0
            batches += done > 0
            if done < params["batch_size"]:
                return rows_, others, batches


def _session_options(statement_timeout: float) -> dict[str, Any]:
    # Sent at connect time (libpq `options`), so every pooled connection has them from the
    # start. The connection check makes PostgreSQL abort the statement of a client that went
    # away (memstore killed mid-call) within a second, rather than run it on, and commit it
    # once its lock is free, after the caller was told the call failed (PostgreSQL 14+).
    options = [f"-c client_connection_check_interval={_CONNECTION_CHECK_MS}"]
    if statement_timeout > 0:
        options.append(f"-c statement_timeout={round(statement_timeout * 1000)}")
    return {"options": " ".join(options)}

"""The base of the Store: the pool, the translated connection, and shared helpers."""

from __future__ import annotations

import uuid as uuid_lib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from server.domain import MetadataChange, TimeKey
from server.errors import AlreadyExists, FailedPrecondition, MemstoreError, NotFound, Unavailable
from server.store.db import fetch_one
from server.store.health import DatabaseHealth, is_stale
from server.store.translate import ErrorFactory, translated

#: Seconds to wait for a replacement after a stale pooled connection was discarded.
_RETRY_CHECKOUT_TIMEOUT = 1.0

#: Sorts before every stored timestamp: the keyset position of a first page.
START: TimeKey = (datetime.min.replace(tzinfo=UTC), "")


class StoreBase:
    """The pool and the one way every method reaches the database."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        # The pool was opened with a plain conninfo string (Store.open).
        self._health = DatabaseHealth(pool, str(pool.conninfo))
        #: Whether the vector tables exist (pgvector was available to migration 0007): new
        #: messages are then queued for embedding and search can rank by meaning.
        self.vectors = False

    @asynccontextmanager
    async def _connect(
        self,
        *,
        unique: ErrorFactory | None = None,
        foreign_key: ErrorFactory | None = None,
        field: str = "request",
        single: bool = False,
    ) -> AsyncIterator[AsyncConnection[Any]]:
        # One transaction per block: committed on exit, rolled back on error. A block of one
        # statement (`single`) runs in autocommit instead: the statement is its own
        # transaction, which saves the BEGIN and COMMIT round trips.
        with translated(unique=unique, foreign_key=foreign_key, field=field):
            if self._health.down:
                # Fail fast rather than wait for the pool's timeout; the probe heals the pool.
                raise Unavailable(
                    f"database unavailable for {self._health.down_for():.1f}s; retry later"
                )
            conn = await self._checkout()
            try:
                if single:
                    async with _autocommit(conn):
                        yield conn
                else:
                    async with conn:
                        yield conn
            except psycopg.OperationalError:
                if conn.broken or conn.closed:
                    self._health.report_lost_connection()
                raise
            finally:
                await self._pool.putconn(conn)

    async def _checkout(self) -> AsyncConnection[Any]:
        # Skip connections the server closed while they sat in the pool (a restart): the
        # pool replaces each closed one, and the call goes on with a live connection. Only
        # when no live one comes is the database taken for down.
        timeout, seen_stale = self._pool.timeout, False
        for _ in range(self._pool.max_size + 1):
            try:
                conn = await self._pool.getconn(timeout)
            except PoolTimeout:
                if seen_stale:
                    self._health.report_lost_connection()
                raise
            if not is_stale(conn):
                return conn
            await conn.close()
            await self._pool.putconn(conn)
            # If the server is down, no fresh connection ever comes: do not wait the pool's
            # whole timeout for one.
            timeout, seen_stale = min(timeout, _RETRY_CHECKOUT_TIMEOUT), True
        self._health.report_lost_connection()
        raise Unavailable("database unavailable: every pooled connection was closed")

    async def _hide_in_live_session(self, statement: str, project_id: int, session_id: str) -> int:
        """Runs `statement` (which soft-deletes messages) on a live session; returns its count.

        The session row is locked first, in the same transaction, so the statement's snapshot
        sees every message an AddMemory committed while this call waited for the lock.

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        params = key(project_id, session_id=session_id)
        async with self._connect() as conn:
            row = await fetch_one(conn, "lock_live_session", params)
            if row is not None:
                row = await fetch_one(conn, statement, params)
            if row is None:
                raise await self._session_missing(conn, project_id, session_id)
        return int(row["messages"])

    async def _session_missing(
        self, conn: AsyncConnection[Any], project_id: int, session_id: str
    ) -> NotFound:
        # Only on the error path: says whether the session is absent or soft-deleted.
        row = await fetch_one(conn, "session_state", key(project_id, session_id=session_id))
        if row is None:
            return session_not_found(session_id)
        return NotFound(
            f"session '{session_id}' is soft-deleted; restore it with UndeleteSession "
            "or by adding memory with AddMemory",
            reason="SESSION_DELETED",
        )


@asynccontextmanager
async def _autocommit(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    # Switching autocommit is local to the client while no transaction is open: no round trip.
    await conn.set_autocommit(True)
    try:
        yield
    finally:
        if not (conn.closed or conn.broken):
            await conn.set_autocommit(False)


def key(project_id: int, **ids: str) -> dict[str, Any]:
    """The parameters naming a row: the project and its ids."""
    return {"project_id": project_id, **ids}


def metadata_params(change: MetadataChange | None) -> dict[str, Any]:
    """The parameters of a metadata merge (or replace) in SQL; patch is NULL without a change."""
    return {
        "replace_metadata": bool(change and change.replace),
        "patch": Jsonb(change.patch) if change is not None else None,
    }


def factory(error: MemstoreError) -> ErrorFactory:
    """An ErrorFactory that always gives `error`, for `translated(unique=..., foreign_key=...)`."""
    return lambda _exc: error


def parse_uuid(session_id: str, value: str) -> uuid_lib.UUID:
    """The UUID of a message; a string that is no UUID names no message (NotFound)."""
    try:
        return uuid_lib.UUID(value)
    except ValueError:
        raise message_not_found(session_id, value) from None


def user_not_found(user_id: str) -> NotFound:
    """The error of a user id that names no user."""
    return NotFound(f"user '{user_id}' not found", reason="USER_NOT_FOUND")


def session_not_found(session_id: str) -> NotFound:
    """The error of a session id that names no session."""
    return NotFound(f"session '{session_id}' not found", reason="SESSION_NOT_FOUND")


def no_such_user(user_id: str | None) -> FailedPrecondition:
    """The error of a session or memory write naming a user that does not exist."""
    return FailedPrecondition(
        f"user '{user_id}' does not exist; create it before naming it", reason="USER_NOT_FOUND"
    )


def message_not_found(session_id: str, uuid: str) -> NotFound:
    """The error of a uuid that names no live message of a live session."""
    return NotFound(
        f"message '{uuid}' not found in session '{session_id}'", reason="MESSAGE_NOT_FOUND"
    )


def session_taken(session_id: str, *, deleted: bool) -> AlreadyExists:
    """The error of CreateSession on a taken id; says how to restore a soft-deleted one."""
    if not deleted:
        return AlreadyExists(
            f"session '{session_id}' already exists", reason="SESSION_ALREADY_EXISTS"
        )
    return AlreadyExists(
        f"session '{session_id}' already exists and is soft-deleted; restore it with "
        "UndeleteSession, or add memory to it with AddMemory (which restores it)",
        reason="SESSION_SOFT_DELETED",
    )

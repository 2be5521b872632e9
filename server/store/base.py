"""The base of the Store: the pool, the translated connection, and shared helpers."""

from __future__ import annotations

import uuid as uuid_lib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from server.domain import MetadataChange, TimeKey
from server.errors import AlreadyExists, FailedPrecondition, MemstoreError, NotFound
from server.store.db import fetch_one
from server.store.translate import ErrorFactory, translated

#: Sorts before every stored timestamp: the keyset position of a first page.
START: TimeKey = (datetime.min.replace(tzinfo=UTC), "")


class StoreBase:
    """The pool and the one way every method reaches the database."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def _connect(
        self,
        *,
        unique: ErrorFactory | None = None,
        foreign_key: ErrorFactory | None = None,
        field: str = "request",
    ) -> AsyncIterator[AsyncConnection[Any]]:
        # One transaction per block: the pool commits on exit, rolls back on error.
        with translated(unique=unique, foreign_key=foreign_key, field=field):
            async with self._pool.connection() as conn:
                yield conn

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

"""The message methods of the Store: memory appended to, read from and cleared in sessions."""

from __future__ import annotations

import uuid as uuid_lib
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg import errors as pg
from psycopg.types.json import Jsonb

from server.domain import Message, MetadataChange, NewMessage, Page, Session
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from server.store import rows
from server.store.base import (
    StoreBase,
    factory,
    key,
    merged_too_large,
    metadata_params,
    no_such_user,
)
from server.store.db import Params, Row, fetch_all, fetch_one
from server.store.queries import query
from server.store.sessions import hide_in_live_session, session_missing

#: The unique key of a message's uuid in its session (migrations/0001).
_UUID_KEY = "messages_project_id_session_id_uuid_key"

#: Runs of add_memory when concurrent calls add the same uuids (see _append).
_APPEND_ATTEMPTS = 4


def memory_window() -> sql.SQL:
    """GetMemory's statement (a live session and its last `lastn` live messages), for callers
    that pipeline it with another read: recall sends both in one round trip."""
    return query("get_memory")


class MessageMethods(StoreBase):
    """Appends, reads and soft-deletes of the messages of sessions."""

    async def add_memory(
        self, project_id: int, session_id: str, user_id: str | None, messages: list[NewMessage]
    ) -> tuple[Session, list[Message]]:
        """Upserts the session (undeleting it) and appends messages in one statement.

        A message whose uuid the session already holds is not appended again: it is answered
        as stored, so a retry with the same uuids changes nothing and answers as the first
        call did. Only new messages take sequences, count, revive the session and are queued
        for embedding. Messages come back one per request message, in request order.

        Raises:
            FailedPrecondition: the named user does not exist (reason USER_NOT_FOUND), or the
                session belongs to another user or to none (reason SESSION_USER_MISMATCH).
            AlreadyExists: a uuid names a message of the session with another role,
                role_type or content (reason MESSAGE_ALREADY_EXISTS); nothing was written.
            InvalidArgument: no messages, a uuid given twice, or a value the database rejects.
        """
        if not messages:
            raise InvalidArgument.field("messages", "at least one message is required")
        uuids = [m.uuid or str(uuid_lib.uuid4()) for m in messages]
        if len(set(uuids)) < len(uuids):
            raise InvalidArgument.field("messages", "each message needs its own uuid")
        params = {
            **key(project_id, session_id=session_id),
            "user_id": user_id,
            "uuids": uuids,
            "roles": [m.role for m in messages],
            "role_types": [m.role_type for m in messages],
            "contents": [m.content for m in messages],
            "metadatas": [Jsonb(m.metadata) for m in messages],
            "embed": self.vectors,
        }
        no_user = factory(no_such_user(user_id))
        async with self._connect(foreign_key=no_user, field="messages", single=True) as conn:
            found = await _append(conn, params)
        if not found:
            raise FailedPrecondition(
                f"session '{session_id}' does not belong to user '{user_id}'",
                reason="SESSION_USER_MISMATCH",
            )
        for row in found:
            if row["m_differs"]:
                raise _uuid_taken(session_id, row)
        return rows.session(found[0]), rows.joined_messages(found)

    async def get_memory(
        self, project_id: int, session_id: str, lastn: int
    ) -> tuple[Session | None, list[Message]]:
        """The live session (None if absent/deleted) and its last `lastn` live messages.

        Messages come oldest first.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = {**key(project_id, session_id=session_id), "lastn": lastn}
        async with self._connect(single=True) as conn:
            found = await fetch_all(conn, "get_memory", params)
        if not found:
            return None, []
        return rows.session(found[0]), rows.joined_messages(found)

    async def list_messages(
        self,
        project_id: int,
        session_id: str,
        after_sequence: int | None,
        limit: int,
        *,
        offset: int | None = None,
    ) -> Page[Message]:
        """Live messages by sequence, strictly after `after_sequence` (keyset) or past the
        first `offset` (ListMessages' page_number); total_size is the session's live count.

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        params = {
            **key(project_id, session_id=session_id),
            "after_sequence": after_sequence or 0,
            "limit": limit + 1,
            "offset": offset or 0,
        }
        async with self._connect(single=True) as conn:
            found = await fetch_all(conn, "list_messages", params)
            if not found:
                raise await session_missing(conn, project_id, session_id)
        messages = rows.joined_messages(found)
        total = int(found[0]["message_count"])
        return Page(messages[:limit], has_more=len(messages) > limit, total_size=total)

    async def get_message(self, project_id: int, session_id: str, uuid: str) -> Message:
        """One live message of a live session.

        Raises:
            NotFound: the message or its session is absent or soft-deleted.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        params = {**key(project_id, session_id=session_id), "uuid": parse_uuid(session_id, uuid)}
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "get_message", params)
        if row is None:
            raise message_not_found(session_id, uuid)
        if row["uuid"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.message(row)

    async def update_message(
        self, project_id: int, session_id: str, uuid: str, change: MetadataChange
    ) -> Message:
        """Merges (or replaces) one live message's metadata in one statement.

        Raises:
            NotFound: the message or its session is absent or soft-deleted.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        params = {
            **key(project_id, session_id=session_id),
            "uuid": parse_uuid(session_id, uuid),
            **metadata_params(change),
        }
        async with self._connect(field="metadata", single=True) as conn:
            row = await fetch_one(conn, "update_message", params)
        if row is None:
            raise message_not_found(session_id, uuid)
        if row["uuid"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.message(row)

    async def clear_memory(self, project_id: int, session_id: str) -> int:
        """Soft-deletes the live messages, keeps the session; returns how many.

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        async with self._connect() as conn:
            return await hide_in_live_session(conn, "clear_memory", project_id, session_id)


async def _append(conn: AsyncConnection[Any], params: Params) -> list[Row]:
    # The statement reads which uuids the session holds in its snapshot, then waits for the
    # session's row lock. A concurrent call that committed one of them meanwhile (the same
    # retry, sent twice) makes the insert fail on the uuid's unique key; run again, the
    # statement sees that message and answers it as stored. Each rerun follows a commit of
    # another call, so a few suffice.
    for attempt in range(_APPEND_ATTEMPTS):
        try:
            return await fetch_all(conn, "add_memory", params)
        except pg.UniqueViolation as exc:
            if exc.diag.constraint_name != _UUID_KEY or attempt + 1 == _APPEND_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _uuid_taken(session_id: str, row: Row) -> AlreadyExists:
    index = int(row["m_ord"]) - 1
    return AlreadyExists(
        f"messages[{index}].uuid: message '{row['m_uuid']}' already exists in session "
        f"'{session_id}' with another role, role_type or content; resend it unchanged to "
        "retry, or give a new message a new uuid",
        reason="MESSAGE_ALREADY_EXISTS",
    )


def parse_uuid(session_id: str, value: str) -> uuid_lib.UUID:
    """The UUID of a message; a string that is no UUID names no message (NotFound)."""
    try:
        return uuid_lib.UUID(value)
    except ValueError:
        raise message_not_found(session_id, value) from None


def message_not_found(session_id: str, uuid: str) -> NotFound:
    """The error of a uuid that names no live message of a live session."""
    return NotFound(
        f"message '{uuid}' not found in session '{session_id}'", reason="MESSAGE_NOT_FOUND"
    )

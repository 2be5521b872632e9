"""The message methods of the Store: memory read from, edited and cleared in sessions (see
sql/messages.sql); AddMemory's appends are in add_memory.py and append.py."""

from __future__ import annotations

import uuid as uuid_lib
from functools import cache

from psycopg import sql

from server.domain import Message, MetadataChange, Page, Session
from server.errors import NotFound
from server.store import rows
from server.store.base import StoreBase, key, merged_too_large, metadata_params
from server.store.budget import budget_rows
from server.store.db import fetch_all, fetch_one
from server.store.queries import compact, query
from server.store.sessions import (
    forget_kept_recall,
    hide_in_live_session,
    lock_live_session,
    session_missing,
)


@cache
def window_fragment(*, budgeted: bool, coalesced: bool) -> sql.Composed:
    """GetMemory's window (memory_window, or memory_window_sized read newest first up to a
    byte budget by budget_rows) over the call's values: get_memory's parameters, or
    (`coalesced`) the call's row `q` and its session `s` in get_memories_recall."""
    if coalesced:
        project_id, session_id, lastn, budget = (
            "s.project_id",
            "s.session_id",
            "q.lastn",
            "q.budget",
        )
    else:
        project_id, session_id = "%(project_id)s", "%(session_id)s"
        lastn, budget = "%(lastn)s", "%(budget)s::int8"
    scan = query("memory_window_scan").format(
        project_id=sql.SQL(project_id), session_id=sql.SQL(session_id), lastn=sql.SQL(lastn)
    )
    if budgeted:
        sized = query("memory_window_sized").format(scan=scan)
        return budget_rows(sized, sql.SQL("k.sequence DESC"), sql.SQL(budget))
    return query("memory_window").format(scan=scan)


@cache
def memory_window(*, budgeted: bool) -> sql.SQL:
    """GetMemory's statement (a live session and its last `lastn` live messages, read up to
    `budget` bytes of content and metadata if `budgeted`), for callers that pipeline it with
    another read: recall sends both in one round trip."""
    window = window_fragment(budgeted=budgeted, coalesced=False)
    return sql.SQL(compact(query("get_memory").format(window=window).as_string(None)))


@cache
def list_messages_statement() -> sql.SQL:
    """ListMessages' statement: a live session and one page of its live messages, read up
    to `budget` bytes of content and metadata as printed (list_messages_sized by budget_rows)."""
    page = budget_rows(query("list_messages_sized"), sql.SQL("k.sequence"))
    return sql.SQL(compact(query("list_messages").format(page=page).as_string(None)))


class MessageMethods(StoreBase):
    """Reads, metadata edits and soft-deletes of the messages of sessions."""

    async def get_memory(
        self, project_id: int, session_id: str, lastn: int, *, budget: int | None = None
    ) -> tuple[Session | None, list[Message]]:
        """The live session (None if absent/deleted) and its last `lastn` live messages.

        Messages come oldest first, read newest first up to `budget` bytes of content and
        metadata (as printed) if
        given (get_memory_with_recall, which GetMemory calls, says when that cut them).

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = {**key(project_id, session_id=session_id), "lastn": lastn, "budget": budget}
        async with self._connect(single=True, session=session_id) as conn:
            found = await fetch_all(conn, memory_window(budgeted=budget is not None), params)
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
        budget: int,
    ) -> Page[Message]:
        """Live messages by sequence, strictly after `after_sequence` (keyset) or past the
        first `offset` (ListMessages' page_number); total_size is the session's live count.
        The page ends early, `cut`, where the messages before the next hold `budget` bytes of
        content and metadata (the first message is always in it).

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        params = {
            **key(project_id, session_id=session_id),
            "after_sequence": after_sequence or 0,
            "limit": limit + 1,
            "offset": offset or 0,
            "budget": budget,
        }
        async with self._connect(single=True, session=session_id) as conn:
            found = await fetch_all(conn, list_messages_statement(), params)
            if not found:
                raise await session_missing(conn, project_id, session_id)
        messages = rows.joined_messages(found)
        total = int(found[0]["message_count"])
        if found[-1]["m_followed"]:
            return Page(messages, has_more=True, total_size=total, cut=True)
        return Page(messages[:limit], has_more=len(messages) > limit, total_size=total)

    async def get_message(self, project_id: int, session_id: str, uuid: str) -> Message:
        """One live message of a live session.

        Raises:
            NotFound: the message or its session is absent or soft-deleted.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        params = {**key(project_id, session_id=session_id), "uuid": parse_uuid(session_id, uuid)}
        async with self._connect(single=True, session=session_id) as conn:
            row = await fetch_one(conn, "get_message", params)
        if row is None:
            raise message_not_found(session_id, uuid)
        if row["uuid"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.message(row)

    async def update_message(
        self, project_id: int, session_id: str, uuid: str, change: MetadataChange
    ) -> Message:
        """Merges (or replaces) one live message's metadata, its session locked first.

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
        async with self._connect(field="metadata", session=session_id) as conn:
            # The session first, as AddMemory, ClearMemory and DeleteSession take it before
            # its messages: the statement alone locked the message, then the session to
            # touch it, and a ClearMemory of the session deadlocked with it
            # (tests/store/test_lock_order.py).
            live = await lock_live_session(conn, project_id, session_id, to_update=True)
            row = await fetch_one(conn, "update_message", params) if live else None
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
        async with self._connect(session=session_id) as conn:
            row = await hide_in_live_session(conn, "clear_memory", project_id, session_id)
            await forget_kept_recall(conn, self, project_id, session_id)
            return int(row["messages"])


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

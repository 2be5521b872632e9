"""The bulk-export methods of the Store: keyset batches of sessions and messages."""

from __future__ import annotations

from server.domain import Message, MessageKey, Page, Session, TimeKey
from server.store import rows
from server.store.base import START, StoreBase
from server.store.db import fetch_all

#: Sorts before every (session_id, sequence): the position of a first batch.
_MESSAGES_START: MessageKey = ("", 0)


class ExportMethods(StoreBase):
    """Reads for ExportSessions and ExportMessages, one short transaction per batch."""

    async def export_sessions(
        self, project_id: int, after: TimeKey | None, limit: int, *, include_deleted: bool = False
    ) -> Page[Session]:
        """Live sessions (soft-deleted ones too with `include_deleted`) ordered by
        (created_at, session_id) strictly after `after`.

        Raises:
            Unavailable: the database cannot be reached.
        """
        after_ts, after_id = after or START
        params = {
            "project_id": project_id,
            "after_ts": after_ts,
            "after_id": after_id,
            "limit": limit + 1,
            "include_deleted": include_deleted,
        }
        async with self._connect() as conn:
            found = await fetch_all(conn, "export_sessions", params)
        return Page([rows.session(r) for r in found[:limit]], has_more=len(found) > limit)

    async def export_messages(
        self,
        project_id: int,
        after: MessageKey | None,
        limit: int,
        *,
        include_deleted: bool = False,
    ) -> Page[Message]:
        """Live messages of live sessions (every message with `include_deleted`, with its
        deleted_at) by (session_id, sequence) strictly after `after`.

        Raises:
            Unavailable: the database cannot be reached.
        """
        after_session, after_sequence = after or _MESSAGES_START
        params = {
            "project_id": project_id,
            "after_session": after_session,
            "after_sequence": after_sequence,
            "limit": limit + 1,
            "include_deleted": include_deleted,
        }
        async with self._connect() as conn:
            found = await fetch_all(conn, "export_messages", params)
        return Page([rows.message(r) for r in found[:limit]], has_more=len(found) > limit)

"""The bulk-export methods of the Store: keyset batches of sessions and messages."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, cast

from psycopg import sql

from server.domain import (
    Message,
    MessageColumns,
    MessageKey,
    Page,
    Session,
    TimeKey,
    WireRows,
    WireRun,
)
from server.store import rows
from server.store.base import START, StoreBase, page_of
from server.store.budget import budget_rows, followed, list_size
from server.store.db import fetch_all
from server.store.queries import query

#: Sorts before every (session_id, sequence): the position of a first batch.
_MESSAGES_START: MessageKey = ("", 0)


class ExportMethods(StoreBase):
    """Reads for ExportSessions and ExportMessages, one short transaction per batch (in a
    held snapshot when one is named: server/store/snapshots.py)."""

    async def export_sessions(
        self,
        project_id: int,
        after: TimeKey | None,
        limit: int,
        *,
        include_deleted: bool = False,
        budget: int,
        snapshot: str | None = None,
    ) -> Page[Session]:
        """Live sessions (soft-deleted ones too with `include_deleted`) ordered by
        (created_at, session_id) strictly after `after`: at most `limit`, and fewer where
        the sessions before the next hold `budget` bytes of metadata and ids (at least one).

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
            "budget": budget,
        }
        async with self._connect(snapshot=_held(project_id, snapshot), fans_out=True) as conn:
            found = await fetch_all(conn, export_sessions_statement(), params)
        return page_of([rows.session(r) for r in found], limit, followed=followed(found))

    async def export_messages(
        self,
        project_id: int,
        after: MessageKey | None,
        limit: int,
        *,
        include_deleted: bool = False,
        snapshot: str | None = None,
    ) -> Page[Message]:
        """Live messages of live sessions (every message with `include_deleted`, with its
        deleted_at) by (session_id, sequence) strictly after `after`.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = _message_batch(project_id, after, limit + 1, include_deleted)
        async with self._connect(snapshot=_held(project_id, snapshot), fans_out=True) as conn:
            found = await fetch_all(conn, "export_messages", params)
        return Page([rows.message(r) for r in found[:limit]], has_more=len(found) > limit)

    async def export_message_columns(
        self,
        project_id: int,
        after: MessageKey | None,
        limit: int,
        *,
        include_deleted: bool = False,
        budget: int,
        snapshot: str | None = None,
    ) -> MessageColumns | None:
        """export_messages' batch (the same messages, at most `limit`) as one MessageColumns,
        a few values for the whole batch; None when no message follows. The batch ends
        early, `cut`, where the messages before the next hold `budget` bytes of content and
        metadata (the first message is always in it).

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = _message_batch(project_id, after, limit, include_deleted)
        params["budget"] = budget
        found = await self._binary_row("export_message_columns", params, snapshot)
        if found is None or not found[0]:
            return None
        rows, cut, lengths, fixed, session_ids, roles, contents, metadata, deleted, mask = found
        return MessageColumns(
            rows, lengths, fixed, session_ids, roles, contents, metadata, deleted, mask, cut
        )

    async def list_user_chunk(
        self, project_id: int, after: TimeKey | None, limit: int, *, snapshot: str | None = None
    ) -> WireRun[TimeKey] | None:
        """The next at most `limit` users after `after`, by (created_at, user_id), as one
        run of ListUsersChunkedResponse `users` entries in protobuf wire bytes; None when no
        user follows.

        Raises:
            Unavailable: the database cannot be reached.
        """
        after_ts, after_id = after or START
        params = {"project_id": project_id, "after_ts": after_ts, "after_id": after_id}
        params["limit"] = limit
        found = cast(
            tuple[bytes, int, datetime | None, str | None],
            await self._binary_row(
                "list_user_chunk_citus" if self.citus else "list_user_chunk", params, snapshot
            ),
        )
        entries, rows, last_created, last_id = found
        if not rows or last_created is None or last_id is None:
            return None
        return WireRun(entries, rows, (last_created, last_id))

    async def list_user_wire(
        self, project_id: int, after: TimeKey | None, limit: int, *, snapshot: str | None = None
    ) -> Page[WireRows[TimeKey]]:
        """One keyset batch of at most `limit` users after `after`, by (created_at, user_id),
        as ListUsersChunkedResponse `users` entries in protobuf wire bytes: one WireRows, or
        none when no user follows. has_more is True when the batch is full (a last, empty
        batch may follow).

        Raises:
            Unavailable: the database cannot be reached.
        """
        after_ts, after_id = after or START
        params = {
            "project_id": project_id,
            "after_ts": after_ts,
            "after_id": after_id,
            "limit": limit,
        }
        found = cast(
            tuple[bytes, list[int], list[datetime], list[str]],
            await self._binary_row(
                "list_user_wire_citus" if self.citus else "list_user_wire", params, snapshot
            ),
        )
        entries, sizes, created, user_ids = found
        if not sizes:
            return Page([], has_more=False)

        def key(i: int) -> TimeKey:
            return created[i], user_ids[i]

        return Page([WireRows(bytes(entries), sizes, key)], has_more=len(sizes) >= limit)

    async def _binary_row(
        self, name: str, params: dict[str, Any], snapshot: str | None
    ) -> tuple[Any, ...] | None:
        # The one row of a statement that returns a whole batch, its results in binary: the
        # bytea values arrive as they are, not as hex text to decode. In a held `snapshot`
        # when given (server/store/snapshots.py).
        async with self._connect(
            single=True, snapshot=_held(params["project_id"], snapshot), fans_out=True
        ) as conn:
            cur = conn.cursor(binary=True)
            await cur.execute(query(name), params)
            return await cur.fetchone()


def _held(project_id: int, snapshot: str | None) -> tuple[int, str] | None:
    # The held snapshot a batch reads in, as StoreBase._connect takes it; None: none.
    return None if snapshot is None else (project_id, snapshot)


def _message_batch(
    project_id: int, after: MessageKey | None, limit: int, include_deleted: bool
) -> dict[str, Any]:
    # The parameters of a batch of messages by (session_id, sequence) after `after`.
    after_session, after_sequence = after or _MESSAGES_START
    return {
        "project_id": project_id,
        "after_session": after_session,
        "after_sequence": after_sequence,
        "limit": limit,
        "include_deleted": include_deleted,
    }


@functools.cache
def export_sessions_statement() -> sql.Composed:
    """export_sessions, its rows (export_sessions_sized) read up to %(budget)s bytes."""
    sized = query("export_sessions_sized").format(size=list_size("s", "session_id", "user_id"))
    return query("export_sessions").format(
        rows=budget_rows(sized, sql.SQL("k.created_at, k.session_id"))
    )

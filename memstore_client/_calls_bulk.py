"""What the search, export and restore methods send and how their answers convert: shared by
sync and asyncio (the per-resource calls are in _calls.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from memstore.v1 import backup_service_pb2 as bs
from memstore.v1 import session_service_pb2 as ss

from . import _checks
from ._calls import BACKUP, SESSIONS, Stream, Unary, _ids, _set_times, _texts
from .types import (
    BackupSource,
    ExportedMessage,
    JsonObject,
    Message,
    RestoreCounts,
    Restored,
    SearchResult,
    SearchResults,
    Session,
    Snapshot,
    User,
    message_backup_proto,
    role_type_number,
    session_backup_proto,
    to_datetime,
    user_backup_proto,
)

#: SearchMemory's search types by the names the client takes.
SEARCH_TYPES = {
    "hybrid": ss.SEARCH_TYPE_HYBRID,
    "full_text": ss.SEARCH_TYPE_FULL_TEXT,
    "semantic": ss.SEARCH_TYPE_SEMANTIC,
}


def search_memory(
    text: str,
    *,
    user_id: str | None,
    session_ids: Sequence[str] | None,
    search_type: str,
    limit: int,
    mmr_lambda: float | None,
    role_types: Sequence[str] | None,
    metadata: JsonObject | None,
    created_after: datetime | None,
    created_before: datetime | None,
) -> Unary[SearchResults]:
    """SearchMemory."""
    _texts(text=text)
    _ids(optional=True, user_id=user_id)
    _checks.texts("session_ids", session_ids)
    _checks.integer("limit", limit)
    _checks.choice("search_type", search_type, SEARCH_TYPES)
    _checks.real("mmr_lambda", mmr_lambda, optional=True)
    _checks.texts("role_types", role_types)
    request = ss.SearchMemoryRequest(
        text=text,
        user_id=user_id or "",
        session_ids=list(session_ids or ()),
        search_type=SEARCH_TYPES[search_type],
        limit=limit,
        mmr_lambda=mmr_lambda,
        role_types=[
            role_type_number(r, f"role_types[{i}]") for i, r in enumerate(role_types or ())
        ],
    )
    if metadata is not None:
        _checks.json_object("metadata", metadata)
        request.metadata_contains.update(metadata)
    _set_times(request, created_after=created_after, created_before=created_before)

    def convert(r: ss.SearchMemoryResponse) -> SearchResults:
        return SearchResults(
            [SearchResult.from_proto(found) for found in r.results],
            r.semantic,
            r.unembedded_messages,
            r.note,
        )

    return Unary(SESSIONS, "SearchMemory", request, convert, idempotent=True)


def export_sessions(
    chunk_size: int, page_token: str, include_deleted: bool = False, snapshot: str = ""
) -> Stream[Session]:
    """ExportSessions (soft-deleted sessions too with include_deleted; in a held snapshot
    when one is named)."""
    _checks.integer("chunk_size", chunk_size)
    _checks.flag("include_deleted", include_deleted)
    _texts(page_token=page_token, snapshot=snapshot)
    request = ss.ExportSessionsRequest(
        chunk_size=chunk_size,
        page_token=page_token,
        include_deleted=include_deleted,
        snapshot=snapshot,
    )
    return Stream(
        SESSIONS, "ExportSessions", request, lambda r: [Session.from_proto(s) for s in r.sessions]
    )


def export_messages(
    chunk_size: int, page_token: str, include_deleted: bool = False, snapshot: str = ""
) -> Stream[ExportedMessage]:
    """ExportMessages (soft-deleted messages too with include_deleted; in a held snapshot
    when one is named)."""
    _checks.integer("chunk_size", chunk_size)
    _checks.flag("include_deleted", include_deleted)
    _texts(page_token=page_token, snapshot=snapshot)
    request = ss.ExportMessagesRequest(
        chunk_size=chunk_size,
        page_token=page_token,
        include_deleted=include_deleted,
        snapshot=snapshot,
    )

    def convert(r: ss.ExportMessagesResponse) -> list[ExportedMessage]:
        return [ExportedMessage(m.session_id, Message.from_proto(m.message)) for m in r.messages]

    return Stream(SESSIONS, "ExportMessages", request, convert)


# -- backup --------------------------------------------------------------------


def open_snapshot(hold_seconds: int) -> Unary[Snapshot]:
    """OpenSnapshot: the database held as it is now, for the export streams to read in.

    Not retried: a first attempt whose answer was lost would hold a snapshot no one knows.
    """
    _checks.integer("hold_seconds", hold_seconds)
    request = bs.OpenSnapshotRequest(hold_seconds=hold_seconds)

    def convert(r: bs.OpenSnapshotResponse) -> Snapshot:
        return Snapshot(r.snapshot, to_datetime(r.expires_at))

    return Unary(BACKUP, "OpenSnapshot", request, convert, idempotent=False)


def close_snapshot(snapshot: str) -> Unary[bool]:
    """CloseSnapshot: whether the snapshot was still held (and is now released)."""
    _texts(snapshot=snapshot)
    request = bs.CloseSnapshotRequest(snapshot=snapshot)
    return Unary(BACKUP, "CloseSnapshot", request, lambda r: r.closed, idempotent=True)


def restore(
    users: Sequence[User],
    sessions: Sequence[Session],
    messages: Sequence[ExportedMessage],
    require_empty: bool,
) -> Unary[Restored]:
    """Restore: rows written back with their original values, all or none.

    Idempotent without `require_empty`: a row already stored as given counts as existing,
    so it is retried. With it, not: a first attempt that committed before its answer was
    lost leaves the project holding its rows, and the retry failed PROJECT_NOT_EMPTY.
    """
    _checks.flag("require_empty", require_empty)
    request = bs.RestoreRequest(
        users=[
            user_backup_proto(u, f"users[{i}]")
            for i, u in enumerate(_checks.rows("users", users, User))
        ],
        sessions=[
            session_backup_proto(s, f"sessions[{i}]")
            for i, s in enumerate(_checks.rows("sessions", sessions, Session))
        ],
        messages=[
            message_backup_proto(m, f"messages[{i}]")
            for i, m in enumerate(_checks.rows("messages", messages, ExportedMessage))
        ],
        require_empty=require_empty,
    )

    def counts(c: bs.RestoreCounts) -> RestoreCounts:
        return RestoreCounts(c.created, c.existing)

    def convert(r: bs.RestoreResponse) -> Restored:
        return Restored(counts(r.users), counts(r.sessions), counts(r.messages))

    return Unary(BACKUP, "Restore", request, convert, idempotent=not require_empty)


def get_backup_source() -> Unary[BackupSource]:
    """GetBackupSource: the project of the key and an id of it in the server's database."""

    def convert(r: bs.GetBackupSourceResponse) -> BackupSource:
        return BackupSource(r.project, r.source_id)

    request = bs.GetBackupSourceRequest()
    return Unary(BACKUP, "GetBackupSource", request, convert, idempotent=True)

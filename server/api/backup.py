"""BackupService: Restore writes the rows of a backup back with their original values."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from memstore.v1 import backup_service_pb2 as pb
from memstore.v1 import backup_service_pb2_grpc as pb_grpc
from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as ss
from server.api import convert
from server.api import metadata_checks as meta
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import unary_errors
from server.domain import DEFAULT_SNAPSHOT_HOLD, Message, RestoreCounts, Session, User

#: Rows of all kinds in one Restore request (one transaction).
MAX_RESTORE_ROWS = 1000
#: The highest sequence a restored message may have (2^53, as JSON numbers hold integers
#: exactly): far past any session's real count, and far enough below PostgreSQL's bigint
#: limit that the session's next sequence, and later AddMemory calls, never overflow it.
MAX_SEQUENCE = 2**53


class BackupServicer(ServicerBase, pb_grpc.BackupServiceServicer):
    """memstore.v1.BackupService."""

    @unary_errors
    async def Restore(self, request: pb.RestoreRequest, context: Context) -> pb.RestoreResponse:
        v = val.Violations()
        count = len(request.users) + len(request.sessions) + len(request.messages)
        # No row only with require_empty: the check alone, which a restore of an empty
        # backup makes; without it an empty backup "restored" into any project unrefused.
        if count > MAX_RESTORE_ROWS or (count == 0 and not request.require_empty):
            v.add("request", f"holds {count} rows; send 1 to {MAX_RESTORE_ROWS}")
        users = _unique(v, [_user(v, f"users[{i}]", u) for i, u in enumerate(request.users)])
        sessions = _unique(
            v, [_session(v, f"sessions[{i}]", s) for i, s in enumerate(request.sessions)]
        )
        messages = _unique(
            v, [_message(v, f"messages[{i}]", m) for i, m in enumerate(request.messages)]
        )
        v.raise_if_any()
        done = await self._store.restore(
            self._project(context),
            [u for _, u in users],
            [s for _, s in sessions],
            [m for _, m in messages],
            require_empty=request.require_empty,
        )
        return pb.RestoreResponse(
            users=_counts(done.users),
            sessions=_counts(done.sessions),
            messages=_counts(done.messages),
        )

    @unary_errors
    async def OpenSnapshot(
        self, request: pb.OpenSnapshotRequest, context: Context
    ) -> pb.OpenSnapshotResponse:
        v = val.Violations()
        hold = val.hold_seconds(v, "hold_seconds", request.hold_seconds, DEFAULT_SNAPSHOT_HOLD)
        v.raise_if_any()
        snapshot, expires_at = await self._store.open_snapshot(self._project(context), hold)
        response = pb.OpenSnapshotResponse(snapshot=snapshot)
        convert.set_timestamp(response.expires_at, expires_at)
        return response

    @unary_errors
    async def CloseSnapshot(
        self, request: pb.CloseSnapshotRequest, context: Context
    ) -> pb.CloseSnapshotResponse:
        v = val.Violations()
        snapshot = val.snapshot(v, "snapshot", request.snapshot, required=True)
        v.raise_if_any()
        assert snapshot is not None  # required
        closed = await self._store.close_snapshot(self._project(context), snapshot)
        return pb.CloseSnapshotResponse(closed=closed)

    @unary_errors
    async def GetBackupSource(
        self, request: pb.GetBackupSourceRequest, context: Context
    ) -> pb.GetBackupSourceResponse:
        source = await self._store.get_backup_source(self._project(context))
        return pb.GetBackupSourceResponse(project=source.project, source_id=source.source_id)


def _counts(counts: RestoreCounts) -> pb.RestoreCounts:
    return pb.RestoreCounts(created=counts.created, existing=counts.existing)


def _unique(v: val.Violations, rows: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Refuses two rows of the request with the same key (naming the second)."""
    first: dict[tuple[Any, ...], str] = {}
    for field, row in rows:
        keys: list[tuple[Any, ...]]
        if isinstance(row, User):
            keys = [("user", row.user_id)]
        elif isinstance(row, Session):
            keys = [("session", row.session_id)]
        else:
            keys = [("seq", row.session_id, row.sequence), ("uuid", row.session_id, row.uuid)]
        for key in keys:
            if key in first:
                v.add(field, f"has the same key as {first[key]} ({key[0]} {key[1:]})")
            first.setdefault(key, field)
    return rows


def _stamp(
    v: val.Violations, field: str, message: Any, name: str, *, required: bool = True
) -> datetime | None:
    if not message.HasField(name):
        if required:
            v.add(f"{field}.{name}", "is required (the backup's value)")
        return None
    return val.timestamp(v, f"{field}.{name}", getattr(message, name))


def _times(v: val.Violations, field: str, message: Any) -> tuple[datetime, datetime]:
    # Placeholders keep the row well-typed; the violations stop the call before it is used.
    created = _stamp(v, field, message, "created_at") or datetime.min
    updated = _stamp(v, field, message, "updated_at") or datetime.min
    return created, updated


def _user(v: val.Violations, field: str, p: resources_pb2.User) -> tuple[str, User]:
    val.check_id(v, f"{field}.user_id", p.user_id)
    for name in ("email", "first_name", "last_name"):
        val.check_text(v, f"{field}.{name}", getattr(p, name))
    metadata = meta.metadata(v, f"{field}.metadata", p.metadata)
    created, updated = _times(v, field, p)
    user = User(p.user_id, p.email, p.first_name, p.last_name, metadata, created, updated, 0)
    return field, user


def _session(v: val.Violations, field: str, p: resources_pb2.Session) -> tuple[str, Session]:
    val.check_id(v, f"{field}.session_id", p.session_id)
    val.check_id(v, f"{field}.user_id", p.user_id, required=False)
    if not 0 <= p.next_sequence <= MAX_SEQUENCE + 1:
        v.add(
            f"{field}.next_sequence",
            f"must be between 0 and 2^53 + 1 (got {p.next_sequence})",
        )
    metadata = meta.metadata(v, f"{field}.metadata", p.metadata)
    created, updated = _times(v, field, p)
    session = Session(
        session_id=p.session_id,
        user_id=p.user_id or None,
        metadata=metadata,
        created_at=created,
        updated_at=updated,
        deleted_at=_stamp(v, field, p, "deleted_at", required=False),
        message_count=0,
        last_message_at=_stamp(v, field, p, "last_message_at", required=False),
        next_sequence=p.next_sequence,
    )
    return field, session


def _message(v: val.Violations, field: str, p: ss.ExportedMessage) -> tuple[str, Message]:
    m = p.message
    val.check_id(v, f"{field}.session_id", p.session_id)
    uuid = val.message_uuid(v, f"{field}.message.uuid", m.uuid)
    if not 1 <= m.sequence <= MAX_SEQUENCE:
        v.add(f"{field}.message.sequence", f"must be between 1 and 2^53 (got {m.sequence})")
    val.check_text(v, f"{field}.message.role", m.role)
    role_type = val.role_type(v, f"{field}.message.role_type", m.role_type)
    val.check_content(v, f"{field}.message.content", m.content)
    metadata = meta.metadata(v, f"{field}.message.metadata", m.metadata)
    created, updated = _times(v, f"{field}.message", m)
    message = Message(
        uuid=uuid,
        session_id=p.session_id,
        sequence=m.sequence,
        role=m.role,
        role_type=role_type,
        content=m.content,
        metadata=metadata,
        created_at=created,
        updated_at=updated,
        deleted_at=_stamp(v, f"{field}.message", m, "deleted_at", required=False),
    )
    return field, message

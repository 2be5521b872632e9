"""Domain objects -> Zep's JSON shapes (the fields Zep's SDK models read, plus memstore's)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from server.domain import (
    Message,
    SearchResult,
    Session,
    User,
    UserRecord,
    decode_stored_json,
    from_micros,
)


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, to the microsecond, as Zep's Go server writes them."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def user(u: User) -> dict[str, Any]:
    """A User as Zep's `User` model."""
    return {
        "user_id": u.user_id,
        "email": u.email,
        "first_name": u.first_name,
        "last_name": u.last_name,
        "metadata": u.metadata,
        "created_at": timestamp(u.created_at),
        "updated_at": timestamp(u.updated_at),
        "session_count": u.session_count,
    }


def user_record(record: UserRecord) -> dict[str, Any]:
    """A UserRecord (the listing's plain tuple) as Zep's `User` model."""
    user_id, email, first_name, last_name, metadata, created, updated, sessions = record
    return {
        "user_id": user_id,
        "email": email,
        "first_name": first_name,
        "last_name": last_name,
        "metadata": decode_stored_json(metadata),
        "created_at": timestamp(from_micros(created)),
        "updated_at": timestamp(from_micros(updated)),
        "session_count": sessions,
    }


def session(s: Session) -> dict[str, Any]:
    """A Session as Zep's `Session` model, plus message_count and last_message_at."""
    return {
        "session_id": s.session_id,
        "user_id": s.user_id,
        "metadata": s.metadata,
        "created_at": timestamp(s.created_at),
        "updated_at": timestamp(s.updated_at),
        "deleted_at": timestamp(s.deleted_at),
        "message_count": s.message_count,
        "last_message_at": timestamp(s.last_message_at),
    }


def message(m: Message) -> dict[str, Any]:
    """A Message as Zep's `Message` model (token_count is always 0: memstore counts none)."""
    return {
        "uuid": m.uuid,
        "role": m.role,
        "role_type": m.role_type,
        "content": m.content,
        "metadata": m.metadata,
        "created_at": timestamp(m.created_at),
        "updated_at": timestamp(m.updated_at),
        "token_count": 0,
    }


def search_result(r: SearchResult) -> dict[str, Any]:
    """A search hit as Zep's `SessionSearchResult` / `MemorySearchResult`, plus user_id."""
    return {
        "message": message(r.message),
        "session_id": r.message.session_id,
        "user_id": r.user_id,
        "score": r.score,
        # Zep's 1.x MemorySearchResult names it `dist`.
        "dist": r.score,
        "metadata": {},
        "summary": None,
    }

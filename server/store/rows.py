"""Rows (psycopg dict rows) to the frozen domain dataclasses."""

from __future__ import annotations

from typing import Any

from server.domain import Message, SearchResult, Session, User

Row = dict[str, Any]


def user(row: Row) -> User:
    """A users row with its session_count."""
    return User(
        user_id=row["user_id"],
        email=row["email"],
        first_name=row["first_name"],
        last_name=row["last_name"],
        metadata=row["metadata"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        session_count=int(row["session_count"]),
    )


def session(row: Row) -> Session:
    """A sessions row."""
    return Session(
        session_id=row["session_id"],
        user_id=row["user_id"],
        metadata=row["metadata"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        deleted_at=row["deleted_at"],
        message_count=int(row["message_count"]),
        last_message_at=row["last_message_at"],
        next_sequence=int(row.get("next_sequence") or 0),
    )


def message(row: Row, prefix: str = "") -> Message:
    """A messages row; `prefix` strips the alias of a row joined to its session (m_)."""
    return Message(
        uuid=str(row[prefix + "uuid"]),
        session_id=row["session_id"],
        sequence=int(row[prefix + "sequence"]),
        role=row[prefix + "role"],
        role_type=row[prefix + "role_type"],
        content=row[prefix + "content"],
        metadata=row[prefix + "metadata"],
        created_at=row[prefix + "created_at"],
        updated_at=row[prefix + "updated_at"],
        deleted_at=row.get(prefix + "deleted_at"),
    )


def search_result(row: Row) -> SearchResult:
    """A found message (a ranking statement's row, search_* or recall's), scored."""
    return SearchResult(message=message(row), user_id=row["user_id"], score=row["score"])


def joined_messages(rows: list[Row]) -> list[Message]:
    """The messages of rows that LEFT JOIN a session to its messages (none when m_uuid is NULL)."""
    return [message(r, "m_") for r in rows if r["m_uuid"] is not None]

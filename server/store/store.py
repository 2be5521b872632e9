"""Store: async methods over a psycopg connection pool, returning domain objects.

CONTRACT (filled in by the store implementation; signatures are fixed):
every method takes the project id first, raises only server.errors domain
errors (NotFound, AlreadyExists, FailedPrecondition, Unavailable, ...), and
never lets a psycopg exception escape.
"""

from __future__ import annotations

from datetime import timedelta

from psycopg_pool import AsyncConnectionPool

from server.domain import (
    DeletedCounts,
    Message,
    MetadataChange,
    NewMessage,
    Page,
    PurgeReport,
    Session,
    SessionQuery,
    TimeKey,
    User,
    UserChanges,
)


class Store:
    """All reads and writes of users, sessions and messages."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @classmethod
    async def open(
        cls, conninfo: str, *, min_size: int = 2, max_size: int = 10, timeout: float = 5.0
    ) -> Store:
        """Opens a pool (waiting until it is ready) and returns a store over it.

        Raises:
            Unavailable: the database cannot be reached within `timeout`.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Closes the pool."""
        raise NotImplementedError

    async def migrate(self) -> list[str]:
        """Applies pending migrations under an advisory lock; returns the names applied."""
        raise NotImplementedError

    async def token_key(self) -> bytes:
        """The page-token HMAC key shared by every worker, created once and kept in the database."""
        raise NotImplementedError

    # -- users -----------------------------------------------------------------

    async def create_user(
        self,
        project_id: int,
        user_id: str,
        email: str,
        first_name: str,
        last_name: str,
        metadata: dict[str, object],
    ) -> User:
        """Raises: AlreadyExists."""
        raise NotImplementedError

    async def get_user(self, project_id: int, user_id: str) -> User:
        """Raises: NotFound."""
        raise NotImplementedError

    async def update_user(self, project_id: int, user_id: str, changes: UserChanges) -> User:
        """One UPDATE; metadata merged in SQL (memstore_merge_patch). Raises: NotFound."""
        raise NotImplementedError

    async def delete_user(self, project_id: int, user_id: str) -> DeletedCounts:
        """Hard-deletes the user, its sessions and messages in one transaction. Raises: NotFound."""
        raise NotImplementedError

    async def list_users(self, project_id: int, after: TimeKey | None, limit: int) -> Page[User]:
        """Users ordered by (created_at, user_id) strictly after `after`."""
        raise NotImplementedError

    async def list_user_sessions(
        self, project_id: int, user_id: str, after: TimeKey | None, limit: int
    ) -> Page[Session]:
        """Live sessions of a user by (created_at, session_id). Raises: NotFound (no such user)."""
        raise NotImplementedError

    # -- sessions --------------------------------------------------------------

    async def create_session(
        self, project_id: int, session_id: str, user_id: str | None, metadata: dict[str, object]
    ) -> Session:
        """Raises: AlreadyExists (message says when soft-deleted), FailedPrecondition (no user)."""
        raise NotImplementedError

    async def get_session(self, project_id: int, session_id: str, show_deleted: bool) -> Session:
        """Raises: NotFound."""
        raise NotImplementedError

    async def update_session(
        self, project_id: int, session_id: str, change: MetadataChange
    ) -> Session:
        """Raises: NotFound (absent or soft-deleted)."""
        raise NotImplementedError

    async def delete_session(self, project_id: int, session_id: str) -> int:
        """Soft-deletes the session and its live messages; returns how many. Raises: NotFound."""
        raise NotImplementedError

    async def undelete_session(self, project_id: int, session_id: str) -> Session:
        """Raises: NotFound, FailedPrecondition (not deleted)."""
        raise NotImplementedError

    async def list_sessions(
        self,
        project_id: int,
        query: SessionQuery,
        after: TimeKey | None,
        offset: int | None,
        limit: int,
    ) -> Page[Session]:
        """Keyset page (after) or OFFSET page (offset); total_size always set."""
        raise NotImplementedError

    # -- memory ----------------------------------------------------------------

    async def add_memory(
        self, project_id: int, session_id: str, user_id: str | None, messages: list[NewMessage]
    ) -> tuple[Session, list[Message]]:
        """Upserts the session (undeleting it) and appends messages in one transaction.

        Raises: FailedPrecondition (unknown user, or another user's session).
        """
        raise NotImplementedError

    async def get_memory(
        self, project_id: int, session_id: str, lastn: int
    ) -> tuple[Session | None, list[Message]]:
        """The live session (None if absent/deleted) and its last `lastn` live messages, oldest first."""
        raise NotImplementedError

    async def list_messages(
        self, project_id: int, session_id: str, after_sequence: int | None, limit: int
    ) -> Page[Message]:
        """Live messages by sequence. Raises: NotFound (session absent or deleted)."""
        raise NotImplementedError

    async def get_message(self, project_id: int, session_id: str, uuid: str) -> Message:
        """Raises: NotFound."""
        raise NotImplementedError

    async def update_message(
        self, project_id: int, session_id: str, uuid: str, change: MetadataChange
    ) -> Message:
        """Raises: NotFound."""
        raise NotImplementedError

    async def clear_memory(self, project_id: int, session_id: str) -> int:
        """Soft-deletes the live messages, keeps the session. Raises: NotFound."""
        raise NotImplementedError

    async def purge(self, retention: timedelta, batch_size: int = 1000) -> PurgeReport:
        """Hard-deletes soft-deleted sessions and messages older than `retention`, in batches."""
        raise NotImplementedError

"""The Store's methods on the database as a whole: ping, migrations, the token key, the purge."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from server.domain import PurgeReport
from server.errors import Unavailable
from server.store.base import StoreBase
from server.store.db import fetch_one
from server.store.migrate import apply_migrations
from server.store.queries import query


class AdminMethods(StoreBase):
    """What the process and operators run on the database, outside any one project's rows."""

    async def ping(self) -> None:
        """One round trip; finding the database gone marks it down (see on_database_change).

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            await conn.execute(query("ping"))

    async def migrate(self) -> list[str]:
        """Applies pending migrations under an advisory lock; returns the names applied.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            await conn.set_autocommit(True)
            # A migration may rewrite a large table: the per-call statement timeout is not
            # meant for it (RESET goes back to the connection's own default afterwards).
            await conn.execute(query("no_statement_timeout"))
            try:
                applied = await apply_migrations(conn)
            finally:
                await conn.execute(query("reset_statement_timeout"))
                await conn.set_autocommit(False)
        await self.check_vectors()
        return applied

    async def check_vectors(self) -> bool:
        """Looks again whether the vector tables exist; remembers and returns the answer.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "vectors_ready", {})
        self.vectors = bool(row and row["ready"])
        self.citus = bool(row and row["citus"])
        return self.vectors

    async def token_key(self) -> bytes:
        """The page-token HMAC key shared by every worker, created once and kept in the database.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = {"candidate": secrets.token_bytes(32)}
        async with self._connect(single=True) as conn:
            # A worker that loses the insert race may not see the winner's row in the same
            # statement's snapshot; the next statement does.
            for _ in range(3):
                row = await fetch_one(conn, "token_key", params)
                if row is not None:
                    return bytes(row["value"])
        raise Unavailable("database unavailable: cannot read the page-token key")

    async def purge(self, retention: timedelta, batch_size: int = 1000) -> PurgeReport:
        """Hard-deletes soft-deleted sessions and messages older than `retention`, in batches.

        Each batch is its own short transaction, so the purge never holds locks for long.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "purge_cutoff", {"retention": retention})
        assert row is not None
        params = {"cutoff": row["cutoff"], "batch_size": batch_size}
        # Messages first: most expired messages belong to live sessions (ClearMemory).
        names = (
            ("purge_messages_citus", "purge_sessions_citus")
            if self.citus
            else ("purge_messages", "purge_sessions")
        )
        messages, _, message_batches = await self._purge_batches(names[0], params)
        sessions, cascaded, session_batches = await self._purge_batches(names[1], params)
        return PurgeReport(
            sessions=sessions,
            messages=messages + cascaded,
            batches=message_batches + session_batches,
            details={"messages": messages, "sessions": sessions, "session_messages": cascaded},
        )

    async def _purge_batches(self, name: str, params: dict[str, Any]) -> tuple[int, int, int]:
        # Short transactions, one per batch, until a batch comes back short.
        rows_, others, batches = 0, 0, 0
        while True:
            async with self._connect(single=True) as conn:
                row = await fetch_one(conn, name, params)
            done = int(row["n"]) if row else 0
            rows_ += done
            others += int(row["others"]) if row else 0
            batches += done > 0
            if done < params["batch_size"]:
                return rows_, others, batches

"""The Store's methods on the database as a whole: ping, migrations, the token key, the purge."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any

from server.domain import BackupSource, PurgeReport
from server.errors import FailedPrecondition, Unavailable
from server.store.base import StoreBase, statement_timeout_off
from server.store.db import fetch_all, fetch_one
from server.store.migrate import apply_migrations, missing_migrations
from server.store.queries import query


class AdminMethods(StoreBase):
    """What the process and operators run on the database, outside any one project's rows."""

    async def ping(self, answer_within: float | None = None) -> None:
        """One round trip; finding the database gone marks it down (see on_database_change).

        `answer_within`: seconds the database has to answer once the ping holds a pooled
        connection; past them it is marked down too. A server that stops answering without
        closing its connections (a hung primary, a network partition) was found by nothing:
        health said SERVING while every call timed out. The wait for a connection is not
        bounded by it: a pool busy with calls is no outage.

        Raises:
            Unavailable: the database cannot be reached, or did not answer in time.
        """
        async with self._connect() as conn:
            if answer_within is None:
                await conn.execute(query("ping"))
                return
            pinged = asyncio.ensure_future(conn.execute(query("ping")))
            await asyncio.wait((pinged,), timeout=answer_within)
            if pinged.done():
                pinged.result()
                return
            self._health.report_lost_connection(
                f"PostgreSQL did not answer a ping within {answer_within:g}s"
            )
            # psycopg asks the server to cancel, then closes the connection if it still does
            # not answer (seconds): the pool then drops it.
            pinged.cancel()
            await asyncio.wait((pinged,))
            raise Unavailable(f"database unavailable: no answer within {answer_within:g}s")

    async def migrate(self) -> list[str]:
        """Applies pending migrations under an advisory lock; returns the names applied.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            await conn.set_autocommit(True)
            # A migration may rewrite a large table: the per-call statement timeout is not
            # meant for it (RESET goes back to the connection's own default afterwards).
            await statement_timeout_off(conn, True)
            try:
                applied = await apply_migrations(conn)
            finally:
                await statement_timeout_off(conn, False)
                await conn.set_autocommit(False)
        await self.check_vectors()
        return applied

    async def require_migrated(self) -> None:
        """Checks, changing nothing, that the database holds this memstore's migrations (but
        those waiting for pgvector), then reads what they made (check_vectors). For the
        one-shot commands (purge, reindex, projects, keys): a newer one, run from a cron job
        against older servers, migrated under them (an audit).

        Raises:
            FailedPrecondition: migrations are missing (reason NOT_MIGRATED), naming them.
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            missing = await missing_migrations(conn)
        if missing:
            raise FailedPrecondition(
                f"the database lacks this memstore's migrations ({', '.join(missing)}): run "
                "`memstore migrate`, or start a server of this version, first (stop servers "
                "of an older version before: README)",
                reason="NOT_MIGRATED",
            )
        await self.check_vectors()

    async def check_vectors(self) -> bool:
        """Looks again whether the vector tables exist; remembers and returns the answer.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "vectors_ready", {})
        self.vectors = bool(row and row["ready"])
        self.word_recall = bool(row and row["word_recall"]) and not self.vectors
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

    async def get_backup_source(self, project_id: int) -> BackupSource:
        """The project's name, and an id of the project in this database that a backup
        records, so that resuming it elsewhere is refused.

        The id is an HMAC of the project's number under the page-token key this database
        keeps (made at random once per database, whatever MEMSTORE_TOKEN_KEY says): every
        worker and replica answers the same, another project or database another, and
        neither the number nor the key can be read from it.

        Raises:
            Unavailable: the database cannot be reached.
        """
        key = await self.token_key()
        async with self._connect() as conn:
            row = await fetch_one(conn, "get_backup_source", {"project_id": project_id})
        assert row is not None  # the caller's key names it, or it is the default
        tag = hmac.new(key, b"memstore backup source %d" % project_id, hashlib.sha256)
        return BackupSource(project=str(row["name"]), source_id=tag.hexdigest()[:32])

    async def purge(self, retention: timedelta, batch_size: int = 1000) -> PurgeReport:
        """Hard-deletes soft-deleted sessions and messages older than `retention`, in batches.

        Each batch is its own short transaction (on Citus, each shard's part of a batch),
        skipping rows a write holds, so the purge never holds locks for long nor waits.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "purge_cutoff", {"retention": retention})
        assert row is not None
        params = {"cutoff": row["cutoff"], "batch_size": batch_size}
        # Messages first: most expired messages belong to live sessions (ClearMemory).
        if self.citus:
            messages, _, message_batches = await self._purge_by_shard(
                "purge_pick_messages_citus", "purge_messages_in_shard", params
            )
            sessions, cascaded, session_batches = await self._purge_by_shard(
                "purge_pick_sessions_citus", "purge_sessions_in_shard", params
            )
        else:
            messages, _, message_batches = await self._purge_batches("purge_messages", params)
            sessions, cascaded, session_batches = await self._purge_batches(
                "purge_sessions", params
            )
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

    async def _purge_by_shard(
        self, pick: str, purge: str, params: dict[str, Any]
    ) -> tuple[int, int, int]:
        # Citus locks no rows of a multi-shard SELECT, and a multi-shard DELETE waits for the
        # rows a write holds while holding its own until its two-phase commit: writes then
        # waited for whole batches (tests/reliability/test_purge.py). So each batch is picked
        # over all shards without locks, then purged one shard at a time, each shard's part
        # its own single-shard transaction that skips locked rows, as on plain PostgreSQL.
        # A batch picked short, or one that purged nothing (all held), is the last.
        rows_, others, batches = 0, 0, 0
        while True:
            async with self._connect(single=True) as conn:
                groups = await fetch_all(conn, pick, params)
            picked, done = 0, 0
            for group in groups:
                # Each shard's part purges at most what was picked there: a batch stays
                # within batch_size rows.
                part = {**params, "session_ids": group["session_ids"]}
                part["batch_size"] = int(group["picked"])
                async with self._connect(single=True) as conn:
                    row = await fetch_one(conn, purge, part)
                picked += int(group["picked"])
                done += int(row["n"]) if row else 0
                others += int(row["others"]) if row else 0
            rows_ += done
            batches += done > 0
            if picked < params["batch_size"] or done == 0:
                return rows_, others, batches

"""The Store's purge: expired soft-deleted rows hard-deleted in batches, one purge at a time per
database, and at most one periodic purge per interval across all its processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from server.domain import PurgeReport, PurgeSkip
from server.store.base import StoreBase
from server.store.db import fetch_all, fetch_one
from server.store.queries import query

log = logging.getLogger(__name__)

#: Seconds between the tries of a purge that waits for another process's to end (Store.purge).
TURN_POLL_SECONDS = 1.0

Conn = AsyncConnection[Any]


class PurgeMethods(StoreBase):
    """The purge of soft-deleted rows past their retention: on demand and periodic."""

    async def purge(self, retention: timedelta, batch_size: int = 1000) -> PurgeReport:
        """Hard-deletes soft-deleted sessions and messages older than `retention`, in batches
        (`memstore purge`).

        Each batch is its own short transaction (on Citus, each shard's part of a batch),
        skipping rows a write holds, so the purge never holds locks for long nor waits. One
        purge runs at a time per database: this one waits for another process's to end, then
        runs whatever ran before it; periodic purges (purge_if_due) count it as theirs.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._purge_turn(wait=True) as conn:
            assert conn is not None
            await conn.execute(query("record_purge_start"))
            return await self._purge_on(conn, retention, batch_size)

    async def purge_if_due(
        self, retention: timedelta, due_after: float, batch_size: int = 1000
    ) -> PurgeReport | PurgeSkip:
        """The periodic purge: as purge(), unless another process's purge is running
        ("other_holder") or one started less than `due_after` seconds ago ("recent"), by the
        database's clock, whichever process ran it. So when every worker of every replica of
        a database calls this once an interval, one of them purges, and another does once
        it stops.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._purge_turn(wait=False) as conn:
            if conn is None:
                return "other_holder"
            last = await fetch_one(conn, "last_purge_started", {})
            if last is not None and last["seconds_ago"] < due_after:
                return "recent"
            await conn.execute(query("record_purge_start"))
            return await self._purge_on(conn, retention, batch_size)

    @asynccontextmanager
    async def _purge_turn(self, *, wait: bool) -> AsyncIterator[Conn | None]:
        """A pooled connection holding the database's purge lock (None, without `wait`, when
        another session holds it), on which the whole purge runs.

        A session's lock, not a transaction's: the purge is many short transactions, each
        batch its own, all run on this connection in autocommit as before.
        """
        async with self._connect(single=True) as conn:
            said = False
            while not await _try_lock(conn):
                if not wait:
                    yield None
                    return
                if not said:
                    log.warning("waiting for another process's purge of this database to end")
                    said = True
                await asyncio.sleep(TURN_POLL_SECONDS)
            try:
                yield conn
            finally:
                await _release(conn)

    async def _purge_on(self, conn: Conn, retention: timedelta, batch_size: int) -> PurgeReport:
        row = await fetch_one(conn, "purge_cutoff", {"retention": retention})
        assert row is not None
        params = {"cutoff": row["cutoff"], "batch_size": batch_size}
        # Messages first: most expired messages belong to live sessions (ClearMemory).
        if self.citus:
            messages, _, message_batches = await _purge_by_shard(
                conn, "purge_pick_messages_citus", "purge_messages_in_shard", params
            )
            sessions, cascaded, session_batches = await _purge_by_shard(
                conn, "purge_pick_sessions_citus", "purge_sessions_in_shard", params
            )
        else:
            messages, _, message_batches = await _purge_batches(conn, "purge_messages", params)
            sessions, cascaded, session_batches = await _purge_batches(
                conn, "purge_sessions", params
            )
        return PurgeReport(
            sessions=sessions,
            messages=messages + cascaded,
            batches=message_batches + session_batches,
            details={"messages": messages, "sessions": sessions, "session_messages": cascaded},
        )


async def _try_lock(conn: Conn) -> bool:
    row = await fetch_one(conn, "try_lock_purge", {})
    return bool(row and row["locked"])


async def _release(conn: Conn) -> None:
    """Gives the purge's lock back; a connection that cannot (broken, or left inside a
    statement by a cancel) is closed instead, which ends its session and the lock with it.
    Returned to the pool still holding the lock, it would keep every process's purge of the
    database from running until the pool closed it."""
    released = False
    try:
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                await conn.execute(query("unlock_purge"))
                released = True
    finally:
        if not released:
            await conn.close()


async def _purge_batches(conn: Conn, name: str, params: dict[str, Any]) -> tuple[int, int, int]:
    # Short transactions, one per batch (autocommit), until a batch comes back short.
    rows_, others, batches = 0, 0, 0
    while True:
        row = await fetch_one(conn, name, params)
        done = int(row["n"]) if row else 0
        rows_ += done
        others += int(row["others"]) if row else 0
        batches += done > 0
        if done < params["batch_size"]:
            return rows_, others, batches


async def _purge_by_shard(
    conn: Conn, pick: str, purge: str, params: dict[str, Any]
) -> tuple[int, int, int]:
    # Citus locks no rows of a multi-shard SELECT, and a multi-shard DELETE waits for the
    # rows a write holds while holding its own until its two-phase commit: writes then
    # waited for whole batches (tests/reliability/test_purge.py). So each batch is picked
    # over all shards without locks, then purged one shard at a time, each shard's part
    # its own single-shard transaction that skips locked rows, as on plain PostgreSQL.
    # A batch picked short, or one that purged nothing (all held), is the last.
    rows_, others, batches = 0, 0, 0
    while True:
        groups = await fetch_all(conn, pick, params)
        picked, done = 0, 0
        for group in groups:
            # Each shard's part purges at most what was picked there: a batch stays
            # within batch_size rows.
            part = {**params, "session_ids": group["session_ids"]}
            part["batch_size"] = int(group["picked"])
            row = await fetch_one(conn, purge, part)
            picked += int(group["picked"])
            done += int(row["n"]) if row else 0
            others += int(row["others"]) if row else 0
        rows_ += done
        batches += done > 0
        if picked < params["batch_size"] or done == 0:
            return rows_, others, batches

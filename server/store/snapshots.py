"""Snapshots held for a backup's reads: BackupService.OpenSnapshot and CloseSnapshot.

A backup reads users, sessions and messages in three streams, each in batches of short
transactions. Read as they are, a project written meanwhile could give a backup that does not
restore (a session whose user was made after the users were read). A held snapshot makes every
batch see the database as it was at one moment: PostgreSQL's exported snapshots
(`pg_export_snapshot`, which pg_dump's parallel workers share the same way), held by a
transaction of a connection of its own and imported by each batch (`StoreBase._connect`'s
`snapshot`), from any memstore process of the database.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from datetime import datetime
from functools import cached_property
from typing import Any, cast

import psycopg
from psycopg import AsyncConnection, IsolationLevel

from server.errors import FailedPrecondition, ResourceExhausted
from server.store.base import StoreBase, holder_gone, holder_label, snapshot_label
from server.store.db import fetch_all, fetch_one
from server.store.translate import translated

log = logging.getLogger(__name__)

#: Snapshots one process holds at once for one project, each on a database connection of
#: its own (outside the pool): a backup holds one for its length, so a few are plenty, and a
#: caller opening them in a loop cannot take the database's connections.
MAX_HELD_SNAPSHOTS = 8
#: Snapshots one process holds at once for all projects: one project's backups never
#: refused another's (a shared 8 did, for up to a day), and many cannot take the database.
MAX_HELD_SNAPSHOTS_ALL = 32

#: How long a close waits for the backend holding the snapshot to have ended, in ms, so that
#: a read after the close never finds the snapshot held. It ends in about a millisecond.
CLOSE_WAIT_MS = 2000


class SnapshotMethods(StoreBase):
    """Opening and closing held snapshots (the export methods import them)."""

    @cached_property
    def _held(self) -> dict[tuple[int, str], AsyncConnection[Any]]:
        # The connections of the snapshots this process holds, by project and id.
        return {}

    async def open_snapshot(self, project_id: int, hold_seconds: int) -> tuple[str, datetime]:
        """Exports a snapshot of the database, held for at most `hold_seconds`; returns its
        id (PostgreSQL's, a dot and a random nonce: PostgreSQL's alone come again after a
        restart) and when it is released at the latest.

        Raises:
            FailedPrecondition: (SNAPSHOT_UNSUPPORTED) the database is a Citus cluster.
            ResourceExhausted: (TOO_MANY_SNAPSHOTS) this process holds MAX_HELD_SNAPSHOTS.
            Unavailable: the database cannot be reached.
        """
        if self.citus:
            raise FailedPrecondition(
                "this database is a Citus cluster, which holds no snapshot across its nodes:"
                " back up while nothing writes to the project",
                reason="SNAPSHOT_UNSUPPORTED",
            )
        await self._make_room(project_id)
        with translated():
            # Not a pooled connection: it stays idle in its transaction for the hold.
            # Store.open gives the pool its options as a dict.
            options = cast(dict[str, Any], self._pool.kwargs)
            conn = await AsyncConnection.connect(
                str(self._pool.conninfo),
                connect_timeout=max(1, round(self._pool.timeout)),
                **options,
            )
            try:
                await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
                await conn.set_read_only(True)
                nonce = secrets.token_hex(8)
                params = {
                    "hold_ms": hold_seconds * 1000,
                    "label": holder_label(project_id, nonce),
                }
                row = await fetch_one(conn, "open_snapshot", params)
            except BaseException:
                await conn.close()
                raise
        assert row is not None  # one row of one exported snapshot
        snapshot = f"{row['snapshot']}.{nonce}"
        self._held[project_id, snapshot] = conn
        return snapshot, row["expires_at"]

    async def close_snapshot(self, project_id: int, snapshot: str) -> bool:
        """Releases a snapshot of `project_id` held by this process or another; False when it
        was gone already.

        Raises:
            Unavailable: the database cannot be reached.
        """
        # Ended by the database whichever process holds it: only the database knows whether
        # it still does (a connection PostgreSQL closed looks open until it is used).
        label = snapshot_label(project_id, snapshot)
        try:
            async with self._connect(single=True) as pooled:
                found = await fetch_all(pooled, "close_snapshot", {"label": label})
                await self._drop_holder(project_id, snapshot)  # mine: it ends at once
                ended = not found or await holder_gone(pooled, label, CLOSE_WAIT_MS / 1000)
        finally:
            # Even when the wait was cut short (the call's deadline): the signal went.
            await self._drop_holder(project_id, snapshot)
        if not ended:
            # Signalled but not ended within the wait: counted closed, but a read just after
            # may still find it held.
            log.warning(
                "closing snapshot %s: its holder had not ended after %d ms", snapshot, CLOSE_WAIT_MS
            )
        return bool(found)

    async def _drop_holder(self, project_id: int, snapshot: str) -> None:
        # Closes this process's connection holding `snapshot`, if it holds it.
        conn = self._held.pop((project_id, snapshot), None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def close_held_snapshots(self) -> None:
        """Releases every snapshot this process holds (the store is closing)."""
        for project_id, snapshot in list(self._held):
            await self._drop_holder(project_id, snapshot)

    async def _make_room(self, project_id: int) -> None:
        # Each held snapshot is a database connection: past a limit, first forget those
        # PostgreSQL has ended (their hold passed), which only the database knows.
        if not self._full(project_id):
            return
        async with self._connect(single=True) as pooled:
            found = await fetch_all(pooled, "held_snapshots", {})
        alive = {str(row["application_name"]) for row in found}
        for project, snapshot in list(self._held):
            if snapshot_label(project, snapshot) not in alive:
                await self._drop_holder(project, snapshot)
        if full := self._full(project_id):
            raise ResourceExhausted(full, reason="TOO_MANY_SNAPSHOTS")

    def _full(self, project_id: int) -> str:
        # Why no other snapshot can be held now; empty when one can.
        mine = sum(project == project_id for project, _ in self._held)
        if mine >= MAX_HELD_SNAPSHOTS:
            return (
                f"this server process holds {mine} snapshots of this project, the most it"
                " holds at once; close one (CloseSnapshot) or wait for one to expire"
            )
        if len(self._held) >= MAX_HELD_SNAPSHOTS_ALL:
            # Nothing of other projects said (how many they hold): only that this process
            # is full, which a retry elsewhere or later gets past.
            return (
                "this server process holds as many snapshots as it holds at once; retry"
                " later, or on another server process"
            )
        return ""

"""Whether PostgreSQL answers: calls fail fast while it is down; the pool heals on its return."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

#: Told False when the database is found down and True when it answers again.
Listener = Callable[[bool], Awaitable[None]]


class DatabaseHealth:
    """Set down by a lost connection; a background probe sets it up again.

    Without it, every pooled connection that the server closed (a restart, a
    crash, a failover) would fail one call each after the database is back,
    and calls made while it is down would wait for the pool's timeout.
    """

    def __init__(
        self, pool: AsyncConnectionPool, conninfo: str, *, probe_interval: float = 0.25
    ) -> None:
        self._pool = pool
        self._conninfo = conninfo
        self._probe_interval = probe_interval
        self._probe: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._listeners: list[Listener] = []

    @property
    def down(self) -> bool:
        """True from a lost connection until the probe reaches the database again."""
        return self._probe is not None and not self._probe.done()

    def down_for(self) -> float:
        """Seconds since the database was found unreachable."""
        return time.monotonic() - self._down_since

    def add_listener(self, listener: Listener) -> None:
        """Calls `listener(False)` when the database goes down and `listener(True)` on return."""
        self._listeners.append(listener)

    def report_lost_connection(self) -> None:
        """Marks the database down and starts probing for its return (once)."""
        if self.down:
            return
        self._down_since = time.monotonic()
        log.warning("lost a database connection; probing until PostgreSQL answers again")
        self._probe = asyncio.get_running_loop().create_task(self._wait_for_return())

    async def _wait_for_return(self) -> None:
        await self._notify(up=False)
        while True:
            try:
                conn = await AsyncConnection.connect(self._conninfo, connect_timeout=2)
                await conn.close()
                break
            except psycopg.Error:
                await asyncio.sleep(self._probe_interval)
        # The pool may still hold connections the server closed: test them all now rather
        # than failing one call per stale connection.
        await self._pool.check()
        log.warning("PostgreSQL answers again after %.1fs", self.down_for())
        await self._notify(up=True)

    async def _notify(self, *, up: bool) -> None:
        for listener in self._listeners:
            try:
                await listener(up)
            except Exception:
                # A listener's failure must not stop the probe that heals the pool.
                log.exception("database state listener failed")

    async def close(self) -> None:
        """Stops a running probe."""
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe


def is_stale(conn: AsyncConnection[Any]) -> bool:
    """Whether an idle pooled connection is unusable; one syscall, no round trip.

    An idle connection has nothing to read unless the server closed it (or sent
    the FATAL that precedes closing), so readable means stale.
    """
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)

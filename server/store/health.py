"""Whether PostgreSQL answers: calls fail fast while it is down; the pool heals on its return."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import select
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from server.errors import Unavailable

log = logging.getLogger(__name__)

#: Told False when the database is found down and True when it answers again.
Listener = Callable[[bool], Awaitable[None]]


class DatabaseHealth:
    """Set down by a lost connection; a background probe sets it up again.

    Without it, every pooled connection that the server closed (a restart, a
    crash, a failover) would fail one call each after the database is back,
    and calls made while it is down, or queued for a connection when it went
    down, would wait for the pool's timeout.
    """

    def __init__(
        self, pool: AsyncConnectionPool[Any], conninfo: str, *, probe_interval: float = 0.25
    ) -> None:
        self._pool = pool
        self._conninfo = conninfo
        self._probe_interval = probe_interval
        self._probe: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._listeners: list[Listener] = []
        self._waiters: set[_Waiter] = set()

    @property
    def down(self) -> bool:
        """True from a lost connection until the probe reaches the database again."""
        return self._probe is not None and not self._probe.done()

    def down_for(self) -> float:
        """Seconds since the database was found unreachable."""
        return time.monotonic() - self._down_since

    def waiting_for_connection(self) -> _Waiter:
        """A block that waits for a pooled connection: it ends in Unavailable if the database goes.

        A call queued behind calls that hold every connection would otherwise wait out the
        pool's timeout after those calls found the database gone, although no connection
        comes before it is back. As asyncio.timeout() ends a block at its deadline, the
        waiting task is cancelled and the cancellation turned into Unavailable; a
        cancellation of the caller's own (its deadline) propagates unchanged. The pool
        takes back a connection it was handing over as the wait was cancelled.

        Raises:
            Unavailable: the database is known down, or is found down during the block.
        """
        return _Waiter(self)

    def add_listener(self, listener: Listener) -> None:
        """Calls `listener(False)` when the database goes down and `listener(True)` on return."""
        self._listeners.append(listener)

    def report_lost_connection(self, why: str = "lost a database connection") -> None:
        """Marks the database down and starts probing for its return (once)."""
        if self.down:
            return
        self._down_since = time.monotonic()
        log.warning("%s; probing until PostgreSQL answers again", why)
        # In a context of its own, not a copy of the call's that found the database gone:
        # the probe outlives that call, and its log lines (and the listeners it runs) carried
        # the call's request id, which a client chooses (tests/reliability/test_db_restart.py).
        self._probe = asyncio.get_running_loop().create_task(
            self._wait_for_return(), context=contextvars.Context()
        )
        for waiter in self._waiters:
            waiter.interrupt()

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


class _Waiter:
    """A task's wait for a pooled connection (DatabaseHealth.waiting_for_connection).

    A plain context manager, not a generator: every checkout enters one.
    """

    __slots__ = ("_cancelling", "_health", "_interrupted", "_task")

    def __init__(self, health: DatabaseHealth) -> None:
        self._health = health
        self._interrupted = False

    def __enter__(self) -> None:
        health = self._health
        if health.down:
            raise Unavailable(f"database unavailable for {health.down_for():.1f}s; retry later")
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        # The task's pending cancellations when its wait began (as asyncio.timeout() keeps).
        self._cancelling = task.cancelling()
        health._waiters.add(self)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._health._waiters.discard(self)
        if not self._interrupted:
            return
        # Take back the interruption's cancellation: if the wait ended with a connection as
        # it came (Python 3.11's wait_for then drops the cancellation), the call goes on
        # with it, and nothing is left pending to cancel its statements.
        # A cancellation beyond it is the caller's own (its deadline), and goes on.
        pending = self._task.uncancel()
        if (
            kind is not None
            and issubclass(kind, asyncio.CancelledError)
            and pending <= self._cancelling
        ):
            raise Unavailable(
                "database unavailable: it went away while this call waited for a "
                "connection; nothing was written"
            ) from None

    def interrupt(self) -> None:
        """Ends the wait: the database is down."""
        if not self._interrupted:
            self._interrupted = True
            self._task.cancel()


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

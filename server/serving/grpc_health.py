"""gRPC health that tells the truth: NOT_SERVING while the database is down or the server drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server.api.status import abort
from server.errors import MemstoreError, ResourceExhausted
from server.serving.limit import MAX_CALLS_IN_FLIGHT
from server.store import Store

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: Seconds between the round trips that notice a database outage while no call is made.
PING_INTERVAL = 1.0
#: Seconds the database has to answer a ping (once it holds a connection) before it is taken
#: for down: SELECT 1 waits for no lock, so only a server or network that stopped answering
#: takes this long; the probe then finds its return within a connect timeout (2 s).
PING_ANSWER_SECONDS = 5.0


class DrainingHealth(HealthServicer):  # type: ignore[misc]
    """The standard health servicer, except that Watch streams end when the drain ends.

    A Watch stream never ends by itself, so without this every watcher would hold the
    shutdown for the whole grace period.
    """

    def __init__(self, most_watches: int = MAX_CALLS_IN_FLIGHT, setting: str = "") -> None:
        super().__init__()
        self._watches: set[asyncio.Task[Any]] = set()
        self._ending = False
        #: Watch streams held at once, and what set the number (named in the refusal).
        self._most_watches, self._setting = most_watches, setting

    async def Watch(self, request: Any, context: Any) -> None:
        """Streams the status of a service until the drain ends (then the stream ends OK).

        Past `most_watches` streams at once (--max-calls-in-flight, counted apart from the
        calls so that watchers never crowd calls out) a Watch is refused as overload: they
        need no key and were not counted at all, so a client could make the server hold
        any number of them (an audit).
        """
        if len(self._watches) >= self._most_watches:
            await abort(
                context,
                ResourceExhausted(
                    f"server overloaded: {self._most_watches} health Watch streams are open "
                    f"({self._setting or 'the cap on calls in flight'}); use Check, or retry "
                    "with backoff",
                    reason="SERVER_OVERLOADED",
                ),
            )
        if self._ending:
            # Arrived after the drain ended the others: end at once too, or it alone would
            # hold the shutdown for the whole grace period.
            await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))
            return
        task = asyncio.current_task()
        assert task is not None
        self._watches.add(task)
        try:
            await super().Watch(request, context)
        except asyncio.CancelledError:
            if not self._ending:
                raise
        finally:
            self._watches.discard(task)

    def end_watches(self) -> None:
        """Ends every Watch stream (each has been told NOT_SERVING by then)."""
        self._ending = True
        for task in self._watches:
            task.cancel()


class Readiness:
    """Owns the health statuses of one server.

    The overall status `""` answers "is the process alive": it stays SERVING while the
    database is down, so a liveness probe does not restart a server that will heal by
    itself. Each service's own status answers "can it serve calls now": NOT_SERVING while
    the database is unreachable. Every status turns NOT_SERVING for good when the drain
    before a shutdown starts.
    """

    def __init__(self, health: DrainingHealth, services: Sequence[str]) -> None:
        self._health = health
        self._services = list(services)

    async def start(self, store: Store) -> None:
        """Marks everything SERVING and follows the store's view of the database from now on."""
        for name in ["", *self._services]:
            await self._health.set(name, SERVING)
        store.on_database_change(self.database_changed)

    async def database_changed(self, up: bool) -> None:
        """Sets every service (not the overall status) SERVING or NOT_SERVING."""
        log.info(
            "health: services %s (database %s)",
            "SERVING" if up else "NOT_SERVING",
            "up" if up else "down",
        )
        for name in self._services:
            await self._health.set(name, SERVING if up else NOT_SERVING)

    async def drain(self, delay: float) -> None:
        """Says NOT_SERVING for every status, permanently, for `delay` seconds of serving.

        Then the Watch streams end, so that they do not hold the shutdown that follows.
        """
        await self._health.enter_graceful_shutdown()
        # At least a moment, so that every watcher has been sent NOT_SERVING.
        await asyncio.sleep(max(delay, 0.05))
        self._health.end_watches()


#: The tasks of the calls being handled now (see track_call).
_CALLS: set[asyncio.Task[Any]] = set()


def track_call() -> None:
    """Registers the current task as a call in flight, until it ends (see settle_calls)."""
    task = asyncio.current_task()
    if task is not None:
        _CALLS.add(task)
        task.add_done_callback(_CALLS.discard)


async def settle_calls(seconds: float) -> None:
    """Waits (at most `seconds`) for the calls gRPC cut off at the end of the grace period.

    Each is cancelling its query in PostgreSQL. Closing the pool and ending the event loop
    now would interrupt that: psycopg would only close the connection, and PostgreSQL would
    run the statement on, and commit it once its lock is free, after the caller was told
    the call failed.
    """
    if _CALLS:
        await asyncio.wait(set(_CALLS), timeout=seconds)


async def watch_database(
    store: Store, interval: float = PING_INTERVAL, answer_within: float = PING_ANSWER_SECONDS
) -> None:
    """Pings the database every `interval` seconds, so an outage shows in health without calls.

    Finding it gone, or unanswering for `answer_within` seconds, marks it down (the store
    fails calls fast and tells its listeners); while it is down the store's own probe
    watches for its return, so the ping is skipped.
    """
    while True:
        await asyncio.sleep(interval)
        # Marked down (or already down): the store's probe watches for the return.
        with contextlib.suppress(MemstoreError):
            await store.ping(answer_within)

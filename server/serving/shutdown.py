"""The graceful stop: SIGTERM and SIGINT caught as an event, work that a stop cancels before
it is done, and gRPC's stop ended once only calls nobody will serve are left."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import grpc

#: Seconds a stopping server goes on waiting for calls once none of memstore's is in flight
#: (stop_grpc): a call gRPC hands over as the stop begins reaches its handler in a few turns
#: of the loop; what is left after this is stranded in gRPC's core.
ORPHAN_SECONDS = 1.0


async def until_stopped(
    work: Coroutine[Any, Any, None], stop: asyncio.Event, started: asyncio.Event | None = None
) -> bool:
    """Runs `work`, cancelled if `stop` is set before `started` is (or before it ends, when
    `started` is None); its finally blocks close what it opened. False when cancelled."""
    run = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((run, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not run.done() and (started is None or not started.is_set()):
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        return False
    await run
    return True


async def stop_grpc(server: grpc.aio.Server, grace: float, busy: Callable[[], bool]) -> None:
    """`server.stop(grace)`, ended early once the server holds only calls nobody will serve.

    gRPC's core (1.85) can strand a call that arrives as the stop begins: it checks for the
    stop without its lock, then queues the call for a handler after the stop has failed every
    request for one, where nothing ever takes it or cancels it (the filter-stack
    `RealRequestMatcher::MatchOrQueue` in `src/core/server/server.cc` misses the check of
    `zombified_` that its promise-based `MatchRequest` has). Its caller then waits for its
    deadline (DEADLINE_EXCEEDED) and the stop for the whole grace period, or that deadline.
    So once no call of memstore's nor reflection stream (`busy`) has been in flight for
    ORPHAN_SECONDS, what the core still holds is cancelled (callers get UNAVAILABLE or
    CANCELLED, at once).
    tests/reliability/test_stop_race.py; docs/reliability.md, "Shutdown".
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(server.stop(grace))
    idle_since: float | None = None
    cancelling: asyncio.Future[None] | None = None
    while not stopping.done():
        await asyncio.wait({stopping}, timeout=ORPHAN_SECONDS / 4)
        if busy():
            idle_since = None
            continue
        idle_since = loop.time() if idle_since is None else idle_since
        if cancelling is None and loop.time() - idle_since >= ORPHAN_SECONDS:
            # A smaller grace ends the stop sooner: it cancels what the core still holds.
            cancelling = asyncio.ensure_future(server.stop(0))
    await stopping
    if cancelling is not None:
        await cancelling


async def wait_for_signal() -> None:
    """Returns when the process receives SIGTERM or SIGINT."""
    with caught_signals() as stop:
        await stop.wait()


@contextlib.contextmanager
def caught_signals() -> Iterator[asyncio.Event]:
    """An event SIGTERM and SIGINT set, instead of ending the process, until the block ends."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

"""Coalesces concurrent point reads into one statement: one round trip serves many calls.

Under grpc.aio each awaited database round trip costs the server far more CPU than the
statement itself (docs/performance.md); GetUser calls that arrive while a batch is in flight
therefore wait for the next batch and share its round trip. A call that arrives when fewer
than `max_in_flight` batches are running goes out at the end of the loop's turn when the
store was idle, and a few turns later (`DISPATCH_TURNS`) when a batch has just finished, so
that under load the calls gRPC is already handing over join it. One batch in flight made the
largest batches and the least CPU per call (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from psycopg_pool import TooManyRequests

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Turns of the event loop a batch waits before it goes out while batches are running back
#: to back. A call gRPC hands over takes several turns to reach the store (its request is read,
#: then its handler started), so a batch sent at the end of the turn its first call arrived in
#: (as until 2026-12-01) left the calls arriving with it to the next batch. Once GetMemory's
#: statement stopped being planned at every call, PostgreSQL answered each batch ~1 ms sooner,
#: batches shrank to about one call and the server's CPU per call grew: GetMemory with recall
#: fell to 0.76 of its rate before. 8 turns gave GetUser 1.45x and GetMemory with recall 1.30x
#: the one turn's rate; 16 another 1.03x and 32 no more than 16 (docs/performance.md, "A batch
#: waits a few turns of the loop").
DISPATCH_TURNS = 16
#: A batch waits those turns only when the one before it finished less than this many seconds
#: ago. Waiting always made a call at half load wait too, behind turns made long by the other
#: calls: GetMemory's p50 at half the agent turn's load rose from ~2 ms to 4-10 ms. A call that
#: finds the store idle goes out at the end of its turn, as before.
BUSY_SECONDS = 0.001


class _Pacer:
    """When a batch goes out: at once when idle, `turns` turns later when busy."""

    def __init__(self, turns: int) -> None:
        self._turns = turns
        self._last_finished = float("-inf")

    def finished(self) -> None:
        self._last_finished = asyncio.get_running_loop().time()

    def after(self, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        busy = loop.time() - self._last_finished < BUSY_SECONDS
        _after_turns(self._turns if busy else 1, callback)


#: Looks up a batch of distinct keys; keys absent from the result have no row, and a key
#: given an exception fails its own call with it (the others of the batch are served).
Fetch = Callable[[list[K]], Awaitable[Mapping[K, V | Exception]]]


class Coalescer(Generic[K, V]):
    """Batches `load(key)` calls; each batch is one `fetch` of the distinct keys waiting.

    A Batcher whose run is the fetch: a failed fetch fails every call of its batch, a key
    the fetch answers with an exception only its own.
    """

    def __init__(
        self,
        fetch: Fetch[K, V],
        *,
        max_in_flight: int = 1,
        max_batch: int = 256,
        max_waiting_batches: int = 0,
        turns: int = DISPATCH_TURNS,
    ):
        self._fetch = fetch
        self._batcher: Batcher[K, V | None] = Batcher(
            self._run,
            max_in_flight=max_in_flight,
            max_batch=max_batch,
            max_waiting_batches=max_waiting_batches,
            turns=turns,
        )

    async def load(self, key: K) -> V | None:
        """The value of `key` (None when there is no row), read in a shared batch.

        Raises:
            TooManyRequests: `max_waiting_batches` batches' worth of calls already wait.
            Exception: whatever `fetch` raised for the batch this call was part of.
        """
        return await self._batcher.submit(key)

    async def _run(self, keys: list[K]) -> list[V | Exception | None]:
        found = await self._fetch(list(dict.fromkeys(keys)))
        return [found.get(k) for k in keys]


def _after_turns(turns: int, callback: Callable[[], None]) -> None:
    # `callback` at the end of the `turns`-th turn of the running loop from now (1: this one's).
    loop = asyncio.get_running_loop()
    if turns <= 1:
        loop.call_soon(callback)
    else:
        loop.call_soon(_after_turns, turns - 1, callback)


def _cancel_if_abandoned(
    task: asyncio.Future[None], futures: Sequence[asyncio.Future[Any]]
) -> None:
    # Every caller of the batch gave up (e.g. their deadlines passed): cancel its query too.
    if not task.done() and all(f.cancelled() for f in futures):
        task.cancel()


T = TypeVar("T")
R = TypeVar("R")

#: Runs a batch of items; one outcome per item, in order: its result, or the exception it
#: alone raised.
Run = Callable[[list[T]], Awaitable[list[R | Exception]]]


class Batcher(Generic[T, R]):
    """Batches `submit(item)` calls: each batch is one `run` of the items waiting.

    Every item has an outcome of its own (`run` decides what a failure of one means for the
    others; a `run` that raises fails them all). A batch is cancelled only when every caller
    in it gave up (e.g. their deadlines passed): so a lone write is cancelled with its
    caller, as an unbatched one would be. A caller that gives up while others of its batch
    wait leaves the batch to finish: its write may then commit, as any write whose answer was
    lost. A caller that gives up before its batch starts is left out of it.
    """

    def __init__(
        self,
        run: Run[T, R],
        *,
        max_in_flight: int = 1,
        max_batch: int = 32,
        max_waiting_batches: int = 0,
        turns: int = DISPATCH_TURNS,
    ):
        self._run_batch = run
        self._pacer = _Pacer(turns)
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._max_waiting = max_waiting_batches * max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Future[None]] = set()

    async def submit(self, item: T) -> R:
        """The outcome of `item`, run in a shared batch.

        Raises:
            TooManyRequests: `max_waiting_batches` batches' worth of calls already wait.
            Exception: what `run` gave as this item's outcome, or raised for the batch.
        """
        if self._max_waiting and len(self._waiting) >= self._max_waiting:
            raise TooManyRequests(f"{len(self._waiting)} calls already wait for a batch")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        # At the end of this turn, or a few turns later while busy (_Pacer), so calls that
        # arrive together share a batch.
        if not self._scheduled and self._in_flight < self._max_in_flight and self._waiting:
            self._scheduled = True
            self._pacer.after(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        batch = [(i, f) for i, f in self._waiting[: self._max_batch] if not f.done()]
        del self._waiting[: self._max_batch]
        if batch:
            self._in_flight += 1
            # A context of its own: the batch serves several calls, and a copy of the context
            # of the call that scheduled it gave that call's request id to every line the
            # batch logged, and its deadline (which would lift the statement timeout for all).
            task = asyncio.get_running_loop().create_task(
                self._run(batch), context=contextvars.Context()
            )
            self._tasks.add(task)  # a strong reference: nothing else holds the task
            task.add_done_callback(self._finished)
            futures = [f for _, f in batch]
            for future in futures:
                future.add_done_callback(lambda _f: _cancel_if_abandoned(task, futures))
        self._schedule()

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._pacer.finished()
        self._tasks.discard(task)
        self._in_flight -= 1
        self._schedule()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._run_batch([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue  # the caller gave up meanwhile
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

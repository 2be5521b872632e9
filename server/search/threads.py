"""Daemon threads for the model's blocking calls, which a stopping process does not wait for."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: As many threads as asyncio's default executor starts, which ran the queries' model before.
DEFAULT_SIZE = min(32, (os.cpu_count() or 1) + 4)

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class DaemonThreads:
    """Runs blocking calls on up to `size` daemon threads, each started when a call finds
    none idle; calls beyond `size` wait in turn, as on an executor.

    Not a ThreadPoolExecutor (nor `asyncio.to_thread`, which runs on one): Python joins an
    executor's threads when the process exits, and `asyncio.run` waits for its default
    executor's, so a remote model that never answered held a stopped server's exit until its
    HTTP timeout (30 s), past the grace period that had already ended the call waiting on it
    (tests/reliability/test_embed_worker.py). A daemon thread is left behind instead: what it
    was computing is no longer awaited by anyone.
    """

    def __init__(self, size: int, name: str, on_start: Callable[[], None] | None = None) -> None:
        self._size = size
        self._name = name
        self._on_start = on_start
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by a thread each time it waits
        self._lock = threading.Lock()
        self._started = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, run on one of the threads with the caller's context variables; its
        exception is raised here. Cancelled, the call runs on and its result is dropped."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        call = contextvars.copy_context().run
        self._jobs.put((loop, answer, lambda: call(fn, *args)))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._started < self._size:
                    self._started += 1
                    threading.Thread(
                        target=self._serve, name=f"{self._name}-{self._started}", daemon=True
                    ).start()
        return await answer

    def _serve(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            loop, answer, job = self._jobs.get()
            try:
                result = job()
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                _hand_over(loop, answer, exc, failed=True)
            else:
                _hand_over(loop, answer, result, failed=False)
            self._idle.release()


def _hand_over(
    loop: asyncio.AbstractEventLoop, answer: asyncio.Future[Any], result: Any, *, failed: bool
) -> None:
    def settle() -> None:
        if answer.done():  # its task was cancelled meanwhile (a stop, a deadline)
            return
        if failed:
            answer.set_exception(result)
        else:
            answer.set_result(result)

    # The loop may be closed by now (the process stopping): nobody waits for this call.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)

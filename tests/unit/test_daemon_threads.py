"""server/search/threads.py: the model's blocking calls on daemon threads."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from server.search.threads import DaemonThreads

_tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="none")


async def test_calls_run_at_once_up_to_the_size_on_daemon_threads() -> None:
    threads = DaemonThreads(3, "t")
    inside = threading.Barrier(3, timeout=10)  # passes only when three calls run together

    def call(n: int) -> tuple[int, bool, str]:
        inside.wait()
        current = threading.current_thread()
        return n * 2, current.daemon, current.name

    done = await asyncio.gather(*(threads.run(call, n) for n in range(3)))
    assert [d[0] for d in done] == [0, 2, 4]
    assert all(daemon for _, daemon, _ in done)
    assert {name for _, _, name in done} == {"t-1", "t-2", "t-3"}


async def test_calls_past_the_size_wait_their_turn() -> None:
    threads = DaemonThreads(1, "one")
    running = 0
    most = 0
    lock = threading.Lock()

    def call() -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        threading.Event().wait(0.01)
        with lock:
            running -= 1
        return threading.current_thread().name

    names = await asyncio.gather(*(threads.run(call) for _ in range(5)))
    assert most == 1
    assert set(names) == {"one-1"}


async def test_an_exception_is_raised_to_the_caller_and_the_thread_serves_on() -> None:
    threads = DaemonThreads(1, "e")

    def fail() -> None:
        raise ValueError("the model refused")

    with pytest.raises(ValueError, match="the model refused"):
        await threads.run(fail)
    assert await threads.run(lambda: "next") == "next"


async def test_the_callers_context_variables_are_seen_and_on_start_runs_once() -> None:
    started: list[str] = []
    threads = DaemonThreads(1, "c", on_start=lambda: started.append("yes"))
    _tag.set("caller's")
    assert await threads.run(_tag.get) == "caller's"
    assert await threads.run(_tag.get) == "caller's"
    assert started == ["yes"]


async def test_a_cancelled_caller_leaves_the_call_running_and_the_thread_free_after() -> None:
    threads = DaemonThreads(1, "x")
    release = threading.Event()
    task = asyncio.ensure_future(threads.run(release.wait, 10))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()  # the call ends; its result is dropped, nobody waits for it
    assert await asyncio.wait_for(threads.run(lambda: 7), 10) == 7

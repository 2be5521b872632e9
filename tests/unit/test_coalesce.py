"""Concurrent point reads share one fetch; errors and cancellations reach the right callers."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.serving.log_format import request_id
from server.store import coalesce
from server.store.base import call_deadline
from server.store.coalesce import Batcher, Coalescer


class Recorder:
    """A fetch that records its batches and can be held open."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.cancelled = 0
        self.error: Exception | None = None

    async def __call__(self, keys: list[str]) -> dict[str, str]:
        self.batches.append(keys)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return {k: k.upper() for k in keys if k != "missing"}


async def test_calls_that_arrive_together_share_one_fetch() -> None:
    fetch = Recorder()
    loader = Coalescer(fetch)
    got = await asyncio.gather(*(loader.load(k) for k in ("a", "b", "a", "missing")))
    assert got == ["A", "B", "A", None]
    assert fetch.batches == [["a", "b", "missing"]]


async def test_a_lone_call_goes_out_at_once() -> None:
    fetch = Recorder()
    loader = Coalescer(fetch)
    assert await asyncio.wait_for(loader.load("x"), 1) == "X"
    assert fetch.batches == [["x"]]


async def test_calls_arriving_while_batches_run_wait_for_the_next_one() -> None:
    fetch = Recorder()
    fetch.release.clear()
    loader = Coalescer(fetch, max_in_flight=1)
    first = asyncio.ensure_future(loader.load("a"))
    await asyncio.sleep(0.01)  # a's batch goes out
    later = [asyncio.ensure_future(loader.load(k)) for k in ("b", "c")]
    await asyncio.sleep(0.01)
    assert fetch.batches == [["a"]]  # b and c wait: one batch may run at a time
    fetch.release.set()
    assert await asyncio.gather(first, *later) == ["A", "B", "C"]
    assert fetch.batches == [["a"], ["b", "c"]]


async def test_a_failed_fetch_fails_every_caller_of_its_batch() -> None:
    fetch = Recorder()
    fetch.error = RuntimeError("database down")
    loader = Coalescer(fetch)
    results = await asyncio.gather(loader.load("a"), loader.load("b"), return_exceptions=True)
    assert [str(r) for r in results] == ["database down", "database down"]
    fetch.error = None
    assert await loader.load("c") == "C"  # the next batch runs normally


async def test_a_key_the_fetch_answers_with_an_error_fails_only_its_own_calls() -> None:
    # GetUser on Citus: a batch failed by a worker lost is read again one user at a time,
    # and only the lost worker's users' calls fail (tests/citus/test_grow.py).
    async def fetch(keys: list[str]) -> dict[str, str | Exception]:
        return {k: RuntimeError(f"{k} lost") if k.startswith("x") else k.upper() for k in keys}

    loader = Coalescer(fetch)
    results = await asyncio.gather(
        *(loader.load(k) for k in ("a", "x1", "b", "x1")), return_exceptions=True
    )
    assert [str(r) for r in results] == ["A", "x1 lost", "B", "x1 lost"]


async def test_the_fetch_is_cancelled_only_when_every_caller_gave_up() -> None:
    fetch = Recorder()
    fetch.release.clear()
    loader = Coalescer(fetch)
    one, two = asyncio.ensure_future(loader.load("a")), asyncio.ensure_future(loader.load("b"))
    await asyncio.sleep(0.01)
    one.cancel()
    await asyncio.sleep(0.01)
    assert fetch.cancelled == 0  # "b" still waits for the same statement
    two.cancel()
    await asyncio.sleep(0.01)
    assert fetch.cancelled == 1
    with pytest.raises(asyncio.CancelledError):
        await two
    fetch.release.set()
    assert await loader.load("c") == "C"  # nothing is left counted as in flight


async def test_the_queue_is_bounded_by_batches_worth_of_calls() -> None:
    # Under overload a caller must hear "too many" at once, not join an endless queue.
    from psycopg_pool import TooManyRequests

    fetch = Recorder()
    fetch.release.clear()
    loader = Coalescer(fetch, max_batch=2, max_waiting_batches=1)
    first = asyncio.ensure_future(loader.load("a"))
    await asyncio.sleep(0.01)
    assert fetch.batches == [["a"]]  # the first batch is in flight and held open
    queued = [asyncio.ensure_future(loader.load(k)) for k in ("b", "c")]
    await asyncio.sleep(0)
    with pytest.raises(TooManyRequests):
        await loader.load("d")
    fetch.release.set()
    assert await first == "A"
    assert await asyncio.gather(*queued) == ["B", "C"]


class BatchRecorder:
    """A batch run that records its batches, can be held open, and fails items named 'bad'."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.finished = 0

    async def __call__(self, items: list[str]) -> list[str | Exception]:
        self.batches.append(items)
        await self.release.wait()
        self.finished += 1
        return [ValueError(i) if i == "bad" else i.upper() for i in items]


async def test_writes_that_arrive_together_share_one_batch_each_with_its_own_outcome() -> None:
    run = BatchRecorder()
    batcher = Batcher(run)
    got = await asyncio.gather(
        *(batcher.submit(i) for i in ("a", "bad", "b")), return_exceptions=True
    )
    assert got[0] == "A" and got[2] == "B"
    assert isinstance(got[1], ValueError)  # only the failing call fails
    assert run.batches == [["a", "bad", "b"]]


async def test_a_write_batch_runs_on_while_one_of_its_callers_waits() -> None:
    run = BatchRecorder()
    run.release.clear()
    batcher = Batcher(run)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.01)
    calls = [asyncio.ensure_future(batcher.submit(i)) for i in ("b", "c")]
    await asyncio.sleep(0)
    run.release.set()
    await first
    run.release.clear()
    await asyncio.sleep(0.01)
    assert run.batches == [["a"], ["b", "c"]]
    calls[0].cancel()  # e.g. b's deadline passed while the commit it shares was under way
    await asyncio.sleep(0.01)
    run.release.set()
    assert await calls[1] == "C" and run.finished == 2  # c's commit was not cut short


async def test_a_write_batch_is_cancelled_when_every_caller_gave_up() -> None:
    run = BatchRecorder()
    run.release.clear()
    batcher = Batcher(run)
    call = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.01)
    call.cancel()  # a lone write whose deadline passed: its statement is cancelled
    await asyncio.sleep(0.01)
    run.release.set()
    assert await batcher.submit("b") == "B"
    assert run.batches == [["a"], ["b"]] and run.finished == 1


async def test_a_write_whose_caller_gave_up_before_its_batch_started_is_left_out() -> None:
    run = BatchRecorder()
    run.release.clear()
    batcher = Batcher(run, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.01)  # a's batch goes out
    gone = asyncio.ensure_future(batcher.submit("gone"))
    kept = asyncio.ensure_future(batcher.submit("kept"))
    await asyncio.sleep(0.01)
    gone.cancel()
    run.release.set()
    assert await asyncio.gather(first, kept) == ["A", "KEPT"]
    assert run.batches == [["a"], ["kept"]]


async def test_a_batch_that_fails_as_a_whole_fails_each_of_its_calls() -> None:
    async def broken(items: list[str]) -> list[str | Exception]:
        raise ConnectionError("database gone")

    batcher: Batcher[str, str] = Batcher(broken)
    got = await asyncio.gather(*(batcher.submit(i) for i in "xy"), return_exceptions=True)
    assert all(isinstance(g, ConnectionError) for g in got)


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_calls_a_few_loop_turns_apart_share_one_fetch_while_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A call gRPC hands over takes several turns of the loop to reach the store: while batches
    # run back to back, a batch sent at the end of its first call's turn left the calls
    # arriving with it for the next round trip. (A wide busy window: a loaded test machine
    # may pause between two statements longer than the real one.)
    monkeypatch.setattr(coalesce, "BUSY_SECONDS", 60.0)
    fetch = Recorder()
    loader = Coalescer(fetch)
    assert await loader.load("z") == "Z"  # a batch has just finished: busy
    first = asyncio.ensure_future(loader.load("a"))
    await _turns(4)
    second = asyncio.ensure_future(loader.load("b"))
    assert await asyncio.gather(first, second) == ["A", "B"]
    assert fetch.batches == [["z"], ["a", "b"]]

    batches: list[list[str]] = []

    async def run(items: list[str]) -> list[str | Exception]:
        batches.append(items)
        return [i.upper() for i in items]

    writer = Batcher(run)
    assert await writer.submit("w") == "W"
    one = asyncio.ensure_future(writer.submit("x"))
    await _turns(4)
    two = asyncio.ensure_future(writer.submit("y"))
    assert await asyncio.gather(one, two) == ["X", "Y"]
    assert batches == [["w"], ["x", "y"]]


async def test_a_call_that_finds_the_store_idle_goes_out_at_the_end_of_its_turn() -> None:
    # Waiting for more calls when none are coming only adds latency: at half load it made
    # GetMemory's p50 two to five times longer (docs/performance.md).
    fetch = Recorder()
    loader = Coalescer(fetch, turns=50)
    call = asyncio.ensure_future(loader.load("a"))
    await _turns(3)
    assert fetch.batches == [["a"]]
    assert await call == "A"


async def test_a_batch_runs_in_a_context_of_its_own() -> None:
    # A batch serves several calls; it ran in a copy of the context of the call that
    # scheduled it, so every line it logged carried that call's request id (which a client
    # chooses). No one call's deadline may lift the statement timeout for all of them either.
    seen: list[tuple[str, float | None]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        seen.append((request_id.get(), call_deadline.get()))
        return list(items)

    batcher: Batcher[int, int] = Batcher(run)

    async def call(rid: str, item: int) -> int:
        request_id.set(rid)
        call_deadline.set(time.monotonic() + 60)
        return await batcher.submit(item)

    assert await asyncio.gather(call("CALLER-1", 1), call("CALLER-2", 2)) == [1, 2]
    assert seen == [("", None)]

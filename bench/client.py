"""Load generators that run in their own processes: unary calls, the export stream, COPY.

The unary client sends pre-serialized request bytes and does not parse replies, so that its
own cost per call is as small as grpc.aio allows and is the same for every method measured.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

#: A window that counted fewer calls (or turns) than this is stretched until it has them, up
#: to STRETCH_LIMIT seconds more: on tiny data and a busy machine, one slow first call could
#: leave a 0.3 s window empty, and a rate of zero measures nothing.
MIN_COUNTED = 3
STRETCH_LIMIT = 30.0
STRETCH_STEP = 0.01

#: One TCP connection per channel: without a local subchannel pool, channels of one process
#: to one target share a connection, and SO_REUSEPORT could not spread them over workers.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class UnaryLoad:
    """What one client process sends: `method` with `payloads` round-robin, for `seconds`."""

    target: str
    method: str
    payloads: tuple[bytes, ...]
    seconds: float
    warmup: float
    concurrency: int
    channels: int
    #: Payload index this process starts at, so processes do not send the same rows.
    offset: int = 0


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _window(seconds: float, counted: Callable[[], int]) -> None:
    """Sleeps the measuring window: `seconds`, then on while fewer than MIN_COUNTED were
    counted (at most STRETCH_LIMIT more). The caller divides by the wall time it measured."""
    await asyncio.sleep(seconds)
    for _ in range(round(STRETCH_LIMIT / STRETCH_STEP)):
        if counted() >= MIN_COUNTED:
            return
        await asyncio.sleep(STRETCH_STEP)


def run_unary(load: UnaryLoad) -> dict[str, float]:
    """Runs one unary load in this process; returns calls, errors, wall and CPU seconds."""
    return asyncio.run(_unary(load))


async def _unary(load: UnaryLoad) -> dict[str, float]:
    channels = [
        grpc.aio.insecure_channel(load.target, options=CHANNEL_OPTIONS)
        for _ in range(load.channels)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        # No serializers: requests go out as the bytes given, replies stay bytes.
        calls = [channel.unary_unary(load.method, None, None) for channel in channels]
        state = {"counting": False, "stop": False, "calls": 0, "errors": 0}
        workers = [
            asyncio.create_task(_worker(calls[i % len(calls)], load, i, state))
            for i in range(load.concurrency)
        ]
        await asyncio.sleep(load.warmup)
        state["counting"] = True
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await _window(load.seconds, lambda: state["calls"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        state["counting"], state["stop"] = False, True
        await asyncio.gather(*workers)
    finally:
        for channel in channels:
            await channel.close(None)
    return {"calls": state["calls"], "errors": state["errors"], "wall": wall, "cpu": cpu}


async def _worker(
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    load: UnaryLoad,
    index: int,
    state: dict[str, int | bool],
) -> None:
    payloads, n = load.payloads, len(load.payloads)
    i = load.offset + index
    while not state["stop"]:
        try:
            await call(payloads[i % n], timeout=30)
            ok = True
        except grpc.aio.AioRpcError:
            ok = False
        if state["counting"]:
            state["calls" if ok else "errors"] += 1
        i += load.concurrency


def run_export(
    target: str, method: str, request: bytes, response_type: str, field: str
) -> dict[str, float]:
    """Reads a whole server stream, parsing each chunk; returns rows, wall and CPU seconds.

    `response_type` names the chunk's message as "module.Message" under memstore.v1 (e.g.
    "user_service_pb2.ListUsersChunkedResponse"); `field` is its repeated field of rows.
    """
    import importlib

    module, name = response_type.split(".")
    parse = getattr(importlib.import_module(f"memstore.v1.{module}"), name).FromString
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    rows = chunks = max_chunk = 0
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stream = channel.unary_stream(method, None, None)
        for data in stream(request, timeout=3600):
            rows += len(getattr(parse(data), field))
            chunks += 1
            max_chunk = max(max_chunk, len(data))
    return {
        "rows": rows,
        "chunks": chunks,
        "max_chunk_bytes": max_chunk,
        "wall": time.perf_counter() - t0,
        "cpu": cpu_seconds() - cpu0,
    }


def run_copy(url: str, statement: str) -> dict[str, float]:
    """Reads `COPY ... TO STDOUT` (text) with psycopg and counts its rows (newlines)."""
    import psycopg

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    rows = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur, cur.copy(statement) as copy:
        for block in copy:
            rows += bytes(block).count(b"\n")
    return {"rows": rows, "wall": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu0}


@dataclass(frozen=True)
class TurnLoad:
    """An agent's turn, repeated: GetMemory then AddMemory on the same session.

    `get_payloads[i]` and `add_payloads[i]` name the same session. With `rate` unset the
    load is closed (`concurrency` agents, each starting its next turn when the last one is
    answered); with `rate` set, turns start at that many per second whatever the answers
    (open loop), and each call's latency is recorded.
    """

    target: str
    get_method: str
    get_payloads: tuple[bytes, ...]
    add_method: str
    add_payloads: tuple[bytes, ...]
    seconds: float
    warmup: float
    concurrency: int
    channels: int
    rate: float | None = None


def run_turns(load: TurnLoad) -> dict[str, Any]:
    """Runs agent turns in this process; returns turns, errors, wall, CPU and latencies (s)."""
    return asyncio.run(_turns(load))


async def _turns(load: TurnLoad) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(load.target, options=CHANNEL_OPTIONS)
        for _ in range(load.channels)
    ]
    state: dict[str, Any] = {"counting": False, "turns": 0, "errors": 0, "get": [], "add": []}
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        pairs = [
            (c.unary_unary(load.get_method, None, None), c.unary_unary(load.add_method, None, None))
            for c in channels
        ]

        async def turn(i: int) -> None:
            get, add = pairs[i % len(pairs)]
            n = i % len(load.get_payloads)
            try:
                t0 = time.perf_counter()
                await get(load.get_payloads[n], timeout=30)
                t1 = time.perf_counter()
                await add(load.add_payloads[n], timeout=30)
                t2 = time.perf_counter()
            except grpc.aio.AioRpcError:
                if state["counting"]:
                    state["errors"] += 1
                return
            if state["counting"]:
                state["turns"] += 1
                state["get"].append(t1 - t0)
                state["add"].append(t2 - t1)

        runner = _open_loop(load, turn) if load.rate else _closed_loop(load, turn)
        task = asyncio.ensure_future(runner)
        await asyncio.sleep(load.warmup)
        state["counting"] = True
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        await _window(load.seconds, lambda: state["turns"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        state["counting"] = False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close(None)
    return {**state, "wall": wall, "cpu": cpu}


async def _closed_loop(load: TurnLoad, turn: Any) -> None:
    async def agent(index: int) -> None:
        i = index
        while True:
            await turn(i)
            i += load.concurrency

    await asyncio.gather(*(agent(k) for k in range(load.concurrency)))


async def _open_loop(load: TurnLoad, turn: Any) -> None:
    assert load.rate is not None
    start, i, pending = time.perf_counter(), 0, set()
    try:
        while True:
            delay = start + i / load.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(turn(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
    finally:
        for task in pending:
            task.cancel()

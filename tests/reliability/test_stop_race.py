"""Calls arriving as a stop begins: each is answered at once, none waits for its deadline.

gRPC's core strands a call that arrives just as the stop begins (server/serving/shutdown.py,
stop_grpc): the caller waited for its deadline. The race is gRPC's, so a bare echo server
shows it: stopped by a bare server.stop, 2 calls in 300 stops got DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc

from server.serving.shutdown import stop_grpc
from tests.reliability import record

#: Stops, each with calls arriving (the race is rare: 1-2 stops in 150 stranded a call).
ROUNDS = int(os.environ.get("MEMSTORE_STOP_RACE_ROUNDS", "150"))
WRITERS = 64
#: A dropped call is answered only at its deadline; any answer this late is one.
DEADLINE = 3.0
_METHOD = "/race.Echo/Echo"


def _echo(in_flight: list[int]) -> Callable[..., Awaitable[bytes]]:
    """The handler, counting its calls in flight (in_flight[0]) as memstore's cap does."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        in_flight[0] += 1
        try:
            await asyncio.sleep(0.001)
            return request
        finally:
            in_flight[0] -= 1

    return echo


async def _round() -> tuple[Counter[str], float]:
    server = grpc.aio.server()
    in_flight = [0]
    handler = grpc.unary_unary_rpc_method_handler(_echo(in_flight))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("race.Echo", {"Echo": handler}),)
    )
    # Registered methods, as memstore registers its services: each has a call requested of
    # gRPC's core while serving, which is how several are pending when the stop begins.
    server.add_registered_method_handlers("race.Echo", {"Echo": handler})  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes: Counter[str] = Counter()
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]

    async def write(channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(_METHOD, _registered_method=True)  # type: ignore[call-arg]
        while True:
            try:
                await call(b"x", timeout=DEADLINE)
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
                return

    writers = [asyncio.create_task(write(channels[i % 4])) for i in range(WRITERS)]
    await asyncio.sleep(0.3)
    start = time.monotonic()
    await stop_grpc(server, 10, lambda: in_flight[0] > 0)
    took = time.monotonic() - start
    await asyncio.gather(*writers)
    for channel in channels:
        await channel.close(None)
    return codes, took


async def test_calls_arriving_as_the_server_stops_are_answered_at_once() -> None:
    codes: Counter[str] = Counter()
    slowest = 0.0
    for _ in range(ROUNDS):
        found, took = await _round()
        codes += found
        slowest = max(slowest, took)
    record("stop_race", rounds=ROUNDS, codes=dict(codes), slowest_stop_seconds=round(slowest, 2))
    # UNAVAILABLE: refused on reconnecting; CANCELLED: arrived once the stop had begun.
    assert set(codes) <= {"UNAVAILABLE", "CANCELLED"}, codes
    # Ended by the stop: no stop waited for a caller's deadline (but for the orphans' second).
    assert slowest < DEADLINE, slowest

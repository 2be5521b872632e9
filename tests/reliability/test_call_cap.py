"""The cap on calls in flight: past it, calls are refused as overload and memory stays bounded."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from memstore.v1 import user_service_pb2 as upb
from server.config import Config, SecurityConfig
from server.serving.app import build_server
from server.store import Store
from tests.fix_db import has_lock_waiter
from tests.grpc import Users
from tests.polling import until
from tests.processes import free_port, serve_memstore, stop_memstore
from tests.reliability import record

CAP = 50
#: Far more calls than the cap, sent in waves as a client that keeps opening calls would.
#: Without a cap (10,000), the server held them all and grew by 14 MB a wave, 143 MB in all.
WAVE, WAVES = 500, 10
BURST = WAVE * WAVES
#: What the waves may add to the server's memory under the cap: the held calls, plus a
#: wave's refused calls passing through (measured: 8 MB after the first wave, 12 MB from
#: the third on).
MOST_GROWTH_MB = 25


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _peak_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _rss_mb(pid))
        await asyncio.sleep(0.01)


async def _update(users: Users, i: int) -> tuple[grpc.StatusCode, str]:
    request = upb.UpdateUserRequest(user_id="hot", email=f"{i}@x.org")
    try:
        await users.UpdateUser(request, timeout=120)
    except grpc.aio.AioRpcError as error:
        return error.code(), _reason(error)
    return grpc.StatusCode.OK, ""


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


async def test_calls_past_the_cap_are_refused_as_overload_and_memory_stays_bounded(
    clean_db: str,
) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    http_port = free_port()
    # No bound on the pool's queue (0) and a long pool timeout: only the cap refuses here.
    args = ("--max-calls-in-flight", str(CAP), "--pool-max-waiting", "0", "--pool-timeout", "120")
    args += ("--http-port", str(http_port), "--purge-interval", "0", "--no-embedding-worker")
    args += ("--log-level", "WARNING")  # thousands of access lines would fill the pipe
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = Users(channel)
            await users.CreateUser(upb.CreateUserRequest(user_id="hot"), timeout=30)
            before = _rss_mb(proc.pid)
            peak, stop = [before], asyncio.Event()
            sampler = asyncio.create_task(_peak_rss(proc.pid, peak, stop))
            async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
                # Every admitted UpdateUser waits for this row lock (or for a connection).
                await blocker.execute("SELECT 1 FROM users WHERE user_id = 'hot' FOR UPDATE")
                calls: list[asyncio.Future[tuple[grpc.StatusCode, str]]] = []

                async def excess_refused() -> bool:
                    return sum(c.done() for c in calls) >= len(calls) - CAP

                for _ in range(WAVES):
                    calls += [asyncio.ensure_future(_update(users, i)) for i in range(WAVE)]
                    assert await until(excess_refused, within=120), "the excess was not refused"
                assert await has_lock_waiter(clean_db)
                # The cap is the process's: an HTTP call is refused too; health still answers.
                async with httpx.AsyncClient(timeout=30) as http:
                    reply = await http.get(f"http://127.0.0.1:{http_port}/api/v2/users/hot")
                    alive = await http.get(f"http://127.0.0.1:{http_port}/healthz")
                health = health_pb2_grpc.HealthStub(channel)
                checked = await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                await blocker.rollback()
            outcomes = Counter(await asyncio.gather(*calls))
            stop.set()
            await sampler
            growth = peak[0] - before
    finally:
        code, out = await asyncio.to_thread(stop_memstore, proc)
    assert code == 0, out
    overloaded = (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_OVERLOADED")
    assert outcomes == {(grpc.StatusCode.OK, ""): CAP, overloaded: BURST - CAP}, outcomes
    assert (reply.status_code, reply.json()["reason"]) == (429, "SERVER_OVERLOADED"), reply.text
    assert alive.status_code == 200
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    record("call_cap", cap=CAP, calls=BURST, rss_growth_mb=round(growth, 1))
    assert growth < MOST_GROWTH_MB, f"the server grew {growth:.0f} MB under a cap of {CAP}"


async def test_health_watch_streams_are_capped_apart_from_the_calls(store: Store) -> None:
    # Watch streams need no key and were not counted at all: a client could make the server
    # hold any number of them. They are capped by --max-calls-in-flight, counted apart from
    # the calls, so watchers never crowd a call out.
    config = Config(host="127.0.0.1", port=0, security=SecurityConfig(max_calls_in_flight=3))
    server, port = await build_server(config, store)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(3)]
            for watch in watches:
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            refused = health.Watch(health_pb2.HealthCheckRequest())
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await refused.read()
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _reason(error.value) == "SERVER_OVERLOADED"
            assert "3 health Watch streams" in str(error.value.details())
            # Calls and Checks are served beside the three watchers.
            checked = await health.Check(health_pb2.HealthCheckRequest())
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            await Users(channel).ListUsers(upb.ListUsersRequest())
            # One watcher gone (once the server has seen it go), another may watch.
            watches[0].cancel()

            async def a_new_watch_is_served() -> bool:
                call = health.Watch(health_pb2.HealthCheckRequest())
                try:
                    return (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError as refused_again:
                    if refused_again.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    return False
                finally:
                    call.cancel()

            assert await until(a_new_watch_is_served, within=5)
            for watch in watches:
                watch.cancel()
    finally:
        await server.stop(None)

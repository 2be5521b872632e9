"""SIGTERM under load: health turns NOT_SERVING, calls finish or fail cleanly, nothing is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb
from tests.fix_db import busy_backends, has_lock_waiter
from tests.grpc import Sessions, Users, msg
from tests.polling import until
from tests.processes import free_port, serve_memstore
from tests.reliability import record

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: The drain test's grace period: far longer than its calls, whatever the machine's load.
GRACE = 60
#: What a call may get from a server that is shutting down: refused, never half-done.
#: UNAVAILABLE on reconnecting; CANCELLED from gRPC's core for a call that reaches the old
#: connection after the stop began, or that the core stranded (stop_grpc cancels those:
#: before it, one waited for its deadline, test_stop_race.py).
CLEAN_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def _write(sessions: Sessions, name: str, acked: list[int], codes: list[object]) -> None:
    n = 0
    while True:
        try:
            request = spb.AddMemoryRequest(session_id=name, messages=[msg(f"{name}:{n}")])
            await sessions.AddMemory(request, timeout=10)
            acked.append(n)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
            return  # The server has stopped accepting; the writer is done.
        n += 1


async def _watch(channel: grpc.aio.Channel, seen: list[tuple[float, int]]) -> None:
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    try:
        async for reply in stream:
            seen.append((time.monotonic(), reply.status))
    except grpc.aio.AioRpcError:
        pass  # The stream ends when the server stops.


async def _poll(channel: grpc.aio.Channel, seen: list[int], stop: asyncio.Event) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    while not stop.is_set():
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            seen.append(reply.status)
        except grpc.aio.AioRpcError:
            return
        await asyncio.sleep(0.05)


async def _unpinned(url: str) -> bool:
    return not await has_lock_waiter(url)


async def _quiet(url: str) -> bool:
    return not await busy_backends(url)


async def _exit_code(proc: subprocess.Popen[str], limit: float) -> tuple[int, str]:
    out, _ = await asyncio.to_thread(proc.communicate, timeout=limit)
    return proc.returncode, out


async def test_sigterm_mid_load_drains_and_keeps_every_acknowledged_write(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    # WARNING: thousands of access-log lines would fill the unread stdout pipe and stall it.
    args = ("--purge-interval", "0", "--grace-period", str(GRACE), "--drain-delay", "1")
    args += ("--log-level", "WARNING")
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        users, sessions = Users(channel), Sessions(channel)
        await users.CreateUser(upb.CreateUserRequest(user_id="busy"), timeout=10)
        names = [f"w{i}" for i in range(4)]
        acked: dict[str, list[int]] = {n: [] for n in names}
        codes: list[object] = []
        watched: list[tuple[float, int]] = []
        checked: list[int] = []
        stop_polling = asyncio.Event()
        writers = [asyncio.create_task(_write(sessions, n, acked[n], codes)) for n in names]
        watcher = asyncio.create_task(_watch(channel, watched))
        poller = asyncio.create_task(_poll(channel, checked, stop_polling))
        async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
            # Hold the row lock so this UpdateUser is in flight through the whole drain.
            await blocker.execute("SELECT 1 FROM users WHERE user_id = 'busy' FOR UPDATE")
            slow = asyncio.ensure_future(
                users.UpdateUser(upb.UpdateUserRequest(user_id="busy", email="b@x"), timeout=30)
            )

            async def mid_load() -> bool:
                # Every writer acknowledged, the slow call pinned, both health probes answered.
                started = all(acked.values()) and bool(watched) and bool(checked)
                return started and await has_lock_waiter(clean_db)

            assert await until(mid_load, within=20), "the load never got going"
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(2.0)  # past the drain delay, inside the grace period
            assert proc.poll() is None, "the server must wait for the in-flight call"
            await blocker.rollback()
        assert (await slow).user.email == "b@x"
        code, out = await _exit_code(proc, limit=GRACE + 30)
        exited = time.monotonic() - signalled
        stop_polling.set()
        await asyncio.gather(*writers, watcher, poller)
    assert code == 0, out
    # Done when the last call was (2 s after the signal): an open health Watch stream does
    # not hold the shutdown for the whole grace period, made long so that no load can blur
    # the two.
    assert exited < GRACE / 2, (exited, out)
    # Health said NOT_SERVING from the signal on: to watchers at once, and to Check calls
    # during the drain delay, while calls were still being served.
    assert any(status == NOT_SERVING and t >= signalled for t, status in watched), watched
    assert NOT_SERVING in checked, checked
    assert set(codes) <= CLEAN_FAILURES, codes
    found = _check_durable(clean_db, acked)
    record(
        "sigterm",
        writes_acknowledged=sum(len(a) for a in acked.values()) + 1,
        writes_found=found + 1,
        seconds_signal_to_exit=round(exited, 2),
        refused_calls=len(codes),
    )


def _check_durable(url: str, acked: dict[str, list[int]]) -> int:
    found = 0
    with psycopg.connect(url) as conn:
        for name, numbers in acked.items():
            rows = conn.execute(
                "SELECT content FROM messages WHERE session_id = %s ORDER BY sequence", [name]
            ).fetchall()
            stored = [int(str(r[0]).split(":")[1]) for r in rows]
            assert stored[: len(numbers)] == numbers, f"{name}: an acknowledged write is missing"
            # At most one more: a call cut off by the shutdown after its commit.
            assert len(stored) - len(numbers) <= 1
            found += len(stored)
        email = conn.execute("SELECT email FROM users WHERE user_id = 'busy'").fetchone()
        assert email == ("b@x",)
    return found


async def test_a_call_past_the_grace_period_fails_cleanly_and_writes_nothing(
    clean_db: str,
) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    args = ("--purge-interval", "0", "--grace-period", "1", "--drain-delay", "0")
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = Users(channel)
        await users.CreateUser(upb.CreateUserRequest(user_id="stuck"), timeout=10)
        async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
            await blocker.execute("SELECT 1 FROM users WHERE user_id = 'stuck' FOR UPDATE")
            stuck = asyncio.ensure_future(
                users.UpdateUser(upb.UpdateUserRequest(user_id="stuck", email="late"), timeout=30)
            )
            assert await until(lambda: has_lock_waiter(clean_db)), (
                "the call never reached PostgreSQL"
            )
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code, out = await _exit_code(proc, limit=30)
            exited = time.monotonic() - signalled
            try:
                await stuck
                raise AssertionError("the call outlived the grace period yet succeeded")
            except grpc.aio.AioRpcError as error:
                assert error.code() in CLEAN_FAILURES, error
            await blocker.rollback()
    # It exited at all: the stuck call could not end by itself (the blocker holds its lock
    # until after the exit), so the grace period ended it.
    assert code == 0, out
    record("sigterm_past_grace", grace_seconds=1, seconds_signal_to_exit=round(exited, 2))
    # The call was cancelled in PostgreSQL too: its update never happens.
    await until(lambda: _quiet(clean_db))
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT email FROM users WHERE user_id = 'stuck'").fetchone() == ("",)


async def test_a_rest_call_past_the_grace_period_fails_cleanly_and_writes_nothing(
    clean_db: str,
) -> None:
    # As the gRPC call above, over REST: uvicorn cancels its requests at the grace period's
    # end and does not wait for them, and the server waited only for gRPC's calls before it
    # closed the pool: the query's cancel was cut short, the statement ran on in PostgreSQL
    # and committed once its lock was free (8 of 15 runs), the caller told 500 in plain
    # text, and the log held two tracebacks.
    env = {**os.environ, "DATABASE_URL": clean_db}
    http_port = free_port()
    args = ("--purge-interval", "0", "--grace-period", "1", "--drain-delay", "0")
    proc, _ = await asyncio.to_thread(serve_memstore, *args, "--http-port", str(http_port), env=env)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
        made = await http.post("/api/v2/users", json={"user_id": "stuck"})
        assert made.status_code == 201, made.text
        async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
            await blocker.execute("SELECT 1 FROM users WHERE user_id = 'stuck' FOR UPDATE")
            stuck = asyncio.ensure_future(
                http.patch("/api/v2/users/stuck", json={"email": "late@x.org"})
            )
            assert await until(lambda: has_lock_waiter(clean_db)), (
                "the call never reached PostgreSQL"
            )
            proc.send_signal(signal.SIGTERM)
            code, out = await _exit_code(proc, limit=30)
            try:
                answer = await stuck
            except httpx.TransportError:
                pass  # the connection closed unanswered: a clean failure too
            else:
                assert answer.status_code == 503, answer.text
                assert answer.json()["reason"] == "SERVER_SHUTTING_DOWN"
            await blocker.rollback()  # the lock is free: a statement left running commits now
    assert code == 0, out
    assert "Traceback" not in out and "ERROR" not in out, out
    await until(lambda: _quiet(clean_db))
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT email FROM users WHERE user_id = 'stuck'").fetchone() == ("",)


async def test_a_killed_server_leaves_no_late_commit(clean_db: str) -> None:
    # SIGKILL mid-call: no chance to cancel anything. PostgreSQL notices the closed
    # connection (client_connection_check_interval) and aborts the waiting statement, so the
    # update does not commit when the lock is released later.
    env = {**os.environ, "DATABASE_URL": clean_db}
    proc, port = await asyncio.to_thread(serve_memstore, "--purge-interval", "0", env=env)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = Users(channel)
        await users.CreateUser(upb.CreateUserRequest(user_id="orphan"), timeout=10)
        async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
            await blocker.execute("SELECT 1 FROM users WHERE user_id = 'orphan' FOR UPDATE")
            doomed = asyncio.ensure_future(
                users.UpdateUser(upb.UpdateUserRequest(user_id="orphan", email="x"), timeout=30)
            )
            assert await until(lambda: has_lock_waiter(clean_db)), (
                "the call never reached PostgreSQL"
            )
            proc.kill()
            await _exit_code(proc, limit=30)
            with pytest.raises(grpc.aio.AioRpcError):
                await doomed
            # Released only once the orphaned statement is gone (the one-second check).
            await until(lambda: _unpinned(clean_db))
            await blocker.rollback()
    await until(lambda: _quiet(clean_db))
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT email FROM users WHERE user_id = 'orphan'").fetchone() == ("",)


async def test_a_reflection_stream_open_as_the_stop_begins_is_given_the_grace(
    clean_db: str,
) -> None:
    # Reflection is not one of memstore's calls, so the stop saw nothing in flight and
    # cancelled what gRPC's core held after a second (stop_grpc): grpcurl describing the
    # schema as a deploy began lost its stream, where calls are given the grace period.
    env = {**os.environ, "DATABASE_URL": clean_db}
    args = ("--purge-interval", "0", "--grace-period", "30", "--drain-delay", "0")
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await stream.read()
        assert "memstore.v1.UserService" in {s.name for s in listed.list_services_response.service}
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(3.0)  # well past the second after which it was cancelled
        assert not stream.done(), f"ended {await stream.code()} inside the grace period"
        symbol = "memstore.v1.SessionService.AddMemory"
        await stream.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        described = await stream.read()
        assert described.file_descriptor_response.file_descriptor_proto, described
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        # The stream's end ends the stop: the grace is a bound, not a wait.
        code, out = await _exit_code(proc, limit=20)
        assert code == 0, out
        assert time.monotonic() - signalled < 20

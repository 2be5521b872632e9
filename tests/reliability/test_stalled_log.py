"""A log consumer that stops reading never stops memstore.

`memstore serve` writes an access line per call to stderr. Here stderr is a pipe nobody reads
(as a blocked container log driver or a stuck shipper): past 64 KiB the pipe is full. Writes
from the event loop blocked it there and every call in flight with it (seen by hand: 300 of
500 calls hung until their deadline). The lines now go through a writer thread's bounded
queue (server/serving/log_output.py): the calls are answered, and the lines are written once
the pipe is read again.
"""

from __future__ import annotations

import asyncio
import json
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.v1 import user_service_pb2 as upb
from tests.grpc import Users
from tests.processes import serve_memstore, stop_memstore
from tests.raw_h2 import WindowShut
from tests.reliability import record

#: Access lines of ~250 bytes: about 40 times what the pipe holds.
CALLS = 10_000
TASKS = 16


async def test_calls_are_answered_while_nobody_reads_the_log(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    args = ("--purge-interval", "0", "--log-level", "INFO", "--no-embedding-worker")
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = Users(channel)
            await users.CreateUser(upb.CreateUserRequest(user_id="u"), timeout=10)
            answered = 0

            async def call(n: int) -> None:
                nonlocal answered
                for _ in range(n):
                    reply = await users.GetUser(upb.GetUserRequest(user_id="u"), timeout=20)
                    assert reply.user.user_id == "u"
                    answered += 1

            await asyncio.gather(*(call(CALLS // TASKS) for _ in range(TASKS)))
            assert answered == CALLS
    finally:
        code, out = await asyncio.to_thread(stop_memstore, proc)
    assert code == 0, out[-2000:]
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [e for e in entries if e.get("method", "").endswith("/GetUser")]
    dropped = sum(int(e["message"].split()[0]) for e in entries if e["logger"] == "memstore.log")
    # Every call has its line, or was counted among those dropped while the pipe was full.
    assert len(access) + dropped == CALLS, (len(access), dropped, out[:1500])
    assert access, "no access line reached the log"
    record("stalled_log", calls_answered=CALLS, lines_written=len(access), lines_dropped=dropped)


async def test_gRPC_cores_own_lines_never_reach_an_unread_stderr(clean_db: str) -> None:
    # gRPC core writes its log lines to fd 2 itself, past the bounded writer above, and a
    # client chose how many: 2,000 calls with a malformed grpc-timeout filled the unread pipe
    # (an audit: core's threads then blocked in the write, and calls with them), and each
    # line broke the log's JSON lines. memstore turns core's log off unless GRPC_VERBOSITY
    # asks for it.
    env = {**os.environ, "DATABASE_URL": clean_db}
    env.pop("GRPC_VERBOSITY", None)
    args = ("--purge-interval", "0", "--no-embedding-worker", "--embedder", "none")
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    try:
        # By hand (no gRPC client sends a malformed grpc-timeout): core logs a line for each.
        conn = await WindowShut().open(port)
        try:
            for _ in range(2_000):
                await conn.call("/grpc.health.v1.Health/Check", b"", (("grpc-timeout", "bad"),))
            await asyncio.sleep(0.5)
        finally:
            await conn.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        code, out = await asyncio.to_thread(stop_memstore, proc)
    assert code == 0, out[-2000:]
    stray = [line for line in out.splitlines() if not line.startswith("{")]
    assert stray == [], stray[:5]

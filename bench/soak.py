"""`make soak`: a bounded mixed workload against a real `memstore serve`; 0 errors, flat memory.

Starts the server as an operator would (a subprocess over a fresh database on DATABASE_URL,
or on an embedded PostgreSQL under .data/soak-pg), runs clients that each own a user and
its sessions (so every call they make must succeed) for SOAK_SECONDS, samples the server's
resident memory, prints the figures and exits non-zero on any error or memory growth.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import conninfo as pg_conninfo
from psycopg import sql

from memstore.v1 import resources_pb2, session_service_pb2_grpc, user_service_pb2_grpc
from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "8"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "120"))
#: Resident memory may grow this much from the end of the warm-up to the end of the run.
MAX_GROWTH_MIB = float(os.environ.get("SOAK_MAX_GROWTH_MIB", "20"))
WARM_UP = 0.25  # the first quarter of the run: pools fill, caches warm
#: Where the figures are kept (a smoke test keeps its own apart from a real soak's).
FIGURES = Path(os.environ.get("SOAK_FIGURES", ROOT / ".data" / "soak-figures.json"))
#: Seconds soft-deleted rows are kept; clients restore only sessions deleted well before.
RETENTION = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fresh_database() -> tuple[str, Callable[[], None]]:
    """A new database on DATABASE_URL's server (or the embedded one), and how to drop it."""
    server_url = os.environ.get("DATABASE_URL")
    if not server_url:
        from server.serving.embedded import EmbeddedPostgres

        server_url = EmbeddedPostgres(ROOT / ".data" / "soak-pg").url("postgres")
    name = f"memstore_soak_{secrets.token_hex(3)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    return pg_conninfo.make_conninfo(server_url, dbname=name), drop


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Client:
    """One agent: its own user and sessions, so every call it makes must succeed."""

    def __init__(self, channel: grpc.aio.Channel, n: int, stats: Stats) -> None:
        self.users = user_service_pb2_grpc.UserServiceStub(channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        self.user = f"soak-user-{n}"
        self.rng = random.Random(n)
        self.stats = stats
        #: Sessions written and not deleted; sessions deleted and not restored.
        self.live: list[str] = []
        self.deleted: list[tuple[float, str]] = []
        self.count = 0

    async def run(self, until: float) -> None:
        await self._call(
            "CreateUser", self.users.CreateUser(upb.CreateUserRequest(user_id=self.user))
        )
        steps: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (40, self.add), (20, self.get_memory), (8, self.get_user), (8, self.update_user),
            (8, self.update_session),
            (6, self.list_sessions), (6, self.list_messages), (4, self.delete_session),
            (3, self.undelete), (2, self.clear), (2, self.export), (1, self.churn_user),
        ]  # fmt: skip
        weights = [w for w, _ in steps]
        while time.monotonic() < until:
            await self.rng.choices([s for _, s in steps], weights)[0]()

    async def _call(self, name: str, call: Awaitable[Any]) -> Any:
        start = time.monotonic()
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:
            self.stats.errors[f"{name}: {error.code().name} {error.details()}"] += 1
            return None
        self.stats.latencies.append(time.monotonic() - start)
        self.stats.calls[name] += 1
        return reply

    async def add(self) -> None:
        new = not self.live or (len(self.live) < 20 and self.rng.random() < 0.1)
        if new:
            self.count += 1
        session_id = f"{self.user}-s{self.count}" if new else self.rng.choice(self.live)
        messages = [
            resources_pb2.Message(
                role="agent",
                role_type=resources_pb2.RoleType.ValueType(self.rng.randint(1, 6)),
                content="x" * self.rng.randint(1, 2000),
            )
            for _ in range(self.rng.randint(1, 8))
        ]
        request = spb.AddMemoryRequest(session_id=session_id, user_id=self.user, messages=messages)
        if await self._call("AddMemory", self.sessions.AddMemory(request, timeout=30)) and new:
            self.live.append(session_id)

    async def get_memory(self) -> None:
        # Also of sessions never written: an empty memory, not an error.
        session_id = f"{self.user}-s{self.rng.randint(1, self.count + 1)}"
        request = spb.GetMemoryRequest(session_id=session_id, lastn=self.rng.randint(1, 20))
        await self._call("GetMemory", self.sessions.GetMemory(request, timeout=30))

    async def get_user(self) -> None:
        request = upb.GetUserRequest(user_id=self.user)
        await self._call("GetUser", self.users.GetUser(request, timeout=30))

    async def update_user(self) -> None:
        meta = struct_pb2.Struct()
        meta.update({f"k{self.rng.randint(0, 20)}": self.rng.random(), "gone": None})
        request = upb.UpdateUserRequest(user_id=self.user, metadata=meta)
        await self._call("UpdateUser", self.users.UpdateUser(request, timeout=30))

    async def update_session(self) -> None:
        if not self.live:
            return await self.add()
        meta = struct_pb2.Struct()
        meta.update({"topic": {"n": self.rng.randint(0, 9)}})
        request = spb.UpdateSessionRequest(session_id=self.rng.choice(self.live), metadata=meta)
        await self._call("UpdateSession", self.sessions.UpdateSession(request, timeout=30))

    async def list_sessions(self) -> None:
        request = spb.ListSessionsRequest(
            user_id=self.user, page_size=10, order_by="updated_at desc"
        )
        await self._call("ListSessions", self.sessions.ListSessions(request, timeout=30))

    async def list_messages(self) -> None:
        if not self.live:
            return await self.add()
        request = spb.ListMessagesRequest(session_id=self.rng.choice(self.live), page_size=50)
        page = await self._call("ListMessages", self.sessions.ListMessages(request, timeout=30))
        if page is not None and page.next_page_token:
            request.page_token = page.next_page_token
            await self._call("ListMessages", self.sessions.ListMessages(request, timeout=30))

    async def delete_session(self) -> None:
        if len(self.live) < 3:
            return await self.add()
        victim = self.live.pop(0)
        request = spb.DeleteSessionRequest(session_id=victim)
        if await self._call("DeleteSession", self.sessions.DeleteSession(request, timeout=30)):
            self.deleted.append((time.monotonic(), victim))

    async def undelete(self) -> None:
        # Sessions deleted long ago may be purged by now: those are forgotten, not restored.
        recent = time.monotonic() - RETENTION / 3
        self.deleted = [(t, sid) for t, sid in self.deleted if t > recent]
        if not self.deleted:
            return
        _, session_id = self.deleted.pop()
        request = spb.UndeleteSessionRequest(session_id=session_id)
        if await self._call("UndeleteSession", self.sessions.UndeleteSession(request, timeout=30)):
            self.live.append(session_id)

    async def clear(self) -> None:
        if not self.live:
            return await self.add()
        request = spb.ClearMemoryRequest(session_id=self.live[-1])
        await self._call("ClearMemory", self.sessions.ClearMemory(request, timeout=30))

    async def export(self) -> None:
        async def read() -> int:
            return sum([len(c.users) async for c in self.users.ListUsersChunked(
                upb.ListUsersChunkedRequest(chunk_size=5), timeout=30)])  # fmt: skip

        await self._call("ListUsersChunked", read())

    async def churn_user(self) -> None:
        # The privacy delete of a short-lived user with a session, then the id is free again.
        other = f"{self.user}-tmp"
        await self._call(
            "CreateUser", self.users.CreateUser(upb.CreateUserRequest(user_id=other), timeout=30)
        )
        add = spb.AddMemoryRequest(
            session_id=f"{other}-s", user_id=other, messages=[resources_pb2.Message(content="bye")]
        )
        await self._call("AddMemory", self.sessions.AddMemory(add, timeout=30))
        await self._call(
            "DeleteUser", self.users.DeleteUser(upb.DeleteUserRequest(user_id=other), timeout=30)
        )


class Stats:
    """What the clients saw."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []


async def _wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            if proc.poll() is not None:
                raise RuntimeError("memstore serve exited during start-up")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("memstore serve did not become SERVING")


async def _sample_memory(pid: int, until: float, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, _rss_mib(pid)))
        await asyncio.sleep(1.0)


def _start_server(url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    cmd = [
        *(sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)),
        # Purge every 5 s what was soft-deleted a minute ago: the purge runs under load too.
        *("--purge-interval", "5", "--purge-retention-days", str(RETENTION / 86400)),
        *("--log-level", "WARNING", "--no-http"),
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "DATABASE_URL": url}), port


async def soak(proc: subprocess.Popen[bytes], port: int) -> tuple[Stats, list[tuple[float, float]]]:
    """Runs the workload against the server; returns what the clients saw and memory samples."""
    stats, samples = Stats(), list[tuple[float, float]]()
    await _wait_serving(port, proc)
    until = time.monotonic() + SECONDS
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        clients = [Client(channel, n, stats) for n in range(CLIENTS)]
        await asyncio.gather(
            _sample_memory(proc.pid, until, samples), *(c.run(until) for c in clients)
        )
    return stats, samples


def _figures(stats: Stats, samples: list[tuple[float, float]], code: int) -> dict[str, Any]:
    steady = [rss for t, rss in samples if t >= SECONDS * WARM_UP]
    quarter = max(1, len(steady) // 4)
    start_mib = statistics.median(steady[:quarter])
    end_mib = statistics.median(steady[-quarter:])
    ordered = sorted(stats.latencies)
    total = sum(stats.calls.values())
    return {
        "seconds": SECONDS,
        "clients": CLIENTS,
        "calls": total,
        "calls_per_second": round(total / SECONDS, 1),
        "errors": sum(stats.errors.values()),
        "error_kinds": dict(stats.errors.most_common(5)),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2),
        "rss_after_warm_up_mib": round(start_mib, 1),
        "rss_at_end_mib": round(end_mib, 1),
        "rss_growth_mib": round(end_mib - start_mib, 1),
        "rss_max_mib": round(max(rss for _, rss in samples), 1),
        "exit_code": code,
        "by_method": dict(sorted(stats.calls.items())),
    }


def main() -> int:
    """Runs the soak and prints its figures; non-zero when an error or growth was seen."""
    url, drop = _fresh_database()
    try:
        proc, port = _start_server(url)
        try:
            stats, samples = asyncio.run(soak(proc, port))
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        figures = _figures(stats, samples, code)
    finally:
        drop()
    print(json.dumps(figures, indent=2))
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
    failed = figures["errors"] or figures["exit_code"] or figures["rss_growth_mib"] > MAX_GROWTH_MIB
    print("soak FAILED" if failed else "soak passed: 0 errors, flat memory, clean exit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python client when the network fails it: a server gone silent, a restart, close()
while calls are in flight, through a TCP proxy that freezes, drops and refuses."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from memstore_client import (
    AsyncMemstore,
    ClientClosed,
    DeadlineExceeded,
    Memstore,
    RetryPolicy,
    Unavailable,
)
from tests.fix_proxy import FaultProxy

USERS = 120
CHUNK = 3
#: gRPC's keepalive on a frozen connection: keepalive_timeout_ms alone waited the default
#: grpc.http2.ping_timeout_ms (60 s) before closing it (grpcio 1.85.1).
KEEPALIVE = [("grpc.keepalive_time_ms", 500), ("grpc.http2.ping_timeout_ms", 500)]
#: The proxy's pause per KiB sent to the client where a test freezes after the first chunk:
#: at full speed the whole stream was in the client's buffers by then, the freeze stopped
#: nothing, and the test failed (or passed without a fault) under load.
SLOWED = 0.01


@pytest.fixture
async def users(grpc_port: int, clean_db: str) -> list[str]:
    """USERS users, added directly (not through the proxy)."""
    ids = [f"u{i:02d}" for i in range(USERS)]
    async with AsyncMemstore(f"127.0.0.1:{grpc_port}") as client:
        for user_id in ids:
            await client.user.add(user_id)
    return ids


async def _read(flavour: str, make: Callable[[], Any], during: Callable[[int], None]) -> Any:
    """Every user id of list_chunked(CHUNK) through a client made by `make` (sync in a
    thread), calling `during(n)` after the nth chunk; what was read, or the error raised."""
    ids: list[str] = []

    def chunk_in(chunk: list[Any]) -> None:
        ids.extend(u.user_id for u in chunk)
        during(len(ids) // CHUNK)

    try:
        if flavour == "sync":

            def run() -> None:
                with make() as client:
                    for chunk in client.user.list_chunked(CHUNK):
                        chunk_in(chunk)

            await asyncio.to_thread(run)
        else:
            async with make() as client:
                async for chunk in client.user.list_chunked(CHUNK):
                    chunk_in(chunk)
    except Exception as error:
        error.read = ids  # type: ignore[attr-defined]
        return error
    return ids


def _client(flavour: str, port: int, **options: Any) -> Callable[[], Any]:
    kind = Memstore if flavour == "sync" else AsyncMemstore
    return lambda: kind(f"127.0.0.1:{port}", **options)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_stream_whose_server_froze_raises_unavailable_with_its_token(
    flavour: str, proxy: FaultProxy, users: list[str], grpc_port: int
) -> None:
    # The peer stops answering after the first chunk (a frozen host, a dropped path): the
    # stream waited forever, as no deadline and no keepalive bounds it. Now each read waits
    # stream_idle_timeout; resuming on the same frozen connection gets nothing within the
    # budget either, and the stream raises Unavailable (what a caller resumes on), with the
    # token that resumes it.
    proxy.pause = SLOWED
    retry = RetryPolicy(stream_budget=1.0)
    make = _client(flavour, proxy.port, stream_idle_timeout=0.5, retry=retry)
    start = time.monotonic()
    error = await _read(flavour, make, lambda n: n == 1 and proxy.freeze())
    elapsed = time.monotonic() - start
    assert isinstance(error, Unavailable), error
    assert error.reason == "STREAM_UNREACHABLE" and "whole stream_budget" in error.message
    # Chunks already on their way when it froze may arrive: whatever came, the token
    # resumes right after it.
    read = error.read
    assert len(read) >= CHUNK and read == users[: len(read)] and error.page_token
    assert elapsed < 5, elapsed
    async with AsyncMemstore(f"127.0.0.1:{grpc_port}") as direct:
        rest = [
            u.user_id
            async for chunk, _ in direct.user.export(CHUNK, error.page_token)
            for u in chunk
        ]
    assert rest == users[len(read) :]


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_stream_whose_server_never_answered_raises_deadline_exceeded(
    flavour: str, proxy: FaultProxy, users: list[str]
) -> None:
    # Frozen before the first chunk: the stream is retried as a unary call is (max_attempts),
    # each read waiting stream_idle_timeout, then gives up as a deadline, with no token.
    retry = RetryPolicy(max_attempts=2)
    make = _client(flavour, proxy.port, stream_idle_timeout=0.5, retry=retry)
    start = time.monotonic()
    if flavour == "sync":

        def run() -> Any:
            with make() as client:
                client.user.get(users[0])  # the connection is up, then freezes
                proxy.freeze()
                with pytest.raises(DeadlineExceeded) as raised:
                    list(client.user.list_chunked(CHUNK))
                return raised.value

        error = await asyncio.to_thread(run)
    else:
        async with make() as client:
            await client.user.get(users[0])
            proxy.freeze()
            with pytest.raises(DeadlineExceeded) as raised:
                async for _ in client.user.list_chunked(CHUNK):
                    pass
            error = raised.value
    assert error.reason == "STREAM_IDLE" and "sent nothing" in error.message
    assert error.page_token == ""
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_frozen_stream_resumes_on_a_new_connection_with_keepalive_options(
    flavour: str, proxy: FaultProxy, users: list[str]
) -> None:
    # Keepalive passed through `options` closes the frozen connection (UNAVAILABLE); the
    # stream resumes on a new one from its last token: every user once.
    proxy.pause = SLOWED
    make = _client(flavour, proxy.port, options=KEEPALIVE)
    start = time.monotonic()
    read = await _read(flavour, make, lambda n: n == 1 and proxy.freeze())
    assert read == users, read
    assert proxy.accepted == 2
    assert time.monotonic() - start < 10


async def test_a_stream_resumes_after_its_idle_timeout_when_the_peer_thaws(
    proxy: FaultProxy, users: list[str]
) -> None:
    # A peer that pauses (a VM migrated, a long GC) longer than stream_idle_timeout: the
    # attempt is cancelled and resumed from its token, on the same connection once it
    # flows again, not from the first row.
    def freeze(n: int) -> None:
        if n == 1:
            proxy.freeze()
            threading.Timer(1.0, proxy.thaw).start()

    proxy.pause = SLOWED
    make = _client("async", proxy.port, stream_idle_timeout=0.3)
    start = time.monotonic()
    assert await _read("async", make, freeze) == users
    assert time.monotonic() - start > 1.0  # the pause happened mid-stream


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_an_export_survives_a_server_restart(
    flavour: str, proxy: FaultProxy, users: list[str]
) -> None:
    # A restart (SIGTERM, then the new process listening 2-4 s later) spent the stream's 4
    # attempts in under a second, mostly on gRPC's cached reconnect backoff. Now a stream
    # that has begun keeps resuming for RetryPolicy.stream_budget (30 s), each attempt
    # waiting for the reconnect.
    def restart(n: int) -> None:
        if n == 1:
            proxy.down()
            threading.Timer(2.5, proxy.up).start()

    proxy.pause = SLOWED
    start = time.monotonic()
    read = await _read(flavour, _client(flavour, proxy.port), restart)
    assert read == users, getattr(read, "read", read)
    assert 2.5 < time.monotonic() - start < 15


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_close_during_a_retry_sleep_is_client_closed(
    flavour: str, proxy: FaultProxy, users: list[str]
) -> None:
    # close() while a call slept before its next retry: grpc's own error came out (sync
    # ValueError "Cannot invoke RPC on closed channel!", asyncio UsageError).
    proxy.down()
    retry = RetryPolicy(max_attempts=10, initial_backoff=2, max_backoff=2, multiplier=1)
    if flavour == "sync":
        client = Memstore(f"127.0.0.1:{proxy.port}", retry=retry)
        threading.Timer(0.3, client.close).start()
        with pytest.raises(ClientClosed):
            await asyncio.to_thread(client.user.get, "u00")
    else:
        aclient = AsyncMemstore(f"127.0.0.1:{proxy.port}", retry=retry)
        call = asyncio.ensure_future(aclient.user.get("u00"))
        await asyncio.sleep(0.3)
        await aclient.close()
        with pytest.raises(ClientClosed):
            await call


async def test_close_during_an_async_call_is_client_closed_not_cancelled(
    proxy: FaultProxy, users: list[str]
) -> None:
    # grpc.aio cancels the calls in flight on close(): their tasks, which nobody cancelled,
    # got CancelledError (gather and TaskGroup read it as their own cancellation).
    client = AsyncMemstore(f"127.0.0.1:{proxy.port}")
    await client.user.get("u00")
    proxy.freeze()
    get = asyncio.ensure_future(client.user.get("u00"))

    async def stream() -> None:
        async for _ in client.user.list_chunked(CHUNK):
            pass

    listing = asyncio.ensure_future(stream())
    await asyncio.sleep(0.3)
    await client.close()
    results = await asyncio.gather(get, listing, return_exceptions=True)
    assert [type(r) for r in results] == [ClientClosed, ClientClosed], results


async def test_close_during_a_sync_call_is_client_closed(
    proxy: FaultProxy, users: list[str]
) -> None:
    client = Memstore(f"127.0.0.1:{proxy.port}")
    await asyncio.to_thread(client.user.get, "u00")
    proxy.freeze()
    threading.Timer(0.3, client.close).start()
    with pytest.raises(ClientClosed):
        await asyncio.to_thread(client.user.get, "u00")

"""What bounds gRPC's connections: idle connections closed, the
process's open files limit, and the accept loop's errors while it is out of descriptors."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from server.config import Config
from server.serving import connections
from server.serving.app import build_server
from server.store import Store
from tests.raw_h2 import WindowShut


@asynccontextmanager
async def _server(store: Store) -> AsyncIterator[int]:
    server, port = await build_server(Config(host="127.0.0.1", port=0), store)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_an_idle_connection_is_closed(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "CONNECTION_IDLE_MS", 500)
    async with _server(store) as port:
        idle = await WindowShut().open(port)
        try:
            await asyncio.wait_for(idle.closed.wait(), timeout=5)
            assert idle.goaway
        finally:
            await idle.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(soft, 1024, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        assert connections.raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_accept_errors_are_logged_once_a_period_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    others: list[str] = []
    loop.set_exception_handler(lambda _loop, context: others.append(context["message"]))
    try:
        handler = connections.AcceptErrors(loop, period=60)
        error = OSError(24, "Too many open files")
        with caplog.at_level(logging.ERROR, logger=connections.__name__):
            for _ in range(1000):
                context = {"message": "socket.accept() out of system resource", "exception": error}
                handler(loop, context)
            handler(loop, {"message": "something else"})
        records = [r for r in caplog.records if r.name == connections.__name__]
        assert len(records) == 1
        assert "1 failed accepts" in records[0].getMessage()
        handler._last -= 60  # a period later: the next record counts those held meanwhile
        handler(loop, context)
        assert "1000 failed accepts" in caplog.records[-1].getMessage()
        assert others == ["something else"]
    finally:
        loop.set_exception_handler(None)

"""Zep's REST API while PostgreSQL is down: a JSON 503, nothing written, and back after."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from server.config import Config
from server.serving.app import build_http
from server.serving.embedded import EmbeddedPostgres
from server.store import Store


@pytest.fixture
async def fault_http(fault_store: Store) -> AsyncIterator[httpx.AsyncClient]:
    server = await build_http(Config(host="127.0.0.1", http_port=0, embedder="none"), fault_store)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
        yield c
    await server.stop(None)


async def test_database_down_is_a_json_503_and_nothing_is_written(
    restartable: EmbeddedPostgres, fault_http: httpx.AsyncClient
) -> None:
    assert (await fault_http.post("/api/v2/users", json={"user_id": "before"})).status_code == 201
    await asyncio.to_thread(restartable.stop_server)
    try:
        down = await fault_http.post("/api/v2/users", json={"user_id": "during"})
        read = await fault_http.get("/api/v2/users/before")
    finally:
        await asyncio.to_thread(restartable.start_server)
    for reply in (down, read):
        assert reply.status_code == 503, reply.text
        assert reply.json()["reason"] == "DATABASE_UNAVAILABLE" and reply.json()["message"]
    for _ in range(100):  # the store heals within a second of PostgreSQL's return
        back = await fault_http.get("/api/v2/users/before")
        if back.status_code == 200:
            break
        await asyncio.sleep(0.1)
    assert back.status_code == 200
    assert (await fault_http.get("/api/v2/users/during")).status_code == 404

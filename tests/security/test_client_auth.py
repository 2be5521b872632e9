"""The Python client and the CLI against a key-requiring server: the key selects the project."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc as us_grpc
from memstore_client import AsyncMemstore, Memstore, Message, Unauthenticated
from server.__main__ import main
from server.config import Config
from server.serving.app import build_server
from server.serving.metrics import Metrics
from server.store import Store
from tests.fix_security import make_key


async def test_client_sends_its_key_and_sees_only_its_project(
    secure_port: int, secure_store: Store, clean_secure_db: str
) -> None:
    address = f"127.0.0.1:{secure_port}"
    key_a, key_b = await make_key(secure_store, "a"), await make_key(secure_store, "b")
    async with AsyncMemstore(address, api_key=key_a) as a, AsyncMemstore(address, key_b) as b:
        await a.user.add("alice")
        await a.memory.add("s", [Message(content="hi")], user_id="alice")
        assert [
            u.user_id for chunk in [c async for c in b.user.list_chunked()] for u in chunk
        ] == []
        assert (await a.memory.get("s")).messages[0].content == "hi"
        assert not (await b.memory.get("s")).found
    async with AsyncMemstore(address) as anonymous:
        with pytest.raises(Unauthenticated) as caught:
            await anonymous.user.get("alice")
    assert caught.value.reason == "API_KEY_MISSING"

    def sync_get() -> str:
        with Memstore(address, api_key=key_a) as client:
            return client.user.get("alice").user_id

    assert await asyncio.to_thread(sync_get) == "alice"


async def test_cli_export_and_import_use_the_key(
    secure_port: int, secure_store: Store, clean_secure_db: str, tmp_path: Path, capsys
) -> None:
    address = f"127.0.0.1:{secure_port}"
    key_a, key_b = await make_key(secure_store, "a"), await make_key(secure_store, "b")
    async with AsyncMemstore(address, api_key=key_a) as a:
        await a.user.add("alice")
    out = tmp_path / "users.jsonl"
    args = ["--address", address, "--no-progress"]
    assert (
        await asyncio.to_thread(
            main, ["export", "users", "-o", str(out), "--api-key", key_a, *args]
        )
        == 0
    )
    assert [json.loads(x)["user_id"] for x in out.read_text().splitlines()] == ["alice"]
    # Into project b, through b's key.
    assert (
        await asyncio.to_thread(
            main, ["import", "users", "-i", str(out), "--api-key", key_b, *args]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["created"] == 1
    async with AsyncMemstore(address, api_key=key_b) as b:
        assert (await b.user.get("alice")).user_id == "alice"
    # Without a key the export fails with the server's reason, not a traceback.
    assert await asyncio.to_thread(main, ["export", "users", *args]) == 1
    assert "API_KEY_MISSING" in capsys.readouterr().err


async def test_rejected_calls_are_counted_and_carry_a_request_id(secure_store: Store) -> None:
    await make_key(secure_store, "a")  # authentication is on
    metrics = Metrics()
    server, port = await build_server(Config(host="127.0.0.1", port=0), secure_store, metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = us_grpc.UserServiceStub(channel).GetUser(
                us.GetUserRequest(user_id="x"), metadata=(("x-request-id", "auth-1"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
    finally:
        await server.stop(None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("x-request-id", "auth-1") in tuple(caught.value.trailing_metadata() or ())
    method = "/memstore.v1.UserService/GetUser"
    value = metrics.registry.get_sample_value(
        "memstore_grpc_requests_total", {"method": method, "code": "UNAUTHENTICATED"}
    )
    assert value == 1

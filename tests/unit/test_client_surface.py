"""The Python client reaches every RPC and every request field of both services, sync and
asyncio alike: a new RPC or field in protos/ fails this test until the client can send it.

A recording gRPC server, built from the service descriptors, answers every RPC with an empty
response and keeps each request; the table below calls the client's public methods with
non-default arguments, and the fields set in the requests it sent must cover the descriptors.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import grpc
import pytest

from memstore.v1 import backup_service_pb2 as bs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from memstore_client import AsyncMemstore, ExportedMessage, Memstore, Message, Session, User
from memstore_client.aio import AsyncBackupClient, AsyncMemoryClient, AsyncUserClient
from memstore_client.sync import BackupClient, MemoryClient, UserClient

T = datetime(2024, 5, 1, tzinfo=UTC)
UUID = "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162"
META = {"a": 1}
USER = User("u", "e", "f", "l", META, T, T, 0)
SESSION = Session("s", "u", META, T, T, T, 0, T)
MESSAGE = Message("c", "r", "user", META, UUID, 1, T, T, T)

#: A snapshot id of OpenSnapshot.
SNAP = "00000003-0000001B-1.0123456789abcdef"

#: (client method, args, kwargs, the RPC it must send). Every argument is non-default, so
#: each field it maps to is set in the request.
SURFACE: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("user.add", ("u",), {"email": "e", "first_name": "f", "last_name": "l", "metadata": META},
     "CreateUser"),
    ("user.get", ("u",), {}, "GetUser"),
    ("user.update", ("u",), {"email": "e", "first_name": "f", "last_name": "l",
                             "metadata": META}, "UpdateUser"),
    ("user.update", ("u",), {"email": "e", "clear_metadata": True}, "UpdateUser"),
    ("user.delete", ("u",), {}, "DeleteUser"),
    ("user.list", (5, "tok"), {}, "ListUsers"),
    ("user.list", (5,), {"page_number": 2}, "ListUsers"),
    ("user.list_chunked", (7,), {}, "ListUsersChunked"),
    ("user.export", (5, "tok"), {"snapshot": SNAP}, "ListUsersChunked"),
    ("user.get_sessions", ("u",), {}, "ListUserSessions"),
    ("user.list_sessions", ("u", 5, "tok"), {}, "ListUserSessions"),
    ("memory.add_session", ("s",), {"user_id": "u", "metadata": META}, "CreateSession"),
    ("memory.get_session", ("s",), {"show_deleted": True}, "GetSession"),
    ("memory.update_session", ("s", META), {}, "UpdateSession"),
    ("memory.update_session", ("s",), {"clear_metadata": True}, "UpdateSession"),
    ("memory.delete", ("s",), {}, "DeleteSession"),
    ("memory.undelete_session", ("s",), {}, "UndeleteSession"),
    ("memory.list_sessions", (5, 2), {
        "user_id": "u", "show_deleted": True, "order_by": "updated_at desc",
        "created_after": T, "created_before": T, "updated_after": T, "updated_before": T,
        "metadata_contains": META}, "ListSessions"),
    ("memory.list_sessions", (5,), {"page_token": "tok"}, "ListSessions"),
    ("memory.add", ("s", [Message(content="c", role="r", role_type="user")]),
     {"user_id": "u"}, "AddMemory"),
    ("memory.get", ("s", 3), {"relevant_limit": 0}, "GetMemory"),
    ("memory.list_messages", ("s", 5, "tok"), {}, "ListMessages"),
    ("memory.list_messages", ("s", 5), {"page_number": 2}, "ListMessages"),
    ("memory.get_message", ("s", UUID), {}, "GetMessage"),
    ("memory.update_message", ("s", UUID, META), {}, "UpdateMessage"),
    ("memory.update_message", ("s", UUID), {"clear_metadata": True}, "UpdateMessage"),
    ("memory.clear", ("s",), {}, "ClearMemory"),
    ("memory.export_sessions", (5, "tok"), {"include_deleted": True,
                                            "snapshot": SNAP}, "ExportSessions"),
    ("memory.export_messages", (5, "tok"), {"include_deleted": True,
                                            "snapshot": SNAP}, "ExportMessages"),
    ("backup.open_snapshot", (60,), {}, "OpenSnapshot"),
    ("backup.close_snapshot", (SNAP,), {}, "CloseSnapshot"),
    ("backup.restore", ([USER], [SESSION], [ExportedMessage("s", MESSAGE)]),
     {"require_empty": True}, "Restore"),
    ("backup.get_source", (), {}, "GetBackupSource"),
    ("memory.search", ("text",), {
        "user_id": "u", "session_ids": ["s"], "search_type": "full_text", "limit": 3,
        "mmr_lambda": 0.5, "role_types": ["user"], "metadata": META,
        "created_after": T, "created_before": T}, "SearchMemory"),
]  # fmt: skip

_MODULES: tuple[ModuleType, ...] = (us, ss, bs)


def _every_field() -> set[tuple[str, str]]:
    return {
        (method.name, field.name)
        for module in _MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        for field in method.input_type.fields
    }


class _Recorder:
    """Answers every RPC of both services with an empty response; keeps (method, request)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        found = []
        for module in _MODULES:
            for service in module.DESCRIPTOR.services_by_name.values():
                methods = {}
                for method in service.methods:
                    request = getattr(module, method.input_type.name)
                    response = getattr(module, method.output_type.name)
                    kind = (
                        grpc.unary_stream_rpc_method_handler
                        if method.server_streaming
                        else grpc.unary_unary_rpc_method_handler
                    )
                    answer = self._stream if method.server_streaming else self._unary
                    methods[method.name] = kind(
                        functools.partial(answer, method.name, response),
                        request_deserializer=request.FromString,
                        response_serializer=response.SerializeToString,
                    )
                found.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        return found

    def _unary(self, name: str, response: Any, request: Any, _context: Any) -> Any:
        self.requests.append((name, request))
        return response()

    def _stream(self, name: str, _response: Any, request: Any, _context: Any) -> Iterator[Any]:
        self.requests.append((name, request))
        return iter(())


@pytest.fixture
def recorder() -> Iterator[tuple[_Recorder, str]]:
    found = _Recorder()
    server = grpc.server(ThreadPoolExecutor(4), handlers=found.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield found, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _method(client: Any, path: str) -> Any:
    target = client
    for part in path.split("."):
        target = getattr(target, part)
    return target


def _sent(recorder: _Recorder, start: int) -> tuple[set[str], set[tuple[str, str]]]:
    requests = recorder.requests[start:]
    methods = {name for name, _ in requests}
    fields = {(name, f.name) for name, request in requests for f, _ in request.ListFields()}
    return methods, fields


def test_the_sync_client_reaches_every_rpc_and_request_field(recorder) -> None:
    found, address = recorder
    covered: set[tuple[str, str]] = set()
    with Memstore(address, timeout=10) as client:
        for path, args, kwargs, rpc in SURFACE:
            start = len(found.requests)
            result = _method(client, path)(*args, **kwargs)
            if inspect.isgenerator(result):
                list(result)
            methods, fields = _sent(found, start)
            assert methods == {rpc}, f"{path} sent {methods}, not {rpc}"
            covered |= fields
    missing = sorted(_every_field() - covered)
    assert not missing, f"request fields the sync client cannot send: {missing}"


async def test_the_async_client_reaches_every_rpc_and_request_field(recorder) -> None:
    # On the session's event loop: grpc.aio objects of a second loop in one process can
    # crash the gRPC core.
    found, address = recorder
    covered: set[tuple[str, str]] = set()
    async with AsyncMemstore(address, timeout=10) as client:
        for path, args, kwargs, rpc in SURFACE:
            start = len(found.requests)
            result = _method(client, path)(*args, **kwargs)
            if hasattr(result, "__aiter__"):
                _ = [item async for item in result]
            else:
                await result
            methods, fields = _sent(found, start)
            assert methods == {rpc}, f"{path} sent {methods}, not {rpc}"
            covered |= fields
    missing = sorted(_every_field() - covered)
    assert not missing, f"request fields the async client cannot send: {missing}"


def _public(obj: Any) -> dict[str, list[tuple[str, Any, Any]]]:
    return {
        name: [
            (p.name, p.kind, p.default)
            for p in inspect.signature(getattr(obj, name)).parameters.values()
        ]
        for name in dir(obj)
        if not name.startswith("_")
    }


@pytest.mark.parametrize(
    ("sync", "aio"),
    [
        (UserClient, AsyncUserClient),
        (MemoryClient, AsyncMemoryClient),
        (BackupClient, AsyncBackupClient),
    ],
)
def test_sync_and_async_clients_have_the_same_methods_and_parameters(sync, aio) -> None:
    assert _public(sync) == _public(aio)

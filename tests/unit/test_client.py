"""The sync client over grpcio-testing's fake channel: requests sent, answers and errors mapped."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2, struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from memstore.v1 import backup_service_pb2 as bs
from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc as us_grpc
from memstore_client import (
    AlreadyExists,
    AsyncMemstore,
    DeadlineExceeded,
    InvalidArgument,
    Memstore,
    Message,
    NotFound,
    RetryPolicy,
    Unavailable,
    backup_cli,
    cli,
)

USERS = us.DESCRIPTOR.services_by_name["UserService"]
SESSIONS = ss.DESCRIPTOR.services_by_name["SessionService"]
OK = grpc.StatusCode.OK
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)


@pytest.fixture
def channel() -> grpc_testing.Channel:
    return grpc_testing.channel([USERS, SESSIONS], grpc_testing.strict_real_time())


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(1)
    yield executor
    # A failed test may leave a call waiting on the fake channel: do not wait for it.
    executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def client(channel: grpc_testing.Channel) -> Memstore:
    return Memstore(channel=channel, api_key="sk-test", retry=FAST, timeout=5)


def _call(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any, **kw: Any) -> Future[Any]:
    return pool.submit(fn, *args, **kw)


def _take(channel: grpc_testing.Channel, service: Any, method: str) -> tuple[Any, Any, Any]:
    return channel.take_unary_unary(service.methods_by_name[method])  # type: ignore[no-any-return]


def _status_trailer(code: int, message: str, *details: Any) -> tuple[tuple[str, bytes], ...]:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    status = status_pb2.Status(code=code, message=message, details=packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def _user_proto(user_id: str) -> resources_pb2.User:
    stamp = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_000)
    meta = struct_pb2.Struct()
    meta.update({"plan": "pro", "seats": 3, "ratio": 0.5, "tags": ["a"]})
    return resources_pb2.User(
        user_id=user_id, email="a@example.com", metadata=meta, created_at=stamp,
        updated_at=stamp, session_count=2,
    )  # fmt: skip


def test_get_user_sends_the_id_and_bearer_key_and_maps_the_user(client, channel, pool):
    future = _call(pool, client.user.get, "alice")
    metadata, request, rpc = _take(channel, USERS, "GetUser")
    assert request == us.GetUserRequest(user_id="alice")
    assert ("authorization", "Bearer sk-test") in metadata
    rpc.terminate(us.GetUserResponse(user=_user_proto("alice")), (), OK, "")
    user = future.result(timeout=5)
    assert user.user_id == "alice" and user.session_count == 2
    assert user.created_at == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    # Struct numbers are floats on the wire; whole ones come back as int.
    assert user.metadata == {"plan": "pro", "seats": 3, "ratio": 0.5, "tags": ["a"]}
    assert isinstance(user.metadata["seats"], int)


def test_without_an_api_key_no_authorization_is_sent(channel, pool):
    plain = Memstore(channel=channel, retry=FAST)
    future = _call(pool, plain.user.get, "bob")
    metadata, _, rpc = _take(channel, USERS, "GetUser")
    assert all(key != "authorization" for key, _ in metadata)
    rpc.terminate(us.GetUserResponse(user=_user_proto("bob")), (), OK, "")
    future.result(timeout=5)


def test_errors_become_typed_exceptions_with_reason_and_fields(client, channel, pool):
    future = _call(pool, client.user.add, "alice", metadata={"k": 1})
    _, request, rpc = _take(channel, USERS, "CreateUser")
    assert request.user_id == "alice" and dict(request.metadata) == {"k": 1.0}
    info = error_details_pb2.ErrorInfo(reason="USER_ALREADY_EXISTS", domain="memstore")
    trailer = _status_trailer(code_pb2.ALREADY_EXISTS, "user 'alice' already exists", info)
    rpc.terminate(None, trailer, grpc.StatusCode.ALREADY_EXISTS, "user 'alice' already exists")
    with pytest.raises(AlreadyExists) as caught:
        future.result(timeout=5)
    assert caught.value.reason == "USER_ALREADY_EXISTS"
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS

    future = _call(pool, client.memory.add, "s1", [{"content": "hi", "role_type": "user"}])
    _, request, rpc = _take(channel, SESSIONS, "AddMemory")
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="messages[0].content", description="too long"
            )
        ]
    )
    info = error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="memstore")
    trailer = _status_trailer(code_pb2.INVALID_ARGUMENT, "messages[0].content: too long", info, bad)
    rpc.terminate(None, trailer, grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content: too long")
    with pytest.raises(InvalidArgument) as invalid:
        future.result(timeout=5)
    assert [(v.field, v.description) for v in invalid.value.field_violations] == [
        ("messages[0].content", "too long")
    ]


def test_idempotent_calls_retry_unavailable_then_succeed(client, channel, pool):
    future = _call(pool, client.user.get, "alice")
    for _ in range(2):
        _, _, rpc = _take(channel, USERS, "GetUser")
        rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "database unavailable")
    _, request, rpc = _take(channel, USERS, "GetUser")
    assert request.user_id == "alice"
    rpc.terminate(us.GetUserResponse(user=_user_proto("alice")), (), OK, "")
    assert future.result(timeout=5).user_id == "alice"


def test_retries_stop_after_max_attempts(client, channel, pool):
    future = _call(pool, client.memory.get, "s1", 3)
    for _ in range(FAST.max_attempts):
        _, request, rpc = _take(channel, SESSIONS, "GetMemory")
        assert request == ss.GetMemoryRequest(session_id="s1", lastn=3)
        rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "down")
    with pytest.raises(Unavailable):
        future.result(timeout=5)


def test_memory_get_says_when_the_memories_could_not_be_read(client, channel, pool):
    # GetMemory's relevant_unavailable (a Citus worker out of reach) reaches the caller.
    future = _call(pool, client.memory.get, "s1", 3)
    _, _, rpc = _take(channel, SESSIONS, "GetMemory")
    answer = ss.GetMemoryResponse(found=True, relevant_unavailable=True)
    answer.messages.add(content="hi")
    rpc.terminate(answer, (), OK, "")
    memory = future.result(timeout=5)
    assert memory.relevant_unavailable and [m.content for m in memory.messages] == ["hi"]
    assert memory.relevant_messages == [] and memory.context == ""


#: Every write the client sends once (docs/clients.md, "Retries"): its call, arguments and RPC.
_ONCE = {
    "CreateUser": (lambda c: c.user.add, ("alice",), USERS),
    "UpdateUser": (lambda c: c.user.update, ("alice",), USERS),
    "DeleteUser": (lambda c: c.user.delete, ("alice",), USERS),
    "CreateSession": (lambda c: c.memory.add_session, ("s1",), SESSIONS),
    "UpdateSession": (lambda c: c.memory.update_session, ("s1", {"a": 1}), SESSIONS),
    "DeleteSession": (lambda c: c.memory.delete, ("s1",), SESSIONS),
    "UndeleteSession": (lambda c: c.memory.undelete_session, ("s1",), SESSIONS),
    "UpdateMessage": (
        lambda c: c.memory.update_message,
        ("s1", "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162", {"a": 1}),
        SESSIONS,
    ),
    "ClearMemory": (lambda c: c.memory.clear, ("s1",), SESSIONS),
}


@pytest.mark.parametrize("rpc_name", sorted(_ONCE))
def test_writes_without_idempotency_are_not_retried(client, channel, pool, rpc_name):
    method, args, service = _ONCE[rpc_name]
    future = _call(pool, method(client), *args)
    _, _, rpc = _take(channel, service, rpc_name)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "down")
    # One attempt only: the lost call may have committed, and nothing tells a retry so (a
    # second attempt would never be answered here, and the result would time out).
    with pytest.raises(Unavailable):
        future.result(timeout=5)


def test_add_memory_is_retried_with_the_same_uuids(client, channel, pool):
    given = "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162"
    messages = [Message(content="hi", role_type="assistant"), Message(content="yo", uuid=given)]
    future = _call(pool, client.memory.add, "s1", messages)
    # The first attempt commits on the server, but its answer is lost: UNAVAILABLE.
    _, first, rpc = _take(channel, SESSIONS, "AddMemory")
    assert first.messages[0].role_type == resources_pb2.ROLE_TYPE_ASSISTANT
    assert first.messages[1].uuid == given
    made = first.messages[0].uuid
    assert str(uuid.UUID(made)) == made and made != given
    stored = {m.uuid: i + 1 for i, m in enumerate(first.messages)}
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection lost during commit")
    # The retry sends the very same uuids, so the server can answer with what it stored.
    _, again, rpc = _take(channel, SESSIONS, "AddMemory")
    assert again == first
    answer = ss.AddMemoryResponse(
        messages=[
            resources_pb2.Message(uuid=m.uuid, content=m.content, sequence=stored[m.uuid])
            for m in again.messages
        ]
    )
    rpc.terminate(answer, (), OK, "")
    added = future.result(timeout=5)
    assert [(m.uuid, m.sequence) for m in added] == [(made, 1), (given, 2)]


def test_each_add_memory_call_makes_new_uuids(client, channel, pool):
    sent = []
    for _ in range(2):
        future = _call(pool, client.memory.add, "s1", [{"content": "same"}])
        _, request, rpc = _take(channel, SESSIONS, "AddMemory")
        sent.append(request.messages[0].uuid)
        rpc.terminate(ss.AddMemoryResponse(), (), OK, "")
        future.result(timeout=5)
    # Two calls are two messages: only a retry of one call repeats its uuids.
    assert sent[0] != sent[1]


def test_not_found_is_not_retried(client, channel, pool):
    future = _call(pool, client.memory.get_session, "nope")
    _, _, rpc = _take(channel, SESSIONS, "GetSession")
    rpc.terminate(None, (), grpc.StatusCode.NOT_FOUND, "session 'nope' not found")
    with pytest.raises(NotFound, match="nope"):
        future.result(timeout=5)


def test_update_sends_only_the_fields_given(client, channel, pool):
    future = _call(pool, client.user.update, "alice", first_name="", metadata={"plan": None})
    _, request, rpc = _take(channel, USERS, "UpdateUser")
    assert request.HasField("first_name") and request.first_name == ""
    assert not request.HasField("email") and not request.HasField("last_name")
    assert request.metadata.fields["plan"].HasField("null_value")
    rpc.terminate(us.UpdateUserResponse(user=_user_proto("alice")), (), OK, "")
    future.result(timeout=5)


def test_list_sessions_sends_the_page_number(client, channel, pool):
    future = _call(pool, client.memory.list_sessions, 10, 3, user_id="alice")
    _, request, rpc = _take(channel, SESSIONS, "ListSessions")
    assert request == ss.ListSessionsRequest(page_size=10, page_number=3, user_id="alice")
    rpc.terminate(ss.ListSessionsResponse(total_size=25), (), OK, "")
    page = future.result(timeout=5)
    assert page.total_size == 25 and page.sessions == [] and page.next_page_token is None


class _DroppingUsers(us_grpc.UserServiceServicer):
    """ListUsersChunked: from the start, one chunk then UNAVAILABLE; resumed, the rest."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def ListUsersChunked(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.tokens.append(request.page_token)
        if not request.page_token:
            users = [_user_proto("a"), _user_proto("b")]
            yield us.ListUsersChunkedResponse(users=users, next_page_token="after-b")
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        yield us.ListUsersChunkedResponse(users=[_user_proto("c")])


def test_list_chunked_resumes_from_the_last_token_after_unavailable() -> None:
    # A real server: a resumed attempt waits for the reconnect (wait_for_ready), which
    # grpcio-testing's channel does not take.
    users = _DroppingUsers()
    server = grpc.server(ThreadPoolExecutor(2))
    us_grpc.add_UserServiceServicer_to_server(users, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Memstore(f"127.0.0.1:{port}", retry=FAST) as client:
            chunks = [[u.user_id for u in chunk] for chunk in client.user.list_chunked(2)]
    finally:
        server.stop(None)
    assert chunks == [["a", "b"], ["c"]]
    assert users.tokens == ["", "after-b"]


def test_a_stream_whose_last_chunk_is_in_ends_there(client, channel, pool):
    # The last chunk (no token) makes the stream whole. An UNAVAILABLE while waiting for its
    # status restarted it from its first row (the empty token), and every row came twice.
    chunks = client.user.list_chunked(chunk_size=2)
    first = _call(pool, next, chunks)
    method = USERS.methods_by_name["ListUsersChunked"]
    _, _, rpc = channel.take_unary_stream(method)
    rpc.send_response(
        us.ListUsersChunkedResponse(users=[_user_proto("a")], next_page_token="after-a")
    )
    assert [u.user_id for u in first.result(timeout=5)] == ["a"]
    last = _call(pool, next, chunks)
    rpc.send_response(us.ListUsersChunkedResponse(users=[_user_proto("b")]))
    assert [u.user_id for u in last.result(timeout=5)] == ["b"]
    rest = _call(pool, list, chunks)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "connection reset")
    assert rest.result(timeout=5) == []


def test_a_restore_that_requires_an_empty_project_is_not_retried(client, channel, pool):
    # Its first attempt may have committed before its answer was lost: a retry then met its
    # own rows and failed PROJECT_NOT_EMPTY. Without require_empty, a retry counts them.
    backup = bs.DESCRIPTOR.services_by_name["BackupService"]
    channel = grpc_testing.channel([backup], grpc_testing.strict_real_time())
    client = Memstore(channel=channel, retry=FAST, timeout=5)
    for require_empty, attempts in ((True, 1), (False, FAST.max_attempts)):
        future = _call(pool, client.backup.restore, require_empty=require_empty)
        for _ in range(attempts):
            _, request, rpc = _take(channel, backup, "Restore")
            assert request.require_empty is require_empty
            rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "down")
        with pytest.raises(Unavailable):
            future.result(timeout=5)


class _SlowlyUnavailable(grpc.GenericRpcHandler):
    """A server whose GetUser answers UNAVAILABLE after `wait` seconds, counting calls."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/memstore.v1.UserService/GetUser":
            return None

        def get_user(request: us.GetUserRequest, context: grpc.ServicerContext) -> None:
            self.calls += 1
            time.sleep(self.wait)
            context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable")

        return grpc.unary_unary_rpc_method_handler(
            get_user,
            request_deserializer=us.GetUserRequest.FromString,
            response_serializer=us.GetUserResponse.SerializeToString,
        )


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_calls_timeout_bounds_its_retries_too(flavour: str) -> None:
    # Each attempt was given the whole timeout: 4 attempts of a server failing after 1 s took
    # 4 s for a timeout of 2.5. Now the call ends by its timeout, the last attempt cut short.
    handler = _SlowlyUnavailable(wait=1.0)
    server = grpc.server(ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    retry = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.002)
    address = f"127.0.0.1:{port}"
    start = time.monotonic()
    try:
        if flavour == "sync":
            with (
                Memstore(address, retry=retry, timeout=2.5) as client,
                pytest.raises((DeadlineExceeded, Unavailable)),
            ):
                client.user.get("alice")
        else:

            async def get() -> None:
                async with AsyncMemstore(address, retry=retry, timeout=2.5) as client:
                    await client.user.get("alice")

            with pytest.raises((DeadlineExceeded, Unavailable)):
                asyncio.run(get())
        elapsed = time.monotonic() - start
    finally:
        server.stop(None)
    assert handler.calls == 3  # the third cut at the deadline, no fourth
    assert elapsed < 3.5, elapsed


def test_an_export_interrupted_after_its_last_chunk_says_it_is_whole(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The last chunk's token is empty: a Ctrl-C after it was written said "nothing exported;
    # run again", of a file holding every row.
    args = _parsed("export", "users")
    cli._interrupted(args, 4, "")
    assert capsys.readouterr().err == "4 users exported, all of them\n"
    cli._interrupted(args, 0, "")
    assert "nothing exported" in capsys.readouterr().err
    cli._interrupted(args, 2, "tok")
    assert "resume with: memstore export users --page-token tok" in capsys.readouterr().err


def _parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_a_resume_command_reaches_the_server_the_interrupted_run_reached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Printed without the connection flags, a restore resumed against the default address:
    # another server, whose rows all "existed", exit 0, the target still empty.
    monkeypatch.delenv("MEMSTORE_API_KEY", raising=False)
    ca = tmp_path / "my ca.pem"
    args = _parsed(
        "restore", "-i", "back up.jsonl", "--address", "db.example:7000", "--ca-file", str(ca)
    )
    command = backup_cli.resume_command(args, "-i", args.input, "--resume")
    assert shlex.split(command) == [
        "memstore", "restore", "-i", "back up.jsonl", "--resume",
        "--address", "db.example:7000", "--ca-file", str(ca),
    ]  # fmt: skip
    args = _parsed("backup", "-o", "b.jsonl", "--tls", "--api-key", "secret-key")
    command = backup_cli.resume_command(args, "-o", args.output, "--resume")
    assert "secret-key" not in command and command.endswith("(with the same --api-key)")
    assert "--tls" in shlex.split(command.split(" (")[0])
    # A key from the environment is found there again: nothing to say.
    monkeypatch.setenv("MEMSTORE_API_KEY", "env-key")
    args = _parsed("export", "users", "--address", "127.0.0.1:1")
    command = backup_cli.resume_command(args, "users", "--page-token", "t")
    assert shlex.split(command)[-2:] == ["--address", "127.0.0.1:1"] and "env-key" not in command


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"initial_backoff": -1}, "initial_backoff"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_backoff": float("nan")}, "max_backoff"),
        ({"multiplier": 0.0}, "multiplier"),
        ({"stream_budget": -5}, "stream_budget"),
    ],
)
def test_a_retry_policy_out_of_range_is_refused_naming_the_field(
    fields: dict[str, Any], named: str
) -> None:
    # initial_backoff=-1 failed later, inside sleep, mid-retry; max_attempts=0 made one
    # attempt all the same.
    with pytest.raises(ValueError, match=f"^{named}: "):
        RetryPolicy(**fields)


def test_the_default_policy_sleeps_at_most_0_7_s_between_four_attempts() -> None:
    # What docs/clients.md says: sleeps of at most 0.1, 0.2 and 0.4 s; max_backoff (2 s)
    # is reached only by a stream resuming (retry 5 on).
    caps = [0.1, 0.2, 0.4]
    for _ in range(200):
        assert all(0 <= d <= cap for d, cap in zip(RetryPolicy().delays(), caps, strict=True))
    assert all(RetryPolicy().backoff(9) <= 2.0 for _ in range(200))

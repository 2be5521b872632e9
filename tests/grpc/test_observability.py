"""Metrics on their own port, request ids in trailing metadata, JSON access logs."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc, user_service_pb2_grpc
from memstore.v1 import user_service_pb2 as us
from server.config import Config
from server.serving.app import build_server
from server.serving.log_format import JsonFormatter, dropped_log_records
from server.serving.metrics import Metrics
from server.store import Store
from tests.grpc import msg, rpc_error
from tests.polling import until

USERS = "/memstore.v1.UserService/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture
async def served(store: Store, clean_db: str) -> AsyncIterator[tuple[int, int]]:
    """A server with its metrics endpoint on a free port; yields both ports."""
    metrics = Metrics(store.pool_stats)
    httpd, metrics_port = metrics.serve("127.0.0.1", 0)
    server, port = await build_server(Config(host="127.0.0.1", port=0), store, metrics)
    await server.start()
    try:
        yield port, metrics_port
    finally:
        await server.stop(None)
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
async def observed(served: tuple[int, int]) -> AsyncIterator[tuple[grpc.aio.Channel, int]]:
    """A channel to the `served` server, and its metrics port."""
    port, metrics_port = served
    # Without BDP probing the client's window stays at 64 KiB, so a stream the client stops
    # reading fills it at once and the server's next write waits on flow control; with it,
    # the window grew to megabytes and the write that should wait was still ahead (on the
    # Citus cluster under load a cancel found the server reading the database, 10 times
    # of 10: test_a_stream_cancelled_while_its_answer_waits_logs_no_error).
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        yield channel, metrics_port


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _requests(samples: dict, method: str, code: str) -> float:  # type: ignore[type-arg]
    key = ("memstore_grpc_requests_total", (("code", code), ("method", method)))
    return float(samples.get(key, 0.0))


async def test_metrics_count_calls_by_method_and_code(observed) -> None:
    channel, metrics_port = observed
    users = user_service_pb2_grpc.UserServiceStub(channel)
    sessions = session_service_pb2_grpc.SessionServiceStub(channel)
    before = await asyncio.to_thread(_scrape, metrics_port)
    await users.CreateUser(us.CreateUserRequest(user_id="alice"))
    await users.GetUser(us.GetUserRequest(user_id="alice"))
    for request in (us.GetUserRequest(user_id="nobody"), us.GetUserRequest(user_id="")):
        with pytest.raises(grpc.aio.AioRpcError):
            await users.GetUser(request)
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("a"), msg("b")]))
    chunks = [c async for c in sessions.ExportMessages(ss.ExportMessagesRequest(chunk_size=1))]
    assert len(chunks) == 2
    with pytest.raises(grpc.aio.AioRpcError):
        bad = ss.ExportSessionsRequest(page_token="garbage")
        _ = [c async for c in sessions.ExportSessions(bad)]
    after = await asyncio.to_thread(_scrape, metrics_port)

    def moved(method: str, code: str) -> float:
        return _requests(after, method, code) - _requests(before, method, code)

    assert moved(USERS + "CreateUser", "OK") == 1
    assert moved(USERS + "GetUser", "OK") == 1
    # The codes are what the calls returned, aborts from server/api/status.py included.
    assert moved(USERS + "GetUser", "NOT_FOUND") == 1
    assert moved(USERS + "GetUser", "INVALID_ARGUMENT") == 1
    export = "/memstore.v1.SessionService/ExportMessages"
    assert moved(export, "OK") == 1
    # A stream's abort counts too.
    assert moved("/memstore.v1.SessionService/ExportSessions", "INVALID_ARGUMENT") == 1
    assert after[("memstore_grpc_stream_rows_total", (("method", export),))] >= 2
    assert after[("memstore_grpc_stream_messages_total", (("method", export),))] >= 2
    latency = ("memstore_grpc_request_duration_seconds_count", (("method", USERS + "GetUser"),))
    assert after[latency] - before.get(latency, 0.0) == 3
    assert after[("memstore_grpc_in_flight", (("method", USERS + "GetUser"),))] == 0
    assert after[("memstore_db_pool_pool_size", ())] >= 1
    # Exported for alerting on a stalled log (tests/unit/test_log_output.py counts them).
    assert after[("memstore_log_records_dropped_total", ())] == dropped_log_records()


async def test_request_id_is_echoed_on_success_and_on_error(observed) -> None:
    channel, _ = observed
    users = user_service_pb2_grpc.UserServiceStub(channel)
    call = users.CreateUser(
        us.CreateUserRequest(user_id="bob"), metadata=(("x-request-id", "trace-42"),)
    )
    await call
    assert ("x-request-id", "trace-42") in tuple(await call.trailing_metadata() or ())
    failing = users.GetUser(us.GetUserRequest(user_id="ghost"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await failing
    trailer = dict(caught.value.trailing_metadata() or ())
    # Generated when the caller sent none; kept next to the google.rpc status details.
    assert len(str(trailer["x-request-id"])) == 32
    assert "grpc-status-details-bin" in trailer


def _access_lines(caplog: pytest.LogCaptureFixture, count: int) -> Callable[[], Awaitable[bool]]:
    """A check for `until`: are `count` access lines written yet?

    A line is written as its call ends, which for an error can be just after the client has
    the answer: the status goes out as the handler aborts, before it returns. The bound
    `until` is given only keeps a line that never comes from hanging the run.
    """

    async def written() -> bool:
        return sum(r.name == "memstore.access" for r in caplog.records) >= count

    return written


async def test_access_log_is_json_with_method_code_latency_and_request_id(observed, caplog):
    channel, _ = observed
    users = user_service_pb2_grpc.UserServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="memstore.access"):
        with pytest.raises(grpc.aio.AioRpcError):
            request = us.GetUserRequest(user_id="ghost")
            await users.GetUser(request, metadata=(("x-request-id", "r-1"),))

        assert await until(_access_lines(caplog, 1), within=30), "no access line"
    records = [r for r in caplog.records if r.name == "memstore.access"]
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["method"] == USERS + "GetUser" and line["code"] == "NOT_FOUND"
    assert line["request_id"] == "r-1" and line["latency_ms"] >= 0
    assert line["level"] == "INFO" and line["time"].endswith("+00:00")


async def test_access_log_names_reason_message_fields_and_peer(observed, caplog):
    channel, _ = observed
    users = user_service_pb2_grpc.UserServiceStub(channel)
    with caplog.at_level(logging.INFO, logger="memstore.access"):
        with pytest.raises(grpc.aio.AioRpcError):
            await users.ListUsers(us.ListUsersRequest(page_size=-3))
        with pytest.raises(grpc.aio.AioRpcError):
            await users.GetUser(us.GetUserRequest(user_id="ghost"))
        await users.CreateUser(us.CreateUserRequest(user_id="fine"))
        assert await until(_access_lines(caplog, 3), within=30), caplog.records
    records = [r for r in caplog.records if r.name == "memstore.access"]
    # By method: an error's line may come after the next call's (see _access_lines).
    lines = {getattr(r, "method", ""): r for r in records}
    bad, missing, ok = (
        json.loads(JsonFormatter().format(lines[USERS + name]))
        for name in ("ListUsers", "GetUser", "CreateUser")
    )
    assert bad["code"] == "INVALID_ARGUMENT" and bad["reason"] == "INVALID_ARGUMENT"
    assert bad["fields"] == ["page_size"] and "page_size" in bad["error"]
    assert bad["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert missing["reason"] == "USER_NOT_FOUND" and "ghost" in missing["error"]
    assert "fields" not in missing
    assert ok["code"] == "OK" and "reason" not in ok and "error" not in ok and ok["peer"]
    # The plain-text form carries the same: reason and message after the code.
    text = lines[USERS + "ListUsers"].getMessage()
    assert "INVALID_ARGUMENT" in text and "page_size" in text and "127.0.0.1" in text


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def test_metrics_answer_only_on_their_path_and_include_process_metrics(observed) -> None:
    _, metrics_port = observed
    for path in ("/", "/favicon.ico", "/metricsx", "/metrics/extra"):
        status, body = await asyncio.to_thread(_get, metrics_port, path)
        assert status == 404 and "/metrics" in body, path
    status, body = await asyncio.to_thread(_get, metrics_port, "/metrics")
    assert status == 200
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= names


async def test_a_stream_the_client_cancels_counts_as_cancelled_not_unknown(observed) -> None:
    # grpc.aio closes a stream the client cancelled with GeneratorExit at its yield about as
    # often as with CancelledError; the first was counted and logged as UNKNOWN, an error
    # of the server that a dashboard alerts on, for what is the client's choice.
    channel, metrics_port = observed
    users = user_service_pb2_grpc.UserServiceStub(channel)
    sessions = session_service_pb2_grpc.SessionServiceStub(channel)
    for i in range(3):
        await users.CreateUser(us.CreateUserRequest(user_id=f"u{i}"))
        await sessions.AddMemory(ss.AddMemoryRequest(session_id=f"s{i}", messages=[msg("a")]))
    # ExportMessages reads its next batch while it sends one: over three messages it ended
    # before most cancels arrived. Over 43 its stream outlasts the client's one read.
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s0", messages=[msg(str(i)) for i in range(40)])
    )
    streams = {
        USERS + "ListUsersChunked": lambda: users.ListUsersChunked(
            us.ListUsersChunkedRequest(chunk_size=1)
        ),
        "/memstore.v1.SessionService/ExportSessions": lambda: sessions.ExportSessions(
            ss.ExportSessionsRequest(chunk_size=1)
        ),
        "/memstore.v1.SessionService/ExportMessages": lambda: sessions.ExportMessages(
            ss.ExportMessagesRequest(chunk_size=1)
        ),
    }
    rounds = 15
    before = await asyncio.to_thread(_scrape, metrics_port)
    for _ in range(rounds):
        for start in streams.values():
            call = start()
            await call.read()
            call.cancel()

    def moved(samples: dict, method: str, code: str) -> float:  # type: ignore[type-arg]
        return _requests(samples, method, code) - _requests(before, method, code)

    async def all_finished() -> bool:
        now = await asyncio.to_thread(_scrape, metrics_port)
        return all(
            sum(moved(now, m, code) for code in ("CANCELLED", "UNKNOWN", "OK")) == rounds
            for m in streams
        )

    assert await until(all_finished)
    after = await asyncio.to_thread(_scrape, metrics_port)
    for method in streams:
        assert moved(after, method, "UNKNOWN") == 0, method
        # A short stream may have ended (OK) before the cancel arrived; most had not.
        assert moved(after, method, "CANCELLED") >= rounds // 2, method


async def test_a_stream_cancelled_while_its_answer_waits_logs_no_error(observed, caplog) -> None:
    # A client that stops reading, then cancels, leaves the server's write waiting on flow
    # control; the write then fails and grpc.aio logged it as an ERROR with a traceback
    # ("ExecuteBatchError raised in core by servicer method"): what the client chose, shown
    # as the server's fault, once per cancelled stream.
    channel, _ = observed
    sessions = session_service_pb2_grpc.SessionServiceStub(channel)
    content = "x" * (512 * 1024)
    for i in range(16):
        messages = [msg(content) for _ in range(4)]
        await sessions.AddMemory(ss.AddMemoryRequest(session_id=f"big{i}", messages=messages))
    caplog.set_level(logging.INFO)

    def ended() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "grpc._cython.cygrpc"]

    async def logged() -> bool:
        return len(ended()) >= 1

    for _ in range(10):  # until a write failed, as most do (2 of 3 in a run by hand)
        call = sessions.ExportMessages(ss.ExportMessagesRequest(chunk_size=1))
        await call.read()
        await asyncio.sleep(1)  # the server fills the window and waits on its next write
        call.cancel()
        if await until(logged, within=2):
            break
    assert ended(), "no write failed: the test proved nothing"
    assert all(m.startswith("a call ended while the server was sending") for m in ended())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


def _updates_past_deadline(port: int, rounds: int) -> list[grpc.StatusCode]:
    # A blocking client in its own thread, as most callers are: one on the test's event loop
    # reached the server only once the loop was free, after the server's deadline had passed.
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        for i in range(rounds):
            request = us.UpdateUserRequest(user_id="locked", email=f"a{i}@b.c")
            try:
                users.UpdateUser(request, timeout=1.0)
            except grpc.RpcError as error:
                codes.append(error.code())
    return codes


async def test_a_call_whose_deadline_passes_counts_as_deadline_exceeded(served, clean_db):
    # The client's cancel for its deadline reaches the server a few milliseconds before the
    # server's own copy of the deadline passes: most such calls were counted and logged as
    # CANCELLED, the client's choice, and hid slow calls from an alert on DEADLINE_EXCEEDED.
    port, metrics_port = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        await asyncio.to_thread(users.CreateUser, us.CreateUserRequest(user_id="locked"))
    rounds = 10
    before = await asyncio.to_thread(_scrape, metrics_port)
    async with await psycopg.AsyncConnection.connect(clean_db) as blocker:
        # The row lock makes each UpdateUser wait until its deadline passes.
        await blocker.execute("SELECT 1 FROM users WHERE user_id = 'locked' FOR UPDATE")
        codes = await asyncio.to_thread(_updates_past_deadline, port, rounds)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * rounds
        await blocker.rollback()
    method = USERS + "UpdateUser"

    def moved(samples: dict, code: str) -> float:  # type: ignore[type-arg]
        return _requests(samples, method, code) - _requests(before, method, code)

    async def all_finished() -> bool:
        now = await asyncio.to_thread(_scrape, metrics_port)
        return moved(now, "DEADLINE_EXCEEDED") + moved(now, "CANCELLED") >= rounds

    assert await until(all_finished)
    after = await asyncio.to_thread(_scrape, metrics_port)
    assert moved(after, "CANCELLED") == 0
    assert moved(after, "DEADLINE_EXCEEDED") == rounds


async def _read_all(call: Any) -> None:
    async for _ in call:
        pass


async def test_bytes_protobuf_cannot_parse_sent_to_health_or_reflection_are_refused_and_counted(
    observed, caplog
) -> None:
    # Health and reflection (open to every caller, no key) kept grpc's strict deserializer:
    # bad bytes were answered UNKNOWN, logged as an ERROR with a traceback, and neither
    # counted nor access-logged. Refused as memstore's own services refuse them now.
    channel, metrics_port = observed
    garbage = b"\xff\xff\xff\xff"
    health, reflection = "/grpc.health.v1.Health/", REFLECTION
    calls = {
        health + "Check": lambda: channel.unary_unary(health + "Check")(garbage, timeout=10),
        health + "Watch": lambda: _read_all(
            channel.unary_stream(health + "Watch")(garbage, timeout=10)
        ),
        reflection: lambda: _read_all(
            channel.stream_stream(reflection)(iter([garbage]), timeout=10)
        ),
    }
    before = await asyncio.to_thread(_scrape, metrics_port)
    caplog.set_level(logging.INFO)
    for start in calls.values():
        await rpc_error(
            start(), grpc.StatusCode.INVALID_ARGUMENT, field="request", reason="MALFORMED_REQUEST"
        )
    assert await until(_access_lines(caplog, len(calls)), within=30), caplog.records
    after = await asyncio.to_thread(_scrape, metrics_port)
    for method in calls:
        moved = _requests(after, method, "INVALID_ARGUMENT") - _requests(
            before, method, "INVALID_ARGUMENT"
        )
        assert moved == 1, method
    lines = {getattr(r, "method", ""): r for r in caplog.records if r.name == "memstore.access"}
    for method in calls:
        assert getattr(lines[method], "reason", None) == "MALFORMED_REQUEST", method
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_call_to_an_unknown_method_is_counted_and_logged_under_one_label(
    observed, caplog
) -> None:
    # gRPC's core answered UNIMPLEMENTED itself, past every handler: such calls (a client
    # of another version, a scan) were in no metric and had no access line. One label for
    # all of them: the caller picks the name, and a label per name would grow without bound.
    channel, metrics_port = observed
    calls = {
        "/no.such.Service/Method": lambda: channel.unary_unary("/no.such.Service/Method")(
            b"", timeout=10
        ),
        USERS + "NoSuchMethod": lambda: channel.unary_unary(USERS + "NoSuchMethod")(
            b"\x0a\x01a", timeout=10
        ),
        # A stream of answers to one request, sent whole with the call's start: a stream of
        # requests raced the server's early UNIMPLEMENTED in the client's core, which then
        # answered INTERNAL ("Internal error from Core", once on CI, the server's line said
        # UNIMPLEMENTED).
        "/no.such.Service/Stream": lambda: _read_all(
            channel.unary_stream("/no.such.Service/Stream")(b"", timeout=10)
        ),
    }
    before = await asyncio.to_thread(_scrape, metrics_port)
    caplog.set_level(logging.INFO)
    for name, start in calls.items():
        error = await rpc_error(start(), grpc.StatusCode.UNIMPLEMENTED, reason="METHOD_NOT_FOUND")
        assert name in str(error.details())
    assert await until(_access_lines(caplog, len(calls)), within=30), caplog.records
    after = await asyncio.to_thread(_scrape, metrics_port)
    moved = _requests(after, "unknown", "UNIMPLEMENTED") - _requests(
        before, "unknown", "UNIMPLEMENTED"
    )
    assert moved == len(calls)
    assert not any(method in str(after) for method in calls)  # no label of their own
    lines = [r for r in caplog.records if r.name == "memstore.access"]
    for name in calls:
        [line] = [r for r in lines if name in str(getattr(r, "error", ""))]
        fields = (line.method, line.code, line.reason)  # type: ignore[attr-defined]
        assert fields == ("unknown", "UNIMPLEMENTED", "METHOD_NOT_FOUND")
    # Known methods still reach their handlers.
    await user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
        us.CreateUserRequest(user_id="known")
    )


async def test_a_request_past_the_receive_limit_is_counted_as_cancelled(
    observed, caplog: pytest.LogCaptureFixture
) -> None:
    # gRPC's core refuses a message past grpc.max_receive_message_length (16 MiB) and ends
    # the call itself (RESOURCE_EXHAUSTED). The handler runs from the call's start (it reads
    # its request after the key check: serving/services.py), so the call is counted, but all
    # it sees is a call that ended without its request: CANCELLED, as a client's cancel.
    channel, metrics_port = observed
    users = user_service_pb2_grpc.UserServiceStub(channel)
    caplog.set_level(logging.INFO)
    big = us.CreateUserRequest(user_id="big", email="e" * (17 << 20))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.CreateUser(big, timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Logged as it is counted: one access line, CANCELLED.
    assert await until(_access_lines(caplog, 1), within=30), caplog.records
    lines = [r for r in caplog.records if r.name == "memstore.access"]
    assert [r.code for r in lines] == ["CANCELLED"], [r.__dict__ for r in lines]  # type: ignore[attr-defined]
    key = (
        "memstore_grpc_requests_total",
        (("code", "CANCELLED"), ("method", "/memstore.v1.UserService/CreateUser")),
    )

    async def counted() -> bool:
        return (await asyncio.to_thread(_scrape, metrics_port)).get(key) == 1.0

    assert await until(counted, 5)

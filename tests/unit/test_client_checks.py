"""The client refuses, before any call, arguments of the wrong type and metadata the server
would refuse or protobuf could not carry: its own errors, naming the argument."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import grpc
import grpc_testing
import pytest

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from memstore_client import (
    ArgumentTypeError,
    AsyncMemstore,
    InvalidArgument,
    Memstore,
    Message,
)
from memstore_client.types import to_dict, to_struct


@pytest.fixture
def client() -> Iterator[Memstore]:
    # A fake channel that no call ever reaches: each check must fire before the call.
    services = [us.DESCRIPTOR.services_by_name["UserService"]]
    services.append(ss.DESCRIPTOR.services_by_name["SessionService"])
    channel = grpc_testing.channel(services, grpc_testing.strict_real_time())
    yield Memstore(channel=channel, timeout=1)


#: A datetime without a time zone: local time to the caller, UTC to protobuf.
NAIVE = datetime(2026, 1, 1, 12, 0)


def _nested(levels: int) -> dict[str, Any]:
    inner: Any = 1
    for _ in range(levels):
        inner = {"a": inner}
    return dict(inner)


def _refused(call: Callable[[], object], field: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        call()
    assert [v.field for v in caught.value.field_violations] == [field]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value).startswith(f"INVALID_ARGUMENT: {field}: ")
    return caught.value


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.user.add(123), "user_id"),
        (lambda c: c.user.add("u", email=b"a@x.io"), "email"),
        (lambda c: c.user.get(None), "user_id"),
        (lambda c: c.user.update("u", first_name=1), "first_name"),
        (lambda c: c.user.delete(1.5), "user_id"),
        (lambda c: c.memory.add_session(7), "session_id"),
        (lambda c: c.memory.add_session("s", user_id=7), "user_id"),
        (lambda c: c.memory.get_session(["s"]), "session_id"),
        (lambda c: c.memory.add(1, [Message("x")]), "session_id"),
        (lambda c: c.memory.add("s", [Message("x"), Message(b"y")]), "messages[1].content"),
        (lambda c: c.memory.add("s", [{"content": "x", "role": 1}]), "messages[0].role"),
        (lambda c: c.memory.get(42), "session_id"),
        (lambda c: c.memory.search(b"text"), "text"),
        (lambda c: c.memory.search("t", session_ids="s1"), "session_ids"),
        (lambda c: c.memory.search("t", session_ids=["s1", 2]), "session_ids[1]"),
        (lambda c: c.memory.search("t", created_after="2026-01-01"), "created_after"),
        (lambda c: c.memory.list_sessions(updated_before=1_700_000_000), "updated_before"),
        (lambda c: c.user.add("u", metadata=["not", "a", "dict"]), "metadata"),
        (lambda c: c.user.add("u", metadata={1: "int key"}), "metadata"),
        (lambda c: c.user.add("u", metadata={"when": object()}), "metadata.when"),
    ],
)
def test_wrong_types_are_type_errors_naming_the_argument(
    client: Memstore, call: Callable[[Memstore], object], field: str
) -> None:
    error = _refused(lambda: call(client), field)
    # Both the client's InvalidArgument and a TypeError, never protobuf's bare words.
    assert isinstance(error, ArgumentTypeError)
    assert isinstance(error, TypeError)
    assert "bad argument type" not in str(error)


async def test_the_async_client_checks_the_same() -> None:
    client = AsyncMemstore(channel=grpc.aio.insecure_channel("127.0.0.1:9"), timeout=1)
    try:
        with pytest.raises(ArgumentTypeError, match="user_id: must be a str, not int"):
            await client.user.add(123)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="more than 32 levels"):
            await client.memory.update_session("s", _nested(40))
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.user.list(limit=2**31), "limit"),
        (lambda c: list(c.user.list_chunked(2**31)), "chunk_size"),
        (lambda c: list(c.user.export(2**31)), "chunk_size"),
        (lambda c: list(c.memory.export_sessions(2**31)), "chunk_size"),
        (lambda c: list(c.memory.export_messages(-(2**31) - 1)), "chunk_size"),
        (lambda c: c.memory.list_messages("s", page_size=2**40), "page_size"),
        (lambda c: c.memory.get("s", lastn=2**31), "lastn"),
        (lambda c: c.memory.get("s", relevant_limit=2**31), "relevant_limit"),
        (lambda c: c.memory.search("t", limit=2**31), "limit"),
    ],
)
def test_counts_past_32_bits_are_invalid_argument_naming_them(
    client: Memstore, call: Callable[[Memstore], object], field: str
) -> None:
    # As list_sessions' page_size always was: protobuf's bare "Value out of range" (a
    # ValueError, and a traceback out of `memstore export --chunk-size`) named nothing.
    error = _refused(lambda: call(client), field)
    assert "does not fit in 32 bits" in error.message


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.memory.list_sessions(created_after=NAIVE), "created_after"),
        (lambda c: c.memory.list_sessions(updated_before=NAIVE), "updated_before"),
        (lambda c: c.memory.search("t", created_after=NAIVE), "created_after"),
        (lambda c: c.memory.search("t", created_before=NAIVE), "created_before"),
    ],
)
def test_naive_datetimes_are_refused_as_restore_refuses_them(
    client: Memstore, call: Callable[[Memstore], object], field: str
) -> None:
    # protobuf reads a naive datetime as UTC: datetime.now() in Berlin moved the bound an
    # hour, silently (restore's rows already refused one).
    error = _refused(lambda: call(client), field)
    assert "timezone-aware" in error.message and not isinstance(error, TypeError)


@pytest.mark.parametrize("levels", [33, 45, 2000])
def test_too_deep_metadata_is_invalid_argument_not_decode_or_recursion_error(
    client: Memstore, levels: int
) -> None:
    error = _refused(lambda: client.user.add("u", metadata=_nested(levels)), "metadata")
    assert not isinstance(error, TypeError)
    assert "more than 32 levels of objects and arrays deep" in error.message
    _refused(
        lambda: client.memory.add("s", [Message("ok"), Message("x", metadata=_nested(levels))]),
        "messages[1].metadata",
    )
    _refused(lambda: client.memory.search("t", metadata=_nested(levels)), "metadata")


def test_a_cycle_is_too_deep_not_a_recursion_error(client: Memstore) -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    _refused(lambda: client.user.update("u", metadata=cyclic), "metadata")
    listed: list[Any] = []
    listed.append(listed)
    _refused(lambda: client.user.update("u", metadata={"l": listed}), "metadata")


def test_the_deepest_metadata_allowed_is_built() -> None:
    deep = _nested(32)
    mixed: Any = 1
    for level in range(31):
        mixed = [mixed] if level % 2 else {"k": mixed}
    for value in (deep, {"m": mixed}):
        struct = to_struct(value)
        assert struct is not None
        # The request that carries it serializes and parses (protobuf's depth limit holds).
        request = us.CreateUserRequest(user_id="u", metadata=struct)
        parsed = us.CreateUserRequest.FromString(request.SerializeToString())
        assert to_dict(parsed.metadata) == value


@pytest.mark.parametrize("number", [2**53 + 1, -(2**53) - 1, 2**60, 10**30])
def test_integers_a_double_cannot_hold_exactly_are_refused(client: Memstore, number: int) -> None:
    error = _refused(lambda: client.user.add("u", metadata={"n": number}), "metadata.n")
    assert "2**53" in error.message
    _refused(lambda: client.memory.update_session("s", {"a": [{"n": number}]}), "metadata.a[0].n")


@pytest.mark.parametrize(
    ("sent", "back"),
    [
        (2**53, 2**53),
        (-(2**53), -(2**53)),
        (3, 3),
        (3.0, 3),  # a whole float within ±2**53 comes back as int: Struct numbers are doubles
        (2.5, 2.5),
        (2.0**60, 2.0**60),  # floats beyond 2**53 stay floats (the caller chose rounding)
        (True, True),
    ],
)
def test_numbers_come_back_as_docs_clients_md_says(sent: object, back: object) -> None:
    struct = to_struct({"n": sent})
    assert struct is not None
    got = to_dict(struct)["n"]
    assert got == back
    assert type(got) is type(back)


def test_non_finite_floats_are_refused(client: Memstore) -> None:
    _refused(lambda: client.user.add("u", metadata={"x": float("nan")}), "metadata.x")
    _refused(lambda: client.user.add("u", metadata={"x": [float("inf")]}), "metadata.x[0]")


@pytest.mark.parametrize("address", ["localhost:99999", "[::1]:65536", "dns:///h:-1"])
async def test_an_address_whose_port_is_out_of_range_is_a_value_error(address: str) -> None:
    # gRPC reads port 99999 modulo 65536: the client talked to port 34463, someone else's.
    for make in (Memstore, AsyncMemstore):
        with pytest.raises(ValueError, match="is not 0 to 65535"):
            make(address)
    for fine in ("localhost:65535", "unix:/tmp/x:99999", "::1", "localhost"):
        Memstore(fine).close()


@pytest.mark.parametrize("key", ["ms_\x01bad", "ms_ü", "ms_key\n", "ms key\x7f"])
def test_an_api_key_grpc_cannot_send_is_refused_naming_it(key: str) -> None:
    # gRPC refused it at each call: INTERNAL "Invalid metadata" and a C log line on stderr.
    services = [us.DESCRIPTOR.services_by_name["UserService"]]
    channel = grpc_testing.channel(services, grpc_testing.strict_real_time())
    for make in (Memstore, AsyncMemstore):
        with pytest.raises(InvalidArgument) as caught:
            make(api_key=key, channel=channel)
        [violation] = caught.value.field_violations
        assert violation.field == "api_key"
        assert "printable ASCII" in violation.description
    with pytest.raises(ArgumentTypeError):
        Memstore(api_key=7, channel=channel)  # type: ignore[arg-type]

"""The client refuses, before any call, arguments of the wrong type and metadata the server
would refuse or protobuf could not carry: its own errors, naming the argument."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import grpc_testing
import pytest

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from memstore_client import (
    ArgumentTypeError,
    AsyncMemstore,
    ExportedMessage,
    InvalidArgument,
    Memstore,
    Message,
    Session,
    User,
)
from memstore_client._calls_bulk import search_memory
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
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

#: Python's and protobuf's own words for a wrong type, which named no argument.
BARE_WORDS = ("bad argument type", "real number", "after **", "has no attribute", "interpreted")


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
        # protobuf's TypeError "must be real number, not str"
        (lambda c: c.memory.search("t", mmr_lambda="0.5"), "mmr_lambda"),
        (lambda c: c.memory.search("t", mmr_lambda=True), "mmr_lambda"),
        # AttributeError: 'int' object has no attribute 'upper'
        (lambda c: c.memory.search("t", role_types=[1]), "role_types[0]"),
        (lambda c: c.memory.search("t", role_types="user"), "role_types"),
        (lambda c: c.memory.search("t", search_type=None), "search_type"),
        # protobuf's TypeError "'str' object cannot be interpreted as an integer"
        (lambda c: c.memory.get_session("s", show_deleted="yes"), "show_deleted"),
        # Read as a bool before: clear_metadata="false" cleared the metadata.
        (lambda c: c.user.update("u", clear_metadata="false"), "clear_metadata"),
        (lambda c: c.memory.update_session("s", None, clear_metadata="no"), "clear_metadata"),
        (lambda c: c.memory.update_message("s", "m", None, clear_metadata=0), "clear_metadata"),
        (lambda c: c.memory.list_sessions(show_deleted="no"), "show_deleted"),
        (lambda c: next(iter(c.memory.export_sessions(include_deleted="no"))), "include_deleted"),
        (lambda c: next(iter(c.memory.export_messages(include_deleted=1))), "include_deleted"),
        (lambda c: c.backup.restore(require_empty="no"), "require_empty"),
        # Message(**m): "argument after ** must be a mapping", and Python's words for a key
        (lambda c: c.memory.add("s", [123]), "messages[0]"),
        (lambda c: c.memory.add("s", "hello"), "messages"),
        (lambda c: c.memory.add("s", {"content": "x"}), "messages"),
        (lambda c: c.memory.add("s", Message("x")), "messages"),
        (lambda c: c.memory.add("s", [{"content": "x", "rol": "user"}]), "messages[0]"),
        (lambda c: c.memory.add("s", [Message("x"), {"role": "user"}]), "messages[1].content"),
        (lambda c: c.memory.add("s", [Message("x", role_type=1)]), "messages[0].role_type"),
        # AttributeError: 'str' object has no attribute 'user_id'
        (lambda c: c.backup.restore(users=["u1"]), "users[0]"),
        (lambda c: c.backup.restore(users="u1"), "users"),
        (lambda c: c.backup.restore(sessions=[_user()]), "sessions[0]"),
        (lambda c: c.backup.restore(messages=[Message("x")]), "messages[0]"),
        (lambda c: c.backup.restore(users=[_user(), _user(user_id=2)]), "users[1].user_id"),
        (
            lambda c: c.backup.restore(sessions=[_session(next_sequence="3")]),
            "sessions[0].next_sequence",
        ),
        (lambda c: c.backup.restore(messages=[ExportedMessage("s", "hi")]), "messages[0].message"),
    ],
)
def test_wrong_types_are_type_errors_naming_the_argument(
    client: Memstore, call: Callable[[Memstore], object], field: str
) -> None:
    error = _refused(lambda: call(client), field)
    # Both the client's InvalidArgument and a TypeError, never protobuf's bare words.
    assert isinstance(error, ArgumentTypeError)
    assert isinstance(error, TypeError)
    assert not [words for words in BARE_WORDS if words in str(error)]


def _user(**changed: Any) -> User:
    fields: dict[str, Any] = {"user_id": "u", "email": "", "first_name": "", "last_name": ""}
    fields |= {"metadata": {}, "created_at": NOW, "updated_at": NOW, "session_count": 0}
    return User(**(fields | changed))


def _session(**changed: Any) -> Session:
    fields: dict[str, Any] = {"session_id": "s", "user_id": None, "metadata": {}}
    fields |= {"created_at": NOW, "updated_at": NOW, "deleted_at": None}
    fields |= {"message_count": 0, "last_message_at": None}
    return Session(**(fields | changed))


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.memory.add("s", [Message("x", role_type="bot")]), "messages[0].role_type"),
        (lambda c: c.memory.add("s", [{"content": "x", "role_type": ""}]), "messages[0].role_type"),
        (lambda c: c.memory.search("t", role_types=["user", "bot"]), "role_types[1]"),
        (lambda c: c.memory.search("t", search_type="fulltext"), "search_type"),
        (
            lambda c: c.backup.restore(
                messages=[ExportedMessage("s", Message("x", role_type="b"))]
            ),
            "messages[0].message.role_type",
        ),
    ],
)
def test_unknown_names_are_invalid_argument_naming_the_field(
    client: Memstore, call: Callable[[Memstore], object], field: str
) -> None:
    # A plain ValueError named neither the argument nor which message held the typo.
    error = _refused(lambda: call(client), field)
    assert not isinstance(error, TypeError)
    assert error.message.startswith(f"{field}: must be one of ")


def test_role_types_are_read_in_any_case_with_or_without_their_prefix() -> None:
    search = search_memory(
        "t",
        user_id=None,
        session_ids=None,
        search_type="full_text",
        limit=10,
        mmr_lambda=1,
        role_types=["user", "Assistant", "ROLE_TYPE_TOOL"],
        metadata=None,
        created_after=None,
        created_before=None,
    )
    request = search.request
    assert isinstance(request, ss.SearchMemoryRequest)
    assert list(request.role_types) == [
        resources_pb2.ROLE_TYPE_USER,
        resources_pb2.ROLE_TYPE_ASSISTANT,
        resources_pb2.ROLE_TYPE_TOOL,
    ]
    assert request.mmr_lambda == 1.0


async def test_the_async_client_checks_the_same() -> None:
    client = AsyncMemstore(channel=grpc.aio.insecure_channel("127.0.0.1:9"), timeout=1)
    try:
        with pytest.raises(ArgumentTypeError, match="user_id: must be a str, not int"):
            await client.user.add(123)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="more than 32 levels"):
            await client.memory.update_session("s", _nested(40))
        with pytest.raises(ArgumentTypeError, match="mmr_lambda: must be a number, not str"):
            await client.memory.search("x", mmr_lambda="0.5")  # type: ignore[arg-type]
        with pytest.raises(ArgumentTypeError, match=r"messages: must be a list of .*, not str"):
            await client.memory.add("s", "hello")  # type: ignore[arg-type]
        with pytest.raises(ArgumentTypeError, match=r"users\[0\]: must be a User, not str"):
            await client.backup.restore(users=["u1"])  # type: ignore[list-item]
        with pytest.raises(InvalidArgument, match=r"role_types\[0\]: must be one of"):
            await client.memory.search("x", role_types=["bot"])
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

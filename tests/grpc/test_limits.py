"""Limits over a real channel: merged metadata size, nesting depth, stored values sent again."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc
from memstore.v1 import user_service_pb2 as us
from memstore_client._channel import aio_channel
from server import off_loop
from server.api.metadata_checks import json_size
from server.domain import MAX_METADATA_BYTES, MAX_METADATA_DEPTH
from tests.grpc import Code, Sessions, Users, as_dict, count_rows, msg, rpc_error, struct
from tests.wire import field, nested_struct

BAD = Code.INVALID_ARGUMENT


async def test_merges_that_outgrow_the_limit_are_refused_for_each_resource(
    users: Users, sessions: Sessions
) -> None:
    # The case: 63,009 bytes stored, then a 10,000-byte merge: 73,019 together.
    big = {"k": "v" * 63_000}
    patch = struct({"k2": "w" * 10_000})
    await users.CreateUser(us.CreateUserRequest(user_id="u", metadata=struct(big)))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s", metadata=struct(big)))
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="m", messages=[msg("x", metadata=struct(big))])
    )
    uuid = added.messages[0].uuid
    calls = [
        users.UpdateUser(us.UpdateUserRequest(user_id="u", metadata=patch)),
        sessions.UpdateSession(ss.UpdateSessionRequest(session_id="s", metadata=patch)),
        sessions.UpdateMessage(ss.UpdateMessageRequest(session_id="m", uuid=uuid, metadata=patch)),
    ]
    for call in calls:
        error = await rpc_error(call, BAD, field="metadata", reason="METADATA_TOO_LARGE")
        assert "73019 bytes" in (error.details() or "")
    user = (await users.GetUser(us.GetUserRequest(user_id="u"))).user
    session = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    message = (await sessions.GetMessage(ss.GetMessageRequest(session_id="m", uuid=uuid))).message
    assert [as_dict(x.metadata) for x in (user, session, message)] == [big] * 3


async def test_update_mask_naming_metadata_replaces_it(users: Users, sessions: Sessions) -> None:
    # METADATA_TOO_LARGE's way out, as its message and the protos name it: replace the
    # metadata by naming it in update_mask. A named metadata was merged, not replaced, so the
    # same refusal came back, and an old key could never be dropped but by a null.
    big = {"k": "v" * 63_000, "old": 1}
    new = {"k2": "w" * 10_000, "gone": None}
    await users.CreateUser(us.CreateUserRequest(user_id="u", metadata=struct(big)))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s", metadata=struct(big)))
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="m", messages=[msg("x", metadata=struct(big))])
    )
    uuid = added.messages[0].uuid
    mask = field_mask_pb2.FieldMask(paths=["metadata"])
    patch = struct(new)
    replaced = [
        (
            await users.UpdateUser(
                us.UpdateUserRequest(user_id="u", metadata=patch, update_mask=mask)
            )
        ).user,
        (
            await sessions.UpdateSession(
                ss.UpdateSessionRequest(session_id="s", metadata=patch, update_mask=mask)
            )
        ).session,
        (
            await sessions.UpdateMessage(
                ss.UpdateMessageRequest(session_id="m", uuid=uuid, metadata=patch, update_mask=mask)
            )
        ).message,
    ]
    # Keys set to null are left out, as a create leaves them.
    assert [as_dict(x.metadata) for x in replaced] == [{"k2": "w" * 10_000}] * 3
    user = (await users.GetUser(us.GetUserRequest(user_id="u"))).user
    session = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    message = (await sessions.GetMessage(ss.GetMessageRequest(session_id="m", uuid=uuid))).message
    assert [as_dict(x.metadata) for x in (user, session, message)] == [{"k2": "w" * 10_000}] * 3


async def test_concurrent_merges_never_store_more_than_the_limit(users: Users) -> None:
    # Twenty 60 KB merges stored 1.2 MB; now only one of them fits.
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    patches = [struct({f"k{i}": "x" * 60_000}) for i in range(20)]
    results = await asyncio.gather(
        *(users.UpdateUser(us.UpdateUserRequest(user_id="u", metadata=p)) for p in patches),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert [r.code() for r in refused] == [BAD] * 19
    user = (await users.GetUser(us.GetUserRequest(user_id="u"))).user
    assert len(user.metadata) == 1
    assert json_size(as_dict(user.metadata)) <= MAX_METADATA_BYTES


async def test_what_is_stored_at_the_limit_is_accepted_again(users: Users) -> None:
    # An export re-imported: the stored object, sent back as it comes out, must fit again.
    # Floats count as PostgreSQL prints them (1e+20 as 21 digits), on both sides.
    small = {"f": 1e20, "g": -1.5e-7, "n": 2**53, "t": "é ☃", "l": [1.5, {"x": None}]}
    value = {**small, "pad": "x" * (MAX_METADATA_BYTES - json_size({**small, "pad": ""}))}
    assert json_size(value) == MAX_METADATA_BYTES
    created = await users.CreateUser(us.CreateUserRequest(user_id="a", metadata=struct(value)))
    again = json_format.MessageToDict(created.user.metadata)
    await users.CreateUser(us.CreateUserRequest(user_id="b", metadata=struct(again)))
    # ...and one byte more is refused on both paths.
    over = {**value, "pad": value["pad"] + "x"}
    await rpc_error(
        users.CreateUser(us.CreateUserRequest(user_id="c", metadata=struct(over))),
        BAD,
        field="metadata",
    )
    await rpc_error(
        users.UpdateUser(us.UpdateUserRequest(user_id="a", metadata=struct({"pad": over["pad"]}))),
        BAD,
        field="metadata",
        reason="METADATA_TOO_LARGE",
    )


# -- nesting ---------------------------------------------------------------------------


def _call(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(method, request_serializer=lambda b: b)


@pytest.mark.parametrize("levels", [MAX_METADATA_DEPTH + 1, 45, 2000])
async def test_too_deep_metadata_is_invalid_argument_naming_thefield(
    channel: grpc.aio.Channel, clean_db: str, levels: int
) -> None:
    # 33 levels pass protobuf's parser and are refused by validation; 45 (the issue's) and
    # 2,000 are refused by the parser, and the server still names the field.
    deep = nested_struct(levels)
    user = _call(channel, "/memstore.v1.UserService/CreateUser")
    await rpc_error(user(field(1, b"u") + field(5, deep)), BAD, field="metadata")
    update = _call(channel, "/memstore.v1.UserService/UpdateUser")
    await rpc_error(update(field(1, b"u") + field(5, deep)), BAD, field="metadata")
    session = _call(channel, "/memstore.v1.SessionService/CreateSession")
    await rpc_error(session(field(1, b"s") + field(3, deep)), BAD, field="metadata")
    # AddMemory: the second message is the deep one, and the error says which.
    fine = field(4, b"hello")
    add = _call(channel, "/memstore.v1.SessionService/AddMemory")
    request = field(1, b"s") + field(2, fine) + field(2, fine + field(5, deep))
    error = await rpc_error(add(request), BAD, field="messages[1].metadata")
    assert f"more than {MAX_METADATA_DEPTH} levels" in (error.details() or "")
    listing = _call(channel, "/memstore.v1.SessionService/ListSessions")
    await rpc_error(listing(field(11, deep)), BAD, field="metadata_contains")
    for table in ("users", "sessions", "messages"):
        assert await count_rows(clean_db, table) == 0


async def test_a_large_request_protobuf_cannot_parse_is_refused_as_a_small_one(
    channel: grpc.aio.Channel, clean_db: str
) -> None:
    # Past OFF_LOOP_BYTES a request is parsed in a thread, in pieces of its fields
    # (serving/wire.py), not in one call on the event loop: each way it still cannot parse
    # is INVALID_ARGUMENT, the too-deep metadata named, as for a small request (above).
    content = b"x" * 1000
    fine = field(4, content)
    many = b"".join(field(2, fine) for _ in range(400))
    assert len(many) > off_loop.OFF_LOOP_BYTES
    add = _call(channel, "/memstore.v1.SessionService/AddMemory")
    deep = field(2, fine + field(5, nested_struct(2000)))
    error = await rpc_error(add(field(1, b"s") + many + deep), BAD, field="messages[400].metadata")
    assert f"more than {MAX_METADATA_DEPTH} levels" in (error.details() or "")
    not_utf8 = field(2, field(4, content[:-2] + b"\xff\xfe"))
    await rpc_error(
        add(field(1, b"s") + many + not_utf8), BAD, field="request", reason="MALFORMED_REQUEST"
    )
    whole = field(1, b"s") + many
    for cut in (whole[:-3], whole + b"\xff"):  # truncated; a tag with no field after it
        await rpc_error(add(cut), BAD, field="request", reason="MALFORMED_REQUEST")
    # The same messages, whole, are stored.
    added = ss.AddMemoryResponse.FromString(await add(whole))
    assert len(added.messages) == 400
    assert await count_rows(clean_db, "messages") == 400


async def test_the_deepest_metadata_allowed_round_trips(users: Users, sessions: Sessions) -> None:
    deep: Any = 1
    for _ in range(MAX_METADATA_DEPTH):
        deep = {"a": deep}
    created = await users.CreateUser(us.CreateUserRequest(user_id="u", metadata=struct(deep)))
    assert as_dict(created.user.metadata) == deep
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("deep", metadata=struct(deep))])
    )
    assert as_dict(added.messages[0].metadata) == deep
    # Search answers carry it one message deeper than any request: it still parses.
    found = await sessions.SearchMemory(
        ss.SearchMemoryRequest(text="deep", search_type=ss.SEARCH_TYPE_FULL_TEXT)
    )
    assert as_dict(found.results[0].message.metadata) == deep


async def test_metadata_of_a_million_values_is_refused_before_it_is_walked(
    users: Users, sessions: Sessions
) -> None:
    # A request of 16 MiB holds a million tiny values. Walking them all, to learn a size far
    # past the limit, held the event loop (every call of the process) for seconds; the walk
    # now stops once a lower bound of the JSON passes twice the limit, and says so.
    wide = struct({"a": [0] * 200_000})
    many = struct({f"k{i}": i for i in range(100_000)})
    calls = [
        ("metadata", users.CreateUser(us.CreateUserRequest(user_id="u", metadata=wide))),
        ("metadata", users.CreateUser(us.CreateUserRequest(user_id="u", metadata=many))),
        (
            "messages[1].metadata",
            sessions.AddMemory(
                ss.AddMemoryRequest(session_id="s", messages=[msg("a"), msg("b", metadata=wide)])
            ),
        ),
    ]
    for name, call in calls:
        error = await rpc_error(call, BAD, field=name)
        assert f"more than {2 * MAX_METADATA_BYTES} bytes as JSON" in (error.details() or "")
    # Just past the limit, the size is still exact.
    over = struct({"a": "x" * (MAX_METADATA_BYTES - len('{"a": ""}') + 1)})
    error = await rpc_error(
        users.CreateUser(us.CreateUserRequest(user_id="u", metadata=over)), BAD, field="metadata"
    )
    assert f"is {MAX_METADATA_BYTES + 1} bytes as JSON" in (error.details() or "")
    await rpc_error(users.GetUser(us.GetUserRequest(user_id="u")), Code.NOT_FOUND)


async def test_an_add_memory_the_server_accepts_is_answered_whole(
    grpc_port: int, clean_db: str
) -> None:
    # 1000 messages just under the 16 MiB request cap were stored, and then the answer,
    # which adds each message's uuid, time and sequence, passed the same cap on the way
    # out: RESOURCE_EXHAUSTED for a write that had committed. The answer's cap (and the
    # client's) leaves room for what the server adds.
    per = (16 * 1024 * 1024 - 40_000) // 1000
    request = ss.AddMemoryRequest(session_id="s", messages=[msg("x" * per) for _ in range(1000)])
    assert request.ByteSize() < 16 * 1024 * 1024
    async with aio_channel(f"127.0.0.1:{grpc_port}", tls=False) as channel:
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        added = await sessions.AddMemory(request)
        assert len(added.messages) == 1000 and added.ByteSize() > 16 * 1024 * 1024
        assert len({m.uuid for m in added.messages}) == 1000

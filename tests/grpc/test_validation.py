"""Bad input over a real channel: INVALID_ARGUMENT naming the field, and nothing written."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc
from memstore.v1 import user_service_pb2 as us
from tests.grpc import Code, count_rows, msg, rpc_error, struct

BAD = Code.INVALID_ARGUMENT
MIB = 1024 * 1024
BAD_IDS = [
    *("", "x" * 257, "a\x01b", "a\x00b", "tab\there", "new\nline", "del\x7f"),
    # Only whitespace, or whitespace at either end.
    *(" ", "\u3000", " alice", "alice "),
    # Invisible format characters and separators: a right-to-left override, isolates, a BOM,
    # a zero-width space, a line separator.
    *("user\u202egnp.exe", "a\u2066b\u2069", "\ufeffa", "a\u200bb", "a\u2028b"),
]
BIG_METADATA = {"blob": "x" * (65 * 1024)}
#: 33 Ki characters, but 66 KiB of UTF-8 (and more still with \u escapes).
MULTIBYTE_METADATA = {"blob": "é" * (33 * 1024)}


async def _lookup_refused(call: Awaitable[object], bad_id: str, field: str) -> None:
    # A read by a malformed id may simply find nothing, but an empty id or a NUL (which
    # PostgreSQL cannot even compare) must be named as bad input, never an INTERNAL error.
    if bad_id == "" or "\x00" in bad_id:
        await rpc_error(call, BAD, field=field)
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() in (BAD, Code.NOT_FOUND), caught.value.details()


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_bad_user_id(users, clean_db, bad_id):
    await rpc_error(users.CreateUser(us.CreateUserRequest(user_id=bad_id)), BAD, field="user_id")
    assert await count_rows(clean_db, "users") == 0
    await _lookup_refused(users.GetUser(us.GetUserRequest(user_id=bad_id)), bad_id, "user_id")


@pytest.mark.parametrize("bad_id", BAD_IDS)
async def test_bad_session_id(sessions, clean_db, bad_id):
    if bad_id:  # empty asks the server for an id on create
        await rpc_error(
            sessions.CreateSession(ss.CreateSessionRequest(session_id=bad_id)),
            BAD,
            field="session_id",
        )
    await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id=bad_id, messages=[msg("x")])),
        BAD,
        field="session_id",
    )
    await _lookup_refused(
        sessions.GetSession(ss.GetSessionRequest(session_id=bad_id)), bad_id, "session_id"
    )
    assert await count_rows(clean_db, "sessions") == 0
    assert await count_rows(clean_db, "messages") == 0


async def test_longest_ids_are_accepted(users, sessions):
    long_id = "é" * 256  # 256 characters (512 bytes of UTF-8)
    assert (await users.CreateUser(us.CreateUserRequest(user_id=long_id))).user.user_id == long_id
    req = ss.CreateSessionRequest(session_id=long_id, user_id=long_id)
    assert (await sessions.CreateSession(req)).session.session_id == long_id


async def test_ids_are_exact_strings_so_nfc_and_nfd_are_two_users(users, sessions, clean_db):
    # "é" composed (NFC, U+00E9) and decomposed (NFD, "e" + U+0301): they look alike but are
    # different strings, so different ids; memstore neither normalises nor refuses either.
    nfc, nfd = "jos\u00e9", "jose\u0301"
    for user_id in (nfc, nfd):
        made = await users.CreateUser(us.CreateUserRequest(user_id=user_id, first_name=user_id))
        assert made.user.user_id.encode() == user_id.encode()
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=user_id, user_id=user_id))
    for user_id in (nfc, nfd):
        read = (await users.GetUser(us.GetUserRequest(user_id=user_id))).user
        assert read.user_id.encode() == user_id.encode() and read.first_name == user_id
        session = (await sessions.GetSession(ss.GetSessionRequest(session_id=user_id))).session
        assert session.session_id.encode() == session.user_id.encode() == user_id.encode()
    listed = (await users.ListUsers(us.ListUsersRequest())).users
    assert sorted(u.user_id.encode() for u in listed) == sorted([nfc.encode(), nfd.encode()])
    assert await count_rows(clean_db, "users") == 2


async def test_over_long_fields(users, clean_db):
    for field in ("email", "first_name", "last_name"):
        req = us.CreateUserRequest(user_id="u", **{field: "x" * 257})
        await rpc_error(users.CreateUser(req), BAD, field=field)
    assert await count_rows(clean_db, "users") == 0


#: Control characters (C0, DEL, C1): a line break in a role wrote a line of its own into
#: GetMemory's ready-to-prompt `context`, an escape sequence recoloured a terminal.
#: Unicode's line and paragraph separators break a line too (str.splitlines, renderers).
CONTROL_TEXTS = (
    "tab\there",
    "new\nline",
    "cr\rhere",
    "esc\x1b[31mred",
    "del\x7f",
    "c1\x85",
    "line\u2028separator",
    "paragraph\u2029separator",
)


async def test_control_characters_in_names_emails_and_roles_are_refused(users, sessions, clean_db):
    await users.CreateUser(us.CreateUserRequest(user_id="ok"))
    for text in CONTROL_TEXTS:
        for field in ("email", "first_name", "last_name"):
            made = users.CreateUser(us.CreateUserRequest(user_id="u", **{field: text}))
            await rpc_error(made, BAD, field=field)
            changed = users.UpdateUser(us.UpdateUserRequest(user_id="ok", **{field: text}))
            await rpc_error(changed, BAD, field=field)
        added = sessions.AddMemory(
            ss.AddMemoryRequest(session_id="s", messages=[msg("x", role=text)])
        )
        await rpc_error(added, BAD, field="messages[0].role")
    assert await count_rows(clean_db, "users") == 1
    assert await count_rows(clean_db, "sessions") == 0
    # Letters of any script, spaces and marks inside are text like any other.
    named = us.CreateUserRequest(
        user_id="v", email="zoë@example.org", first_name="Zoë Ann", last_name="כהן"
    )
    assert (await users.CreateUser(named)).user.first_name == "Zoë Ann"
    role = "José Núñez (agent)"
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("x", role=role)])
    )
    assert added.messages[0].role == role


async def test_oversized_or_nul_metadata(users, sessions, clean_db):
    near_limit = {"blob": "x" * (60 * 1024)}
    await users.CreateUser(us.CreateUserRequest(user_id="ok", metadata=struct(near_limit)))
    for bad in (
        BIG_METADATA,
        MULTIBYTE_METADATA,
        {"k": "a\x00b"},
        {"nested": {"list": ["ok", "\x00"]}},
        {"a\x00": 1},
    ):
        await rpc_error(
            users.CreateUser(us.CreateUserRequest(user_id="u", metadata=struct(bad))),
            BAD,
            field="metadata",
        )
        await rpc_error(
            users.UpdateUser(us.UpdateUserRequest(user_id="ok", metadata=struct(bad))),
            BAD,
            field="metadata",
        )
        await rpc_error(
            sessions.CreateSession(ss.CreateSessionRequest(session_id="s", metadata=struct(bad))),
            BAD,
            field="metadata",
        )
        await rpc_error(
            sessions.AddMemory(
                ss.AddMemoryRequest(session_id="s", messages=[msg("x", metadata=struct(bad))])
            ),
            BAD,
            field="messages[0].metadata",
        )
    assert await count_rows(clean_db, "users") == 1
    assert await count_rows(clean_db, "sessions") == 0
    stored = (await users.GetUser(us.GetUserRequest(user_id="ok"))).user
    assert stored.metadata["blob"] == near_limit["blob"]


async def test_bad_message_content(sessions, clean_db):
    # The limit is on UTF-8 bytes: 524,289 characters of "é" are 1 MiB + 2 bytes.
    for content in ("x" * (MIB + 1), "é" * (MIB // 2 + 1), "nul\x00inside"):
        await rpc_error(
            sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg(content)])),
            BAD,
            field="messages[0].content",
        )
    await rpc_error(
        sessions.AddMemory(
            ss.AddMemoryRequest(session_id="s", messages=[msg("x", role="r" * 257)])
        ),
        BAD,
        field="messages[0].role",
    )
    assert await count_rows(clean_db, "sessions") == 0
    assert await count_rows(clean_db, "messages") == 0
    # Exactly 1 MiB of UTF-8 is allowed.
    resp = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("é" * (MIB // 2))])
    )
    assert resp.session.message_count == 1


async def test_an_empty_content_is_a_message_without_text(sessions, clean_db):
    # An assistant's turn that only calls a tool has no text; refused, the turn was lost.
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="tools", messages=[msg("weather?"), msg(""), msg("18C")])
    )
    assert [m.content for m in added.messages] == ["weather?", "", "18C"]
    got = await sessions.GetMemory(ss.GetMemoryRequest(session_id="tools", lastn=3))
    assert [m.content for m in got.messages] == ["weather?", "", "18C"]


async def test_message_count_limits(sessions, clean_db):
    await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[])), BAD, field="messages"
    )
    await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x")] * 1001)),
        BAD,
        field="messages",
    )
    assert await count_rows(clean_db, "sessions") == 0


async def test_role_type_out_of_range(sessions, clean_db):
    await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x", role_type=99)])),
        BAD,
        field="messages[0].role_type",
    )
    assert await count_rows(clean_db, "sessions") == 0


async def test_one_bad_message_writes_nothing(sessions, clean_db):
    batch = [msg("fine"), msg("bad\x00"), msg("fine too")]
    await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=batch)),
        BAD,
        field="messages[1]",
    )
    await rpc_error(
        sessions.GetSession(ss.GetSessionRequest(session_id="s", show_deleted=True)),
        Code.NOT_FOUND,
    )
    assert await count_rows(clean_db, "messages") == 0
    # On an existing session, too: nothing is appended.
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("first")]))
    await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=batch)),
        BAD,
        field="messages[1]",
    )
    assert (
        await sessions.GetSession(ss.GetSessionRequest(session_id="s"))
    ).session.message_count == 1
    assert await count_rows(clean_db, "messages") == 1


async def test_unknown_update_mask_path(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u", email="e@example.com"))
    for paths in (["nickname"], ["user_id"], ["email", "created_at"]):
        await rpc_error(
            users.UpdateUser(
                us.UpdateUserRequest(
                    user_id="u",
                    email="new@example.com",
                    update_mask=field_mask_pb2.FieldMask(paths=paths),
                )
            ),
            BAD,
            field="update_mask",
        )
    assert (await users.GetUser(us.GetUserRequest(user_id="u"))).user.email == "e@example.com"
    resp = await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x")]))
    mask = field_mask_pb2.FieldMask(paths=["user_id"])
    await rpc_error(
        sessions.UpdateSession(ss.UpdateSessionRequest(session_id="s", update_mask=mask)),
        BAD,
        field="update_mask",
    )
    await rpc_error(
        sessions.UpdateMessage(
            ss.UpdateMessageRequest(session_id="s", uuid=resp.messages[0].uuid, update_mask=mask)
        ),
        BAD,
        field="update_mask",
    )


async def test_an_error_naming_much_bad_input_still_reaches_the_caller(users, sessions, clean_db):
    # Trailers past gRPC's default 8 KiB limit (16 KiB hard) are dropped by the client, which
    # answered RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" in place of
    # the INVALID_ARGUMENT: 1000 bad messages made 280 KB of violations, an update_mask of
    # 5000 unknown paths a message of 64 KB. Cut to fit, the first violations named.
    bad = [msg("x", role="r" * 300, uuid="not-a-uuid-" + "é" * 40 + str(i)) for i in range(1000)]
    error = await rpc_error(
        sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=bad)),
        BAD,
        field="messages[0].role",
    )
    assert "2000 violations" in error.details()
    assert sum(len(v) for _, v in error.trailing_metadata()) < 6 * 1024
    assert await count_rows(clean_db, "sessions") == 0
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    paths = [f"bogus_{'ü' * 20}_{i}" for i in range(5000)]
    request = us.UpdateUserRequest(user_id="u", update_mask=field_mask_pb2.FieldMask(paths=paths))
    error = await rpc_error(users.UpdateUser(request), BAD, field="update_mask")
    assert error.details().startswith("update_mask: unknown path(s) 'bogus_")


async def test_negative_lastn_and_malformed_uuid(sessions):
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x")]))
    await rpc_error(
        sessions.GetMemory(ss.GetMemoryRequest(session_id="s", lastn=-1)), BAD, field="lastn"
    )
    for uuid in ("not-a-uuid", "", "0000", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"):
        await rpc_error(
            sessions.GetMessage(ss.GetMessageRequest(session_id="s", uuid=uuid)), BAD, field="uuid"
        )
        await rpc_error(
            sessions.UpdateMessage(
                ss.UpdateMessageRequest(session_id="s", uuid=uuid, metadata=struct({"a": 1}))
            ),
            BAD,
            field="uuid",
        )


def _raw(
    channel: grpc.aio.Channel, method: str, response_type: Any
) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=response_type.FromString
    )


async def test_invalid_utf8_is_invalid_argument(channel, sessions, clean_db):
    get_user = _raw(channel, "/memstore.v1.UserService/GetUser", us.GetUserResponse)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_user(b"\x0a\x02\xff\xfe")  # user_id = b"\xff\xfe"
    assert caught.value.code() == BAD, caught.value.details()

    create_user = _raw(channel, "/memstore.v1.UserService/CreateUser", us.CreateUserResponse)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_user(b"\x0a\x01u\x12\x03a\xc3\x28")  # email ends in a broken sequence
    assert caught.value.code() == BAD, caught.value.details()

    # AddMemory with messages[0].content = b"\xff\xfe": nothing may be stored half.
    content = b"\x22\x02\xff\xfe"
    request = b"\x0a\x01s" + b"\x12" + bytes([len(content)]) + content
    add = _raw(channel, "/memstore.v1.SessionService/AddMemory", ss.AddMemoryResponse)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await add(request)
    assert caught.value.code() == BAD, caught.value.details()
    assert await count_rows(clean_db, "users") == 0
    assert await count_rows(clean_db, "sessions") == 0
    assert await count_rows(clean_db, "messages") == 0
    # The server still answers well-formed calls on the same channel.
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x")]))


async def test_request_size_limit(grpc_port, clean_db):
    # The response echoes the messages, so this client must accept large responses too.
    options = [("grpc.max_receive_message_length", 64 * MIB)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        # Above gRPC's 4 MiB default yet under memstore's 16 MiB: accepted.
        big = [msg("x" * MIB) for _ in range(6)]
        resp = await stub.AddMemory(ss.AddMemoryRequest(session_id="big", messages=big))
        assert resp.session.message_count == 6
        # Above 16 MiB: refused with a clear status, nothing written.
        huge = [msg("y" * MIB) for _ in range(17)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.AddMemory(ss.AddMemoryRequest(session_id="huge", messages=huge))
    assert caught.value.code() in (Code.RESOURCE_EXHAUSTED, BAD), caught.value.details()
    assert await count_rows(clean_db, "sessions") == 1
    assert await count_rows(clean_db, "messages") == 6

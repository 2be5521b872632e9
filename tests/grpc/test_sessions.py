"""SessionService sessions over a real channel: create, get, update, soft delete, undelete."""

from __future__ import annotations

import asyncio
import re

import grpc
from google.protobuf import field_mask_pb2

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.grpc import Code, as_dict, count_rows, msg, rpc_error, struct


async def test_create_with_id_and_user(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    req = ss.CreateSessionRequest(session_id="s", user_id="u", metadata=struct({"a": {"b": 1}}))
    created = (await sessions.CreateSession(req)).session
    assert (created.session_id, created.user_id) == ("s", "u")
    assert as_dict(created.metadata) == {"a": {"b": 1}}
    assert created.HasField("created_at") and created.HasField("updated_at")
    assert not created.HasField("deleted_at")
    assert not created.HasField("last_message_at")
    assert created.message_count == 0
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got == created


async def test_create_without_id_assigns_hex_id(sessions):
    first = (await sessions.CreateSession(ss.CreateSessionRequest())).session
    second = (await sessions.CreateSession(ss.CreateSessionRequest())).session
    assert re.fullmatch(r"[0-9a-f]{32}", first.session_id)
    assert first.session_id != second.session_id
    assert first.user_id == ""
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id=first.session_id))).session
    assert got.session_id == first.session_id


async def test_create_with_unknown_user_is_failed_precondition(sessions, clean_db):
    await rpc_error(
        sessions.CreateSession(ss.CreateSessionRequest(session_id="s", user_id="ghost")),
        Code.FAILED_PRECONDITION,
    )
    await rpc_error(
        sessions.GetSession(ss.GetSessionRequest(session_id="s", show_deleted=True)),
        Code.NOT_FOUND,
    )
    assert await count_rows(clean_db, "sessions") == 0


async def test_create_duplicate_is_already_exists(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s", metadata=struct({"v": 1})))
    await rpc_error(
        sessions.CreateSession(ss.CreateSessionRequest(session_id="s", metadata=struct({"v": 2}))),
        Code.ALREADY_EXISTS,
    )
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert as_dict(got.metadata) == {"v": 1}


async def test_duplicate_of_deleted_session_says_how_to_restore(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    error = await rpc_error(
        sessions.CreateSession(ss.CreateSessionRequest(session_id="s")), Code.ALREADY_EXISTS
    )
    text = (error.details() or "").lower()
    assert "deleted" in text, text
    assert "undelete" in text or "restore" in text, text


async def test_get_hides_deleted_unless_show_deleted(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    live = await sessions.GetSession(ss.GetSessionRequest(session_id="s", show_deleted=True))
    assert not live.session.HasField("deleted_at")
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    await rpc_error(sessions.GetSession(ss.GetSessionRequest(session_id="s")), Code.NOT_FOUND)
    shown = await sessions.GetSession(ss.GetSessionRequest(session_id="s", show_deleted=True))
    assert shown.session.session_id == "s"
    assert shown.session.HasField("deleted_at")
    await rpc_error(sessions.GetSession(ss.GetSessionRequest(session_id="nope")), Code.NOT_FOUND)


async def test_update_session_merges_metadata(sessions):
    start = {"a": {"x": 1}, "list": [1, 2], "drop": "me"}
    created = (
        await sessions.CreateSession(
            ss.CreateSessionRequest(session_id="s", metadata=struct(start))
        )
    ).session
    patch = {"a": {"y": 2}, "list": [3], "drop": None}
    req = ss.UpdateSessionRequest(session_id="s", metadata=struct(patch))
    after = (await sessions.UpdateSession(req)).session
    assert as_dict(after.metadata) == {"a": {"x": 1, "y": 2}, "list": [3]}
    assert after.created_at == created.created_at
    assert after.updated_at.ToMicroseconds() >= created.updated_at.ToMicroseconds()
    # Naming metadata in the mask with no metadata clears it.
    mask = field_mask_pb2.FieldMask(paths=["metadata"])
    cleared = (
        await sessions.UpdateSession(ss.UpdateSessionRequest(session_id="s", update_mask=mask))
    ).session
    assert as_dict(cleared.metadata) == {}
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert as_dict(got.metadata) == {}


async def test_update_deleted_or_absent_session_is_not_found(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s", metadata=struct({"v": 1})))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    await rpc_error(
        sessions.UpdateSession(ss.UpdateSessionRequest(session_id="s", metadata=struct({"v": 2}))),
        Code.NOT_FOUND,
    )
    await rpc_error(
        sessions.UpdateSession(ss.UpdateSessionRequest(session_id="x", metadata=struct({"v": 2}))),
        Code.NOT_FOUND,
    )
    got = await sessions.GetSession(ss.GetSessionRequest(session_id="s", show_deleted=True))
    assert as_dict(got.session.metadata) == {"v": 1}


async def test_delete_session_hides_session_and_messages(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", user_id="u", messages=[msg("a"), msg("b"), msg("c")])
    )
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="t", user_id="u"))
    deleted = await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    assert deleted.deleted_messages == 3

    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    assert not memory.found and len(memory.messages) == 0 and not memory.HasField("session")
    await rpc_error(sessions.ListMessages(ss.ListMessagesRequest(session_id="s")), Code.NOT_FOUND)
    uuid = added.messages[0].uuid
    await rpc_error(
        sessions.GetMessage(ss.GetMessageRequest(session_id="s", uuid=uuid)), Code.NOT_FOUND
    )
    listed = await sessions.ListSessions(ss.ListSessionsRequest())
    assert [s.session_id for s in listed.sessions] == ["t"]
    assert listed.total_size == 1
    shown = await sessions.ListSessions(ss.ListSessionsRequest(show_deleted=True))
    assert [s.session_id for s in shown.sessions] == ["s", "t"]
    assert shown.total_size == 2
    owned = await users.ListUserSessions(us.ListUserSessionsRequest(user_id="u"))
    assert [s.session_id for s in owned.sessions] == ["t"]
    # Deleting again: it is already deleted.
    await rpc_error(sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s")), Code.NOT_FOUND)
    await rpc_error(
        sessions.DeleteSession(ss.DeleteSessionRequest(session_id="nope")), Code.NOT_FOUND
    )


async def test_undelete_restores_session_not_messages(sessions):
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("old1"), msg("old2")])
    )
    await sessions.UpdateSession(
        ss.UpdateSessionRequest(session_id="s", metadata=struct({"kept": True}))
    )
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    restored = (await sessions.UndeleteSession(ss.UndeleteSessionRequest(session_id="s"))).session
    assert restored.session_id == "s"
    assert not restored.HasField("deleted_at")
    assert restored.message_count == 0
    assert as_dict(restored.metadata) == {"kept": True}

    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert not got.HasField("deleted_at")
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    assert memory.found and len(memory.messages) == 0
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert len(listed.messages) == 0


async def test_undelete_live_or_absent_session(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    await rpc_error(
        sessions.UndeleteSession(ss.UndeleteSessionRequest(session_id="s")),
        Code.FAILED_PRECONDITION,
    )
    await rpc_error(
        sessions.UndeleteSession(ss.UndeleteSessionRequest(session_id="nope")), Code.NOT_FOUND
    )


async def test_message_count_and_last_message_at(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    resp = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("a"), msg("b"), msg("c")])
    )
    assert resp.session.message_count == 3
    assert resp.session.HasField("last_message_at")
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got.message_count == 3
    assert got.last_message_at.ToMicroseconds() >= got.created_at.ToMicroseconds()


async def test_concurrent_creates_of_one_id_make_one_session(sessions):
    calls = [sessions.CreateSession(ss.CreateSessionRequest(session_id="race")) for _ in range(10)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, ss.CreateSessionResponse) for r in results) == 1
    errors = [r for r in results if not isinstance(r, ss.CreateSessionResponse)]
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors), errors
    assert {e.code() for e in errors} == {Code.ALREADY_EXISTS}


async def test_concurrent_session_updates_of_different_keys_all_survive(sessions):
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    await asyncio.gather(
        *(
            sessions.UpdateSession(
                ss.UpdateSessionRequest(session_id="s", metadata=struct({"n": {f"k{i}": i}}))
            )
            for i in range(20)
        )
    )
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert as_dict(got.metadata) == {"n": {f"k{i}": i for i in range(20)}}


async def test_adding_memory_bumps_updated_at(sessions):
    created = (await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))).session
    added = await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x")]))
    assert added.session.updated_at.ToMicroseconds() > created.updated_at.ToMicroseconds()
    assert added.session.created_at == created.created_at

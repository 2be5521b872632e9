"""Memory over a real channel: AddMemory, GetMemory, messages, ClearMemory."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable

from google.protobuf import field_mask_pb2

from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server import off_loop
from tests.grpc import UUID_RE, Code, Sessions, as_dict, count_rows, msg, rpc_error, struct
from tests.stored_values import wide_metadata


def _contents(messages: Iterable[rs.Message]) -> list[str]:
    return [m.content for m in messages]


async def _add(
    sessions: Sessions, session_id: str, *contents: str, user_id: str = ""
) -> ss.AddMemoryResponse:
    req = ss.AddMemoryRequest(
        session_id=session_id, user_id=user_id, messages=[msg(c) for c in contents]
    )
    return await sessions.AddMemory(req)


async def test_add_memory_creates_session_in_order(sessions):
    resp = await _add(sessions, "s", "one", "two", "three")
    assert resp.session.session_id == "s"
    assert resp.session.message_count == 3
    assert _contents(resp.messages) == ["one", "two", "three"]
    assert all(UUID_RE.match(m.uuid) for m in resp.messages)
    assert len({m.uuid for m in resp.messages}) == 3
    seqs = [m.sequence for m in resp.messages]
    assert seqs[0] >= 1 and seqs == sorted(set(seqs))
    assert all(m.HasField("created_at") for m in resp.messages)
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got.message_count == 3


async def test_add_memory_appends_after_existing(sessions):
    first = await _add(sessions, "s", "a", "b")
    second = await _add(sessions, "s", "c", "d")
    assert min(m.sequence for m in second.messages) > max(m.sequence for m in first.messages)
    assert second.session.message_count == 4
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert _contents(listed.messages) == ["a", "b", "c", "d"]
    assert [m.uuid for m in listed.messages] == [
        m.uuid for m in (*first.messages, *second.messages)
    ]


async def test_add_memory_revives_deleted_session_with_only_new_messages(sessions):
    old = await _add(sessions, "s", "old1", "old2", "old3")
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    new = await _add(sessions, "s", "new1", "new2")
    assert not new.session.HasField("deleted_at")
    assert new.session.message_count == 2
    # Sequences are never reused, even after a soft delete.
    assert min(m.sequence for m in new.messages) > max(m.sequence for m in old.messages)
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got.message_count == 2
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    assert memory.found and _contents(memory.messages) == ["new1", "new2"]
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert _contents(listed.messages) == ["new1", "new2"]


async def test_concurrent_add_memory_on_one_new_session(sessions):
    calls = [
        sessions.AddMemory(
            ss.AddMemoryRequest(session_id="hot", messages=[msg(f"c{i}-{j}") for j in range(3)])
        )
        for i in range(20)
    ]
    results = await asyncio.gather(*calls)
    assert {r.session.session_id for r in results} == {"hot"}
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="hot", page_size=1000))
    assert len(listed.messages) == 60
    seqs = [m.sequence for m in listed.messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == 60
    position = {m.content: m.sequence for m in listed.messages}
    assert set(position) == {f"c{i}-{j}" for i in range(20) for j in range(3)}
    for i in range(20):
        mine = [position[f"c{i}-{j}"] for j in range(3)]
        assert mine == sorted(mine), f"call {i} out of order: {mine}"
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="hot"))).session
    assert got.message_count == 60
    assert (await sessions.ListSessions(ss.ListSessionsRequest())).total_size == 1


async def test_add_memory_user_rules(users, sessions, clean_db):
    await rpc_error(_add(sessions, "s", "x", user_id="ghost"), Code.FAILED_PRECONDITION)
    await rpc_error(
        sessions.GetSession(ss.GetSessionRequest(session_id="s", show_deleted=True)),
        Code.NOT_FOUND,
    )
    assert await count_rows(clean_db, "messages") == 0

    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    await users.CreateUser(us.CreateUserRequest(user_id="w"))
    created = await _add(sessions, "s", "x", user_id="u")
    assert created.session.user_id == "u"
    # Another user's session: refused, nothing appended.
    await rpc_error(_add(sessions, "s", "y", user_id="w"), Code.FAILED_PRECONDITION)
    # Omitting user_id on an existing session is fine.
    later = await _add(sessions, "s", "z")
    assert later.session.user_id == "u"
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert _contents(listed.messages) == ["x", "z"]


async def test_get_memory_lastn(sessions):
    await _add(sessions, "s", *(f"m{i}" for i in range(10)))
    default = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    assert default.found and default.session.session_id == "s"
    assert _contents(default.messages) == [f"m{i}" for i in range(4, 10)]
    three = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s", lastn=3))
    assert _contents(three.messages) == ["m7", "m8", "m9"]
    many = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s", lastn=5000))
    assert _contents(many.messages) == [f"m{i}" for i in range(10)]


async def test_get_memory_unknown_session_is_empty_not_error(sessions):
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="nope"))
    assert memory.found is False
    assert len(memory.messages) == 0
    assert not memory.HasField("session")


async def test_list_messages_pages(sessions):
    await _add(sessions, "s", *(f"m{i}" for i in range(10)))
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = await sessions.ListMessages(
            ss.ListMessagesRequest(session_id="s", page_size=4, page_token=token)
        )
        sizes.append(len(page.messages))
        seen += _contents(page.messages)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"m{i}" for i in range(10)]
    assert sizes == [4, 4, 2]
    await rpc_error(
        sessions.ListMessages(ss.ListMessagesRequest(session_id="nope")), Code.NOT_FOUND
    )


async def test_get_and_update_message(sessions):
    resp = await sessions.AddMemory(
        ss.AddMemoryRequest(
            session_id="s",
            messages=[msg("hello", role="Alice", metadata=struct({"a": {"x": 1}, "l": [1]}))],
        )
    )
    added = resp.messages[0]
    got = (await sessions.GetMessage(ss.GetMessageRequest(session_id="s", uuid=added.uuid))).message
    assert (got.uuid, got.content, got.role) == (added.uuid, "hello", "Alice")
    assert got.sequence == added.sequence
    assert as_dict(got.metadata) == {"a": {"x": 1}, "l": [1]}

    patch = struct({"a": {"y": 2}, "l": [2, 3], "new": None})
    req = ss.UpdateMessageRequest(session_id="s", uuid=added.uuid, metadata=patch)
    updated = (await sessions.UpdateMessage(req)).message
    assert as_dict(updated.metadata) == {"a": {"x": 1, "y": 2}, "l": [2, 3]}
    assert updated.content == "hello" and updated.sequence == added.sequence
    assert updated.updated_at.ToMicroseconds() >= added.created_at.ToMicroseconds()
    again = await sessions.GetMessage(ss.GetMessageRequest(session_id="s", uuid=added.uuid))
    assert as_dict(again.message.metadata) == {"a": {"x": 1, "y": 2}, "l": [2, 3]}

    mask = field_mask_pb2.FieldMask(paths=["metadata"])
    req = ss.UpdateMessageRequest(session_id="s", uuid=added.uuid, update_mask=mask)
    assert as_dict((await sessions.UpdateMessage(req)).message.metadata) == {}


async def test_message_lookup_is_scoped_to_its_session(sessions):
    resp = await _add(sessions, "s", "x")
    await _add(sessions, "t", "y")
    uuid = resp.messages[0].uuid
    await rpc_error(
        sessions.GetMessage(ss.GetMessageRequest(session_id="t", uuid=uuid)), Code.NOT_FOUND
    )
    absent = "00000000-0000-4000-8000-000000000000"
    await rpc_error(
        sessions.GetMessage(ss.GetMessageRequest(session_id="s", uuid=absent)), Code.NOT_FOUND
    )
    await rpc_error(
        sessions.UpdateMessage(
            ss.UpdateMessageRequest(session_id="s", uuid=absent, metadata=struct({"a": 1}))
        ),
        Code.NOT_FOUND,
    )


async def test_clear_memory_keeps_session(sessions):
    first = await _add(sessions, "s", "a", "b", "c")
    cleared = await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="s"))
    assert cleared.deleted_messages == 3
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got.message_count == 0 and not got.HasField("deleted_at")
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    assert memory.found and len(memory.messages) == 0
    assert len((await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))).messages) == 0
    await rpc_error(
        sessions.GetMessage(ss.GetMessageRequest(session_id="s", uuid=first.messages[0].uuid)),
        Code.NOT_FOUND,
    )
    after = await _add(sessions, "s", "d")
    assert after.messages[0].sequence > max(m.sequence for m in first.messages)
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s"))
    assert _contents(memory.messages) == ["d"]
    await rpc_error(sessions.ClearMemory(ss.ClearMemoryRequest(session_id="nope")), Code.NOT_FOUND)


async def test_role_and_role_type_round_trip(sessions):
    kinds = [
        rs.ROLE_TYPE_USER,
        rs.ROLE_TYPE_ASSISTANT,
        rs.ROLE_TYPE_SYSTEM,
        rs.ROLE_TYPE_TOOL,
        rs.ROLE_TYPE_FUNCTION,
        rs.ROLE_TYPE_NOROLE,
        rs.ROLE_TYPE_UNSPECIFIED,
    ]
    messages = [msg(f"m{k}", role_type=k, role=f"speaker {k}") for k in kinds]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=messages))
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    got = [(m.role, m.role_type) for m in listed.messages]
    expected = [(f"speaker {k}", k) for k in kinds[:-1]]
    expected.append((f"speaker {rs.ROLE_TYPE_UNSPECIFIED}", rs.ROLE_TYPE_NOROLE))
    assert got == expected


async def test_a_large_add_memory_answers_the_metadata_get_memory_reads(sessions):
    # Past off_loop.OFF_LOOP_BYTES of metadata the store dumps it, and parses its answer's,
    # in a thread: the values are those of a small call all the same. A retry (the same
    # uuids) answers the stored messages as the first call did.
    metadatas = wide_metadata(60)
    assert len(json.dumps(metadatas)) > off_loop.OFF_LOOP_BYTES
    sent = [struct(m) for m in metadatas]
    request = ss.AddMemoryRequest(
        session_id="s",
        messages=[msg(f"m{i}", metadata=m, uuid=str(uuid.uuid4())) for i, m in enumerate(sent)],
    )
    added = await sessions.AddMemory(request)
    read = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s", lastn=len(sent)))
    assert [as_dict(m.metadata) for m in added.messages] == [as_dict(m) for m in sent]
    assert [m.metadata for m in read.messages] == [m.metadata for m in added.messages]
    assert [m.uuid for m in read.messages] == [m.uuid for m in added.messages]
    again = await sessions.AddMemory(request)
    assert list(again.messages) == list(added.messages)


async def test_a_key_set_to_null_is_not_stored_by_any_create(sessions, users):
    # Metadata is stored as merged into {} (memstore_merge_patch): as an update removes a key
    # set to null, a create, a new session and a new message never store one, at any depth;
    # a null inside an array is a value and is kept (docs/design.md, "Metadata merge").
    sent = struct({"gone": None, "kept": {"gone": None, "n": 1}, "list": [None, 1]})
    stored = {"kept": {"n": 1}, "list": [None, 1]}
    user = (await users.CreateUser(us.CreateUserRequest(user_id="u", metadata=sent))).user
    session = (
        await sessions.CreateSession(
            ss.CreateSessionRequest(session_id="s", user_id="u", metadata=sent)
        )
    ).session
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("m", metadata=sent)])
    )
    read = await sessions.GetMemory(ss.GetMemoryRequest(session_id="s", lastn=1))
    got_user = (await users.GetUser(us.GetUserRequest(user_id="u"))).user
    for metadata in (user.metadata, session.metadata, added.messages[0].metadata):
        assert as_dict(metadata) == stored
    assert as_dict(read.messages[0].metadata) == stored
    assert as_dict(got_user.metadata) == stored

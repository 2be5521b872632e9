"""UserService over a real channel: create, get, update (masks, metadata merge), delete."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import field_mask_pb2

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.grpc import Code, Users, as_dict, count_rows, msg, rpc_error, struct

NESTED = {
    "plan": {"tier": "gold", "limits": {"daily": 100, "burst": 2.5}},
    "tags": ["a", "b", 3],
    "active": True,
    "score": -7,
    "note": "héllo ✓",
}


async def test_create_and_get_round_trip(users):
    created = (
        await users.CreateUser(
            us.CreateUserRequest(
                user_id="alice",
                email="alice@example.com",
                first_name="Alice",
                last_name="Liddell",
                metadata=struct(NESTED),
            )
        )
    ).user
    assert created.user_id == "alice"
    assert created.HasField("created_at") and created.created_at.seconds > 0
    assert created.HasField("updated_at")
    assert created.updated_at.ToMicroseconds() >= created.created_at.ToMicroseconds()
    assert created.session_count == 0

    got = (await users.GetUser(us.GetUserRequest(user_id="alice"))).user
    assert (got.email, got.first_name, got.last_name) == ("alice@example.com", "Alice", "Liddell")
    assert as_dict(got.metadata) == NESTED
    assert got.created_at == created.created_at
    # Timestamps carry microseconds at most (PostgreSQL's precision).
    assert got.created_at.nanos % 1000 == 0


async def test_create_duplicate_is_already_exists(users):
    await users.CreateUser(us.CreateUserRequest(user_id="dup", email="first@example.com"))
    await rpc_error(
        users.CreateUser(us.CreateUserRequest(user_id="dup", email="second@example.com")),
        Code.ALREADY_EXISTS,
    )
    got = (await users.GetUser(us.GetUserRequest(user_id="dup"))).user
    assert got.email == "first@example.com"


async def test_absent_user_is_not_found(users):
    await rpc_error(users.GetUser(us.GetUserRequest(user_id="nobody")), Code.NOT_FOUND)
    await rpc_error(
        users.UpdateUser(us.UpdateUserRequest(user_id="nobody", email="x@example.com")),
        Code.NOT_FOUND,
    )
    await rpc_error(users.DeleteUser(us.DeleteUserRequest(user_id="nobody")), Code.NOT_FOUND)


async def _make_bob(users: Users) -> resources_pb2.User:
    return (
        await users.CreateUser(
            us.CreateUserRequest(
                user_id="bob",
                email="bob@example.com",
                first_name="Bob",
                last_name="Builder",
                metadata=struct({"k": "v"}),
            )
        )
    ).user


async def test_update_with_mask_changes_only_named_fields(users):
    before = await _make_bob(users)
    req = us.UpdateUserRequest(
        user_id="bob",
        email="ignored@example.com",  # set, but not in the mask
        first_name="Robert",
        update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
    )
    after = (await users.UpdateUser(req)).user
    assert (after.email, after.first_name, after.last_name) == (
        "bob@example.com",
        "Robert",
        "Builder",
    )
    assert as_dict(after.metadata) == {"k": "v"}
    assert after.created_at == before.created_at
    assert after.updated_at.ToMicroseconds() >= before.updated_at.ToMicroseconds()


async def test_update_mask_clears_named_unset_fields(users):
    await _make_bob(users)
    req = us.UpdateUserRequest(
        user_id="bob", update_mask=field_mask_pb2.FieldMask(paths=["last_name", "metadata"])
    )
    after = (await users.UpdateUser(req)).user
    assert after.last_name == ""
    assert as_dict(after.metadata) == {}
    assert (after.email, after.first_name) == ("bob@example.com", "Bob")
    stored = (await users.GetUser(us.GetUserRequest(user_id="bob"))).user
    assert stored.last_name == "" and as_dict(stored.metadata) == {}


async def test_update_without_mask_changes_only_set_fields(users):
    await _make_bob(users)
    after = (await users.UpdateUser(us.UpdateUserRequest(user_id="bob", first_name="Rob"))).user
    assert (after.email, after.first_name, after.last_name) == (
        "bob@example.com",
        "Rob",
        "Builder",
    )
    assert as_dict(after.metadata) == {"k": "v"}
    # proto3 `optional`: an explicitly set empty string is a change (it clears the field).
    after = (await users.UpdateUser(us.UpdateUserRequest(user_id="bob", email=""))).user
    assert (after.email, after.first_name, after.last_name) == ("", "Rob", "Builder")


async def test_metadata_merge_patch(users):
    start = {"a": {"x": 1, "y": 2, "deep": {"p": 1}}, "list": [1, 2, 3], "keep": "k", "gone": 1}
    await users.CreateUser(us.CreateUserRequest(user_id="m", metadata=struct(start)))
    patch = {
        "a": {"y": 3, "z": 4, "deep": {"q": 2}},
        "list": [9],
        "gone": None,
        "new": {"n": True},
        "keep2": None,  # removing an absent key is a no-op
    }
    after = (await users.UpdateUser(us.UpdateUserRequest(user_id="m", metadata=struct(patch)))).user
    expected = {
        "a": {"x": 1, "y": 3, "z": 4, "deep": {"p": 1, "q": 2}},
        "list": [9],
        "keep": "k",
        "new": {"n": True},
    }
    assert as_dict(after.metadata) == expected
    # Nested null removes a nested key; a scalar replaces an object and vice versa.
    patch2 = {"a": {"x": None, "deep": "flat"}, "keep": {"now": "object"}}
    after = (
        await users.UpdateUser(us.UpdateUserRequest(user_id="m", metadata=struct(patch2)))
    ).user
    expected = {
        "a": {"y": 3, "z": 4, "deep": "flat"},
        "list": [9],
        "keep": {"now": "object"},
        "new": {"n": True},
    }
    assert as_dict(after.metadata) == expected
    stored = (await users.GetUser(us.GetUserRequest(user_id="m"))).user
    assert as_dict(stored.metadata) == expected


async def test_concurrent_updates_of_different_keys_all_survive(users):
    await users.CreateUser(us.CreateUserRequest(user_id="c", metadata=struct({"base": 0})))
    await asyncio.gather(
        *(
            users.UpdateUser(
                us.UpdateUserRequest(user_id="c", metadata=struct({f"k{i}": i, "n": {f"i{i}": i}}))
            )
            for i in range(20)
        )
    )
    meta = as_dict((await users.GetUser(us.GetUserRequest(user_id="c"))).user.metadata)
    assert meta["base"] == 0
    assert {k: meta[k] for k in meta if k.startswith("k")} == {f"k{i}": i for i in range(20)}
    assert meta["n"] == {f"i{i}": i for i in range(20)}


async def test_session_count_counts_live_sessions(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s1", user_id="u"))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s2", user_id="u"))
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s3", user_id="u", messages=[msg("x")]))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="other"))
    assert (await users.GetUser(us.GetUserRequest(user_id="u"))).user.session_count == 3
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s2"))
    assert (await users.GetUser(us.GetUserRequest(user_id="u"))).user.session_count == 2


async def test_delete_user_removes_sessions_and_messages(users, sessions, clean_db):
    await users.CreateUser(us.CreateUserRequest(user_id="gone"))
    await users.CreateUser(us.CreateUserRequest(user_id="stays"))
    add = sessions.AddMemory
    await add(ss.AddMemoryRequest(session_id="g1", user_id="gone", messages=[msg("a")] * 3))
    await add(ss.AddMemoryRequest(session_id="g2", user_id="gone", messages=[msg("b")] * 2))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="g2"))
    await add(ss.AddMemoryRequest(session_id="k1", user_id="stays", messages=[msg("c")] * 4))
    await add(ss.AddMemoryRequest(session_id="free", messages=[msg("d")]))

    counts = await users.DeleteUser(us.DeleteUserRequest(user_id="gone"))
    assert (counts.deleted_sessions, counts.deleted_messages) == (2, 5)

    await rpc_error(users.GetUser(us.GetUserRequest(user_id="gone")), Code.NOT_FOUND)
    for sid in ("g1", "g2"):
        await rpc_error(
            sessions.GetSession(ss.GetSessionRequest(session_id=sid, show_deleted=True)),
            Code.NOT_FOUND,
        )
        memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id=sid))
        assert not memory.found and len(memory.messages) == 0
    listed = await sessions.ListSessions(ss.ListSessionsRequest(show_deleted=True))
    assert sorted(s.session_id for s in listed.sessions) == ["free", "k1"]
    # A hard delete: the rows are gone from the database, not just hidden.
    assert await count_rows(clean_db, "sessions") == 2
    assert await count_rows(clean_db, "messages") == 5

    # Other users' data is untouched.
    kept = await sessions.GetMemory(ss.GetMemoryRequest(session_id="k1", lastn=10))
    assert kept.found and len(kept.messages) == 4

    # The id is free again, and the new user inherits nothing.
    again = (await users.CreateUser(us.CreateUserRequest(user_id="gone"))).user
    assert again.session_count == 0
    owned = await users.ListUserSessions(us.ListUserSessionsRequest(user_id="gone"))
    assert list(owned.sessions) == []
    # The session ids are free again too.
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="g1", user_id="gone"))
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="g1"))
    assert memory.found and len(memory.messages) == 0


async def test_list_user_sessions(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    await users.CreateUser(us.CreateUserRequest(user_id="v"))
    for sid in ("a", "b", "c"):
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=sid, user_id="u"))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="v1", user_id="v"))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="b"))
    got = await users.ListUserSessions(us.ListUserSessionsRequest(user_id="u"))
    assert [s.session_id for s in got.sessions] == ["a", "c"]
    assert all(s.user_id == "u" for s in got.sessions)
    assert got.next_page_token == ""
    await rpc_error(
        users.ListUserSessions(us.ListUserSessionsRequest(user_id="nobody")), Code.NOT_FOUND
    )


async def test_concurrent_creates_of_one_id_make_one_user(users):
    calls = [
        users.CreateUser(us.CreateUserRequest(user_id="race", email=f"{i}@x")) for i in range(10)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    winners = [r for r in results if isinstance(r, us.CreateUserResponse)]
    losers = [r for r in results if not isinstance(r, us.CreateUserResponse)]
    assert len(winners) == 1
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in losers), losers
    assert {e.code() for e in losers} == {Code.ALREADY_EXISTS}
    got = (await users.GetUser(us.GetUserRequest(user_id="race"))).user
    assert got.email == winners[0].user.email


async def test_an_update_that_changes_nothing_keeps_updated_at(users, sessions):
    # The protos promise that "a request that changes nothing returns the user (session,
    # message) as it is": a merge of {} or a field set to its value bumped updated_at, and a
    # listing by updated_at moved the row.
    before = await _make_bob(users)
    same = [
        us.UpdateUserRequest(user_id="bob", email="bob@example.com"),
        us.UpdateUserRequest(user_id="bob", metadata=struct({})),
        us.UpdateUserRequest(user_id="bob", metadata=struct({"k": "v"})),
    ]
    for req in same:
        assert (await users.UpdateUser(req)).user.updated_at == before.updated_at, req
    changed = (await users.UpdateUser(us.UpdateUserRequest(user_id="bob", email="b@x.org"))).user
    assert changed.updated_at.ToMicroseconds() > before.updated_at.ToMicroseconds()
    added = await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg("hi", metadata=struct({"k": 1}))])
    )
    session, uuid = added.session, added.messages[0].uuid
    message = added.messages[0]
    kept = await sessions.UpdateSession(
        ss.UpdateSessionRequest(session_id="s", metadata=struct({}))
    )
    assert kept.session.updated_at == session.updated_at
    untouched = await sessions.UpdateMessage(
        ss.UpdateMessageRequest(session_id="s", uuid=uuid, metadata=struct({"k": 1}))
    )
    assert untouched.message.updated_at == message.updated_at
    got = await sessions.GetSession(ss.GetSessionRequest(session_id="s"))
    assert got.session.updated_at == session.updated_at  # the message's session too
    moved = await sessions.UpdateMessage(
        ss.UpdateMessageRequest(session_id="s", uuid=uuid, metadata=struct({"k": 2}))
    )
    assert moved.message.updated_at.ToMicroseconds() > message.updated_at.ToMicroseconds()
    got = await sessions.GetSession(ss.GetSessionRequest(session_id="s"))
    assert got.session.updated_at.ToMicroseconds() > session.updated_at.ToMicroseconds()

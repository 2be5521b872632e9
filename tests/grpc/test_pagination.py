"""Keyset pagination over a real channel: every row exactly once, defaults, clamps, tokens."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.grpc import Code, Sessions, Users, msg, rpc_error, struct, tamper, walk


async def _make_users(
    users: Users, n: int, prefix: str = "u", concurrent: bool = True
) -> list[str]:
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    if concurrent:
        # 64 at a time: a thousand at once overflow the pool's wait queue on a loaded box,
        # and are refused, as they should be (test_hostile_input.py); paging is what is tested here.
        for start in range(0, n, 64):
            batch = ids[start : start + 64]
            await asyncio.gather(
                *(users.CreateUser(us.CreateUserRequest(user_id=u)) for u in batch)
            )
    else:
        for u in ids:
            await users.CreateUser(us.CreateUserRequest(user_id=u))
    return ids


async def _make_sessions(sessions: Sessions, n: int, prefix: str = "s", **kw: Any) -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    for sid in ids:  # one by one, so created_at follows the list order
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=sid, **kw))
    return ids


def _key(row: Any, id_field: str) -> tuple[int, str]:
    return (row.created_at.ToMicroseconds(), getattr(row, id_field))


async def test_list_users_walks_every_row_once_in_order(users):
    ids = await _make_users(users, 23)
    rows, sizes = await walk(users.ListUsers, us.ListUsersRequest(page_size=5), "users")
    assert sizes == [5, 5, 5, 5, 3]
    assert sorted(u.user_id for u in rows) == ids
    keys = [_key(u, "user_id") for u in rows]
    assert keys == sorted(keys) and len(set(keys)) == 23


async def test_list_sessions_and_user_sessionswalk(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="owner"))
    ids = await _make_sessions(sessions, 12, user_id="owner")
    rows, sizes = await walk(sessions.ListSessions, ss.ListSessionsRequest(page_size=4), "sessions")
    assert sizes == [4, 4, 4]  # an exact multiple: the last full page carries no token
    assert [s.session_id for s in rows] == ids
    rows, sizes = await walk(
        users.ListUserSessions,
        us.ListUserSessionsRequest(user_id="owner", page_size=5),
        "sessions",
    )
    assert sizes == [5, 5, 2]
    assert [s.session_id for s in rows] == ids


async def test_users_survive_inserts_and_deletes_between_pages(users):
    ids = await _make_users(users, 20, concurrent=False)
    req = us.ListUsersRequest(page_size=5)
    page = await users.ListUsers(req)
    seen = [u.user_id for u in page.users]
    assert seen == ids[:5]
    # Delete the row the token points after, a seen row, and rows not yet seen; insert new ones.
    deleted = {ids[4], ids[2], ids[5], ids[9], ids[19]}
    for u in deleted:
        await users.DeleteUser(us.DeleteUserRequest(user_id=u))
    added = await _make_users(users, 3, prefix="new", concurrent=False)
    token = page.next_page_token
    while token:
        page = await users.ListUsers(us.ListUsersRequest(page_size=5, page_token=token))
        seen += [u.user_id for u in page.users]
        token = page.next_page_token
        if len(seen) == 10:  # mutate again mid-walk
            await users.DeleteUser(us.DeleteUserRequest(user_id=ids[18]))
            deleted.add(ids[18])
    assert len(seen) == len(set(seen)), "a row was returned twice"
    unseen_deleted = deleted - set(ids[:5])
    assert not unseen_deleted & set(seen[5:]), "a row deleted before its page was returned"
    survivors = [u for u in ids if u not in deleted]
    assert [u for u in seen if u in survivors] == survivors
    assert [u for u in seen if u.startswith("new")] == added


async def test_sessions_and_messages_survive_changes_between_pages(sessions):
    ids = await _make_sessions(sessions, 10)
    page = await sessions.ListSessions(ss.ListSessionsRequest(page_size=3))
    seen = [s.session_id for s in page.sessions]
    for sid in (ids[2], ids[3], ids[7]):  # the cursor row, and rows not yet seen
        await sessions.DeleteSession(ss.DeleteSessionRequest(session_id=sid))
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="late"))
    token = page.next_page_token
    while token:
        page = await sessions.ListSessions(ss.ListSessionsRequest(page_size=3, page_token=token))
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
    assert seen == [*ids[:3], *(i for i in ids[3:] if i not in (ids[3], ids[7])), "late"]

    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="m", messages=[msg(f"m{i}") for i in range(7)])
    )
    page = await sessions.ListMessages(ss.ListMessagesRequest(session_id="m", page_size=3))
    contents = [m.content for m in page.messages]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="m", messages=[msg("m7"), msg("m8")]))
    token = page.next_page_token
    while token:
        page = await sessions.ListMessages(
            ss.ListMessagesRequest(session_id="m", page_size=3, page_token=token)
        )
        contents += [m.content for m in page.messages]
        token = page.next_page_token
    assert contents == [f"m{i}" for i in range(9)]


async def test_page_size_zero_means_fifty(users, sessions):
    await _make_users(users, 60)
    page = await users.ListUsers(us.ListUsersRequest())
    assert len(page.users) == 50 and page.next_page_token
    await users.CreateUser(us.CreateUserRequest(user_id="owner"))
    await asyncio.gather(
        *(
            sessions.CreateSession(ss.CreateSessionRequest(session_id=f"s{i}", user_id="owner"))
            for i in range(60)
        )
    )
    listed = await sessions.ListSessions(ss.ListSessionsRequest())
    assert len(listed.sessions) == 50 and listed.next_page_token and listed.total_size == 60
    owned = await users.ListUserSessions(us.ListUserSessionsRequest(user_id="owner"))
    assert len(owned.sessions) == 50 and owned.next_page_token
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="m", messages=[msg(f"m{i}") for i in range(60)])
    )
    messages = await sessions.ListMessages(ss.ListMessagesRequest(session_id="m"))
    assert len(messages.messages) == 50 and messages.next_page_token


async def test_page_size_above_maximum_is_clamped(users, sessions):
    await _make_users(users, 1001)
    page = await users.ListUsers(us.ListUsersRequest(page_size=5000))
    assert len(page.users) == 1000 and page.next_page_token
    rest = await users.ListUsers(
        us.ListUsersRequest(page_size=5000, page_token=page.next_page_token)
    )
    assert len(rest.users) == 1 and not rest.next_page_token
    chunks = [
        len(c.users)
        async for c in users.ListUsersChunked(us.ListUsersChunkedRequest(chunk_size=5000))
    ]
    assert sum(chunks) == 1001 and max(chunks) <= 1000

    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="m", messages=[msg(f"m{i}") for i in range(1000)])
    )
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="m", messages=[msg("last")]))
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="m", page_size=2000))
    assert len(listed.messages) == 1000 and listed.next_page_token
    memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id="m", lastn=2000))
    assert len(memory.messages) == 1000 and memory.messages[-1].content == "last"


async def test_negative_page_size_is_invalid(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("x")]))
    bad = Code.INVALID_ARGUMENT
    await rpc_error(users.ListUsers(us.ListUsersRequest(page_size=-1)), bad, field="page_size")
    await rpc_error(
        users.ListUserSessions(us.ListUserSessionsRequest(user_id="u", page_size=-1)),
        bad,
        field="page_size",
    )
    await rpc_error(
        sessions.ListSessions(ss.ListSessionsRequest(page_size=-5)), bad, field="page_size"
    )
    await rpc_error(
        sessions.ListMessages(ss.ListMessagesRequest(session_id="s", page_size=-1)),
        bad,
        field="page_size",
    )


async def test_bad_tokens_are_invalid_argument(users, sessions):
    await _make_users(users, 4)
    token = (await users.ListUsers(us.ListUsersRequest(page_size=2))).next_page_token
    assert token
    bad = Code.INVALID_ARGUMENT
    for wrong in (tamper(token), token[:-3], "garbage!!", "djE6bm90LWEtdG9rZW4"):
        await rpc_error(
            users.ListUsers(us.ListUsersRequest(page_size=2, page_token=wrong)),
            bad,
            field="page_token",
        )
    # A ListUsers token is not a ListSessions token.
    await rpc_error(
        sessions.ListSessions(ss.ListSessionsRequest(page_size=2, page_token=token)),
        bad,
        field="page_token",
    )


async def test_token_from_another_query_is_invalid(users, sessions):
    for uid in ("a", "b"):
        await users.CreateUser(us.CreateUserRequest(user_id=uid))
        await _make_sessions(sessions, 3, prefix=f"{uid}-", user_id=uid)
    base = ss.ListSessionsRequest(page_size=1, user_id="a")
    token = (await sessions.ListSessions(base)).next_page_token
    assert token
    # The same query accepts it.
    same = ss.ListSessionsRequest(page_size=1, user_id="a", page_token=token)
    assert [s.session_id for s in (await sessions.ListSessions(same)).sessions] == ["a-001"]
    others = [
        ss.ListSessionsRequest(user_id="b"),
        ss.ListSessionsRequest(),
        ss.ListSessionsRequest(user_id="a", order_by="created_at desc"),
        ss.ListSessionsRequest(user_id="a", order_by="updated_at"),
        ss.ListSessionsRequest(user_id="a", show_deleted=True),
        ss.ListSessionsRequest(user_id="a", metadata_contains=struct({"k": "v"})),
    ]
    for other in others:
        other.page_size = 1
        other.page_token = token
        await rpc_error(sessions.ListSessions(other), Code.INVALID_ARGUMENT, field="page_token")

    owned = await users.ListUserSessions(us.ListUserSessionsRequest(user_id="a", page_size=1))
    await rpc_error(
        users.ListUserSessions(
            us.ListUserSessionsRequest(user_id="b", page_size=1, page_token=owned.next_page_token)
        ),
        Code.INVALID_ARGUMENT,
        field="page_token",
    )

    for sid in ("m1", "m2"):
        await sessions.AddMemory(
            ss.AddMemoryRequest(session_id=sid, messages=[msg("x"), msg("y"), msg("z")])
        )
    page = await sessions.ListMessages(ss.ListMessagesRequest(session_id="m1", page_size=1))
    await rpc_error(
        sessions.ListMessages(
            ss.ListMessagesRequest(session_id="m2", page_size=1, page_token=page.next_page_token)
        ),
        Code.INVALID_ARGUMENT,
        field="page_token",
    )
    await rpc_error(
        users.ListUsers(us.ListUsersRequest(page_token=page.next_page_token)),
        Code.INVALID_ARGUMENT,
        field="page_token",
    )


async def test_page_number_matches_token_path(sessions):
    ids = await _make_sessions(sessions, 7)
    by_token, sizes = await walk(
        sessions.ListSessions, ss.ListSessionsRequest(page_size=3), "sessions"
    )
    assert sizes == [3, 3, 1]
    by_number: list[str] = []
    for number in (1, 2, 3):
        page = await sessions.ListSessions(ss.ListSessionsRequest(page_size=3, page_number=number))
        assert page.total_size == 7
        by_number += [s.session_id for s in page.sessions]
    assert by_number == [s.session_id for s in by_token] == ids
    beyond = await sessions.ListSessions(ss.ListSessionsRequest(page_size=3, page_number=4))
    assert len(beyond.sessions) == 0 and beyond.total_size == 7
    await rpc_error(
        sessions.ListSessions(ss.ListSessionsRequest(page_size=3, page_number=-1)),
        Code.INVALID_ARGUMENT,
        field="page_number",
    )
    token = (await sessions.ListSessions(ss.ListSessionsRequest(page_size=3))).next_page_token
    await rpc_error(
        sessions.ListSessions(ss.ListSessionsRequest(page_size=3, page_token=token, page_number=2)),
        Code.INVALID_ARGUMENT,
        field=("page_number", "page_token"),
    )


async def test_order_by(sessions):
    ids = await _make_sessions(sessions, 5)
    desc, _ = await walk(
        sessions.ListSessions,
        ss.ListSessionsRequest(page_size=2, order_by="created_at desc"),
        "sessions",
    )
    assert [s.session_id for s in desc] == ids[::-1]
    asc = await sessions.ListSessions(ss.ListSessionsRequest(order_by="created_at asc"))
    assert [s.session_id for s in asc.sessions] == ids
    await sessions.UpdateSession(
        ss.UpdateSessionRequest(session_id=ids[1], metadata=struct({"x": 1}))
    )
    by_update, _ = await walk(
        sessions.ListSessions,
        ss.ListSessionsRequest(page_size=2, order_by="updated_at"),
        "sessions",
    )
    assert [s.session_id for s in by_update] == [ids[0], *ids[2:], ids[1]]
    latest = await sessions.ListSessions(ss.ListSessionsRequest(order_by="updated_at desc"))
    assert latest.sessions[0].session_id == ids[1]
    for wrong in ("name", "created_at sideways", "created_at asc desc", "session_id; drop"):
        await rpc_error(
            sessions.ListSessions(ss.ListSessionsRequest(order_by=wrong)),
            Code.INVALID_ARGUMENT,
            field="order_by",
        )


async def test_filters(users, sessions):
    await users.CreateUser(us.CreateUserRequest(user_id="u"))
    metas = [
        {"tier": "gold", "n": {"a": 1}},
        {"tier": "free"},
        {"tier": "gold"},
        {},
        {"n": {"a": 1}},
    ]
    for i, meta in enumerate(metas):
        await sessions.CreateSession(
            ss.CreateSessionRequest(
                session_id=f"s{i}", user_id="u" if i % 2 == 0 else "", metadata=struct(meta)
            )
        )
    everything = list((await sessions.ListSessions(ss.ListSessionsRequest())).sessions)

    async def ids(**kw: Any) -> list[str]:
        page = await sessions.ListSessions(ss.ListSessionsRequest(**kw))
        assert page.total_size == len(page.sessions)
        return [s.session_id for s in page.sessions]

    assert await ids(user_id="u") == ["s0", "s2", "s4"]
    assert await ids(metadata_contains=struct({"tier": "gold"})) == ["s0", "s2"]
    assert await ids(metadata_contains=struct({"n": {"a": 1}})) == ["s0", "s4"]
    assert await ids(user_id="u", metadata_contains=struct({"tier": "gold"})) == ["s0", "s2"]
    assert await ids(user_id="nobody") == []
    pivot = everything[2].created_at
    after = [
        s.session_id for s in everything if s.created_at.ToMicroseconds() >= pivot.ToMicroseconds()
    ]
    before = [s.session_id for s in everything if s.session_id not in after]
    assert await ids(created_after=pivot) == after
    assert await ids(created_before=pivot) == before
    await sessions.UpdateSession(
        ss.UpdateSessionRequest(session_id="s1", metadata=struct({"z": 1}))
    )
    touched = (await sessions.GetSession(ss.GetSessionRequest(session_id="s1"))).session.updated_at
    assert await ids(updated_after=touched) == ["s1"]
    assert "s1" not in await ids(updated_before=touched)


async def test_time_bounds_must_make_a_range(sessions):
    # As SearchMemory: swapped bounds are a mistake to name, not a silent empty list.
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    early, late = Timestamp(seconds=1_700_000_000), Timestamp(seconds=1_800_000_000)
    for after, before in (("created_after", "created_before"), ("updated_after", "updated_before")):
        for low, high in ((late, early), (early, early)):
            request = ss.ListSessionsRequest(**{after: low, before: high})
            await rpc_error(sessions.ListSessions(request), Code.INVALID_ARGUMENT, field=before)


async def test_largest_timestamp_is_a_bound(sessions):
    # 9999-12-31T23:59:59.999999999Z, protobuf's largest Timestamp: "no upper bound".
    await sessions.CreateSession(ss.CreateSessionRequest(session_id="s"))
    last = Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    page = await sessions.ListSessions(ss.ListSessionsRequest(created_before=last))
    assert [s.session_id for s in page.sessions] == ["s"]
    found = await sessions.SearchMemory(ss.SearchMemoryRequest(text="x", created_before=last))
    assert list(found.results) == []
    page = await sessions.ListSessions(ss.ListSessionsRequest(created_after=last))
    assert list(page.sessions) == []

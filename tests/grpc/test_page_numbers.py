"""ListUsers and ListMessages page by page_number (Zep's SDKs) as ListSessions does, with
total_size; the keyset token stays the fast path and the two cannot be mixed."""

from __future__ import annotations

from typing import Any

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from memstore_client import AsyncMemstore, InvalidArgument
from tests.grpc import Code, Sessions, Users, msg, rpc_error, walk


async def _users(users: Users, n: int) -> list[str]:
    ids = [f"u{i:02d}" for i in range(n)]
    for uid in ids:  # one by one, so created_at follows the list order
        await users.CreateUser(us.CreateUserRequest(user_id=uid))
    return ids


async def _by_number(call: Any, make: Any, field: str, pages: int) -> tuple[list[str], list[int]]:
    got: list[str] = []
    totals: list[int] = []
    for number in range(1, pages + 1):
        page = await call(make(number))
        got += [getattr(row, "user_id", None) or row.content for row in getattr(page, field)]
        totals.append(page.total_size)
    return got, totals


async def test_list_users_page_numbers_match_the_token_path(users: Users) -> None:
    ids = await _users(users, 7)
    by_token, sizes = await walk(users.ListUsers, us.ListUsersRequest(page_size=3), "users")
    assert sizes == [3, 3, 1] and [u.user_id for u in by_token] == ids
    by_number, totals = await _by_number(
        users.ListUsers, lambda n: us.ListUsersRequest(page_size=3, page_number=n), "users", 3
    )
    assert by_number == ids and totals == [7, 7, 7]
    beyond = await users.ListUsers(us.ListUsersRequest(page_size=3, page_number=4))
    assert len(beyond.users) == 0 and beyond.total_size == 7 and not beyond.next_page_token
    # A page_number page's token continues by keyset, carrying the count it started with.
    second = await users.ListUsers(us.ListUsersRequest(page_size=3, page_number=2))
    await users.CreateUser(us.CreateUserRequest(user_id="late"))
    third = await users.ListUsers(
        us.ListUsersRequest(page_size=3, page_token=second.next_page_token)
    )
    assert [u.user_id for u in third.users] == ["u06", "late"] and third.total_size == 7
    assert (await users.ListUsers(us.ListUsersRequest())).total_size == 8


async def test_list_users_total_rides_in_the_token_and_chunked_tokens_still_work(
    users: Users,
) -> None:
    await _users(users, 5)
    first = await users.ListUsers(us.ListUsersRequest(page_size=2))
    assert first.total_size == 5
    # The chunked export's tokens interchange with ListUsers' (same fingerprint).
    chunks = users.ListUsersChunked(
        us.ListUsersChunkedRequest(chunk_size=2, page_token=first.next_page_token)
    )
    assert [[u.user_id for u in c.users] async for c in chunks] == [["u02", "u03"], ["u04"]]


async def test_list_users_page_number_errors_name_the_field(users: Users) -> None:
    await _users(users, 3)
    await rpc_error(
        users.ListUsers(us.ListUsersRequest(page_number=-1)),
        Code.INVALID_ARGUMENT,
        field="page_number",
    )
    token = (await users.ListUsers(us.ListUsersRequest(page_size=1))).next_page_token
    await rpc_error(
        users.ListUsers(us.ListUsersRequest(page_size=1, page_token=token, page_number=2)),
        Code.INVALID_ARGUMENT,
        field="page_number",
    )


async def test_list_messages_page_numbers_and_total(sessions: Sessions) -> None:
    contents = [f"m{i}" for i in range(7)]
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[msg(c) for c in contents])
    )
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="other", messages=[msg("x")]))
    by_token, sizes = await walk(
        sessions.ListMessages, ss.ListMessagesRequest(session_id="s", page_size=3), "messages"
    )
    assert sizes == [3, 3, 1] and [m.content for m in by_token] == contents

    def request(number: int) -> ss.ListMessagesRequest:
        return ss.ListMessagesRequest(session_id="s", page_size=3, page_number=number)

    by_number, totals = await _by_number(sessions.ListMessages, request, "messages", 3)
    assert by_number == contents and totals == [7, 7, 7]
    beyond = await sessions.ListMessages(request(4))
    assert len(beyond.messages) == 0 and beyond.total_size == 7
    second = await sessions.ListMessages(request(2))
    third = await sessions.ListMessages(
        ss.ListMessagesRequest(session_id="s", page_size=3, page_token=second.next_page_token)
    )
    assert [m.content for m in third.messages] == ["m6"] and not third.next_page_token
    # total_size counts live messages only.
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="s"))
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="s", messages=[msg("new")]))
    after = await sessions.ListMessages(request(1))
    assert [m.content for m in after.messages] == ["new"] and after.total_size == 1
    await rpc_error(
        sessions.ListMessages(ss.ListMessagesRequest(session_id="s", page_number=-2)),
        Code.INVALID_ARGUMENT,
        field="page_number",
    )
    await rpc_error(
        sessions.ListMessages(
            ss.ListMessagesRequest(session_id="s", page_token=second.next_page_token, page_number=1)
        ),
        Code.INVALID_ARGUMENT,
        field="page_number",
    )


async def test_the_client_exposes_page_numbers_and_totals(grpc_port: int, clean_db: str) -> None:
    async with AsyncMemstore(f"127.0.0.1:{grpc_port}") as client:
        for uid in ("a", "b", "c"):
            await client.user.add(uid)
        page = await client.user.list(limit=2, page_number=2)
        assert [u.user_id for u in page.users] == ["c"] and page.total_size == 3
        first = await client.user.list(limit=2)
        assert first.total_size == 3 and first.next_cursor
        await client.memory.add("s", [{"content": f"m{i}"} for i in range(5)])
        messages = await client.memory.list_messages("s", page_size=2, page_number=3)
        assert [m.content for m in messages.messages] == ["m4"] and messages.total_size == 5
        try:
            await client.user.list(page_number="2")  # type: ignore[arg-type]
        except InvalidArgument as error:
            assert error.field_violations[0].field == "page_number"
        else:
            raise AssertionError("a str page_number must be refused")

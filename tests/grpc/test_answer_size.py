"""Answers of large rows: pages read by token end early by bytes, larger asks are refused.

The stubs here are a default gRPC client's: it accepts answers of 4 MiB at most.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.api.answer_size import MAX_ANSWER_BYTES, PAGE_BYTES
from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, Page
from server.store import Store
from tests.grpc import Code, Sessions, Users, rpc_error

#: Within the 1 MiB a message's content may be; four of them pass no page, five do.
BIG = "x" * 1_000_000
#: Within the 64 KiB of metadata a row may hold: seventy rows make a page too large.
PAD = {"pad": "y" * 60_000}


async def _big_messages(store: Store, session_id: str, count: int, word: str = "") -> None:
    for start in range(0, count, 4):
        said = [
            NewMessage(role="r", role_type="user", content=f"{word} {BIG}", metadata={})
            for _ in range(min(4, count - start))
        ]
        await store.add_memory(P, session_id, None, said)


async def test_pages_of_large_messages_end_early_and_page_on_by_token(
    sessions: Sessions, store: Store
) -> None:
    # A page of the default 50 messages of 1 MB each was 11 MB: a default client refused it
    # (4 MiB), and past 17 MiB the server did, naming no field.
    await _big_messages(store, "big", 11)
    seen: list[int] = []
    token = ""
    while True:
        page = await sessions.ListMessages(
            ss.ListMessagesRequest(session_id="big", page_token=token)
        )
        assert 0 < len(page.messages) < 11 and page.ByteSize() <= PAGE_BYTES + 1024
        assert page.total_size == 11
        seen.extend(m.sequence for m in page.messages)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(range(1, 12))
    # By page_number a shorter page would make the next number skip rows: refused instead.
    ask = ss.ListMessagesRequest(session_id="big", page_number=1)
    await rpc_error(sessions.ListMessages(ask), Code.INVALID_ARGUMENT, field="page_size")
    small = await sessions.ListMessages(ss.ListMessagesRequest(session_id="big", page_size=2))
    assert [m.sequence for m in small.messages] == [1, 2] and small.next_page_token


async def test_pages_of_large_users_and_sessions_end_early_and_page_on(
    users: Users, sessions: Sessions, store: Store
) -> None:
    await store.create_user(P, "owner", "", "", "", {})
    for i in range(70):
        await store.create_user(P, f"u{i:02d}", "", "", "", PAD)
        await store.create_session(P, f"s{i:02d}", "owner", PAD)

    async def read_all(call, request, rows: str) -> list[str]:  # type: ignore[no-untyped-def]
        found: list[str] = []
        while True:
            page = await call(request)
            assert page.ByteSize() <= PAGE_BYTES + 1024
            assert 0 < len(getattr(page, rows)) < 70
            found.extend(
                r.session_id if rows == "sessions" else r.user_id for r in getattr(page, rows)
            )
            if not page.next_page_token:
                return found
            request.page_token = page.next_page_token

    listed = await read_all(users.ListUsers, us.ListUsersRequest(page_size=1000), "users")
    assert sorted(listed) == sorted(["owner", *(f"u{i:02d}" for i in range(70))])
    assert len(listed) == len(set(listed))
    request = ss.ListSessionsRequest(page_size=1000)
    listed = await read_all(sessions.ListSessions, request, "sessions")
    assert sorted(listed) == [f"s{i:02d}" for i in range(70)]
    owned = us.ListUserSessionsRequest(user_id="owner", page_size=1000)
    listed = await read_all(users.ListUserSessions, owned, "sessions")
    assert sorted(listed) == [f"s{i:02d}" for i in range(70)]


async def test_a_memory_or_search_larger_than_an_answer_is_refused_naming_the_field(
    sessions: Sessions, store: Store
) -> None:
    # 20 messages of 1 MB each: GetMemory(lastn 20) and a search for 20 of them would answer
    # 20 MB, more than the server sends: it answered RESOURCE_EXHAUSTED, naming nothing.
    count = MAX_ANSWER_BYTES // len(BIG) + 2
    await _big_messages(store, "huge", count, word="needle")
    ask = ss.GetMemoryRequest(session_id="huge", lastn=count, relevant_limit=0)
    error = await rpc_error(sessions.GetMemory(ask), Code.INVALID_ARGUMENT, field="lastn")
    assert "MiB" in (error.details() or "")
    fewer = await sessions.GetMemory(ss.GetMemoryRequest(session_id="huge", lastn=3))
    assert [m.sequence for m in fewer.messages] == [count - 2, count - 1, count]
    search = ss.SearchMemoryRequest(
        text="needle", session_ids=["huge"], limit=count, search_type=ss.SEARCH_TYPE_FULL_TEXT
    )
    await rpc_error(sessions.SearchMemory(search), Code.INVALID_ARGUMENT, field="limit")


async def _window(store: Store) -> None:
    # A session of 18 messages, 18.9 MB: lastn 18 is read up to the answer's bytes, and not
    # cut (17 of them hold less than 17 MiB).
    await store.create_user(P, "u", "", "", "", {})
    said = [NewMessage("r", "user", "needle " + "w" * 1_048_000, {}) for _ in range(18)]
    for start in range(0, 18, 6):
        await store.add_memory(P, "now", "u", said[start : start + 6])


async def _memories(store: Store, count: int) -> None:
    # Memories of 600,007 bytes in the user's other session: 30 of them pass 17 MiB.
    for start in range(0, count, 10):
        old = [NewMessage("r", "user", "needle " + "m" * 600_000, {}) for _ in range(10)]
        await store.add_memory(P, "old", "u", old[: min(10, count - start)])


async def test_get_memory_whose_memories_pass_the_answer_names_the_larger_part(
    sessions: Sessions, store: Store
) -> None:
    # The memories are read only up to the answer's bytes (then, where the window is larger
    # than what was read, again up to the window's): the refusal still names the field whose
    # rows are larger, as when every memory was read and the answer measured.
    await _window(store)
    await _memories(store, 31)  # 18.6 MB of memories: the window is larger
    ask = ss.GetMemoryRequest(session_id="now", lastn=18, relevant_limit=100)
    await rpc_error(sessions.GetMemory(ask), Code.INVALID_ARGUMENT, field="lastn")
    await _memories(store, 1)  # 19.2 MB: the memories are
    error = await rpc_error(sessions.GetMemory(ask), Code.INVALID_ARGUMENT, field="relevant_limit")
    assert "ask for fewer" in (error.details() or "")
    fewer = await sessions.GetMemory(
        ss.GetMemoryRequest(session_id="now", lastn=1, relevant_limit=3)
    )
    assert len(fewer.relevant_messages) == 3


async def test_pages_of_large_users_and_sessions_are_read_only_up_to_the_page(
    users: Users, sessions: Sessions, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store read every row of page_size (1,000 rows of 64 KiB of metadata: 64 MB parsed)
    # for the page to keep the ~68 that fit in it. Now it reads a row past them at most.
    await store.create_user(P, "owner", "", "", "", {})
    for i in range(70):
        await store.create_user(P, f"u{i:02d}", "", "", "", PAD)
        await store.create_session(P, f"s{i:02d}", "owner", PAD)
    read: list[int] = []

    def counted(method: Callable[..., Awaitable[Page[Any]]]) -> Callable[..., Any]:
        async def reading(*args: Any, **kwargs: Any) -> Page[Any]:
            page = await method(*args, **kwargs)
            read.append(len(page.items))
            return page

        return reading

    for name in ("list_user_records", "list_sessions", "list_user_sessions"):
        monkeypatch.setattr(store, name, counted(getattr(store, name)))
    owned = us.ListUserSessionsRequest(user_id="owner", page_size=1000)
    pages = [
        (await users.ListUsers(us.ListUsersRequest(page_size=1000))).users,
        (await sessions.ListSessions(ss.ListSessionsRequest(page_size=1000))).sessions,
        (await users.ListUserSessions(owned)).sessions,
    ]
    assert all(len(page) < 70 for page in pages)
    assert all(n <= len(page) + 1 for n, page in zip(read, pages, strict=True)), (
        read,
        [len(p) for p in pages],
    )

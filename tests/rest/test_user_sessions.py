"""Zep's unpaged list of a user's sessions: answered whole, as the store's pages are read."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import httpx
import pytest
from starlette.responses import JSONResponse

from server.domain import DEFAULT_PROJECT_ID, Page, Session
from server.errors import Unavailable
from server.rest import convert
from server.rest.common import USER_SESSIONS_PAGE
from server.store import Store

SESSIONS = 3000
#: How long a held page read waits for the client before giving up (never, when streaming).
HOLD_SECONDS = 20


async def _many_sessions(store: Store, user_id: str, count: int) -> list[Session]:
    await store.create_user(DEFAULT_PROJECT_ID, user_id, "", "", "", {})
    made: list[Session] = []
    for start in range(0, count, 8):
        made += await asyncio.gather(
            *(
                # Non-ASCII metadata: the answer is UTF-8, as JSONResponse writes it.
                store.create_session(
                    DEFAULT_PROJECT_ID, f"s-{i:05d}", user_id, {"i": i, "note": "café ☕"}
                )
                for i in range(start, min(start + 8, count))
            )
        )
    return sorted(made, key=lambda s: (s.created_at, s.session_id))


class _Reads:
    """Records the store's page reads; the second one waits until `released` is set."""

    def __init__(self, store: Store) -> None:
        self._read = store.list_user_sessions
        self.limits: list[int] = []
        self.released = asyncio.Event()
        self.held_until_released = False

    async def __call__(
        self, project_id: int, user_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> Page[Session]:
        self.limits.append(limit)
        if len(self.limits) == 2:
            try:
                await asyncio.wait_for(self.released.wait(), HOLD_SECONDS)
                self.held_until_released = True
            except TimeoutError:
                pass  # the client saw nothing yet: the answer waits for every page
        return await self._read(project_id, user_id, after, limit)


async def test_a_user_of_3000_sessions_is_answered_whole_while_read_in_pages(
    http: httpx.AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Zep's route has no paging, so the whole list is one answer. It was read into memory,
    # every page of 1,000, then rendered at once; now each page of USER_SESSIONS_PAGE goes
    # out before the next is read, so what the server holds is bounded by the page, not the
    # user. The second read waits for the client to have the first page's JSON: old code,
    # which answered nothing before its last read, made it wait in vain.
    sessions = await _many_sessions(store, "many", SESSIONS)
    rendered = [convert.session(s) for s in sessions]
    whole = JSONResponse(rendered).body  # the answer's bytes as they were
    first_page = JSONResponse(rendered[:USER_SESSIONS_PAGE]).body[:-1]  # "[{...},...{...}"
    reads = _Reads(store)
    monkeypatch.setattr(store, "list_user_sessions", reads)
    body = b""
    async with http.stream("GET", "/api/v2/users/many/sessions") as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        async for chunk in reply.aiter_raw():
            body += chunk
            if len(body) >= len(first_page):
                reads.released.set()
    assert body == whole
    got = [s["session_id"] for s in json.loads(body)]
    assert got == [s.session_id for s in sessions]  # oldest first
    assert sorted(got) == [f"s-{i:05d}" for i in range(SESSIONS)]
    assert reads.held_until_released, "the first page was not sent before the second read"
    assert reads.limits == [USER_SESSIONS_PAGE] * (SESSIONS // USER_SESSIONS_PAGE)


@pytest.mark.parametrize(
    ("path", "headers", "nested"),
    [
        ("/api/v2/users/u/sessions", {}, False),
        ("/api/v2/users/u/sessions", {"x-fern-sdk-name": "zep-python"}, True),
        ("/api/v1/user/u/sessions", {}, False),
    ],
)
async def test_each_shape_of_the_list_is_what_it_was(
    http: httpx.AsyncClient, store: Store, path: str, headers: dict[str, str], nested: bool
) -> None:
    # Flat (zep-cloud, 1.x) or inside a list (zep-python 2.x), empty or past a page: byte for
    # byte JSONResponse's rendering of the whole list.
    await store.create_user(DEFAULT_PROJECT_ID, "u", "", "", "", {})
    empty = await http.get(path, headers=headers)
    assert empty.status_code == 200 and empty.content == (b"[[]]" if nested else b"[]")
    count = USER_SESSIONS_PAGE + 1
    for i in range(count):
        await store.create_session(DEFAULT_PROJECT_ID, f"u-{i:03d}", "u", {"i": i})
    sessions = (await store.list_user_sessions(DEFAULT_PROJECT_ID, "u", None, 1000)).items
    assert len(sessions) == count
    rendered: list[Any] = [convert.session(s) for s in sessions]
    full = await http.get(path, headers=headers)
    assert full.content == JSONResponse([rendered] if nested else rendered).body
    missing = await http.get(path.replace("/u/", "/nobody/"), headers=headers)
    assert missing.status_code == 404 and missing.json()["reason"] == "USER_NOT_FOUND"


async def test_a_read_failing_after_the_answer_started_cuts_it_short(
    http: httpx.AsyncClient, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once the status is sent an error can no longer be answered: the answer is left
    # unfinished (the connection closed), never ended as a shorter list that parses.
    await _many_sessions(store, "cut", 2 * USER_SESSIONS_PAGE)
    read = store.list_user_sessions
    calls = 0

    async def failing(
        project_id: int, user_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> Page[Session]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Unavailable("the database went away")
        return await read(project_id, user_id, after, limit)

    monkeypatch.setattr(store, "list_user_sessions", failing)
    with pytest.raises(httpx.RemoteProtocolError):
        await http.get("/api/v2/users/cut/sessions")
    monkeypatch.undo()
    again = await http.get("/api/v2/users/cut/sessions")  # the server serves on
    assert again.status_code == 200 and len(again.json()) == 2 * USER_SESSIONS_PAGE

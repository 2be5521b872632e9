"""/api/v2's lists read as Zep's server reads them: whole without a page size, users newest
first, Zep's camelCase page names and Go's booleans (getzep/zep v1.0.2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from server.domain import DEFAULT_PROJECT_ID, NewMessage, Session, User
from server.store import Store

START = datetime(2026, 1, 1, tzinfo=UTC)


def _users(count: int) -> list[User]:
    at = [START + timedelta(seconds=i) for i in range(count)]
    return [User(f"w{i:04}", "", "", "", {}, t, t, 0) for i, t in enumerate(at)]


def _sessions(count: int) -> list[Session]:
    at = [START + timedelta(seconds=i) for i in range(count)]
    return [Session(f"s{i:04}", None, {}, t, t, None, 0, None) for i, t in enumerate(at)]


async def _said(store: Store, count: int) -> None:
    said = [NewMessage("a", "user", f"m{i}", {}, None) for i in range(count)]
    await store.add_memory(DEFAULT_PROJECT_ID, "talk", None, said)


async def test_v2_lists_without_a_page_size_answer_every_row_or_refuse(
    http: httpx.AsyncClient, store: Store
) -> None:
    # Zep reads an absent page size as 0, and bun writes no LIMIT for 0: every row, whatever
    # the page number (its offset, (number - 1) * 0, is 0). memstore answered the first 50.
    # Past 1,000 rows, 400 naming the page size, as /api/v1's lists (test_http.py).
    users, sessions = _users(1001), _sessions(1000)
    await store.restore(DEFAULT_PROJECT_ID, users[:60], sessions[:59], [])
    await _said(store, 60)  # and the session "talk": 60 sessions
    lists = [  # path, the answer's rows, page size, page number
        ("/api/v2/users-ordered", "users", "pageSize", "pageNumber"),
        ("/api/v2/sessions-ordered", "sessions", "page_size", "page_number"),
        ("/api/v2/sessions/talk/messages", "messages", "limit", "cursor"),
        ("/api/v1/sessions/talk/messages", "messages", "limit", "cursor"),
    ]
    for path, rows, _, number in lists:
        for params in ({}, {number: 2}):
            listed = await http.get(path, params=params)
            assert listed.status_code == 200, (path, listed.text)
            assert (len(listed.json()[rows]), listed.json()["total_count"]) == (60, 60), path
    await store.restore(DEFAULT_PROJECT_ID, users[60:1000], sessions[59:999], [])
    await _said(store, 940)
    for path, rows, _, _ in lists:
        assert len((await http.get(path)).json()[rows]) == 1000, path
    await store.restore(DEFAULT_PROJECT_ID, users[1000:], sessions[999:], [])
    await _said(store, 1)  # 1001 users, sessions and messages
    for path, rows, size, number in lists:
        refused = await http.get(path)
        assert refused.status_code == 400, (path, refused.text)
        assert [v["field"] for v in refused.json()["violations"]] == [size], refused.json()
        assert "whole listing" in refused.json()["message"]
        # Paged, the row past the first 1,000 is there.
        page = await http.get(path, params={size: 1000, number: 2})
        assert page.status_code == 200 and len(page.json()[rows]) == 1, (path, page.text)


async def test_users_ordered_lists_newest_first_and_v1_oldest_first(
    http: httpx.AsyncClient, store: Store
) -> None:
    # Zep's ListAllOrderedUsersHandler calls ListAllOrdered(..., "", false): ORDER BY id
    # DESC, the newest first; memstore listed the oldest first. Zep 0.27.2's /api/v1 list
    # (ListAll: `id > cursor ORDER BY id ASC`) stays oldest first.
    users = _users(5)
    twin = User("w0005", "", "", "", {}, users[4].created_at, users[4].created_at, 0)
    await store.restore(DEFAULT_PROJECT_ID, [*users, twin], [], [])
    newest = ["w0005", "w0004", "w0003", "w0002", "w0001", "w0000"]  # ties: by id, DESC
    listed = (await http.get("/api/v2/users-ordered")).json()
    assert [u["user_id"] for u in listed["users"]] == newest
    pages = [
        (await http.get("/api/v2/users-ordered", params={"pageSize": 4, "pageNumber": n})).json()
        for n in (1, 2, 3)
    ]
    assert [[u["user_id"] for u in p["users"]] for p in pages] == [newest[:4], newest[4:], []]
    oldest = (await http.get("/api/v1/user", params={"limit": 4, "cursor": 2})).json()
    assert [u["user_id"] for u in oldest] == ["w0002", "w0003", "w0004", "w0005"]


async def test_sessions_ordered_reads_zeps_camel_case_page_names(
    http: httpx.AsyncClient, store: Store
) -> None:
    # Zep reads pageNumber and pageSize here (the SDKs send page_number and page_size), and
    # memstore ignored them: the whole listing answered a page.
    await store.restore(DEFAULT_PROJECT_ID, [], _sessions(3), [])
    for params in ({"pageNumber": 2, "pageSize": 1}, {"page_number": 2, "page_size": 1}):
        page = (await http.get("/api/v2/sessions-ordered", params=params)).json()
        assert [s["session_id"] for s in page["sessions"]] == ["s0001"], (params, page)
        assert page["total_count"] == 3
    for params, field in [
        ({"pageSize": 1, "page_size": 1}, "pageSize"),
        ({"pageNumber": 1, "page_number": 1}, "pageNumber"),
        ({"pageSize": 1001}, "pageSize"),
        ({"pageNumber": 0}, "pageNumber"),
    ]:
        refused = await http.get("/api/v2/sessions-ordered", params=params)
        assert refused.status_code == 400, (params, refused.text)
        assert [v["field"] for v in refused.json()["violations"]] == [field], refused.json()


async def test_asc_reads_what_gos_parse_bool_reads(http: httpx.AsyncClient, store: Store) -> None:
    # Zep reads `asc` with strconv.ParseBool; memstore refused t, T, f and F.
    await store.restore(DEFAULT_PROJECT_ID, [], _sessions(2), [])
    readings = {text: True for text in ("1", "t", "T", "TRUE", "true", "True")}
    readings |= {text: False for text in ("0", "f", "F", "FALSE", "false", "False")}
    for text, ascending in readings.items():
        listed = await http.get("/api/v2/sessions-ordered", params={"asc": text})
        assert listed.status_code == 200, (text, listed.text)
        first = listed.json()["sessions"][0]["session_id"]
        assert first == ("s0000" if ascending else "s0001"), text
    refused = await http.get("/api/v2/sessions-ordered", params={"asc": "yes"})
    assert refused.status_code == 400
    assert [v["field"] for v in refused.json()["violations"]] == ["asc"]

"""REST answers of messages are capped as gRPC's are: 400 naming the query value that asked.

gRPC refuses an answer past answer_size.MAX_ANSWER_BYTES (17 MiB), naming lastn,
relevant_limit or the page size (tests/grpc/test_answer_size.py); REST answered the same
call with all of it, built as one JSON document in memory on the event loop: GetMemory's
lastn=210 of 1 MiB messages was 210 MiB of JSON (the server's peak RSS went from 0.3 to 1.5
GB), and lastn=1000 would be a gigabyte.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from memstore.v1 import session_service_pb2 as spb
from server.api.answer_size import MAX_ANSWER_BYTES
from server.domain import DEFAULT_PROJECT_ID, NewMessage
from server.store import Store
from tests.grpc import Sessions

#: Enough 1 MiB messages to pass the cap, and a count that stays under it.
OVER = MAX_ANSWER_BYTES // 2**20 + 2
UNDER = 8


async def _big_session(store: Store) -> None:
    # "needle" once, then one word too long for full-text search to index.
    content = "needle " + "x" * (2**20 - 16)
    messages = [NewMessage("a", "user", content, {}, None) for _ in range(OVER)]
    await store.add_memory(DEFAULT_PROJECT_ID, "big", None, messages[: OVER // 2])
    await store.add_memory(DEFAULT_PROJECT_ID, "big", None, messages[OVER // 2 :])


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/api/v2/sessions/big/memory", {"lastn": OVER, "relevant_limit": 0}, "lastn"),
        ("/api/v2/sessions/big/messages", {"limit": OVER}, "limit"),
        ("/api/v1/sessions/big/messages", {"limit": OVER}, "limit"),
    ],
)
async def test_answers_past_the_cap_are_400_naming_what_asked(
    http: httpx.AsyncClient, store: Store, path: str, query: dict[str, int], field: str
) -> None:
    await _big_session(store)
    reply = await http.get(path, params=query)
    assert reply.status_code == 400, reply.status_code
    assert [v["field"] for v in reply.json()["violations"]] == [field], reply.json()
    assert "ask for fewer" in reply.json()["message"]
    smaller = {k: UNDER if v == OVER else v for k, v in query.items()}
    reply = await http.get(path, params=smaller)
    assert reply.status_code == 200
    assert len(reply.json()["messages"]) == UNDER


async def test_a_whole_listing_of_messages_past_the_cap_is_400_naming_limit(
    http: httpx.AsyncClient, store: Store
) -> None:
    # Without a limit every message is asked for (Zep's), and read only up to the cap.
    await _big_session(store)
    for path in ("/api/v2/sessions/big/messages", "/api/v1/sessions/big/messages"):
        reply = await http.get(path)
        assert reply.status_code == 400, reply.status_code
        assert [v["field"] for v in reply.json()["violations"]] == ["limit"], reply.json()
        assert "ask for fewer" in reply.json()["message"]


async def test_a_search_past_the_cap_is_400_naming_limit(
    http: httpx.AsyncClient, store: Store
) -> None:
    await _big_session(store)
    body = {"text": "needle", "search_type": "full_text"}
    reply = await http.post("/api/v2/sessions/big/search", params={"limit": OVER}, json=body)
    assert reply.status_code == 400, reply.status_code
    assert [v["field"] for v in reply.json()["violations"]] == ["limit"]
    reply = await http.post("/api/v2/sessions/big/search", params={"limit": UNDER}, json=body)
    assert reply.status_code == 200 and len(reply.json()) == UNDER


async def test_grpc_refuses_the_same_get_memory_naming_the_same_field(
    http: httpx.AsyncClient, store: Store, grpc_port: int
) -> None:
    await _big_session(store)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        request = spb.GetMemoryRequest(session_id="big", lastn=OVER, relevant_limit=0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await Sessions(channel).GetMemory(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("lastn: ")
    reply = await http.get("/api/v2/sessions/big/memory", params={"lastn": OVER})
    assert reply.json()["message"] == caught.value.details()


async def test_get_memory_whose_memories_pass_the_cap_names_the_larger_part(
    http: httpx.AsyncClient, store: Store
) -> None:
    # As tests/grpc/test_answer_size.py: memories read up to the cap (and again up to the
    # window's size where the window is larger) are refused naming what gRPC names, the field
    # of the larger part: the window's 18.9 million characters against 18.6, then 19.2.
    await store.create_user(DEFAULT_PROJECT_ID, "u", "", "", "", {})
    said = [NewMessage("r", "user", "needle " + "w" * 1_048_000, {}) for _ in range(18)]
    for start in range(0, 18, 6):
        await store.add_memory(DEFAULT_PROJECT_ID, "now", "u", said[start : start + 6])

    async def memories(count: int) -> None:
        old = [NewMessage("r", "user", "needle " + "m" * 600_000, {}) for _ in range(count)]
        for start in range(0, count, 10):
            await store.add_memory(DEFAULT_PROJECT_ID, "old", "u", old[start : start + 10])

    path, query = "/api/v2/sessions/now/memory", {"lastn": 18, "relevant_limit": 100}
    await memories(31)
    reply = await http.get(path, params=query)
    assert reply.status_code == 400, reply.status_code
    assert [v["field"] for v in reply.json()["violations"]] == ["lastn"], reply.json()
    await memories(1)
    reply = await http.get(path, params=query)
    assert reply.status_code == 400, reply.status_code
    assert [v["field"] for v in reply.json()["violations"]] == ["relevant_limit"], reply.json()
    assert "ask for fewer" in reply.json()["message"]
    reply = await http.get(path, params={"lastn": 1, "relevant_limit": 3})
    assert reply.status_code == 200 and len(reply.json()["relevant_messages"]) == 3


#: Messages of 60,000 characters of metadata: 300 of them pass the cap, 250 do not.
_META = {"t": "x" * 60_000}
META_OVER, META_UNDER = 300, 250


async def test_metadata_counts_toward_the_cap_as_grpc_counts_it(
    http: httpx.AsyncClient, store: Store, grpc_port: int
) -> None:
    # Only content and role were counted: GetMemory's lastn=1000 over 1,000 messages of 59 KB
    # of metadata answered 200 with 49 MB of JSON, where gRPC refuses what passes 17 MiB.
    messages = [NewMessage("a", "user", "hi", _META, None) for _ in range(META_OVER)]
    await store.add_memory(DEFAULT_PROJECT_ID, "meta", None, messages[:150])
    await store.add_memory(DEFAULT_PROJECT_ID, "meta", None, messages[150:])
    query = {"lastn": META_OVER, "relevant_limit": 0}
    reply = await http.get("/api/v2/sessions/meta/memory", params=query)
    assert reply.status_code == 400, reply.status_code
    assert [v["field"] for v in reply.json()["violations"]] == ["lastn"], reply.json()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        request = spb.GetMemoryRequest(session_id="meta", lastn=META_OVER, relevant_limit=0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await Sessions(channel).GetMemory(request)
    assert caught.value.details().startswith("lastn: ")
    reply = await http.get("/api/v2/sessions/meta/memory", params={"lastn": META_UNDER})
    assert reply.status_code == 200
    assert len(reply.json()["messages"]) == META_UNDER


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/v2/sessions-ordered", "page_size"),
        ("/api/v1/sessions", "limit"),
        ("/api/v2/users-ordered", "pageSize"),
        ("/api/v2/users-ordered", "page_size"),
        ("/api/v1/user", "limit"),
    ],
)
async def test_lists_of_sessions_and_users_are_capped_by_their_metadata(
    http: httpx.AsyncClient, store: Store, path: str, field: str
) -> None:
    # They were not capped at all: sessions-ordered?page_size=1000 over sessions of 59 KB of
    # metadata answered 49 MB of JSON in 12.5 s, holding other callers up to 8.4 s.
    async def one(i: int) -> None:
        if "user" in path:
            await store.create_user(DEFAULT_PROJECT_ID, f"u{i}", "", "", "", _META)
        else:
            await store.create_session(DEFAULT_PROJECT_ID, f"s{i}", None, _META)

    for start in range(0, META_OVER, 50):
        await asyncio.gather(*(one(i) for i in range(start, start + 50)))
    reply = await http.get(path, params={field: META_OVER})
    assert reply.status_code == 400, reply.status_code
    assert [v["field"] for v in reply.json()["violations"]] == [field], reply.json()
    assert "ask for fewer" in reply.json()["message"]
    reply = await http.get(path, params={field: META_UNDER})
    assert reply.status_code == 200
    rows = reply.json()
    rows = rows if isinstance(rows, list) else rows.get("sessions", rows.get("users"))
    assert len(rows) == META_UNDER

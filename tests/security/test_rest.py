"""API keys and project isolation over Zep's REST API hold exactly as over gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest

from server.api_keys import split_key
from server.config import Config
from server.serving.app import build_http
from server.serving.tls import SecurityConfig
from server.store import Store
from tests.fix_db import has_lock_waiter
from tests.fix_rest import run_sdk
from tests.fix_security import KEY_CACHE_SECONDS, make_key
from tests.polling import until

A_USER, A_SESSION = "a-user", "a-session"


@pytest.fixture(scope="module")
async def secure_http(secure_store: Store) -> AsyncIterator[str]:
    """The REST API over the key-requiring security database (keys exist before it starts)."""
    await make_key(secure_store, "a")
    config = Config(
        host="127.0.0.1",
        http_port=0,
        embedder="none",
        security=SecurityConfig(key_cache_seconds=KEY_CACHE_SECONDS),
    )
    server = await build_http(config, secure_store)
    await server.start()
    yield f"http://127.0.0.1:{server.port}"
    await server.stop(None)


@pytest.fixture
async def http(secure_http: str, clean_secure_db: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secure_http, timeout=30) as client:
        yield client


async def _key(store: Store, project: str) -> dict[str, str]:
    return {"Authorization": f"Api-Key {await make_key(store, project)}"}


#: (method, path, body) of every served route, aimed at project a's ids.
ROUTES = [
    ("POST", "/api/v2/users", {"user_id": "new"}),
    ("GET", "/api/v2/users-ordered", None),
    ("GET", f"/api/v2/users/{A_USER}", None),
    ("PATCH", f"/api/v2/users/{A_USER}", {"email": "x@y.z"}),
    ("DELETE", f"/api/v2/users/{A_USER}", None),
    ("GET", f"/api/v2/users/{A_USER}/sessions", None),
    ("POST", "/api/v2/sessions", {"session_id": "new"}),
    ("GET", "/api/v2/sessions-ordered", None),
    ("POST", "/api/v2/sessions/search", {"text": "secret"}),
    ("GET", f"/api/v2/sessions/{A_SESSION}", None),
    ("PATCH", f"/api/v2/sessions/{A_SESSION}", {"metadata": {"x": 1}}),
    ("GET", f"/api/v2/sessions/{A_SESSION}/memory", None),
    ("POST", f"/api/v2/sessions/{A_SESSION}/memory", {"messages": [{"content": "x"}]}),
    ("DELETE", f"/api/v2/sessions/{A_SESSION}/memory", None),
    ("GET", f"/api/v2/sessions/{A_SESSION}/messages", None),
    ("POST", f"/api/v2/sessions/{A_SESSION}/search", {"text": "secret"}),
    ("GET", "/api/v1/user", None),
    ("GET", f"/api/v1/user/{A_USER}/sessions", None),
    ("GET", "/api/v1/sessions", None),
    ("GET", f"/api/v1/sessions/{A_SESSION}/memory", None),
    ("GET", "/api/v2/no-such-route", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Api-Key ms_wrong_key"},
        {"Authorization": "Bearer ms_wrong_key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-Api-Key": "not-a-key"},
    ],
    ids=["none", "api-key", "bearer", "basic", "x-api-key"],
)
async def test_without_a_valid_key_every_route_is_a_json_401(
    http: httpx.AsyncClient, method: str, path: str, body: object, headers: dict[str, str]
) -> None:
    reply = await http.request(method, path, json=body, headers=headers)
    assert reply.status_code == 401, reply.text
    expected = "API_KEY_MISSING" if not headers else "API_KEY_INVALID"
    assert reply.json()["reason"] == expected and reply.json()["message"]
    assert "www-authenticate" in reply.headers


async def test_two_different_keys_in_one_request_are_refused(
    http: httpx.AsyncClient, secure_store: Store
) -> None:
    a_key = (await _key(secure_store, "a"))["Authorization"].split()[1]
    b_key = (await _key(secure_store, "b"))["Authorization"].split()[1]
    reply = await http.get(
        "/api/v2/sessions-ordered",
        headers={"Authorization": f"Bearer {a_key}", "X-Api-Key": b_key},
    )
    assert reply.status_code == 401 and reply.json()["reason"] == "API_KEY_INVALID"


async def test_an_empty_authorization_header_leaves_the_api_key_header_to_count(
    http: httpx.AsyncClient, secure_store: Store
) -> None:
    # A proxy may pass an empty Authorization along; it carries no key, so X-Api-Key counts.
    a_key = (await _key(secure_store, "a"))["Authorization"].split()[1]
    reply = await http.get(
        "/api/v2/sessions-ordered", headers={"Authorization": "", "X-Api-Key": a_key}
    )
    assert reply.status_code == 200, reply.text
    alone = await http.get("/api/v2/sessions-ordered", headers={"Authorization": ""})
    assert alone.status_code == 401 and alone.json()["reason"] == "API_KEY_MISSING"


async def test_healthz_needs_no_key(http: httpx.AsyncClient) -> None:
    reply = await http.get("/healthz")
    assert reply.status_code == 200 and reply.text == "."
    assert reply.headers["x-zep-version"] == "0.27.2-memstore"  # docs/zep-compat.md's routes


async def _seed_a(http: httpx.AsyncClient, a: dict[str, str]) -> None:
    assert (await http.post("/api/v2/users", json={"user_id": A_USER}, headers=a)).is_success
    made = await http.post(
        "/api/v2/sessions", json={"session_id": A_SESSION, "user_id": A_USER}, headers=a
    )
    assert made.is_success
    memory = {"messages": [{"role": "a", "role_type": "user", "content": "a secret plan"}]}
    added = await http.post(f"/api/v2/sessions/{A_SESSION}/memory", json=memory, headers=a)
    assert added.is_success


async def test_another_projects_ids_behave_as_if_absent(
    http: httpx.AsyncClient, secure_store: Store
) -> None:
    a, b = await _key(secure_store, "a"), await _key(secure_store, "b")
    await _seed_a(http, a)
    uuid = (await http.get(f"/api/v2/sessions/{A_SESSION}/memory", headers=a)).json()["messages"][
        0
    ]["uuid"]
    for method, path in [
        ("GET", f"/api/v2/users/{A_USER}"),
        ("PATCH", f"/api/v2/users/{A_USER}"),
        ("DELETE", f"/api/v2/users/{A_USER}"),
        ("GET", f"/api/v2/users/{A_USER}/sessions"),
        ("GET", f"/api/v2/sessions/{A_SESSION}"),
        ("PATCH", f"/api/v2/sessions/{A_SESSION}"),
        ("DELETE", f"/api/v2/sessions/{A_SESSION}/memory"),
        ("GET", f"/api/v2/sessions/{A_SESSION}/messages"),
        ("GET", f"/api/v2/sessions/{A_SESSION}/messages/{uuid}"),
        ("PATCH", f"/api/v2/sessions/{A_SESSION}/messages/{uuid}"),
        ("GET", f"/api/v1/user/{A_USER}/sessions"),
    ]:
        body = {"metadata": {"x": 1}} if method == "PATCH" else None
        reply = await http.request(method, path, json=body, headers=b)
        assert reply.status_code == 404, (method, path, reply.text)
    memory = (await http.get(f"/api/v2/sessions/{A_SESSION}/memory", headers=b)).json()
    assert memory["messages"] == [] and memory["found"] is False
    for path in ("/api/v2/sessions-ordered", "/api/v2/users-ordered"):
        assert (await http.get(path, headers=b)).json()["total_count"] == 0
    assert (await http.get("/api/v1/sessions", headers=b)).json() == []
    found = await http.post("/api/v2/sessions/search", json={"text": "secret plan"}, headers=b)
    assert found.json()["results"] == []
    # b's memory write to the same session id makes b's own session; a's is untouched.
    mine = {"messages": [{"content": "b's own"}]}
    assert (
        await http.post(f"/api/v2/sessions/{A_SESSION}/memory", json=mine, headers=b)
    ).is_success
    theirs = (await http.get(f"/api/v2/sessions/{A_SESSION}/memory", headers=a)).json()
    assert [m["content"] for m in theirs["messages"]] == ["a secret plan"]
    assert (await http.get(f"/api/v2/users/{A_USER}", headers=a)).status_code == 200


async def test_a_revoked_key_stops_working(http: httpx.AsyncClient, secure_store: Store) -> None:
    a = await _key(secure_store, "a")
    assert (await http.get("/api/v2/sessions-ordered", headers=a)).status_code == 200
    parts = split_key(a["Authorization"].split()[1])
    assert parts is not None
    await secure_store.revoke_api_key(parts[0])
    await asyncio.sleep(KEY_CACHE_SECONDS * 3)
    assert (await http.get("/api/v2/sessions-ordered", headers=a)).status_code == 401


@pytest.mark.parametrize("sdk", ["zep2", "zep1", "cloud"])
async def test_the_sdks_are_refused_with_a_bad_key(secure_http: str, sdk: str) -> None:
    # The SDK runs in another process; this loop keeps serving while it waits.
    result = await asyncio.to_thread(run_sdk, sdk, "unauthorized", secure_http, "ms_bad")
    assert isinstance(result, dict)
    assert "401" in str(result), result


@pytest.mark.parametrize(
    ("sdk", "expected"), [("zep2", {"user": "keyed"}), ("zep1", {"messages": 1})]
)
async def test_the_sdks_work_with_a_valid_key(
    secure_http: str, secure_store: Store, clean_secure_db: str, sdk: str, expected: object
) -> None:
    key = await make_key(secure_store, "b")  # zep2 sends Api-Key, zep1 Bearer
    result = await asyncio.to_thread(run_sdk, sdk, "authorized", secure_http, key)
    assert result == expected


async def test_overload_is_a_json_429(secure_db_url: str, clean_secure_db: str) -> None:
    # A pool of one connection and a queue of one caller, the connection pinned by a PATCH
    # waiting on a row lock: further requests are refused at once, not queued without bound.
    store = await Store.open(secure_db_url, min_size=1, max_size=1, timeout=2, max_waiting=1)
    key = {"Authorization": f"Api-Key {await make_key(store, 'a')}"}
    config = Config(
        host="127.0.0.1",
        http_port=0,
        embedder="none",
        security=SecurityConfig(key_cache_seconds=60),
    )
    server = await build_http(config, store)
    await server.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", headers=key, timeout=30
        ) as http:
            assert (await http.post("/api/v2/users", json={"user_id": "hot"})).is_success
            async with await psycopg.AsyncConnection.connect(secure_db_url) as blocker:
                await blocker.execute("SELECT 1 FROM users WHERE user_id = 'hot' FOR UPDATE")
                pinned = asyncio.ensure_future(
                    http.patch("/api/v2/users/hot", json={"email": "a@x.org"})
                )
                assert await until(lambda: has_lock_waiter(secure_db_url), within=20)
                replies = await asyncio.gather(
                    *(http.get("/api/v2/users-ordered") for _ in range(6))
                )
                await blocker.rollback()
            assert (await pinned).status_code == 200
        refused = [r for r in replies if r.status_code == 429]
        assert len(refused) >= 5, [r.status_code for r in replies]
        assert all(r.json()["reason"] == "SERVER_OVERLOADED" for r in refused)
    finally:
        await server.stop(None)
        await store.close()


async def test_a_refused_request_is_logged_under_the_route_it_would_have_reached(
    http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # Refused before routing (a bad key here; a body too large and overload alike), a
    # request was counted and logged under route "unmatched", the label of paths no route
    # serves: refusals on a real route showed as a scan, and were missing from the route's.
    bad_key = {"Authorization": "Api-Key msk_0000deadbeef_wrong"}
    sent = {
        "r-get": ("GET", "/api/v2/users/alice"),
        "r-delete": ("DELETE", "/api/v2/sessions/s1/memory"),
        "r-405": ("PUT", "/api/v2/users/alice"),  # the route's path, not its method
        "r-none": ("GET", "/api/v2/no/such/route"),
    }
    with caplog.at_level(logging.INFO, logger="memstore.access"):
        for rid, (method, path) in sent.items():
            reply = await http.request(method, path, headers={**bad_key, "x-request-id": rid})
            assert reply.status_code == 401, reply.text
    lines = {
        getattr(r, "request_id", ""): getattr(r, "method", "")
        for r in caplog.records
        if r.name == "memstore.access"
    }
    # The access line's route is the metrics' `route` label (server/rest/app.py, _finish).
    assert lines["r-get"] == "GET /api/v2/users/{user_id}"
    assert lines["r-delete"] == "DELETE /api/v2/sessions/{session_id}/memory"
    assert lines["r-405"] == "PUT /api/v2/users/{user_id}"
    assert lines["r-none"] == "GET unmatched"

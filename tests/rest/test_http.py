"""The HTTP side of Zep's REST API: JSON errors, limits, request ids, metrics, access logs."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from server import off_loop
from server.domain import DEFAULT_PROJECT_ID, Session, User
from server.rest.app import MAX_BODY_BYTES
from server.serving.metrics import Metrics
from server.store import Store
from tests.stored_values import wide_metadata


async def test_unknown_route_is_json_404(http: httpx.AsyncClient) -> None:
    reply = await http.get("/api/v2/nothing-here")
    assert reply.status_code == 404
    assert reply.json()["reason"] == "ROUTE_NOT_FOUND" and reply.json()["message"]


async def test_wrong_method_is_json_405_naming_the_allowed_ones(http: httpx.AsyncClient) -> None:
    reply = await http.put("/api/v2/users/alice", json={})
    assert reply.status_code == 405
    assert reply.json()["reason"] == "METHOD_NOT_ALLOWED"
    assert {m.strip() for m in reply.headers["allow"].split(",")} >= {"GET", "PATCH", "DELETE"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b"\xff\xfe", "body"),
        (b'{"user_id": "a", "metadata": {"x": NaN}}', "body"),
        (b'{"user_id": "a", "metadata": {"x": [1e400]}}', "metadata.x[0]"),
        (b'{"user_id": 7}', "user_id"),
        (b'{"user_id": "a", "email": ["x"]}', "email"),
        (b'{"user_id": "a", "metadata": "text"}', "metadata"),
        (b'{"user_id": " padded"}', "user_id"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    http: httpx.AsyncClient, body: bytes, field: str
) -> None:
    reply = await http.post(
        "/api/v2/users", content=body, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["reason"] == "INVALID_ARGUMENT"
    assert field in {v["field"] for v in reply.json()["violations"]}, reply.json()
    assert (await http.get("/api/v2/users/a")).status_code == 404  # nothing half-written
    if field.startswith("metadata."):  # a finite number too large: said as such
        assert "beyond a double's range" in reply.json()["message"]


async def test_control_characters_in_names_emails_and_roles_are_400_naming_them(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.post("/api/v2/users", json={"user_id": "ok"})).status_code == 201
    for text in ("new\nline", "esc\x1b[31m", "c1\x85"):
        for field in ("email", "first_name", "last_name"):
            made = await http.post("/api/v2/users", json={"user_id": "u", field: text})
            assert made.status_code == 400, made.text
            assert [v["field"] for v in made.json()["violations"]] == [field]
            changed = await http.patch("/api/v2/users/ok", json={field: text})
            assert changed.status_code == 400, changed.text
            assert [v["field"] for v in changed.json()["violations"]] == [field]
        for version in ("v1", "v2"):
            added = await http.post(
                f"/api/{version}/sessions/s1/memory",
                json={"messages": [{"role": text, "role_type": "user", "content": "x"}]},
            )
            assert added.status_code == 400, added.text
            assert [v["field"] for v in added.json()["violations"]] == ["messages[0].role"]
    assert (await http.get("/api/v2/users/u")).status_code == 404
    assert (await http.get("/api/v2/sessions/s1")).status_code == 404


async def test_a_bad_message_writes_none_of_the_others(http: httpx.AsyncClient) -> None:
    messages = [
        {"role": "a", "role_type": "user", "content": "fine"},
        {"role": "b", "role_type": "user", "content": "nul\u0000inside"},
    ]
    reply = await http.post("/api/v2/sessions/s1/memory", json={"messages": messages})
    assert reply.status_code == 400
    assert [v["field"] for v in reply.json()["violations"]] == ["messages[1].content"]
    assert (await http.get("/api/v2/sessions/s1")).status_code == 404


async def test_too_deep_metadata_is_refused_naming_it(http: httpx.AsyncClient) -> None:
    text = '{"user_id": "deep", "metadata": ' + '{"a":' * 40 + "1" + "}" * 41
    reply = await http.post("/api/v2/users", content=text)
    assert reply.status_code == 400 and reply.json()["violations"][0]["field"] == "metadata"
    hostile = '{"user_id": "deep", "metadata": ' + '{"a":' * 100_000 + "1" + "}" * 100_001
    reply = await http.post("/api/v2/users", content=hostile)
    assert reply.status_code == 400 and reply.json()["violations"][0]["field"] == "body"


async def test_metadata_of_a_million_values_is_refused_before_it_is_walked(
    http: httpx.AsyncClient,
) -> None:
    # A 14 MB body of seven million zeros held the event loop for 40 s (each value was
    # walked twice and converted to a Struct) before its size was refused; now the walk
    # stops once a lower bound of the JSON passes twice the limit.
    bodies = {
        "metadata": {"user_id": "u", "metadata": {"a": [0] * 200_000}},
        "metadata ": {"user_id": "u", "metadata": {f"k{i}": [[i]] for i in range(60_000)}},
    }
    for field, body in bodies.items():
        reply = await http.post("/api/v2/users", json=body)
        assert reply.status_code == 400
        assert [v["field"] for v in reply.json()["violations"]] == [field.strip()]
        assert "more than 131072 bytes as JSON" in reply.json()["message"]
    added = await http.post(
        "/api/v2/sessions/s/memory",
        json={"messages": [{"content": "x", "metadata": {"a": ["x"] * 100_000}}]},
    )
    assert added.status_code == 400
    assert [v["field"] for v in added.json()["violations"]] == ["messages[0].metadata"]
    assert (await http.get("/api/v2/users/u")).status_code == 404


async def test_bodies_over_16_mib_are_413(http: httpx.AsyncClient) -> None:
    big = b'{"user_id": "big", "email": "' + b"x" * MAX_BODY_BYTES + b'"}'
    declared = await http.post("/api/v2/users", content=big)
    assert declared.status_code == 413 and declared.json()["reason"] == "REQUEST_TOO_LARGE"

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    streamed = await http.post("/api/v2/users", content=chunks())
    assert streamed.status_code == 413 and streamed.json()["reason"] == "REQUEST_TOO_LARGE"
    assert (await http.get("/api/v2/users/big")).status_code == 404


async def test_empty_query_values_mean_absent_and_bad_ones_name_the_parameter(
    http: httpx.AsyncClient,
) -> None:
    await http.post("/api/v2/sessions/s1/memory", json={"messages": [{"content": "hi"}]})
    reply = await http.get("/api/v2/sessions/s1/memory?lastn=")
    assert reply.status_code == 200 and [m["content"] for m in reply.json()["messages"]] == ["hi"]
    assert reply.json()["messages"][0]["role_type"] == "norole"
    bad = await http.get("/api/v2/sessions/s1/memory?lastn=two")
    assert bad.status_code == 400 and bad.json()["violations"][0]["field"] == "lastn"
    negative = await http.get("/api/v2/sessions-ordered?page_number=-1")
    assert negative.status_code == 400
    assert negative.json()["violations"][0]["field"] == "page_number"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v2/users", '{"user_id": "a\\ud800"}', "user_id"),
        ("/api/v2/users", '{"user_id": "a", "metadata": {"k": ["\\udfff"]}}', "metadata.k[0]"),
        ("/api/v2/users", '{"user_id": "a", "metadata": {"\\ud800": 1}}', "metadata"),
        (
            "/api/v1/sessions/s/memory",
            '{"messages": [{"content": "\\udc80x"}]}',
            "messages[0].content",
        ),
    ],
)
async def test_lone_surrogates_are_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: str, field: str
) -> None:
    # Found by test_fuzz_rest: JSON may spell a lone surrogate (a \ud800 escape), which
    # PostgreSQL cannot store: the write answered 500 INTERNAL.
    reply = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert [v["field"] for v in reply.json()["violations"]] == [field], reply.text
    for written in ("/api/v2/users/a", "/api/v2/sessions/s"):
        found = await http.get(written)
        assert found.status_code == 404, found.text
    # A pair is one character, stored as such.
    pair = await http.post("/api/v2/users", content='{"user_id": "a\\ud83d\\ude00"}')
    assert pair.status_code == 201, pair.text
    assert pair.json()["user_id"] == "a\U0001f600"


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/v2/sessions/search?limit=2147483648", {"text": "x"}, "limit"),
        ("/api/v1/sessions/s/search?limit=" + "9" * 30, {"text": "x"}, "limit"),
        ("/api/v2/sessions/search", {"text": "x", "min_score": 10**400}, "min_score"),
        ("/api/v2/sessions/search", {"text": "x", "mmr_lambda": 10**400}, "mmr_lambda"),
        ("/api/v2/users", {"user_id": "a", "metadata": {"n": 10**400}}, "metadata.n"),
    ],
)
async def test_numbers_past_every_limit_are_400_naming_the_field(
    http: httpx.AsyncClient, url: str, body: dict[str, object], field: str
) -> None:
    # Found by test_fuzz_rest: a limit past int32 or a number past a double answered 500.
    reply = await http.post(url, content=json.dumps(body))
    assert reply.status_code == 400, reply.text
    assert field in {v["field"] for v in reply.json()["violations"]}


@pytest.mark.parametrize(
    "url",
    [
        "/api/v2/users-ordered?pageNumber=" + "9" * 30,
        "/api/v2/sessions-ordered?page_size=2147483648",
        "/api/v1/user?cursor=" + "9" * 20,
        "/api/v2/sessions/s/messages?cursor=" + "9" * 30,
        "/api/v2/sessions/s/memory?lastn=2147483648",
        # Past Python's 4300 digits int() refuses to read (a ValueError: 500 until 2026-12-01).
        "/api/v2/users-ordered?pageNumber=" + "9" * 4301,
        "/api/v2/sessions/s/memory?relevant_limit=-" + "0" * 5000 + "1",
        "/api/v1/user?limit=" + "1" * 5000,
    ],
)
async def test_query_numbers_past_int32_are_400_naming_the_parameter(
    http: httpx.AsyncClient, url: str
) -> None:
    # As gRPC's int32 fields: an OFFSET past bigint named no parameter ("request").
    reply = await http.get(url)
    name = url.split("?")[1].split("=", maxsplit=1)[0]
    assert reply.status_code == 400, reply.text
    assert [v["field"] for v in reply.json()["violations"]] == [name]


@pytest.mark.parametrize(
    "url",
    [
        "/api/v2/users-ordered?pageSize=1_0",
        "/api/v2/sessions-ordered?page_size=%D9%A1%D9%A2",
        "/api/v1/user?limit=%201",
        "/api/v2/sessions/s/memory?lastn=5%0A",
        "/api/v2/sessions/s/messages?limit=%EF%BC%93",
    ],
)
async def test_query_numbers_are_ascii_digits_only(http: httpx.AsyncClient, url: str) -> None:
    # Python's int() reads "1_0" as 10, Arabic-Indic and fullwidth digits, and spaces around
    # them: each was accepted as some other number than the caller wrote.
    reply = await http.get(url)
    name = url.split("?")[1].split("=", maxsplit=1)[0]
    assert reply.status_code == 400, reply.text
    assert [v["field"] for v in reply.json()["violations"]] == [name]


async def test_ids_in_paths_are_percent_decoded(http: httpx.AsyncClient) -> None:
    made = await http.post("/api/v2/users", json={"user_id": "ann lee+ö@x"})
    assert made.status_code == 201
    got = await http.get("/api/v2/users/ann%20lee%2B%C3%B6%40x")
    assert got.status_code == 200 and got.json()["user_id"] == "ann lee+ö@x"


async def test_an_encoded_slash_stays_in_its_id(http: httpx.AsyncClient) -> None:
    # ids may hold "/" (SPEC: any text without controls). Decoded before routing, the path
    # of session "x/memory" was the memory route of session "x", and of user "bob/sessions"
    # the sessions of user "bob": another resource's data, answered 200.
    await http.post("/api/v2/sessions/x/memory", json={"messages": [{"content": "of x"}]})
    await http.post("/api/v2/users", json={"user_id": "bob"})
    await http.post("/api/v2/sessions", json={"session_id": "of-bob", "user_id": "bob"})
    for path, kind in (("sessions/x%2Fmemory", "session"), ("users/bob%2Fsessions", "user")):
        reply = await http.get(f"/api/v2/{path}")
        assert reply.status_code == 404 and reply.json()["reason"] == f"{kind.upper()}_NOT_FOUND"
    made = await http.post("/api/v2/users", json={"user_id": "a/b%2F"})
    assert made.status_code == 201
    got = await http.get("/api/v2/users/a%2Fb%252F")
    assert got.status_code == 200 and got.json()["user_id"] == "a/b%2F"
    added = await http.post(
        "/api/v2/sessions/team%2Fone/memory", json={"messages": [{"content": "hi"}]}
    )
    assert added.status_code == 200
    memory = (await http.get("/api/v2/sessions/team%2Fone/memory")).json()
    assert [m["content"] for m in memory["messages"]] == ["hi"]
    session = (await http.get("/api/v2/sessions/team%2Fone")).json()
    assert session["session_id"] == "team/one"


async def test_invalid_utf8_in_a_path_id_is_400_naming_it(http: httpx.AsyncClient) -> None:
    # Decoded leniently, %C3%28 became U+FFFD "(": stored as an id the caller never sent,
    # and the same id as %E2%28 (SPEC: invalid UTF-8 is rejected, not stored).
    for path in ("sessions/%C3%28/memory", "sessions/%E2%28"):
        method = "POST" if path.endswith("memory") else "GET"
        body = {"messages": [{"content": "x"}]} if method == "POST" else None
        reply = await http.request(method, f"/api/v2/{path}", json=body)
        assert reply.status_code == 400, reply.text
        assert [v["field"] for v in reply.json()["violations"]] == ["session_id"]
        assert "UTF-8" in reply.json()["message"]
    listed = (await http.get("/api/v2/sessions-ordered")).json()
    assert listed["sessions"] == []
    # A real U+FFFD, sent as its UTF-8 bytes, is an id like any other.
    made = await http.post(
        "/api/v2/sessions/%EF%BF%BD/memory", json={"messages": [{"content": "x"}]}
    )
    assert made.status_code == 200
    assert (await http.get("/api/v2/sessions/%EF%BF%BD")).json()["session_id"] == "\ufffd"


async def test_request_ids_metrics_and_access_log(
    http: httpx.AsyncClient, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="memstore.access"):
        reply = await http.get("/api/v2/users/nobody", headers={"x-request-id": "trace-42"})
    assert reply.status_code == 404 and reply.headers["x-request-id"] == "trace-42"
    line = next(r for r in caplog.records if getattr(r, "request_id", "") == "trace-42")
    assert line.method == "GET /api/v2/users/{user_id}" and line.code == 404  # type: ignore[attr-defined]
    count = metrics.registry.get_sample_value(
        "memstore_http_requests_total",
        {"route": "/api/v2/users/{user_id}", "method": "GET", "status": "404"},
    )
    assert count is not None and count >= 1
    generated = await http.get("/healthz")
    assert generated.text == "." and len(generated.headers["x-request-id"]) == 32


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/facts/0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162",
        "/api/v2/sessions/s1/summary",
        "/api/v2/users/u1/facts",
        "/api/v2/graph/search",
        "/api/v1/collection/docs",
    ],
)
async def test_zep_features_memstore_lacks_answer_json_501(
    http: httpx.AsyncClient, path: str
) -> None:
    reply = await http.get(path)
    assert reply.status_code == 501 and reply.json()["reason"] == "NOT_IMPLEMENTED"


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
async def test_fixed_paths_are_never_read_as_a_session_id(
    http: httpx.AsyncClient, method: str
) -> None:
    # Zep's /sessions/end (end several sessions; memstore ends none) and /sessions/search
    # (POST only) are paths of their own, not sessions named "end" and "search": with such
    # sessions stored, GET and PATCH there answered them as /sessions/{session_id}.
    for sid in ("end", "search"):
        made = await http.post("/api/v2/sessions", json={"session_id": sid})
        assert made.status_code == 201
    end = await http.request(method, "/api/v2/sessions/end", json={"metadata": {"a": 1}})
    assert end.status_code == 501 and end.json()["reason"] == "NOT_IMPLEMENTED", end.text
    if method != "POST":
        search = await http.request(method, "/api/v2/sessions/search", json={"metadata": {}})
        assert search.status_code == 405, search.text
        assert search.json()["reason"] == "METHOD_NOT_ALLOWED"
        assert {m.strip() for m in search.headers["allow"].split(",")} == {"POST"}
    for sid in ("end", "search"):  # untouched, and reached by their other paths
        got = await http.get(f"/api/v2/sessions/{sid}/messages")
        assert got.status_code == 200 and got.json()["messages"] == [], got.text
        v1 = await http.get(f"/api/v1/sessions/{sid}")
        assert v1.status_code == 200 and v1.json()["metadata"] == {}, v1.text


async def test_search_filters_and_what_it_refuses(http: httpx.AsyncClient) -> None:
    await http.post("/api/v2/users", json={"user_id": "u"})
    await http.post("/api/v2/sessions", json={"session_id": "s", "user_id": "u"})
    memory = {
        "messages": [
            {"content": "the red kite flies", "metadata": {"tag": "bird"}},
            {"content": "a red bicycle", "metadata": {"tag": "bike"}},
        ]
    }
    assert (await http.post("/api/v2/sessions/s/memory", json=memory)).is_success

    async def search(body: dict[str, object]) -> httpx.Response:
        return await http.post("/api/v2/sessions/search?limit=5", json=body)

    both = (await search({"text": "red", "user_id": "u"})).json()["results"]
    assert {r["message"]["content"] for r in both} == {"the red kite flies", "a red bicycle"}
    tagged = (await search({"text": "red", "metadata": {"tag": "bird"}})).json()["results"]
    assert [r["message"]["content"] for r in tagged] == ["the red kite flies"]
    # A `where` key that is not Zep's filter is metadata like any other.
    where = await search({"text": "red", "metadata": {"where": {"city": "Oslo"}}})
    assert where.status_code == 200 and where.json()["results"] == [], where.text
    assert (await search({"text": "red", "min_score": 1e9})).json()["results"] == []
    # Without vectors (--embedder none here) a similarity search scores by words as a hybrid
    # score is, 0 to 1 with the best 1: its raw ts_rank (0.03 to 0.1) made a min_score of 0.1
    # to 0.5 keep nothing, not even an exact match (an audit).
    kite = (await search({"text": "kite", "min_score": 0.5})).json()["results"]
    assert [(r["message"]["content"], r["score"]) for r in kite] == [("the red kite flies", 1.0)]
    red = (await search({"text": "red", "min_score": 0.5})).json()["results"]
    scores = [r["score"] for r in red]
    assert len(scores) == 2 and scores[0] == 1.0 and 0.5 < scores[1] <= 1.0, scores
    # full_text keeps PostgreSQL's own rank.
    raw = (await search({"text": "kite", "search_type": "full_text"})).json()["results"]
    assert len(raw) == 1 and 0 < raw[0]["score"] < 0.5, raw
    # MMR diversifies by meaning: without an embedding model (--embedder none) it is refused.
    mmr = await search({"text": "red", "user_id": "u", "search_type": "mmr"})
    assert mmr.status_code == 400 and mmr.json()["reason"] == "SEMANTIC_UNAVAILABLE", mmr.text
    for body, field in [
        ({"text": "red", "record_filter": {"where": {"jsonpath": "$.tag"}}}, "record_filter"),
        # Zep's filter in `metadata` (its SDKs' examples): it matched nothing, silently.
        (
            {"text": "red", "metadata": {"where": {"jsonpath": '$.tag ? (@ == "bird")'}}},
            "metadata.where",
        ),
        (
            {"text": "red", "metadata": {"where": {"and": [{"jsonpath": "$.tag"}]}}},
            "metadata.where",
        ),
        ({"text": "red", "search_scope": "facts"}, "search_scope"),
        ({"text": "red", "search_type": "fuzzy"}, "search_type"),
        ({"text": ""}, "text"),
        ({"text": "red", "session_ids": "s"}, "session_ids"),
    ]:
        refused = await search(body)
        assert refused.status_code == 400, refused.text
        assert field in {v["field"] for v in refused.json()["violations"]}, refused.json()


async def test_user_updates_leave_null_fields_and_list_sizes_are_capped(
    http: httpx.AsyncClient,
) -> None:
    await http.post("/api/v2/users", json={"user_id": "u", "email": "u@x.org"})
    updated = await http.patch("/api/v2/users/u", json={"email": None, "first_name": "U"})
    assert (updated.json()["email"], updated.json()["first_name"]) == ("u@x.org", "U")
    removed = await http.patch("/api/v2/users/u", json={"metadata": {"a": 1}})
    assert removed.json()["metadata"] == {"a": 1}
    removed = await http.patch("/api/v2/users/u", json={"metadata": {"a": None, "b": 2}})
    assert removed.json()["metadata"] == {"b": 2}  # null removes a key (Zep cannot)
    assert (await http.get("/api/v2/users/nobody/sessions")).status_code == 404
    messages = [{"content": f"m{i}"} for i in range(1000)]
    await http.post("/api/v2/sessions/big/memory", json={"messages": messages})
    await http.post("/api/v2/sessions/big/memory", json={"messages": [{"content": "last"}]})
    page = (await http.get("/api/v2/sessions/big/messages?limit=1000")).json()
    assert (page["row_count"], page["total_count"]) == (1000, 1001)
    # A page past 1,000 rows is refused, not cut: the caller counts the next page's offset
    # by the size it asked for, so a cut page skipped the rows between.
    for route, field in [
        ("/api/v2/sessions/big/messages?limit=5000&cursor=2", "limit"),
        ("/api/v2/users-ordered?pageSize=1001", "pageSize"),
        ("/api/v2/users-ordered?page_size=2000", "page_size"),
        ("/api/v2/sessions-ordered?page_size=1001", "page_size"),
        ("/api/v1/user?limit=2000&cursor=2000", "limit"),
        ("/api/v1/sessions?limit=1001", "limit"),
    ]:
        refused = await http.get(route)
        assert refused.status_code == 400, (route, refused.text)
        assert [v["field"] for v in refused.json()["violations"]] == [field], refused.json()


async def test_a_parameter_given_under_both_its_names_is_refused(http: httpx.AsyncClient) -> None:
    # An audit: users-ordered?pageSize=1&page_size=2 answered one user, the other name
    # silently dropped (and never validated), where a name given twice is refused.
    for route in (
        "/api/v2/users-ordered?pageSize=1&page_size=2",
        "/api/v2/users-ordered?page_size=abc&pageSize=1",
        "/api/v2/users-ordered?pageNumber=1&page_number=1",
    ):
        refused = await http.get(route)
        assert refused.status_code == 400, (route, refused.text)
        assert "give one of the two" in refused.json()["violations"][0]["description"]


async def test_given_timestamps_and_token_counts_are_ignored(http: httpx.AsyncClient) -> None:
    message = {"content": "hi", "created_at": "2001-01-01T00:00:00Z", "token_count": 99}
    assert (await http.post("/api/v2/sessions/t/memory", json={"messages": [message]})).is_success
    stored = (await http.get("/api/v2/sessions/t/memory")).json()["messages"][0]
    assert not stored["created_at"].startswith("2001") and stored["token_count"] == 0


async def test_large_metadata_reads_back_as_sent(http: httpx.AsyncClient) -> None:
    # Past off_loop.OFF_LOOP_BYTES of metadata the store dumps it, and parses what it reads
    # back, in a thread: the values are those of a small call all the same.
    metadatas = wide_metadata(60)
    assert len(json.dumps(metadatas)) > off_loop.OFF_LOOP_BYTES
    messages = [{"content": f"m{i}", "metadata": m} for i, m in enumerate(metadatas)]
    added = await http.post("/api/v2/sessions/s/memory", json={"messages": messages})
    assert added.status_code == 200, added.text
    memory = await http.get("/api/v2/sessions/s/memory", params={"lastn": len(messages)})
    assert [m["metadata"] for m in memory.json()["messages"]] == metadatas
    listed = await http.get("/api/v2/sessions/s/messages", params={"limit": len(messages)})
    assert [m["metadata"] for m in listed.json()["messages"]] == metadatas


#: Numbers of metadata that jsonb prints in full decimal: 1.5e300 as 301 digits, which a
#: JSON reader takes for an integer that is not the double sent (nor a float at all).
WIDE_NUMBERS = {
    "huge": 1.5e300,
    "negative": -2.5e40,
    "past_exact": 1e23,
    "at_exact": 2**53,
    "fraction": 123456789.125,
    "tiny": 5e-324,
}


@pytest.mark.parametrize("wide", [False, True], ids=["small", "past_off_loop"])
async def test_floats_of_any_size_read_back_as_the_floats_sent(
    http: httpx.AsyncClient, wide: bool
) -> None:
    # `wide` pads the messages' metadata past OFF_LOOP_BYTES in all, so the store parses
    # what it reads in a thread: both parses give the same values.
    metadata = {**WIDE_NUMBERS, "nested": [WIDE_NUMBERS]}
    pad = {"pad": "x" * 60_000} if wide else {}
    count = off_loop.OFF_LOOP_BYTES // 60_000 + 1 if wide else 1

    def same(found: object) -> None:
        # ==, and the type too: 1.5e300 == int(1.5e300) is True in Python, but a client's
        # float field is not an integer of 301 digits.
        assert json.dumps(found, sort_keys=True) == json.dumps(metadata, sort_keys=True)

    user = {"user_id": "numbers", "metadata": metadata}
    assert (await http.post("/api/v2/users", json=user)).status_code == 201
    same((await http.get("/api/v2/users/numbers")).json()["metadata"])
    listed = (await http.get("/api/v2/users-ordered")).json()
    same(next(u for u in listed["users"] if u["user_id"] == "numbers")["metadata"])
    session = {"session_id": "numbers", "user_id": "numbers", "metadata": metadata}
    assert (await http.post("/api/v2/sessions", json=session)).status_code == 201
    same((await http.get("/api/v2/sessions/numbers")).json()["metadata"])
    message = {"content": "m", "role_type": "user", "metadata": {**metadata, **pad}}
    added = await http.post("/api/v2/sessions/numbers/memory", json={"messages": [message] * count})
    assert added.status_code == 200, added.text
    params = {"lastn": count, "limit": count}
    for found in (
        (await http.get("/api/v2/sessions/numbers/memory", params=params)).json()["messages"],
        (await http.get("/api/v2/sessions/numbers/messages", params=params)).json()["messages"],
    ):
        assert len(found) == count
        for m in found:
            same({k: v for k, v in m["metadata"].items() if k != "pad"})


async def test_v1_lists_without_a_limit_answer_every_row_or_refuse(
    http: httpx.AsyncClient, store: Store
) -> None:
    # zep-python 1.x's user.list() and memory.list_sessions() send `limit=`, and Zep answers
    # every row: memstore answered the first 50. Now every row up to 1,000; past them 400
    # naming limit (a list cut short would read as the whole).
    start = datetime(2026, 1, 1, tzinfo=UTC)
    at = [start + timedelta(seconds=i) for i in range(1001)]
    users = [User(f"w{i:04}", "", "", "", {}, t, t, 0) for i, t in enumerate(at)]
    sessions = [Session(f"s{i:04}", None, {}, t, t, None, 0, None) for i, t in enumerate(at)]
    await store.restore(DEFAULT_PROJECT_ID, users[:60], sessions[:60], [])
    listed = await http.get("/api/v1/user", params={"limit": ""})
    assert [u["user_id"] for u in listed.json()] == [u.user_id for u in users[:60]]
    listed = await http.get("/api/v1/sessions")
    assert [s["session_id"] for s in listed.json()] == [s.session_id for s in sessions[:60]]
    await store.restore(DEFAULT_PROJECT_ID, users[60:1000], sessions[60:1000], [])
    assert len((await http.get("/api/v1/user")).json()) == 1000
    assert len((await http.get("/api/v1/sessions")).json()) == 1000
    await store.restore(DEFAULT_PROJECT_ID, users[1000:], sessions[1000:], [])
    for route in ("/api/v1/user", "/api/v1/sessions"):
        refused = await http.get(route)
        assert refused.status_code == 400, refused.text
        assert [v["field"] for v in refused.json()["violations"]] == ["limit"], refused.json()
        # From an offset, the rest of the listing: 1 row after the first 1,000.
        rest = await http.get(route, params={"cursor": 1000})
        assert rest.status_code == 200 and len(rest.json()) == 1, rest.text


async def test_a_memory_write_asks_for_its_context_with_a_boolean(http: httpx.AsyncClient) -> None:
    body = {"messages": [{"content": "hi"}], "return_context": "yes"}
    refused = await http.post("/api/v2/sessions/ctx/memory", json=body)
    assert refused.status_code == 400, refused.text
    assert [v["field"] for v in refused.json()["violations"]] == ["return_context"]
    assert (await http.get("/api/v2/sessions/ctx")).status_code == 404  # nothing written
    body["return_context"] = True
    added = await http.post("/api/v2/sessions/ctx/memory", json=body)
    # No user, no other session to recall from: the context is empty, and null as Zep's.
    assert added.status_code == 200 and added.json() == {"message": "OK", "context": None}


async def test_a_query_parameter_given_twice_is_400_naming_it(http: httpx.AsyncClient) -> None:
    # `?limit=1&limit=2` was read as its last value, silently: as a repeated JSON key, it is
    # refused (which of the two the caller meant is not the server's to guess).
    await http.post("/api/v2/sessions/s/memory", json={"messages": [{"content": "a"}] * 3})
    for path, params in (
        ("/api/v2/sessions/s/messages", [("limit", "1"), ("limit", "2")]),
        ("/api/v2/sessions/s/memory", [("lastn", "1"), ("lastn", "3")]),
        ("/api/v2/sessions-ordered", [("order_by", "created_at"), ("order_by", "updated_at")]),
        ("/api/v2/sessions-ordered", [("asc", "true"), ("asc", "true")]),
    ):
        reply = await http.get(path, params=params)
        assert reply.status_code == 400, (path, reply.text)
        name = params[0][0]
        assert [v["field"] for v in reply.json()["violations"]] == [name]
        assert "given 2 times" in reply.json()["message"]
    once = await http.get("/api/v2/sessions/s/messages", params={"limit": "2"})
    assert once.status_code == 200 and len(once.json()["messages"]) == 2

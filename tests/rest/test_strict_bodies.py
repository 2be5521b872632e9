"""What a REST body may hold and be sent as, over HTTP: refused where the last key, a double
or a content type silently changed what the caller sent (docs/zep-compat.md)."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from server.api.metadata_checks import MAX_FILTER_ELEMENTS

JSON = {"content-type": "application/json"}


async def _nothing_written(http: httpx.AsyncClient) -> None:
    for path in ("/api/v2/users/a", "/api/v2/sessions/s"):
        found = await http.get(path)
        assert found.status_code == 404, found.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v2/users", '{"user_id": "a", "user_id": "b"}', "user_id"),
        ("/api/v2/users", '{"user_id": "a", "metadata": {"k": 1, "j": 2, "k": 3}}', "metadata.k"),
        (
            "/api/v2/sessions/s/memory",
            '{"messages": [{"content": "x"}, {"content": "a", "role": "r", "content": "b"}]}',
            "messages[1].content",
        ),
        (
            "/api/v1/sessions/s/memory",
            '{"messages": [{"content": "x", "metadata": {"a": [0, {"b": 1, "b": 1}]}}]}',
            "messages[0].metadata.a[1].b",
        ),
        (
            "/api/v2/sessions",
            '{"session_id": "s", "metadata": {"t": {"u": {}, "u": {}}}}',
            "metadata.t.u",
        ),
    ],
)
async def test_a_repeated_key_is_400_naming_the_key_and_its_path(
    http: httpx.AsyncClient, path: str, body: str, field: str
) -> None:
    # Python's json (as most parsers) kept the last of a repeated key: the first value was
    # dropped without a word, at any depth.
    reply = await http.post(path, content=body, headers=JSON)
    assert reply.status_code == 400, reply.text
    assert reply.json()["reason"] == "INVALID_ARGUMENT"
    [violation] = reply.json()["violations"]
    key = field.rsplit(".", 1)[-1]
    assert violation["field"] == field, reply.text
    assert f"repeats the key {key!r}" in violation["description"], reply.text
    await _nothing_written(http)


async def test_a_repeated_key_in_an_update_or_a_search_is_refused_too(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.post("/api/v2/users", json={"user_id": "a"})).status_code == 201
    patch = await http.patch(
        "/api/v2/users/a", content='{"metadata": {"plan": "pro", "plan": null}}', headers=JSON
    )
    assert patch.status_code == 400, patch.text
    assert [v["field"] for v in patch.json()["violations"]] == ["metadata.plan"]
    assert (await http.get("/api/v2/users/a")).json()["metadata"] == {}
    search = await http.post(
        "/api/v2/sessions/search", content='{"text": "a", "text": "b"}', headers=JSON
    )
    assert search.status_code == 400 and search.json()["violations"][0]["field"] == "text"
    # The same key in two objects is no repetition; nor is a key and its value.
    fine = await http.post(
        "/api/v2/sessions/s/memory",
        content='{"messages": [{"content": "content"}, {"content": "b", "metadata": {"content": 1}}'
        "]}",
        headers=JSON,
    )
    assert fine.status_code == 200, fine.text


async def test_a_repeated_key_after_another_error_names_that_error(
    http: httpx.AsyncClient,
) -> None:
    # The key is found by parsing again: an error further on is still the one reported.
    for body in ('{"metadata": {"a": 1, "a": 2}, "user_id": NaN}', '{"a": 1, "a": 2} []'):
        bad = await http.post("/api/v2/users", content=body)
        assert bad.status_code == 400, bad.text
        assert bad.json()["violations"][0]["field"] == "body", bad.text
        assert "is not valid JSON" in bad.json()["message"]
    lone = await http.post(
        "/api/v2/users", content='{"user_id": "a", "user_id": "b", "email": "\\ud800"}'
    )
    assert lone.status_code == 400, lone.text
    assert [v["field"] for v in lone.json()["violations"]] == ["email"]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        'application/json;charset="UTF-8"',
        # Every other WHATWG label of UTF-8 (what browsers and many clients send), any case.
        "application/json; charset=utf8",
        'application/json; charset="UTF8"',
        "application/json; charset=Unicode-1-1-UTF-8",
        "application/json; charset=unicode11utf8",
        "application/json; charset=UNICODE20UTF8",
        'application/json; charset="x-unicode20utf8"',
        "application/json; odata=verbose",
        "application/merge-patch+json",
        "application/vnd.api+json; charset=utf-8",
    ],
)
async def test_json_bodies_are_read_with_or_without_a_content_type(
    http: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    reply = await http.post("/api/v2/users", content='{"user_id": "a"}', headers=headers)
    assert reply.status_code == 201, reply.text


@pytest.mark.parametrize(
    ("content_type", "said"),
    [
        ("text/plain", "text/plain"),
        ("text/plain;charset=UTF-8", "text/plain"),  # fetch() with a string body
        ("application/x-www-form-urlencoded", "--json"),  # curl -d, urllib's default
        ("multipart/form-data; boundary=x", "multipart"),
        ("application/xml", "application/xml"),
        ("application/jsonp", "application/jsonp"),
        ("application/+json", "application/+json"),
        ("application/json; charset=latin-1", "charset 'latin-1'"),
        ("application/json; charset=utf-16", "charset 'utf-16'"),
        ("application/json; charset=unicode", "charset 'unicode'"),  # WHATWG: UTF-16LE
        ("application/json; charset=utf_8", "charset 'utf_8'"),  # Python's name, no label
    ],
)
async def test_bodies_not_sent_as_json_are_415_naming_content_type(
    http: httpx.AsyncClient, content_type: str, said: str
) -> None:
    # Every body was read as JSON whatever it was declared to be.
    for path, method in (("/api/v2/users", "POST"), ("/api/v2/sessions/s/memory", "POST")):
        body = '{"user_id": "a", "messages": [{"content": "x"}]}'
        reply = await http.request(
            method, path, content=body, headers={"content-type": content_type}
        )
        assert reply.status_code == 415, reply.text
        assert reply.json()["reason"] == "UNSUPPORTED_MEDIA_TYPE"
        [violation] = reply.json()["violations"]
        assert violation["field"] == "Content-Type"
        assert said in violation["description"], violation
        assert reply.json()["message"].startswith("Content-Type: ")
    await _nothing_written(http)


async def test_the_415_says_how_to_send_json_and_a_repeated_header_is_refused(
    http: httpx.AsyncClient,
) -> None:
    form = await http.post(
        "/api/v2/users",
        content='{"user_id": "a"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert "application/json" in form.json()["message"] and "curl" in form.json()["message"]
    twice = await http.post(
        "/api/v2/users",
        content='{"user_id": "a"}',
        headers=[("content-type", "application/json"), ("content-type", "text/plain")],
    )
    assert twice.status_code == 415 and "2 times" in twice.json()["message"], twice.text
    # A body-less request is not asked for a type: the PATCH that sends none changes nothing.
    assert (await http.post("/api/v2/users", json={"user_id": "a"})).status_code == 201
    empty = await http.patch("/api/v2/users/a", headers={"content-type": "text/plain"})
    assert empty.status_code == 200, empty.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity, gzip", "GZIP"])
async def test_compressed_bodies_are_415_naming_content_encoding(
    http: httpx.AsyncClient, encoding: str
) -> None:
    # A gzip body was reported as "body: is not valid UTF-8": memstore decodes no coding.
    body = gzip.compress(b'{"user_id": "a"}')
    reply = await http.post(
        "/api/v2/users", content=body, headers={**JSON, "content-encoding": encoding}
    )
    assert reply.status_code == 415, reply.text
    assert reply.json()["reason"] == "UNSUPPORTED_CONTENT_ENCODING"
    [violation] = reply.json()["violations"]
    assert violation["field"] == "Content-Encoding"
    assert "does not decode compressed request bodies" in violation["description"]
    assert reply.headers["accept-encoding"] == "identity"
    await _nothing_written(http)
    plain = await http.post(
        "/api/v2/users", content=b'{"user_id": "a"}', headers={"content-encoding": "identity"}
    )
    assert plain.status_code == 201, plain.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v2/users", {"user_id": "a", "metadata": {"n": 2**53 + 1}}, "metadata.n"),
        ("/api/v2/users", {"user_id": "a", "metadata": {"n": -(2**53) - 1}}, "metadata.n"),
        ("/api/v2/users", {"user_id": "a", "metadata": {"n": 10**400}}, "metadata.n"),
        (
            "/api/v2/sessions",
            {"session_id": "s", "metadata": {"a": [1, {"b": 2**64}]}},
            "metadata.a[1].b",
        ),
        (
            "/api/v2/sessions/s/memory",
            {"messages": [{"content": "x"}, {"content": "y", "metadata": {"id": 2**63 - 1}}]},
            "messages[1].metadata.id",
        ),
        ("/api/v2/sessions/search", {"text": "x", "metadata": {"n": 2**60}}, "metadata.n"),
        ("/api/v2/sessions/search", {"text": "x", "min_score": 2**60}, "min_score"),
        ("/api/v2/sessions/search", {"text": "x", "mmr_lambda": -(2**54)}, "mmr_lambda"),
    ],
)
async def test_integers_beyond_2_53_are_400_naming_the_path(
    http: httpx.AsyncClient, path: str, body: dict[str, object], field: str
) -> None:
    # A Struct's numbers are doubles: 2^53 + 1 was stored as 2^53, silently. The gRPC path
    # says so and the Python client refuses such ints; over REST they are refused too.
    reply = await http.post(path, content=json.dumps(body), headers=JSON)
    assert reply.status_code == 400, reply.text
    assert [v["field"] for v in reply.json()["violations"]] == [field], reply.text
    assert "2^53" in reply.json()["message"]
    await _nothing_written(http)


async def test_integers_within_2_53_and_floats_are_stored_exactly(http: httpx.AsyncClient) -> None:
    metadata = {"max": 2**53, "min": -(2**53), "f": 2.5, "e": 1e-7, "yes": True}
    made = await http.post("/api/v2/users", json={"user_id": "a", "metadata": metadata})
    assert made.status_code == 201, made.text
    assert (await http.get("/api/v2/users/a")).json()["metadata"] == metadata
    updated = await http.patch("/api/v2/users/a", json={"metadata": {"max": 2**53 + 1}})
    assert updated.status_code == 400
    assert [v["field"] for v in updated.json()["violations"]] == ["metadata.max"]
    assert (await http.get("/api/v2/users/a")).json()["metadata"] == metadata


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v2/sessions/s/memory", {"messages": [{"content": 5}]}, "messages[0].content"),
        ("/api/v2/sessions/s/memory", {"messages": [{"content": ["x"]}]}, "messages[0].content"),
        (
            "/api/v2/sessions/s/memory",
            {"messages": [{"content": "x", "role": 1}]},
            "messages[0].role",
        ),
        ("/api/v2/sessions", {"session_id": 7}, "session_id"),
        ("/api/v2/sessions", {"session_id": "s", "user_id": {}}, "user_id"),
        ("/api/v2/users", {"user_id": False}, "user_id"),
        ("/api/v2/users", {"user_id": "a", "email": 1}, "email"),
    ],
)
async def test_a_string_of_the_wrong_type_is_reported_once(
    http: httpx.AsyncClient, path: str, body: dict[str, object], field: str
) -> None:
    # `content: 5` was named twice: "must be a string, not a number" and "is required".
    reply = await http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    violations = reply.json()["violations"]
    assert [v["field"] for v in violations] == [field], reply.text
    assert violations[0]["description"].startswith("must be a string, not ")
    await _nothing_written(http)


async def test_a_search_filter_of_too_many_array_elements_is_400_naming_metadata(
    http: httpx.AsyncClient,
) -> None:
    # SearchMemory's bound (tests/grpc/test_filter_cost.py), named as Zep's body names it.
    body = {"text": "pasta", "metadata": {"tags": list(range(MAX_FILTER_ELEMENTS + 1))}}
    for path in ("/api/v2/sessions/search", "/api/v2/sessions/s/search"):
        reply = await http.post(path, json=body)
        assert reply.status_code == 400, reply.text
        [violation] = reply.json()["violations"]
        assert violation["field"] == "metadata", reply.text
        assert f"at most {MAX_FILTER_ELEMENTS}" in violation["description"], reply.text
    allowed = {"text": "pasta", "metadata": {"tags": list(range(MAX_FILTER_ELEMENTS))}}
    reply = await http.post("/api/v2/sessions/search", json=allowed)
    assert reply.status_code == 200, reply.text

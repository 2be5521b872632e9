"""Requests refused before they are routed for their request line: a URL too long, or bytes
that are not HTTP/1.1, answered in JSON as every other REST error (headers: see
test_slow_clients.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

#: The documented limit of a request's target (path and query): README, zep-compat.md.
URL_LIMIT = 16 * 1024


async def _exchange(base_url: str, request: bytes) -> tuple[int, dict[str, str], Any]:
    """Sends `request` on a new connection; returns the answer's status, headers and JSON."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def _get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_a_url_past_16_kib_is_414_naming_it(base_url: str) -> None:
    # Up to 64 KiB a long id was 400 naming user_id; past it httptools cannot parse the
    # target and uvicorn answered a plain-text "Invalid HTTP request received.", which
    # Zep's SDKs cannot read as an error.
    fits = b"/api/v2/users/" + b"a" * (URL_LIMIT - len("/api/v2/users/"))
    status, _, body = await _exchange(base_url, _get(fits))
    assert status == 400 and body["violations"][0]["field"] == "user_id"
    for size in (URL_LIMIT + 1, 60_000, 70_000):
        status, headers, body = await _exchange(base_url, _get(b"/api/v2/users/" + b"a" * size))
        assert status == 414, (size, body)
        assert headers["content-type"] == "application/json"
        assert (
            body["reason"] == "URI_TOO_LONG"
            and f"URL is longer than {URL_LIMIT}" in (body["message"])
        )


async def test_bytes_that_are_not_http_are_a_json_400(base_url: str) -> None:
    status, headers, body = await _exchange(base_url, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json"
    assert body["reason"] == "MALFORMED_REQUEST" and "HTTP/1.1" in body["message"]


async def test_refusals_before_routing_read_as_every_other_rest_error(base_url: str) -> None:
    # The same body as a routed 400 (its violations name the field) and a request id to
    # quote, as every answer has: a client's error handling needs no second shape.
    too_long_id = _get(b"/api/v2/users/" + b"a" * 300)
    routed_status, routed_headers, routed = await _exchange(base_url, too_long_id)
    assert routed_status == 400 and routed_headers["x-request-id"]
    assert set(routed) == {"message", "reason", "violations"}
    status, headers, body = await _exchange(base_url, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and len(headers["x-request-id"]) == 32
    assert body["violations"] == [{"field": "request", "description": "is not an HTTP/1.1 request"}]
    status, headers, body = await _exchange(base_url, _get(b"/" + b"a" * (URL_LIMIT + 1)))
    assert status == 414 and headers["x-request-id"]
    assert set(body) == {"message", "reason"}


async def test_a_trailing_slash_is_no_route_even_after_an_id_that_is_not_utf8(
    base_url: str,
) -> None:
    # Starlette answered a trailing slash with a 307 to the path without it, with no JSON
    # body; for an id that is not UTF-8 it failed to build that redirect: a plain-text 500.
    for target in (
        b"/api/v2/sessions/%FF/",
        b"/api/v2/sessions/%FF/memory/",
        b"/api/v2/users/%C3%28/",
        b"/api/v1/user/%FF/sessions/",
        b"/api/v2/sessions/x/",
    ):
        status, headers, body = await _exchange(base_url, _get(target))
        assert (status, body["reason"]) == (404, "ROUTE_NOT_FOUND"), target
        assert headers["content-type"] == "application/json"


async def test_a_percent_that_begins_no_escape_is_kept_as_sent(
    base_url: str, clean_db: str
) -> None:
    # "a%2%46b": the stray "%" and the "F" decoded from %46 spelled "%2F", read as "/": a
    # session "a/b" the caller never named, written to.
    body = b'{"messages": [{"content": "hi"}]}'
    post = (
        b"POST /api/v2/sessions/a%2%46b/memory HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    status, _, _ = await _exchange(base_url, post)
    assert status == 200
    status, _, got = await _exchange(base_url, _get(b"/api/v2/sessions/a%2%46b"))
    assert (status, got["session_id"]) == (200, "a%2Fb")
    status, _, got = await _exchange(base_url, _get(b"/api/v2/sessions/a%25%32%46b"))
    assert (status, got["session_id"]) == (200, "a%2Fb")  # the same id, fully escaped
    status, _, listed = await _exchange(base_url, _get(b"/api/v2/sessions-ordered"))
    assert [s["session_id"] for s in listed["sessions"]] == ["a%2Fb"]
    status, _, got = await _exchange(base_url, _get(b"/api/v2/sessions/100%"))
    assert (status, got["reason"]) == (404, "SESSION_NOT_FOUND")
    assert "'100%'" in got["message"]

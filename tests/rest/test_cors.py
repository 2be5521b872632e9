"""Browsers' cross-origin calls (CORS): refused as any unserved method by default, answered
for the origins of --http-cors-origin (Zep's server answers every origin)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest

from server.config import Config, SecurityConfig
from server.serving.app import build_http
from server.serving.auth import StartupRefused, start_authenticator
from server.serving.metrics import Metrics
from server.settings import parse_origins
from server.store import Store

APP = "http://app.example"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "PATCH",
    "Access-Control-Request-Headers": "authorization,content-type",
}


@pytest.fixture
def cors_metrics() -> Metrics:
    """The metrics of the `cors` server, which a test reads back."""
    return Metrics()


@pytest.fixture
async def cors(
    store: Store, clean_db: str, cors_metrics: Metrics
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a REST server that allows the origin APP."""
    del clean_db
    config = Config(host="127.0.0.1", http_port=0, embedder="none", http_cors_origin=(APP,))
    server = await build_http(config, store, cors_metrics)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop(None)


async def test_without_the_flag_there_is_no_cors(http: httpx.AsyncClient) -> None:
    preflight = await http.options("/api/v2/sessions/s/memory", headers=PREFLIGHT)
    assert preflight.status_code == 405, preflight.text
    assert preflight.json()["reason"] == "METHOD_NOT_ALLOWED"
    got = await http.get("/api/v2/sessions/s/memory", headers={"Origin": APP})
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


async def test_the_flags_origins_get_preflights_and_readable_answers(
    cors: httpx.AsyncClient,
) -> None:
    preflight = await cors.options("/api/v2/users/u", headers=PREFLIGHT)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP
    # Answered with no key asked of it, and with a request id, as every answer.
    assert len(preflight.headers["x-request-id"]) == 32
    assert "PATCH" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    made = await cors.post("/api/v2/users", json={"user_id": "u"}, headers={"Origin": APP})
    assert made.status_code == 201 and made.headers["access-control-allow-origin"] == APP
    assert "x-request-id" in made.headers["access-control-expose-headers"].lower()
    # An error is readable by the page's script too.
    missing = await cors.get("/api/v2/users/nobody", headers={"Origin": APP})
    assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == APP


async def test_zep_clouds_js_sdk_passes_its_preflight(cors: httpx.AsyncClient) -> None:
    # zep-cloud's JS SDK (Fern) sends its names and versions on every call: its preflights
    # were refused "headers not allowed" (a review).
    fern = "x-fern-language,x-fern-sdk-name,x-fern-sdk-version,x-fern-runtime"
    headers = {**PREFLIGHT, "Access-Control-Request-Headers": f"authorization,{fern}"}
    preflight = await cors.options("/api/v2/sessions/s/memory", headers=headers)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP


async def test_any_origin_without_a_key_is_refused_at_start(store: Store, clean_db: str) -> None:
    # Every web page a browser on the machine opens could read and change all data of a
    # server without keys (a review). Named origins are the operator's choice: served.
    del clean_db
    assert not await store.any_api_key()  # the run's database is open (tests/fix_security.py)
    anyone = Config(host="127.0.0.1", http_port=0, embedder="none", http_cors_origin=("*",))
    with pytest.raises(StartupRefused, match="--http-cors-origin '\\*' without authentication"):
        await start_authenticator(anyone, store)
    insecure = replace(anyone, security=SecurityConfig(insecure=True))
    assert not (await start_authenticator(insecure, store)).enabled
    named = replace(anyone, http_cors_origin=(APP,))
    assert not (await start_authenticator(named, store)).enabled


async def test_a_preflight_from_another_origin_is_a_json_400_naming_origin(
    cors: httpx.AsyncClient,
) -> None:
    other = {**PREFLIGHT, "Origin": "http://evil.example"}
    refused = await cors.options("/api/v2/users/u", headers=other)
    assert refused.status_code == 400, refused.text
    assert "access-control-allow-origin" not in refused.headers
    body = refused.json()
    assert body["reason"] == "CORS_NOT_ALLOWED"
    assert [v["field"] for v in body["violations"]] == ["Origin"], body
    got = await cors.get("/api/v2/users-ordered", headers={"Origin": "http://evil.example"})
    assert got.status_code == 200 and "access-control-allow-origin" not in got.headers


async def test_preflights_are_counted_and_logged_as_requests(
    cors: httpx.AsyncClient, cors_metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    # Answered by Starlette's CORSMiddleware outside the app, preflights reached neither the
    # request metrics nor the access log: a browser's refused calls left no trace.
    refused_headers = {**PREFLIGHT, "Origin": "http://evil.example", "x-request-id": "pre-no"}
    with caplog.at_level(logging.INFO, logger="memstore.access"):
        allowed = await cors.options(
            "/api/v2/users/u", headers={**PREFLIGHT, "x-request-id": "pre-ok"}
        )
        refused = await cors.options("/api/v2/users/u", headers=refused_headers)
    assert (allowed.status_code, refused.status_code) == (200, 400)
    assert refused.headers["x-request-id"] == "pre-no"
    for status in ("200", "400"):
        labels = {"route": "/api/v2/users/{user_id}", "method": "OPTIONS", "status": status}
        assert cors_metrics.registry.get_sample_value("memstore_http_requests_total", labels) == 1
    duration = {"route": "/api/v2/users/{user_id}", "method": "OPTIONS"}
    timed = cors_metrics.registry.get_sample_value(
        "memstore_http_request_duration_seconds_count", duration
    )
    assert timed == 2
    lines = {getattr(r, "request_id", ""): r for r in caplog.records}
    ok, no = lines["pre-ok"], lines["pre-no"]
    assert (ok.method, ok.code) == ("OPTIONS /api/v2/users/{user_id}", 200)  # type: ignore[attr-defined]
    assert (no.code, no.reason, no.fields) == (400, "CORS_NOT_ALLOWED", ["Origin"])  # type: ignore[attr-defined]


def test_origins_are_origins_or_a_lone_star() -> None:
    assert parse_origins(f"{APP}, https://b.example:8443") == (APP, "https://b.example:8443")
    assert parse_origins("*") == ("*",)
    # As a browser sends them (the header is compared whole): these were taken, never matched.
    given = "HTTPS://App.Example.com:443, http://a.example:80, http://a.example:8080"
    sent = ("https://app.example.com", "http://a.example", "http://a.example:8080")
    assert parse_origins(given) == sent
    for bad in (f"{APP}/", "app.example", f"*,{APP}", "http://a b"):
        with pytest.raises(ValueError, match="not an origin"):
            parse_origins(bad)

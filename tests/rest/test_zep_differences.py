"""Where memstore's REST answers knowingly differ from Zep's server (getzep/zep v1.0.2), each
kept and listed in docs/zep-compat.md."""

from __future__ import annotations

import httpx
import pytest


async def test_a_user_update_with_empty_text_clears_the_field(http: httpx.AsyncClient) -> None:
    # Zep writes a user update with bun's OmitZero: "" is a zero value, so the field stays
    # as it was. memstore stores what was sent: "" clears it (null or absent leaves it).
    await http.post("/api/v2/users", json={"user_id": "u", "email": "u@x.org", "first_name": "U"})
    updated = await http.patch("/api/v2/users/u", json={"email": "", "first_name": None})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["email"], updated.json()["first_name"]) == ("", "U")
    assert (await http.get("/api/v2/users/u")).json()["email"] == ""


@pytest.mark.parametrize("api", ["/api/v2", "/api/v1"])
async def test_messages_of_an_unknown_or_deleted_session_are_404(
    http: httpx.AsyncClient, api: str
) -> None:
    # Zep answers 200 with an empty list; memstore says the session is not there.
    unknown = await http.get(f"{api}/sessions/nobody/messages")
    assert unknown.status_code == 404 and unknown.json()["reason"] == "SESSION_NOT_FOUND"
    await http.post(f"{api}/sessions/gone/memory", json={"messages": [{"content": "hi"}]})
    assert (await http.get(f"{api}/sessions/gone/messages")).status_code == 200
    await http.delete(f"{api}/sessions/gone/memory")
    deleted = await http.get(f"{api}/sessions/gone/messages")
    assert deleted.status_code == 404 and deleted.json()["reason"] == "SESSION_DELETED"


@pytest.mark.parametrize("path", ["/api/v2/users", "/api/v2/sessions"])
async def test_zeps_cursor_paged_v2_lists_are_not_served(
    http: httpx.AsyncClient, path: str
) -> None:
    # Zep serves GET /api/v2/users and /api/v2/sessions (paged by cursor); no Python SDK
    # calls them. Here the paths create (POST) only: a GET is 405 naming POST.
    listed = await http.get(path, params={"limit": 10, "cursor": 1})
    assert listed.status_code == 405 and listed.json()["reason"] == "METHOD_NOT_ALLOWED"
    assert listed.headers["allow"] == "POST"

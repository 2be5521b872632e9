"""zep-cloud 2.22.1 (the newest 2.x), unchanged, against memstore: run in its own virtualenv.

zep-cloud takes base_url as the API root (it adds no /api/v2 itself). Usage:
python cloud.py SCENARIO BASE_URL [API_KEY]; prints a JSON summary as its last line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from zep_cloud import BadRequestError, NotFoundError
from zep_cloud.client import AsyncZep, Zep
from zep_cloud.core.api_error import ApiError
from zep_cloud.types import Message


def _client(base_url: str, key: str = "any-key") -> Zep:
    return Zep(base_url=f"{base_url}/api/v2", api_key=key)


def users_and_sessions(base_url: str) -> dict[str, Any]:
    client = _client(base_url)
    client.user.add(user_id="dora", email="dora@example.com", metadata={"tier": 1})
    try:
        client.user.add(user_id="dora")
        raise AssertionError("a duplicate user was created")
    except BadRequestError as exc:
        assert "already exists" in str(exc.body.message)
    assert client.user.get("dora").email == "dora@example.com"
    updated = client.user.update("dora", first_name="Dora", metadata={"tier": 2, "x": True})
    assert updated.metadata == {"tier": 2, "x": True} and updated.first_name == "Dora"
    client.memory.add_session(session_id="d-1", user_id="dora", metadata={"topic": "tea"})
    client.memory.add_session(session_id="d-2", user_id="dora")
    try:
        client.memory.add_session(session_id="d-3", user_id="nobody")
        raise AssertionError("a session of an unknown user was created")
    except BadRequestError as exc:
        assert exc.status_code == 400
    flat = client.user.get_sessions("dora")  # zep-cloud reads a flat list
    assert [s.session_id for s in flat] == ["d-1", "d-2"], flat
    session = client.memory.update_session("d-1", metadata={"mood": "calm"})
    assert session.metadata == {"topic": "tea", "mood": "calm"}, session.metadata
    page = client.memory.list_sessions(page_size=1, page_number=2, order_by="created_at", asc=True)
    assert [s.session_id for s in page.sessions or []] == ["d-2"] and page.total_count == 2
    users = client.user.list_ordered(page_size=10, page_number=1)
    assert [u.user_id for u in users.users or []] == ["dora"] and users.total_count == 1
    client.user.delete("dora")
    try:
        client.memory.get_session("d-1")
        raise AssertionError("a session outlived its user")
    except NotFoundError as exc:
        assert exc.status_code == 404
    return {"sessions": [s.session_id for s in flat]}


def memory(base_url: str) -> dict[str, Any]:
    client = _client(base_url)
    client.memory.add(
        "e-1",
        messages=[
            Message(role="Eve", role_type="user", content="My cat is called Miso."),
            Message(role="bot", role_type="assistant", content="Miso is a lovely name."),
            Message(role="tool", role_type="tool", content="lookup: ok"),
        ],
    )
    got = client.memory.get("e-1", lastn=2)
    assert [m.role_type for m in got.messages or []] == ["assistant", "tool"], got.messages
    messages = client.memory.get_session_messages("e-1", limit=2, cursor=2)
    assert [m.content for m in messages.messages or []] == ["lookup: ok"], messages
    first = client.memory.get_session_messages("e-1").messages[0]  # type: ignore[index]
    assert client.memory.get_session_message("e-1", first.uuid_).content == first.content
    changed = client.memory.update_message_metadata("e-1", first.uuid_, metadata={"seen": 1})
    assert changed.metadata == {"seen": 1}
    hits = client.memory.search("e-1", text="cat Miso", search_type="similarity", limit=2)
    assert hits and hits[0].message is not None, hits
    assert hits[0].message.content == "My cat is called Miso.", hits
    across = client.memory.search_sessions(text="Miso", session_ids=["e-1"], limit=5)
    assert {r.session_id for r in across.results or []} == {"e-1"}, across
    client.memory.delete("e-1")
    try:
        client.memory.get_session("e-1")
        raise AssertionError("a deleted session is still served")
    except NotFoundError:
        pass
    client.memory.add("e-1", messages=[Message(role="Eve", role_type="user", content="again")])
    revived = client.memory.get("e-1")
    assert [m.content for m in revived.messages or []] == ["again"], revived.messages
    try:
        client.memory.get_summaries("e-1")
        raise AssertionError("summaries were served")
    except ApiError as exc:  # not served: a JSON 501 the SDK reads as an error
        assert exc.status_code == 501 and "summaries" in str(exc.body), exc.body
    return {"hits": len(hits)}


def added_with_context(base_url: str) -> dict[str, Any]:
    # memory.add(return_context=True) reads `context` from the answer: the recall memory.get
    # would answer now (the user's other sessions). memstore answered {"message": "OK"}, so
    # the SDK's context was always None.
    client = _client(base_url)
    client.user.add(user_id="ivy")
    client.memory.add_session(session_id="ivy-1", user_id="ivy")
    client.memory.add_session(session_id="ivy-2", user_id="ivy")
    said = "We adopted a beagle named Biscuit."
    quiet = client.memory.add(
        "ivy-1", messages=[Message(role="Ivy", role_type="user", content=said)]
    )
    assert quiet.context is None, quiet
    asked = Message(role="Ivy", role_type="user", content="Which food suits Biscuit?")
    added = client.memory.add("ivy-2", messages=[asked], return_context=True)
    assert added.context == client.memory.get("ivy-2").context, added
    return {"remembered": said in (added.context or "")}


async def _async(base_url: str) -> str:
    client = AsyncZep(base_url=f"{base_url}/api/v2", api_key="any-key")
    await client.memory.add("f-1", messages=[Message(role="F", role_type="user", content="hi")])
    session = await client.memory.get_session("f-1")
    return session.session_id or ""


def asynchronous(base_url: str) -> dict[str, Any]:
    return {"session": asyncio.run(_async(base_url))}


def from_environment(base_url: str) -> dict[str, Any]:
    # The README's other way to point zep-cloud at memstore: ZEP_API_URL, the server's root
    # (the SDK adds /api/v2 itself then), and no base_url.
    os.environ["ZEP_API_URL"] = base_url
    client = Zep(api_key="any-key")
    client.user.add(user_id="env-user")
    return {"user": client.user.get("env-user").user_id}


def whole_lists(base_url: str) -> dict[str, Any]:
    # The list calls without a page size: Zep answers every row (memstore answered 50).
    client = _client(base_url)
    said = [Message(role="W", role_type="user", content=f"m{i}") for i in range(60)]
    client.memory.add("w-00", messages=said)
    for i in range(1, 60):
        client.user.add(user_id=f"w-{i:02}")
        client.memory.add_session(session_id=f"w-{i:02}", user_id=f"w-{i:02}")
    messages = client.memory.get_session_messages("w-00")
    users = client.user.list_ordered()
    sessions = client.memory.list_sessions()
    counts = [
        [len(messages.messages or []), messages.total_count],
        [len(users.users or []), users.total_count],
        [len(sessions.sessions or []), sessions.total_count],
    ]
    # Newest first, as Zep's users-ordered and sessions-ordered.
    assert (users.users or [])[0].user_id == "w-59", users.users
    assert (sessions.sessions or [])[0].session_id == "w-59", sessions.sessions
    return {"counts": counts}


def unauthorized(base_url: str, key: str) -> dict[str, Any]:
    try:
        _client(base_url, key).user.get("anyone")
        raise AssertionError("a bad key was let in")
    except ApiError as exc:
        return {"status": exc.status_code, "body": exc.body}


if __name__ == "__main__":
    scenario, url, *rest = sys.argv[1:]
    print(json.dumps(globals()[scenario](url, *rest), default=str))

"""zep-python 2.0.2, unchanged, against memstore: run in its own virtualenv by tests/rest.

Usage: python zep2.py SCENARIO BASE_URL [API_KEY]. Asserts as it goes; prints a JSON
summary as its last line for the calling test.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from zep_python import BadRequestError, NotFoundError
from zep_python.client import AsyncZep, Zep
from zep_python.core.api_error import ApiError
from zep_python.types import Message


def _client(base_url: str, key: str = "any-key") -> Zep:
    return Zep(base_url=base_url, api_key=key)


def users(base_url: str) -> dict[str, Any]:
    client = _client(base_url)
    made = client.user.add(
        user_id="alice", email="alice@example.com", first_name="Alice", metadata={"plan": "pro"}
    )
    assert made.user_id == "alice" and made.metadata == {"plan": "pro"}, made
    assert made.created_at, made
    try:
        client.user.add(user_id="alice")
        raise AssertionError("a duplicate user was created")
    except BadRequestError as exc:
        assert "already exists" in str(exc.body.message), exc.body
    got = client.user.get("alice")
    assert (got.email, got.first_name, got.last_name) == ("alice@example.com", "Alice", "")
    updated = client.user.update("alice", last_name="Liddell", metadata={"lang": "en"})
    # Merged, as Zep merges: the old key stays.
    assert updated.metadata == {"plan": "pro", "lang": "en"}, updated.metadata
    assert (updated.email, updated.last_name) == ("alice@example.com", "Liddell")
    try:
        client.user.get("nobody")
        raise AssertionError("an unknown user was found")
    except NotFoundError as exc:
        assert exc.status_code == 404 and "nobody" in str(exc.body.message)
    client.memory.add_session(session_id="a-1", user_id="alice")
    client.memory.add(
        "a-2", messages=[Message(role="Alice", role_type="user", content="hello")]
    )  # a session without a user: not hers
    client.memory.add_session(session_id="a-3", user_id="alice", metadata={"n": 3})
    listed = client.user.get_sessions("alice")
    # 2.0.2 declares a list of lists: one list of her sessions, oldest first.
    assert [[s.session_id for s in group] for group in listed] == [["a-1", "a-3"]], listed
    assert client.user.get("alice").session_count == 2
    deleted = client.user.delete("alice")
    assert deleted.message, deleted
    for session_id in ("a-1", "a-3"):
        try:
            client.memory.get_session(session_id)
            raise AssertionError(f"{session_id} outlived its user")
        except NotFoundError:
            pass
    assert client.memory.get_session("a-2").session_id == "a-2"
    try:
        client.user.delete("alice")
        raise AssertionError("a deleted user was deleted again")
    except NotFoundError:
        pass
    client.user.add(user_id="alice")  # the id is free again
    try:
        client.memory.get_fact("0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162")
        raise AssertionError("facts were served")
    except ApiError as exc:  # not served: a JSON 501 the SDK reads as an error
        assert exc.status_code == 501 and "facts" in str(exc.body), exc.body
    return {"deleted": deleted.message, "listed": _list_users(client)}


def _list_users(client: Zep) -> list[str]:
    for i in range(5):
        client.user.add(user_id=f"u-{i}")
    seen: list[str] = []
    for number in (1, 2, 3, 4):
        # Newest first, as Zep's users-ordered.
        page = client.user.list_ordered(page_size=2, page_number=number)
        assert page.total_count == 6 and page.row_count == len(page.users or []), page
        seen.extend(u.user_id or "" for u in page.users or [])
    return seen


def sessions(base_url: str) -> dict[str, Any]:
    client = _client(base_url)
    client.user.add(user_id="bob")
    made = client.memory.add_session(session_id="s-1", user_id="bob", metadata={"a": {"b": 1}})
    assert (made.session_id, made.user_id, made.metadata) == ("s-1", "bob", {"a": {"b": 1}})
    for bad in (
        {"session_id": "s-1"},  # taken
        {"session_id": "s-x", "user_id": "nobody"},  # no such user
    ):
        try:
            client.memory.add_session(**bad)
            raise AssertionError(f"created {bad}")
        except BadRequestError as exc:
            assert exc.status_code == 400 and exc.body.message, exc.body
    got = client.memory.get_session("s-1")
    assert got.user_id == "bob" and got.created_at
    updated = client.memory.update_session("s-1", metadata={"a": {"c": 2}, "d": 4})
    assert updated.metadata == {"a": {"b": 1, "c": 2}, "d": 4}, updated.metadata
    try:
        client.memory.update_session("nope", metadata={"x": 1})
        raise AssertionError("updated an unknown session")
    except NotFoundError:
        pass
    for i in range(2, 8):
        client.memory.add_session(session_id=f"s-{i}")
    seen: list[str] = []
    totals = set()
    for number in (1, 2, 3, 4):
        page = client.memory.list_sessions(page_size=2, page_number=number, asc=True)
        seen.extend(s.session_id for s in page.sessions or [])
        totals.add(page.total_count)
        assert page.response_count == len(page.sessions or []), page
    assert seen == [f"s-{i}" for i in range(1, 8)], seen  # no row twice, none skipped
    assert totals == {7}, totals
    newest = client.memory.list_sessions(page_size=1, order_by="created_at")
    assert [s.session_id for s in newest.sessions or []] == ["s-7"], newest  # Zep: desc
    try:
        client.memory.list_sessions(order_by="metadata")
        raise AssertionError("an unknown order was accepted")
    except BadRequestError as exc:
        assert "order_by" in str(exc.body.message)
    return {"listed": seen}


def memory(base_url: str) -> dict[str, Any]:
    client = _client(base_url)
    added = client.memory.add(
        "m-1",
        messages=[
            Message(role="Ann", role_type="user", content="I like tea", metadata={"k": 1}),
            Message(role="bot", role_type="assistant", content="Noted: tea."),
            Message(role="sys", role_type="system", content="be brief"),
        ],
    )
    assert added.message, added
    session = client.memory.get_session("m-1")  # created by adding memory
    assert session.session_id == "m-1" and session.user_id is None
    got = client.memory.get("m-1", lastn=2)
    assert [(m.role, m.role_type, m.content) for m in got.messages or []] == [
        ("bot", "assistant", "Noted: tea."),
        ("sys", "system", "be brief"),
    ], got.messages
    full = client.memory.get("m-1")
    first = (full.messages or [])[0]
    assert first.metadata == {"k": 1} and first.uuid_ and first.created_at, first
    one = client.memory.get_session_message("m-1", first.uuid_)
    assert one.content == "I like tea"
    changed = client.memory.update_message_metadata("m-1", first.uuid_, metadata={"j": 2})
    assert changed.metadata == {"k": 1, "j": 2}, changed.metadata
    paged = [
        [
            m.content
            for m in client.memory.get_session_messages("m-1", limit=2, cursor=n).messages or []
        ]
        for n in (1, 2, 3)
    ]
    assert paged == [["I like tea", "Noted: tea."], ["be brief"], []], paged
    listing = client.memory.get_session_messages("m-1")
    assert (listing.total_count, listing.row_count) == (3, 3), listing
    empty = client.memory.get("never-made")
    assert not empty.messages, empty  # Zep answers an unknown session with empty memory
    client.memory.delete("m-1")  # soft delete of the session and its messages
    try:
        client.memory.get_session("m-1")
        raise AssertionError("a deleted session is still served")
    except NotFoundError:
        pass
    assert not client.memory.get("m-1").messages
    try:
        client.memory.get_session_message("m-1", first.uuid_)
        raise AssertionError("a deleted message is still served")
    except NotFoundError:
        pass
    client.memory.add("m-1", messages=[Message(role="Ann", role_type="user", content="back")])
    revived = client.memory.get("m-1")
    # The session lives again; what was deleted with it stays deleted.
    assert [m.content for m in revived.messages or []] == ["back"], revived.messages
    try:
        client.memory.delete("never-made")
        raise AssertionError("deleted an unknown session")
    except NotFoundError:
        pass
    try:
        client.memory.add("m-2", messages=[Message(role="x", role_type="robot", content="hi")])
        raise AssertionError("an unknown role type was stored")
    except ApiError as exc:
        assert exc.status_code == 400 and "messages[0].role_type" in str(exc.body), exc.body
    return {"revived": [m.content for m in revived.messages or []]}


def search(base_url: str) -> dict[str, Any]:
    client = _client(base_url)
    client.user.add(user_id="maya")
    client.memory.add_session(session_id="maya-1", user_id="maya")
    client.memory.add_session(session_id="maya-2", user_id="maya")
    client.memory.add(
        "maya-1",
        messages=[
            Message(role="Maya", role_type="user", content="We adopted a beagle named Biscuit."),
            Message(role="bot", role_type="assistant", content="What a lovely name!"),
        ],
    )
    client.memory.add(
        "maya-2", messages=[Message(role="Maya", role_type="user", content="Food for Biscuit?")]
    )
    found = client.memory.search_sessions(text="beagle Biscuit", user_id="maya", limit=5)
    results = found.results or []
    assert results and results[0].message is not None, found
    assert results[0].message.content == "We adopted a beagle named Biscuit.", results
    assert all(r.score is not None for r in results)
    memory = client.memory.get("maya-2")
    extra = memory.dict()
    # memstore's recall: the user's other sessions, in fields the model keeps as extras.
    relevant = extra.get("relevant_messages") or []
    assert any("beagle" in r["message"]["content"] for r in relevant), extra
    assert "Biscuit" in (extra.get("context") or ""), extra
    return {"sessions": sorted({r.session_id for r in results if r.session_id})}


async def _async_roundtrip(base_url: str) -> list[str]:
    client = AsyncZep(base_url=base_url, api_key="any-key")
    await client.user.add(user_id="carol")
    await client.memory.add(
        "c-1", messages=[Message(role="Carol", role_type="user", content="async hello")]
    )
    got = await client.memory.get("c-1")
    try:
        await client.memory.get_session("c-404")
        raise AssertionError("found an unknown session")
    except NotFoundError:
        pass
    return [m.content or "" for m in got.messages or []]


def asynchronous(base_url: str) -> dict[str, Any]:
    return {"contents": asyncio.run(_async_roundtrip(base_url))}


def unauthorized(base_url: str, key: str) -> dict[str, Any]:
    """With a key that is not valid: every call is refused with a JSON 401."""
    try:
        _client(base_url, key).user.get("anyone")
        raise AssertionError("a bad key was let in")
    except ApiError as exc:
        return {"status": exc.status_code, "body": exc.body}


def authorized(base_url: str, key: str) -> dict[str, Any]:
    """With a valid key: a user made and read back in the key's project."""
    client = _client(base_url, key)
    client.user.add(user_id="keyed")
    client.memory.add("keyed-1", messages=[Message(role="k", role_type="user", content="hi")])
    return {"user": client.user.get("keyed").user_id}


if __name__ == "__main__":
    scenario, url, *rest = sys.argv[1:]
    print(json.dumps(globals()[scenario](url, *rest), default=str))

"""zep-python 1.5.0 (`ZepClient`, /api/v1) and langchain-community's ZepChatMessageHistory,
unchanged, against memstore: run in their own virtualenv by tests/rest.

Usage: python zep1.py SCENARIO BASE_URL [API_KEY]; prints a JSON summary as its last line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from typing import Any

warnings.simplefilter("ignore", DeprecationWarning)  # zep_python's own import shim warns

from langchain_community.chat_message_histories import ZepChatMessageHistory  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from zep_python import APIError, NotFoundError, ZepClient  # noqa: E402
from zep_python.memory import Memory, MemorySearchPayload, Session  # noqa: E402
from zep_python.message import Message  # noqa: E402
from zep_python.user import CreateUserRequest, UpdateUserRequest  # noqa: E402


def users(base_url: str) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        client = ZepClient(base_url=base_url)  # checks GET /healthz first, and its version
    assert not [str(w.message) for w in warned if "Zep server" in str(w.message)], warned
    made = client.user.add(
        CreateUserRequest(user_id="gil", email="gil@example.com", metadata={"a": 1})
    )
    assert made.user_id == "gil" and made.created_at is not None, made
    try:
        client.user.add(CreateUserRequest(user_id="gil"))
        raise AssertionError("a duplicate user was created")
    except APIError as exc:
        assert exc.response_data and exc.response_data["status_code"] == 400, exc
    updated = client.user.update(UpdateUserRequest(user_id="gil", metadata={"b": 2}))
    assert updated.metadata == {"a": 1, "b": 2}, updated.metadata
    try:
        client.user.get("nobody")
        raise AssertionError("found an unknown user")
    except NotFoundError:
        pass
    for i in range(7):
        client.user.add(CreateUserRequest(user_id=f"v-{i}"))
    client.user.delete("v-2")  # a gap: Zep's own cursor repeated rows after one
    chunks = [[u.user_id for u in chunk] for chunk in client.user.list_chunked(chunk_size=2)]
    flat = [user_id for chunk in chunks for user_id in chunk]
    assert flat == ["gil", "v-0", "v-1", "v-3", "v-4", "v-5", "v-6"], chunks
    assert [u.user_id for u in client.user.list(limit=2, cursor=2)] == ["v-1", "v-3"]
    client.memory.add_session(Session(session_id="g-1", user_id="gil"))
    client.memory.add_session(Session(session_id="g-2", user_id="gil", metadata={"m": 1}))
    assert [s.session_id for s in client.user.get_sessions("gil")] == ["g-1", "g-2"]
    client.user.delete("gil")
    try:
        client.memory.get_session("g-1")
        raise AssertionError("a session outlived its user")
    except NotFoundError:
        pass
    return {"chunks": chunks}


def memory(base_url: str) -> dict[str, Any]:
    client = ZepClient(base_url=base_url)
    session = client.memory.add_session(Session(session_id="h-1", metadata={"x": {"y": 1}}))
    assert session.session_id == "h-1"
    merged = client.memory.update_session(Session(session_id="h-1", metadata={"x": {"z": 2}}))
    assert merged.metadata == {"x": {"y": 1, "z": 2}}, merged.metadata
    added = client.memory.add_memory(
        "h-1",
        Memory(
            messages=[
                Message(role="human", content="I am training for a marathon in April."),
                Message(role="ai", content="Great, let us plan your long runs."),
                Message(role="human", content="I also like swimming."),
            ]
        ),
    )
    got = client.memory.get_memory("h-1", lastn=2)
    assert [m.content for m in got.messages] == [
        "Great, let us plan your long runs.",
        "I also like swimming.",
    ], got.messages
    found = client.memory.search_memory(
        "h-1", MemorySearchPayload(text="marathon training"), limit=2
    )
    assert found and found[0].message is not None, found
    assert found[0].message["content"] == "I am training for a marathon in April.", found
    assert found[0].dist is not None
    page = client.message.get_session_messages("h-1", limit=2, cursor=2)
    assert [m.content for m in page] == ["I also like swimming."], page
    first = client.message.get_session_messages("h-1")[0]
    assert client.message.get_session_message("h-1", first.uuid).content == first.content
    changed = client.message.update_message_metadata(
        "h-1", first.uuid, metadata={"metadata": {"pace": "easy"}}
    )
    assert changed.metadata == {"pace": "easy"}, changed.metadata
    for i in range(2, 6):
        client.memory.add_session(Session(session_id=f"h-{i}"))
    listed = [s.session_id for s in client.memory.list_sessions(limit=2, cursor=1)]
    assert listed == ["h-2", "h-3"], listed
    every = [[s.session_id for s in c] for c in client.memory.list_all_sessions(chunk_size=2)]
    assert [s for c in every for s in c] == ["h-1", "h-2", "h-3", "h-4", "h-5"], every
    deleted = client.memory.delete_memory("h-1")
    try:
        client.memory.get_session("h-1")
        raise AssertionError("a deleted session is still served")
    except NotFoundError:
        pass
    # add_memory and delete_memory return the answer's text: Zep 0.27.2's plain OK.
    return {"found": len(found), "added": added, "deleted": deleted}


def langchain(base_url: str) -> dict[str, Any]:
    history = ZepChatMessageHistory(session_id="lc-1", url=base_url)
    assert history.messages == []  # an unknown session is an empty history
    history.add_user_message("Hi! I'm Priya and I keep bees.")
    history.add_ai_message("Hello Priya! How are the bees?")
    history.add_messages([HumanMessage(content="They made honey."), AIMessage(content="Sweet!")])
    kinds = [(type(m).__name__, m.content) for m in history.messages]
    assert kinds == [
        ("HumanMessage", "Hi! I'm Priya and I keep bees."),
        ("AIMessage", "Hello Priya! How are the bees?"),
        ("HumanMessage", "They made honey."),
        ("AIMessage", "Sweet!"),
    ], kinds
    assert all(m.additional_kwargs["uuid"] for m in history.messages)
    hits = history.search("bees honey", limit=3)
    assert hits and "honey" in (hits[0].message or {}).get("content", ""), hits
    asyncio.run(history.aadd_messages([HumanMessage(content="async one")]))
    assert history.messages[-1].content == "async one"
    history.clear()  # Zep's delete: the session is soft-deleted
    assert history.messages == []
    history.add_user_message("starting over")
    assert [m.content for m in history.messages] == ["starting over"]
    return {"kinds": [k for k, _ in kinds], "tools": _langchain_tool_turns(base_url)}


def _langchain_tool_turns(base_url: str) -> dict[str, Any]:
    # An assistant's turn that only calls a tool has no text: the whole turn was refused
    # (400 "messages[1].content: is required") and lost. And `messages` sends no lastn,
    # which Zep 0.x answered with its message window, 12 (memstore sent 6).
    history = ZepChatMessageHistory(session_id="lc-tools", url=base_url)
    call = {"name": "weather", "args": {"city": "Paris"}, "id": "call_1"}
    turn = [
        HumanMessage(content="What's the weather in Paris?"),
        AIMessage(content="", tool_calls=[call]),
        ToolMessage(content="18C, sunny", tool_call_id="call_1"),
        AIMessage(content="It's 18C and sunny in Paris."),
    ]
    for _ in range(4):
        history.add_messages(turn)
    got = [m.content for m in history.messages]
    assert got == [m.content for m in turn] * 3, got
    return {"window": len(got), "empty": got.count("")}


def unauthorized(base_url: str, key: str) -> dict[str, Any]:
    """A bad Bearer key: 1.x raises its AuthError on the JSON 401."""
    client = ZepClient(base_url=base_url, api_key=key)
    try:
        client.user.get("anyone")
        raise AssertionError("a bad key was let in")
    except APIError as exc:  # AuthError is not an APIError subclass in 1.5.0
        raise AssertionError(f"wrong error class: {exc!r}") from exc
    except Exception as exc:
        return {"error": type(exc).__name__, "data": getattr(exc, "response_data", None)}


def authorized(base_url: str, key: str) -> dict[str, Any]:
    client = ZepClient(base_url=base_url, api_key=key)
    client.memory.add_memory("keyed-v1", Memory(messages=[Message(role="k", content="hi")]))
    return {"messages": len(client.memory.get_memory("keyed-v1").messages)}


if __name__ == "__main__":
    scenario, url, *rest = sys.argv[1:]
    print(json.dumps(globals()[scenario](url, *rest), default=str))

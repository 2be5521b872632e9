"""/api/v2: the routes zep-python 2.x (`zep_python.client.Zep`) and zep-cloud 2.x call."""

from __future__ import annotations

import uuid
from itertools import chain
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from server import off_loop
from server.api import answer_size
from server.api import validation as val
from server.api.search import DEFAULT_RELEVANT_LIMIT
from server.domain import JsonObject, NewMessage, SessionQuery, UserChanges
from server.errors import InvalidArgument
from server.rest import body as b
from server.rest import common, params
from server.rest import convert as c
from server.rest.answers import json_answer
from server.rest.routing import endpoint, project, route, services
from server.rest.search import search_one_session, search_sessions

OK = {"message": "OK"}
#: The header Fern-made SDKs send with their name.
_SDK_NAME = "x-fern-sdk-name"
#: Zep's order_by values memstore orders by (Zep also takes user_id and session_id).
_ORDER_FIELDS: dict[str, Literal["created_at", "updated_at"]] = {
    "created_at": "created_at",
    "updated_at": "updated_at",
}


@endpoint
async def add_user(request: Request) -> Response:
    user_id, texts, metadata = common.new_user(await b.json_object(request))
    created = await services(request).store.create_user(
        project(request),
        user_id,
        texts["email"],
        texts["first_name"],
        texts["last_name"],
        metadata,
    )
    return JSONResponse(c.user(created), status_code=201)


@endpoint
async def get_user(request: Request) -> Response:
    found = await services(request).store.get_user(
        project(request), params.path_id(request, "user_id")
    )
    return JSONResponse(c.user(found))


@endpoint
async def update_user(request: Request) -> Response:
    user_id = params.path_id(request, "user_id")
    changes = common.user_changes(await b.json_object(request, required=False))
    store = services(request).store
    if changes == UserChanges():
        updated = await store.get_user(project(request), user_id)
    else:
        updated = await store.update_user(project(request), user_id, changes)
    return JSONResponse(c.user(updated))


@endpoint
async def delete_user(request: Request) -> Response:
    user_id = params.path_id(request, "user_id")
    await services(request).store.delete_user(project(request), user_id)
    return JSONResponse(OK)


@endpoint
async def list_users(request: Request) -> Response:
    # Zep reads camelCase names (the SDKs send them here); snake_case is accepted too.
    window = common.numbered_window(
        request, "pageNumber", "pageSize", aliases=("page_number", "page_size")
    )
    # Newest first, as Zep's ListAllOrdered(..., "", false): ORDER BY id DESC.
    return await common.list_users(
        services(request).store,
        project(request),
        window,
        ("pageNumber", "user.list_ordered"),
        newest_first=True,
    )


@endpoint
async def user_sessions(request: Request) -> Response:
    user_id = params.path_id(request, "user_id")
    # zep-python 2.0.2 declares this answer a list of lists of sessions (and fails on
    # Zep's own flat list); zep-cloud and others read the flat list.
    nested = request.headers.get(_SDK_NAME) == "zep-python"
    return await common.user_sessions(
        services(request).store, project(request), user_id, nested=nested
    )


@endpoint
async def add_session(request: Request) -> Response:
    session_id, user_id, metadata = common.new_session(
        await b.json_object(request), require_id=True
    )
    created = await services(request).store.create_session(
        project(request), session_id or uuid.uuid4().hex, user_id, metadata
    )
    return JSONResponse(c.session(created), status_code=201)


@endpoint
async def get_session(request: Request) -> Response:
    session_id = params.path_id(request, "session_id")
    found = await services(request).store.get_session(project(request), session_id, False)
    return JSONResponse(c.session(found))


@endpoint
async def update_session(request: Request) -> Response:
    session_id = params.path_id(request, "session_id")
    change = common.metadata_patch(await b.json_object(request, required=False))
    store = services(request).store
    if change is None:
        found = await store.get_session(project(request), session_id, False)
    else:
        found = await store.update_session(project(request), session_id, change)
    return JSONResponse(c.session(found))


@endpoint
async def list_sessions(request: Request) -> Response:
    # Zep reads camelCase names; the SDKs send snake_case here.
    window = common.numbered_window(
        request, "page_number", "page_size", aliases=("pageNumber", "pageSize")
    )
    offset, size = window.offset, window.size
    order_by = params.query_value(request, "order_by") or "created_at"
    field = _ORDER_FIELDS.get(order_by)
    if field is None:
        raise InvalidArgument.field(
            "order_by", f"{order_by[:64]!r} is not supported; use created_at or updated_at"
        )
    # Zep's default direction is descending (asc=false).
    ascending = params.query_bool(request, "asc") or False
    query = SessionQuery(order_field=field, descending=not ascending)
    budget = answer_size.list_budget(size, answer_size.MAX_ANSWER_BYTES)
    page = await services(request).store.list_sessions(
        project(request), query, None, offset, size, count=True, budget=budget
    )
    if page.cut:
        raise answer_size.refuse_cut_answer(window.field, f"{size} sessions")
    if window.whole and page.has_more:
        raise common.not_whole(
            window.field, f"{size} sessions", "memory.list_sessions", number="page_number"
        )

    def build() -> dict[str, Any]:
        sessions = common.sessions_answer(page, window.field)
        return {
            "sessions": sessions,
            "response_count": len(sessions),
            "row_count": len(sessions),
            "total_count": page.total_size or 0,
        }

    return await json_answer(common.sessions_size(page), build)


@endpoint
async def get_memory(request: Request) -> Response:
    return await memory_answer(request, val.DEFAULT_LASTN)


async def memory_answer(request: Request, default_lastn: int) -> Response:
    """GetMemory over REST, `default_lastn` messages when the query names none (Zep's
    default differs between its two APIs)."""
    session_id = params.path_id(request, "session_id")
    lastn, recall = common.lastn_and_recall(
        params.query_int(request, "lastn", minimum=0),
        params.query_int(request, "relevant_limit", minimum=0),
        default_lastn,
    )
    searcher = services(request).searcher
    memory = await answer_size.read_memory(searcher, project(request), session_id, lastn, recall)
    if memory.relevant_cut:
        raise await answer_size.refuse_cut_recall(
            searcher,
            memory,
            (project(request), session_id, recall),
            messages=answer_size.text_size(memory.messages),
            measure=answer_size.recall_text_size,
            # At most 4 bytes of UTF-8 a character: past 4 * size + 4 bytes their text holds
            # more than `size` characters.
            content_budget=lambda size: 4 * size + 4,
            asked=f"the last {len(memory.messages)} messages and {recall} memories",
        )

    def build() -> dict[str, Any]:
        answer_size.check_text_answer(
            f"the last {len(memory.messages)} messages and {len(memory.relevant)} memories",
            lastn=memory.messages,
            relevant_limit=[r.message for r in memory.relevant],
        )
        # An unknown or deleted session is an empty memory (found: false), as the spec asks:
        # agent frameworks rely on it (Zep's v1 server answered 404; docs/zep-compat.md).
        return {
            "messages": [c.message(m) for m in memory.messages],
            "metadata": {},
            "summary": None,
            "facts": None,
            "relevant_facts": None,
            "context": memory.context or None,
            "relevant_messages": [c.search_result(r) for r in memory.relevant],
            "found": memory.session is not None,
            "relevant_unavailable": memory.relevant_unavailable,
        }

    rows = chain(memory.messages, (r.message for r in memory.relevant))
    return await json_answer(answer_size.text_at_least(rows, off_loop.OFF_LOOP_BYTES), build)


async def write_memory(request: Request) -> tuple[str, bool]:
    """Appends a memory write's messages to the path's session (made if absent); answers its
    id and whether the write asks for the context back."""
    session_id = params.path_id(request, "session_id")
    messages, return_context = await b.checked_json(request, _memory_write)
    await services(request).store.add_memory(project(request), session_id, None, messages)
    return session_id, return_context


@endpoint
async def add_memory(request: Request) -> Response:
    session_id, return_context = await write_memory(request)
    if not return_context:
        return JSONResponse(OK)
    # zep-cloud's memory.add(return_context=True) reads `context` from the answer: the
    # context memory.get would answer now, the session's recall as a prompt block.
    memory = await answer_size.read_memory(
        services(request).searcher,
        project(request),
        session_id,
        val.DEFAULT_LASTN,
        DEFAULT_RELEVANT_LIMIT,
    )
    return JSONResponse({**OK, "context": memory.context or None})


def _memory_write(data: JsonObject) -> tuple[list[NewMessage], bool]:
    """A memory write's messages, and whether it asks for the context back."""
    messages = common.new_messages(data)
    flag = data.get("return_context")
    if flag is not None and not isinstance(flag, bool):
        raise InvalidArgument.field("return_context", f"must be true or false, not {b.kind(flag)}")
    return messages, bool(flag)


async def forget_memory(request: Request) -> None:
    """Zep's memory delete: soft-deletes the path's session with its messages; memory added
    later revives the session, and the messages deleted here stay deleted."""
    session_id = params.path_id(request, "session_id")
    await services(request).store.delete_session(project(request), session_id)


@endpoint
async def delete_memory(request: Request) -> Response:
    await forget_memory(request)
    return JSONResponse(OK)


@endpoint
async def list_messages(request: Request) -> Response:
    # Zep's `cursor` here is a 1-based page number of `limit` messages.
    session_id = params.path_id(request, "session_id")
    window = common.numbered_window(request, "cursor", "limit")
    return await common.list_messages(services(request).store, project(request), session_id, window)


@endpoint
async def get_message(request: Request) -> Response:
    session_id = params.path_id(request, "session_id")
    message_uuid = _message_uuid(request)
    found = await services(request).store.get_message(project(request), session_id, message_uuid)
    return JSONResponse(c.message(found))


@endpoint
async def update_message(request: Request) -> Response:
    session_id = params.path_id(request, "session_id")
    message_uuid = _message_uuid(request)
    change = common.metadata_patch(await b.json_object(request))
    store = services(request).store
    if change is None:
        found = await store.get_message(project(request), session_id, message_uuid)
    else:
        found = await store.update_message(project(request), session_id, message_uuid, change)
    return JSONResponse(c.message(found))


def _message_uuid(request: Request) -> str:
    v = val.Violations()
    value = val.message_uuid(v, "message_uuid", params.path_text(request, "message_uuid"))
    v.raise_if_any()
    return value


def routes() -> list[BaseRoute]:
    """The /api/v2 routes memstore serves (docs/zep-compat.md has the table)."""
    p = "/api/v2"
    return [
        route(f"{p}/users", POST=add_user),
        route(f"{p}/users-ordered", GET=list_users),
        route(f"{p}/users/{{user_id}}", GET=get_user, PATCH=update_user, DELETE=delete_user),
        route(f"{p}/users/{{user_id}}/sessions", GET=user_sessions),
        route(f"{p}/sessions", POST=add_session),
        route(f"{p}/sessions-ordered", GET=list_sessions),
        route(f"{p}/sessions/search", POST=search_sessions),
        route(f"{p}/sessions/{{session_id}}", GET=get_session, PATCH=update_session),
        route(
            f"{p}/sessions/{{session_id}}/memory",
            GET=get_memory,
            POST=add_memory,
            DELETE=delete_memory,
        ),
        route(f"{p}/sessions/{{session_id}}/search", POST=search_one_session),
        route(f"{p}/sessions/{{session_id}}/messages", GET=list_messages),
        route(
            f"{p}/sessions/{{session_id}}/messages/{{message_uuid}}",
            GET=get_message,
            PATCH=update_message,
        ),
    ]

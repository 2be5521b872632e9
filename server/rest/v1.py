"""/api/v1: the routes zep-python 1.x (`ZepClient`) and LangChain's Zep integration call.

Most answers have the /api/v2 shapes (the same handlers); 1.x differs in its paths (`/user`),
in its lists (plain JSON arrays) and in `cursor`, an offset of rows there.
"""

from __future__ import annotations

import functools

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute

from server.api import answer_size
from server.api import validation as val
from server.domain import SessionQuery
from server.rest import common, params, v2
from server.rest.answers import json_answer
from server.rest.routing import endpoint, project, route, services
from server.rest.search import search_one_session


def _offset_window(request: Request) -> common.Window:
    # 1.x pages with `limit` rows from `cursor`, an offset (0, limit, 2*limit, ...). Without
    # a limit (1.x's `user.list()` and `memory.list_sessions()` send `limit=`) Zep answers
    # every row: so does memstore, up to MAX_PAGE_SIZE of them, and refuses more (whole).
    # Until 2026-12-02 it answered the first 50.
    limit = common.page_size(request, "limit")
    offset = params.query_int(request, "cursor", minimum=0) or 0
    return common.Window(offset, limit or val.MAX_PAGE_SIZE, limit is None, "limit")


@endpoint
async def list_users(request: Request) -> Response:
    # Oldest first, as Zep 0.27.2's ListAll (`id > cursor ORDER BY id ASC`).
    window = _offset_window(request)
    store = services(request).store
    paging = ("cursor", "user.list_chunked")
    return await common.list_users(store, project(request), window, paging, flat=True)


@endpoint
async def list_sessions(request: Request) -> Response:
    offset, size, whole, _ = _offset_window(request)
    # Oldest first by (created_at, session_id): offsets stay put while sessions are added.
    budget = answer_size.list_budget(size, answer_size.MAX_ANSWER_BYTES)
    page = await services(request).store.list_sessions(
        project(request), SessionQuery(), None, offset, size, count=False, budget=budget
    )
    if page.cut:
        raise answer_size.refuse_cut_answer("limit", f"{size} sessions")
    if whole and page.has_more:
        raise common.not_whole("limit", f"{size} sessions", "memory.list_all_sessions")
    return await json_answer(
        common.sessions_size(page), functools.partial(common.sessions_answer, page, "limit")
    )


@endpoint
async def user_sessions(request: Request) -> Response:
    user_id = params.path_id(request, "user_id")
    return await common.user_sessions(services(request).store, project(request), user_id)


@endpoint
async def get_memory(request: Request) -> Response:
    return await v2.memory_answer(request, common.V1_DEFAULT_LASTN)


# Zep 0.27.2 answers a memory write and delete with the plain text OK, which zep-python
# 1.x returns (`response.text`); until 2026-12-03 its callers got '{"message":"OK"}'.
@endpoint
async def add_memory(request: Request) -> Response:
    await v2.write_memory(request)
    return PlainTextResponse("OK")


@endpoint
async def delete_memory(request: Request) -> Response:
    await v2.forget_memory(request)
    return PlainTextResponse("OK")


def routes() -> list[BaseRoute]:
    """The /api/v1 routes memstore serves (docs/zep-compat.md has the table)."""
    p = "/api/v1"
    return [
        route(f"{p}/user", POST=v2.add_user, GET=list_users),
        route(
            f"{p}/user/{{user_id}}", GET=v2.get_user, PATCH=v2.update_user, DELETE=v2.delete_user
        ),
        route(f"{p}/user/{{user_id}}/sessions", GET=user_sessions),
        route(f"{p}/sessions", POST=v2.add_session, GET=list_sessions),
        route(f"{p}/sessions/{{session_id}}", GET=v2.get_session, PATCH=v2.update_session),
        route(
            f"{p}/sessions/{{session_id}}/memory",
            GET=get_memory,
            POST=add_memory,
            DELETE=delete_memory,
        ),
        route(f"{p}/sessions/{{session_id}}/search", POST=search_one_session),
        route(f"{p}/sessions/{{session_id}}/messages", GET=v2.list_messages),
        route(
            f"{p}/sessions/{{session_id}}/messages/{{message_uuid}}",
            GET=v2.get_message,
            PATCH=v2.update_message,
        ),
    ]

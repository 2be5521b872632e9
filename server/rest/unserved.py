"""Zep routes memstore does not serve (facts, summaries, graphs, documents...): a JSON 501
that says so, rather than a 404 that reads like a missing session or user."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

#: What each unserved family is, by the paths Zep's SDKs call.
_UNSERVED = {
    "facts": ("/api/v2/facts/{rest:path}", "/api/v2/sessions/{session_id}/facts",
              "/api/v2/users/{user_id}/facts"),
    "summaries": ("/api/v2/sessions/{session_id}/summary",),
    "classification, extraction and question synthesis": (
        "/api/v2/sessions/{session_id}/classify", "/api/v2/sessions/{session_id}/extract",
        "/api/v2/sessions/{session_id}/synthesize_question",
    ),
    "ending sessions": ("/api/v2/sessions/end", "/api/v2/sessions/{session_id}/end"),
    "knowledge graphs and groups": ("/api/v2/graph/{rest:path}", "/api/v2/groups/{rest:path}",
                                    "/api/v2/groups", "/api/v2/users/{user_id}/node"),
    "document collections": ("/api/v1/collection", "/api/v1/collection/{rest:path}",
                             "/api/v2/collections", "/api/v2/collections/{rest:path}"),
}  # fmt: skip
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _answer(feature: str) -> Callable[[Request], Awaitable[Response]]:
    async def not_served(request: Request) -> Response:
        del request
        return JSONResponse(
            {
                "message": f"memstore does not serve Zep's {feature} (see docs/zep-compat.md)",
                "reason": "NOT_IMPLEMENTED",
            },
            status_code=501,
        )

    return not_served


def routes() -> list[BaseRoute]:
    """One route per unserved path, every method answering 501."""
    return [
        Route(path, _answer(feature), methods=_METHODS)
        for feature, paths in _UNSERVED.items()
        for path in paths
    ]

"""What the routes of Zep's REST API share: their services, the caller's project, the
endpoint decorator (domain errors to JSON answers), the method-dispatching route(), and the
Starlette router over them with /healthz and JSON 404 and 405 answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from server.api.tokens import PageTokens
from server.errors import MemstoreError
from server.rest.app import ERROR_KEY, error_response, errors_log
from server.search.service import Searcher
from server.store import Store

#: The version /healthz names; zep-python 1.x warns of servers older than 0.21.0. Zep's
#: server sends its version and build (`0.27.2-<sha>`), and 1.x reads only a version with a
#: dash: bare `0.27.2` read as 0.0.0, and every ZepClient() warned "incompatible Zep server".
ZEP_VERSION = "0.27.2-memstore"

Handler = Callable[[Request], Awaitable[Response]]


class Services:
    """What the routes reach: the store, the searcher (memory with recall), page tokens."""

    def __init__(self, store: Store, searcher: Searcher, tokens: PageTokens) -> None:
        self.store = store
        self.searcher = searcher
        self.tokens = tokens


def project(request: Request) -> int:
    """The project RestApp resolved for this request from its API key."""
    return int(request.scope["memstore.project"])


def services(request: Request) -> Services:
    """The Services of the app serving `request`."""
    found: Services = request.app.state.services
    return found


def endpoint(handler: Handler) -> Handler:
    """Maps domain errors raised by a route to their JSON answer; hides unexpected ones."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except MemstoreError as error:
            request.scope[ERROR_KEY] = error  # for the access line (RestApp._finish)
            return error_response(error)
        except ClientDisconnect:
            # The client went away before its body was in: nothing was read, so nothing was
            # written, and no one is left to answer. Not the server's fault: counted and
            # logged as 499 (as nginx does), not as an internal error with a traceback.
            request.scope[ERROR_KEY] = _client_closed()
            return Response(status_code=CLIENT_CLOSED_STATUS)
        except Exception:
            errors_log.exception("unexpected error in %s", handler.__qualname__)
            return error_response(
                MemstoreError("internal error; see the server log", reason="INTERNAL")
            )

    wrapped.__qualname__ = handler.__qualname__
    wrapped.__name__ = handler.__name__
    return wrapped


class FixedRoute(Route):
    """A route whose path has no parameter claims it for every method (405 for those it does
    not serve): otherwise the router, finding the method unserved here, goes on to a later
    `/sessions/{session_id}` and answers GET /api/v2/sessions/search as the session "search"
    (tests/unit/test_rest_routes.py)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        return (Match.FULL if match is Match.PARTIAL else match), child


def route(path: str, **handlers: Handler) -> Route:
    """One route for `path` whose handlers are given by method (GET=..., PATCH=...), so a
    wrong method answers 405 with an Allow header naming all the others."""

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    dispatch.__name__ = "_".join(h.__name__ for h in handlers.values())
    kind = Route if "{" in path else FixedRoute
    return kind(path, dispatch, methods=list(handlers))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    del request
    if exc.status_code == 405:
        message, reason = "method not allowed on this route", "METHOD_NOT_ALLOWED"
    elif exc.status_code == 404:
        message, reason = "no such route (see docs/zep-compat.md)", "ROUTE_NOT_FOUND"
    else:
        message, reason = str(exc.detail), "HTTP_ERROR"
    return JSONResponse(
        {"message": message, "reason": reason}, status_code=exc.status_code, headers=exc.headers
    )


async def _healthz(request: Request) -> Response:
    # What Zep serves and zep-python 1.x checks when a client is created: "." and a version.
    del request
    return PlainTextResponse(".", headers={"X-Zep-Version": ZEP_VERSION})


def build_app(routes: list[BaseRoute], services_: Services) -> Starlette:
    """The Starlette router over `routes`, plus /healthz and JSON 404/405 answers."""
    app = Starlette(
        routes=[Route("/healthz", _healthz, methods=["GET"]), *routes],
        exception_handlers={HTTPException: _http_error},
    )
    # A path with a trailing slash is no route (404 in JSON), not a 307 to the path without
    # it: that redirect had no JSON body and, for a path whose id is not UTF-8 (a lone
    # surrogate here, see routing_path), failed to build its Location and answered a
    # plain-text 500.
    app.router.redirect_slashes = False
    app.state.services = services_
    return app


#: The status of a request whose client closed the connection before it was answered.
CLIENT_CLOSED_STATUS = 499


def _client_closed() -> MemstoreError:
    return MemstoreError(
        "the client closed the connection before its request body arrived",
        reason="CLIENT_CLOSED",
    )

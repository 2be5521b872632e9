"""The ASGI app of Zep's REST API: request ids, auth, the body cap, metrics and access logs.

Every request passes through `RestApp` before routing: it resolves the caller's project
from the API key (the same Authenticator as gRPC), caps the body at the gRPC limit, and
counts and logs the request. Every answer is JSON, errors included (`{"message": ...}`,
which Zep's 2.x SDKs parse), unknown routes (404) and wrong methods (405) too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Message, Receive, Scope, Send

from server.api.status import http_status
from server.api.tokens import PageTokens
from server.errors import InvalidArgument, MemstoreError, RequestTooLarge, Unavailable
from server.rest import protocol
from server.rest.error_body import error_body
from server.rest.media import ENCODING_REASON
from server.search.service import Searcher
from server.serving.auth import Authenticator
from server.serving.limit import CallLimit
from server.serving.observability import LATENCY_BUCKETS, REQUEST_ID_KEY, Metrics, request_id
from server.store import Store

log = logging.getLogger("memstore.access")
#: Where a route (or the refusal before routing) leaves the domain error it answered with.
_ERROR_KEY = "memstore.error"
#: Set in a request's scope while it counts against the cap on calls in flight.
_ADMITTED_KEY = "memstore.admitted"
#: Where a layer outside the app that answers a request itself leaves its answer (answer_for).
_ANSWER_KEY = "memstore.answer"
errors_log = logging.getLogger(__name__)

#: The largest request body accepted: the gRPC receive limit.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: The version /healthz names; zep-python 1.x warns of servers older than 0.21.0. Zep's
#: server sends its version and build (`0.27.2-<sha>`), and 1.x reads only a version with a
#: dash: bare `0.27.2` read as 0.0.0, and every ZepClient() warned "incompatible Zep server".
ZEP_VERSION = "0.27.2-memstore"
#: Paths every caller may reach without a key: liveness, as Zep serves it.
OPEN_PATHS = frozenset({"/healthz"})
#: The route label of a request refused before it was read whole (RestApp.refused_unread):
#: no path was routed, and the path (when read) is the caller's, an unbounded label.
UNREAD = "unread"

_MAX_ID = 128

Handler = Callable[[Request], Awaitable[Response]]


class HttpMetrics:
    """The HTTP metric families, in the same registry as the gRPC ones."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.requests = Counter(
            "memstore_http_requests",
            "Finished HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "memstore_http_request_duration_seconds",
            "Time from the start of an HTTP request to its answer, by route template.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "memstore_http_in_flight", "HTTP requests being served.", registry=registry
        )


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


def answer_for(scope: Scope, response: Response, error: MemstoreError | None = None) -> None:
    """Has RestApp send `response` for this request in place of routing it (no key asked),
    counted and logged as its own answers are, under the route it would have reached: for a
    layer outside the app that answers requests itself (server/rest/cors.py's preflights)."""
    scope[_ANSWER_KEY] = response
    if error is not None:
        scope[_ERROR_KEY] = error


def error_response(error: MemstoreError) -> JSONResponse:
    """The JSON answer of a domain error: Zep's `message`, and memstore's reason and fields."""
    response = JSONResponse(error_body(error), status_code=http_status(error))
    if error.reason == ENCODING_REASON:
        # RFC 9110's 415 for a content coding: the codings that would have been read.
        response.headers["Accept-Encoding"] = "identity"
    return response


class JsonArrayStream(StreamingResponse):
    """A JSON array answered while its items are read, one chunk per batch of them: byte for
    byte what JSONResponse of the whole list answers (`nested`: of a list holding it), with
    one batch in memory at a time. Each batch comes rendered: its items' JSON (json_bytes
    each), sent in chunks of about CHUNK_BYTES, so that no send copies megabytes on the loop.

    A domain error raised while the batches are read, once the answer has started, can no
    longer be an error answer: the answer is left unfinished (the server closes the
    connection, so the client sees a cut answer, never a shorter list that parses), and the
    error is logged and named on the access line.
    """

    def __init__(self, batches: AsyncIterator[list[bytes]], *, nested: bool = False) -> None:
        super().__init__(_array_chunks(batches, nested), media_type="application/json")
        self._scope: Scope = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except MemstoreError as error:
            self._scope[_ERROR_KEY] = error
            errors_log.warning("answer cut short after it started: %s", error.message)
            return
        except Exception:
            errors_log.exception("unexpected error in an answer after it started")
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


#: A JsonArrayStream's chunks hold about this many bytes: a page of 100 sessions of 4,000
#: metadata keys is 5 MB of JSON, whose copies into one chunk and into the socket's buffer held
#: the loop 15-20 ms (tests/reliability/test_loop_stalls.py).
CHUNK_BYTES = 64 * 1024


async def _array_chunks(batches: AsyncIterator[list[bytes]], nested: bool) -> AsyncIterator[bytes]:
    yield b"[[" if nested else b"["
    first = True
    async for batch in batches:
        for piece in _pieces(batch, comma=not first):
            yield piece
            first = False
            # A turn of the loop between pieces: each send copies one piece, not the batch.
            await asyncio.sleep(0)
    yield b"]]" if nested else b"]"


def _pieces(items: list[bytes], *, comma: bool) -> Iterator[bytes]:
    """`items` joined by commas (led by one if `comma`), cut between items where a piece
    reaches CHUNK_BYTES."""
    piece: list[bytes] = [b""] if comma else []
    size = 0
    for item in items:
        piece.append(item)
        size += len(item)
        if size >= CHUNK_BYTES:
            yield b",".join(piece)
            piece, size = [b""], 0
    if len(piece) > 1 or (piece and piece[0]):
        yield b",".join(piece)


def endpoint(handler: Handler) -> Handler:
    """Maps domain errors raised by a route to their JSON answer; hides unexpected ones."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except MemstoreError as error:
            request.scope[_ERROR_KEY] = error  # for the access line (RestApp._finish)
            return error_response(error)
        except ClientDisconnect:
            # The client went away before its body was in: nothing was read, so nothing was
            # written, and no one is left to answer. Not the server's fault: counted and
            # logged as 499 (as nginx does), not as an internal error with a traceback.
            request.scope[_ERROR_KEY] = _client_closed()
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


class RestApp:
    """The outer ASGI layer: request id, the cap on calls in flight, auth, body cap, metrics
    and the access log."""

    def __init__(
        self, router: Starlette, auth: Authenticator, metrics: HttpMetrics, limit: CallLimit
    ) -> None:
        self._router = router
        self._auth = auth
        self._metrics = metrics
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return
        start = time.perf_counter()
        headers = _headers(scope)
        rid = _request_id(headers)
        request_id.set(rid)
        status = [0]
        rid_header = (REQUEST_ID_KEY.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        path = routing_path(scope)
        if path != scope["path"]:
            # A copy: the server's own scope keeps its path (uvicorn logs it, quoted).
            scope = {**scope, "path": path}
        self._metrics.in_flight.inc()
        try:
            refused = await self._refusal(scope, headers)
            if refused is not None:
                # Counted and logged under the route it would have reached, as when routed:
                # "unmatched" is for paths no route serves (a scan), which this is not.
                if (would := route_of(self._router, scope)) is not None:
                    scope["route"] = would
                await refused(scope, receive, send_with_id)
                return
            await self._router(scope, _capped(receive), send_with_id)
        except asyncio.CancelledError:
            # Cancelled by HttpServer.stop at the grace period's end, its query cancelled
            # with it (nothing written). Unstarted, the answer says so, as gRPC's UNAVAILABLE
            # does; started, it is left unfinished and the connection closes.
            if not status[0]:
                scope[_ERROR_KEY] = _shutting_down()
                await error_response(scope[_ERROR_KEY])(scope, receive, send_with_id)
        finally:
            if scope.get(_ADMITTED_KEY):
                self._limit.leave()
            self._metrics.in_flight.dec()
            self._finish(scope, status[0] or 500, time.perf_counter() - start, rid)

    async def _refusal(self, scope: Scope, headers: dict[str, str]) -> Response | None:
        """The answer that refuses this request before routing, or None to route it."""
        answer: Response | None = scope.get(_ANSWER_KEY)
        if answer is not None:
            return answer
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            scope[_ERROR_KEY] = _too_large()
            return error_response(scope[_ERROR_KEY])
        if scope["path"] in OPEN_PATHS:
            return None  # liveness answers under overload too, as gRPC health does
        try:
            self._limit.enter()
            scope[_ADMITTED_KEY] = True
            scope["memstore.project"] = await self._auth.project_for(_credentials(scope))
        except MemstoreError as error:
            scope[_ERROR_KEY] = error
            response = error_response(error)
            if error.reason.startswith("API_KEY"):
                response.headers["WWW-Authenticate"] = 'Bearer realm="memstore"'
            return response
        return None

    def refused_unread(
        self, error: MemstoreError, method: str, peer: str, elapsed: float, rid: str
    ) -> None:
        """Counts and logs a request the connection refused before the app could see it
        (server/rest/protocol.py: a head too large, a URL too long, bytes that are no HTTP/1.1
        request, a head not in in time), under route UNREAD and its method when read."""
        self._record(
            UNREAD, method or "unknown", http_status(error),
            elapsed=elapsed, rid=rid, peer=peer, error=error,
        )  # fmt: skip

    def _finish(self, scope: Scope, status: int, elapsed: float, rid: str) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = str(scope.get("method", ""))
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else ""
        self._record(
            template, method, status,
            elapsed=elapsed, rid=rid, peer=peer, error=scope.get(_ERROR_KEY),
        )  # fmt: skip

    def _record(
        self,
        template: str,
        method: str,
        status: int,
        *,
        elapsed: float,
        rid: str,
        peer: str,
        error: MemstoreError | None,
    ) -> None:
        self._metrics.requests.labels(template, method, str(status)).inc()
        self._metrics.latency.labels(template, method).observe(elapsed)
        latency_ms = round(elapsed * 1000, 3)
        name = f"{method} {template}"
        fields: dict[str, Any] = {
            "method": name,
            "code": status,
            "latency_ms": latency_ms,
            "request_id": rid,
            "peer": peer,
            **_error_fields(error),
        }
        # As the gRPC access line: reason and message after the status, fields in JSON.
        outcome = " ".join(str(fields[k]) for k in ("reason", "error") if k in fields)
        log.info(
            "%s %d %.1fms %s%s",
            name,
            status,
            latency_ms,
            peer,
            f" {outcome}" if outcome else "",
            extra=fields,
        )


def route_of(router: Starlette, scope: Scope) -> BaseRoute | None:
    """The route Starlette's router would give `scope`, found without running it: the first
    that matches path and method, else the first that matches the path (a 405)."""
    partial = None
    for candidate in router.routes:
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return candidate
        if match is Match.PARTIAL and partial is None:
            partial = candidate
    return partial


def _error_fields(error: MemstoreError | None) -> dict[str, Any]:
    """What an access line says of the domain error a request was answered with."""
    if error is None:
        return {}
    found: dict[str, Any] = {"reason": error.reason, "error": error.message}
    if isinstance(error, InvalidArgument):
        found["fields"] = [v.field for v in error.violations]
    return found


_AUTH_HEADERS = frozenset({b"authorization", b"x-api-key"})


def _shutting_down() -> Unavailable:
    return Unavailable(
        "the server is shutting down: this call ran past its grace period and was cancelled "
        "with its query; retry it on another server",
        reason="SERVER_SHUTTING_DOWN",
    )


#: The status of a request whose client closed the connection before it was answered.
CLIENT_CLOSED_STATUS = 499


def _client_closed() -> MemstoreError:
    return MemstoreError(
        "the client closed the connection before its request body arrived",
        reason="CLIENT_CLOSED",
    )


def _too_large() -> RequestTooLarge:
    return RequestTooLarge(
        f"the request body is larger than {MAX_BODY_BYTES} bytes", reason="REQUEST_TOO_LARGE"
    )


def _headers(scope: Scope) -> dict[str, str]:
    # Header names arrive lowercased; a repeated header keeps its last value (credentials
    # are read separately, every copy of them: see _credentials).
    return {
        name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", ())
    }


def _credentials(scope: Scope) -> list[tuple[str, str]]:
    # Every copy: two different keys in one request are refused, as over gRPC.
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope.get("headers", ())
        if name in _AUTH_HEADERS
    ]


def _request_id(headers: dict[str, str]) -> str:
    given = headers.get(REQUEST_ID_KEY, "")
    if 0 < len(given) <= _MAX_ID and all(0x21 <= ord(c) <= 0x7E for c in given):
        return given
    return uuid.uuid4().hex


#: A run of percent-escapes in a raw path.
_ESCAPES = re.compile(rb"(?:%[0-9A-Fa-f]{2})+")
#: A "%" not followed by two hex digits: no escape.
_STRAY_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: The escapes a routed path keeps (see routing_path), and what they stand for.
_KEPT = {"%2F": "/", "%25": "%"}
_KEPT_ESCAPE = re.compile("%2[F5]")


def routing_path(scope: Scope) -> str:
    """The path to route by: the raw path decoded, but for "/" and "%" inside a segment,
    which stay "%2F" and "%25" (decoded by `path_value`), and bytes that are not UTF-8,
    which become lone surrogates (refused by the id checks, naming the parameter).

    The server's own decoding (uvicorn's `unquote`) turns "%2F" into a separator, so the
    path of session "x/memory" was the memory route of session "x", and replaces invalid
    UTF-8 with U+FFFD, an id the caller never sent.
    """
    raw = scope.get("raw_path")
    if not raw or b"%" not in raw:
        return str(scope["path"])
    raw = raw.split(b"?", 1)[0]
    # A "%" that begins no escape is itself: kept as "%25", as a decoded one, or it and the
    # decoded text after it could spell an escape ("a%2%46b" was the id "a/b", not "a%2Fb").
    raw = _STRAY_PERCENT.sub(b"%25", raw)
    return _ESCAPES.sub(_decode_escapes, raw).decode("utf-8", "surrogateescape")


def _decode_escapes(run: re.Match[bytes]) -> bytes:
    decoded = bytes.fromhex(run.group().replace(b"%", b"").decode("ascii"))
    # "/" and "%" are ASCII, never inside a UTF-8 sequence: re-escaping them is exact.
    return decoded.replace(b"%", b"%25").replace(b"/", b"%2F")


def path_value(value: str) -> str:
    """A path parameter of a routed path (routing_path) as the caller sent it."""
    if "%" not in value:
        return value
    return _KEPT_ESCAPE.sub(lambda m: _KEPT[m.group()], value)


def _capped(receive: Receive) -> Receive:
    """`receive` that raises RequestTooLarge once the body passes MAX_BODY_BYTES, and
    RequestTimeout once it arrives slower than server/rest/protocol.py allows: a body that
    stopped half-way held its call (and its share of --max-calls-in-flight) for good."""
    seen = 0
    start = asyncio.get_running_loop().time()

    async def capped() -> Message:
        nonlocal seen
        deadline = start + protocol.BODY_SECONDS + seen / protocol.BODY_MIN_RATE
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise protocol.body_timeout() from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise _too_large()
        return message

    return capped

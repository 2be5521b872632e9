"""The ASGI app of Zep's REST API: request ids, auth, the body cap, metrics and access logs.

Every request passes through `RestApp` before routing (the router: server/rest/routing.py):
it resolves the caller's project from the API key (the same Authenticator as gRPC), caps the
body at the gRPC limit, and counts and logs the request. Every answer is JSON, errors
included (`{"message": ...}`, which Zep's 2.x SDKs parse, error_response), unknown routes
(404) and wrong methods (405) too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import Message, Receive, Scope, Send

from server.api.status import http_status
from server.errors import InvalidArgument, MemstoreError, RequestTooLarge, Unavailable
from server.rest import protocol
from server.rest.error_body import error_body
from server.rest.media import ENCODING_REASON
from server.rest.paths import routing_path
from server.serving.auth import Authenticator
from server.serving.limit import CallLimit
from server.serving.log_format import request_id
from server.serving.metrics import LATENCY_BUCKETS, Metrics
from server.serving.observability import REQUEST_ID_KEY

log = logging.getLogger("memstore.access")
#: Where a route (or the refusal before routing) leaves the domain error it answered with.
ERROR_KEY = "memstore.error"
#: Set in a request's scope while it counts against the cap on calls in flight.
_ADMITTED_KEY = "memstore.admitted"
#: Where a layer outside the app that answers a request itself leaves its answer (answer_for).
_ANSWER_KEY = "memstore.answer"
#: Unexpected errors of routes and of answers cut short (routing.py, stream.py).
errors_log = logging.getLogger(__name__)

#: The largest request body accepted: the gRPC receive limit.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Paths every caller may reach without a key: liveness, as Zep serves it.
OPEN_PATHS = frozenset({"/healthz"})
#: The route label of a request refused before it was read whole (RestApp.refused_unread):
#: no path was routed, and the path (when read) is the caller's, an unbounded label.
UNREAD = "unread"

_MAX_ID = 128


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


def answer_for(scope: Scope, response: Response, error: MemstoreError | None = None) -> None:
    """Has RestApp send `response` for this request in place of routing it (no key asked),
    counted and logged as its own answers are, under the route it would have reached: for a
    layer outside the app that answers requests itself (server/rest/cors.py's preflights)."""
    scope[_ANSWER_KEY] = response
    if error is not None:
        scope[ERROR_KEY] = error


def error_response(error: MemstoreError) -> JSONResponse:
    """The JSON answer of a domain error: Zep's `message`, and memstore's reason and fields."""
    response = JSONResponse(error_body(error), status_code=http_status(error))
    if error.reason == ENCODING_REASON:
        # RFC 9110's 415 for a content coding: the codings that would have been read.
        response.headers["Accept-Encoding"] = "identity"
    return response


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
                scope[ERROR_KEY] = _shutting_down()
                await error_response(scope[ERROR_KEY])(scope, receive, send_with_id)
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
            scope[ERROR_KEY] = _too_large()
            return error_response(scope[ERROR_KEY])
        if scope["path"] in OPEN_PATHS:
            return None  # liveness answers under overload too, as gRPC health does
        try:
            self._limit.enter()
            scope[_ADMITTED_KEY] = True
            scope["memstore.project"] = await self._auth.project_for(_credentials(scope))
        except MemstoreError as error:
            scope[ERROR_KEY] = error
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
            elapsed=elapsed, rid=rid, peer=peer, error=scope.get(ERROR_KEY),
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

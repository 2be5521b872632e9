"""Cross-origin calls from browsers (CORS): off unless --http-cors-origin names origins."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import InvalidArgument, MemstoreError
from server.rest.app import answer_for, error_response
from server.serving.observability import REQUEST_ID_KEY

#: What the SDKs' calls send beyond the CORS-safelisted headers: a key, a JSON body, and
#: (zep-cloud's JS SDK, built by Fern) the SDK's and runtime's names and versions, on every
#: call: without them its preflights were refused (a review).
_HEADERS = [
    "authorization",
    "content-type",
    "x-api-key",
    "x-fern-language",
    "x-fern-sdk-name",
    "x-fern-sdk-version",
    "x-fern-runtime",
    "x-fern-runtime-version",
]
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
#: The header a refused preflight names, by the word Starlette reports it with.
_FAILED = {
    "origin": "Origin",
    "method": "Access-Control-Request-Method",
    "headers": "Access-Control-Request-Headers",
    "private-network": "Access-Control-Request-Private-Network",
}


class _Cors(CORSMiddleware):
    """Starlette's CORS middleware, whose preflights the app answers, counted and logged as
    any request (they never reached it: tests/rest/test_cors.py), and whose refused preflight
    answers memstore's JSON 400."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's own test of a preflight (CORSMiddleware.__call__), which it answers.
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                answer_for(scope, *self._preflight(headers))
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def preflight_response(self, request_headers: Headers) -> Response:
        return self._preflight(request_headers)[0]

    def _preflight(self, request_headers: Headers) -> tuple[Response, MemstoreError | None]:
        """Starlette's answer to a preflight; refused, memstore's JSON 400 and its error."""
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer, None
        words = bytes(answer.body).decode().removeprefix("Disallowed CORS ").split(", ")
        error = InvalidArgument.field(
            _FAILED.get(words[0], "Origin"),
            f"this preflight's {', '.join(words)} not allowed (see --http-cors-origin)",
            reason="CORS_NOT_ALLOWED",
        )
        refused = error_response(error)
        refused.headers.update({"Vary": "Origin"})
        return refused, error


def with_cors(app: ASGIApp, origins: tuple[str, ...]) -> ASGIApp:
    """`app` answering browsers' preflights and marking answers for `origins` (`*`: any);
    `app` itself when there are none. Outside the app, so that the errors a browser's call
    meets carry the headers too, so its script can read them; a preflight (which carries no
    key) is handed to the app already answered (answer_for), so no key is asked of it."""
    if not origins:
        return app
    return _Cors(
        app,
        allow_origins=list(origins),
        allow_methods=_METHODS,
        allow_headers=_HEADERS,
        expose_headers=[REQUEST_ID_KEY],
        max_age=600,
    )

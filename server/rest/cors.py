"""Cross-origin calls from browsers (CORS): off unless --http-cors-origin names origins."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from server.errors import InvalidArgument
from server.rest.app import error_response
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
    """Starlette's CORS middleware, whose refused preflight answers memstore's JSON 400."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        words = bytes(answer.body).decode().removeprefix("Disallowed CORS ").split(", ")
        refused = error_response(
            InvalidArgument.field(
                _FAILED.get(words[0], "Origin"),
                f"this preflight's {', '.join(words)} not allowed (see --http-cors-origin)",
                reason="CORS_NOT_ALLOWED",
            )
        )
        refused.headers.update({"Vary": "Origin"})
        return refused


def with_cors(app: ASGIApp, origins: tuple[str, ...]) -> ASGIApp:
    """`app` answering browsers' preflights and marking answers for `origins` (`*`: any);
    `app` itself when there are none. Outside the app, so that a preflight (which carries no
    key) is answered before the key is checked; the errors a browser's call meets carry the
    headers too, so its script can read them."""
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

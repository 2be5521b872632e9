"""The path a REST request is routed by, and its parameters as the caller sent them: "/" and
"%" inside a segment kept escaped, bytes that are not UTF-8 kept apart."""

from __future__ import annotations

import re

from starlette.types import Scope

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

"""What a REST request body may be sent as: JSON, in UTF-8, not compressed.

Zep's SDKs send `Content-Type: application/json` (httpx's `json=`). A body without the
header is read as JSON too: scripts send one that way (`requests.post(url, data=text)`,
httpx's `content=`), and nothing else is meant by it. A body declared as anything else was
read as JSON all the same, so a form or text body a caller did not mean as JSON was
accepted; a compressed one was reported as "not valid UTF-8" (docs/zep-compat.md).
"""

from __future__ import annotations

from starlette.datastructures import Headers

from server.errors import UnsupportedMediaType

#: How to send JSON, for the errors: curl's `-d` sends a form (x-www-form-urlencoded).
_HOW = (
    "send the body as JSON with Content-Type: application/json (curl: --json '{...}', "
    "or -H 'Content-Type: application/json' with -d, which alone sends a form)"
)

#: The reason of a body in a content coding memstore does not decode.
ENCODING_REASON = "UNSUPPORTED_CONTENT_ENCODING"
#: The length of "application/+json": a suffixed type needs a name before its "+json".
_BARE_SUFFIX = len("application/+json")
#: The labels of UTF-8 in the WHATWG Encoding Standard, which browsers and many HTTP clients
#: follow (https://encoding.spec.whatwg.org/#names-and-labels): `charset=utf8` is UTF-8 too.
UTF8_LABELS = frozenset(
    {"unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "utf-8", "utf8", "x-unicode20utf8"}
)


def check_json_body(headers: Headers) -> None:
    """Refuses a body declared as other than JSON in UTF-8, or compressed.

    Accepted: no Content-Type (or an empty one), `application/json` and any
    `application/*+json`, with parameters, but a charset that is not one of UTF-8's labels
    (`UTF8_LABELS`, in any case, quoted or not).

    Raises:
        UnsupportedMediaType: naming `Content-Type` or `Content-Encoding` (HTTP 415).
    """
    encodings = headers.getlist("content-encoding")
    if encodings:
        _check_encoding(encodings)
    types = headers.getlist("content-type")
    if not types:
        return
    if len(types) > 1:
        raise UnsupportedMediaType.field(
            "Content-Type", f"is given {len(types)} times; send it once. {_HOW}"
        )
    _check_type(types[0])


def _check_type(header: str) -> None:
    media, *params = header.split(";")
    media = media.strip().lower()
    if not media and not params:
        return  # an empty header says no more than a missing one
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json") and len(media) > _BARE_SUFFIX
    ):
        raise UnsupportedMediaType.field(
            "Content-Type",
            f"is {header[:100]!r}: memstore reads request bodies as JSON only; {_HOW}",
        )
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() != "charset":
            continue
        charset = value.strip().strip('"').lower()
        if charset not in UTF8_LABELS:
            raise UnsupportedMediaType.field(
                "Content-Type",
                f"declares charset {charset[:40]!r}: JSON bodies are read as UTF-8 only; "
                "encode the body as UTF-8 and send charset=utf-8 or no charset",
            )


def _check_encoding(encodings: list[str]) -> None:
    codings = [c.strip().lower() for value in encodings for c in value.split(",")]
    others = [c for c in codings if c not in ("", "identity")]
    if others:
        raise UnsupportedMediaType.field(
            "Content-Encoding",
            f"is {', '.join(others)[:100]!r}: memstore does not decode compressed request "
            "bodies; send the JSON uncompressed, without Content-Encoding",
            reason=ENCODING_REASON,
        )

"""JSON answers rendered as JSONResponse renders them, built and rendered in a thread when large.

json.dumps renders a value in one call into C that holds the GIL throughout: a GetMemory of
1,000 messages of 800 metadata keys (9 MiB of JSON) took a tenth of a second, and the checks
and conversions before it as long again, all on the event loop both ports share
(tests/reliability/test_loop_stalls.py). Past OFF_LOOP_BYTES (server/off_loop.py) an answer is
built in a thread and rendered one list item at a time, each a short call: byte for byte what
one call renders, the GIL given up to the loop between items (as serving/wire.py serializes a
large protobuf answer). A small answer stays on the loop, cheaper than the hop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from server import off_loop

#: How deep into an answer's objects and lists it is rendered in pieces: its top-level object
#: (or list), the lists it holds, and their items whole (a row, at most ~1 MiB).
_PIECE_DEPTH = 2


def json_bytes(value: Any) -> bytes:
    """`value` as JSONResponse renders it (compact, UTF-8, no NaN)."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


async def json_answer(size: int, build: Callable[[], Any]) -> Response:
    """The JSON answer of `build()` (which may raise a domain error: its refusal), in a thread
    and in pieces when `size` (answer_size.text_at_least or metadata_at_least of its rows)
    reaches OFF_LOOP_BYTES."""
    body = await off_loop.run(size, _rendered, build, size)
    return Response(body, media_type="application/json")


def _rendered(build: Callable[[], Any], size: int) -> bytes:
    value = build()
    if size < off_loop.OFF_LOOP_BYTES:
        return json_bytes(value)
    return _in_pieces(value, _PIECE_DEPTH)


def _in_pieces(value: Any, depth: int) -> bytes:
    if depth and isinstance(value, list):
        return b"[" + b",".join(_in_pieces(item, depth - 1) for item in value) + b"]"
    if depth and isinstance(value, dict):
        fields = (json_bytes(k) + b":" + _in_pieces(v, depth - 1) for k, v in value.items())
        return b"{" + b",".join(fields) + b"}"
    return json_bytes(value)

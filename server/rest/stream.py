"""JSON arrays answered while their items are read (JsonArrayStream), in chunks that no send
copies megabytes of on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import MemstoreError
from server.rest.app import ERROR_KEY, errors_log


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
            self._scope[ERROR_KEY] = error
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

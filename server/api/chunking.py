"""The one chunker behind every server stream: prefetched keyset batches, byte-bounded chunks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message as ProtoMessage

from server.domain import Page, WireRows
from server.errors import MemstoreError

#: A chunk stops growing before it passes this many serialized bytes: far below gRPC's 4 MiB
#: default message limit, yet large enough that the per-message cost is spread over many rows.
MAX_CHUNK_BYTES = 256 * 1024


class ChunkMessage(Protocol):
    """What the chunker needs of a streamed response: a token that resumes after it."""

    next_page_token: str


class Entries(Protocol):
    """What the chunker needs of a response's repeated field: taking back its last entry."""

    def __delitem__(self, index: int, /) -> None: ...


Row = TypeVar("Row")
Key = TypeVar("Key")
Chunk = TypeVar("Chunk", bound=ChunkMessage)
Field = TypeVar("Field", bound=Entries)


async def chunks(
    *,
    fetch: Callable[[Key | None, int], Awaitable[Page[Row]]],
    key: Callable[[Row], Key],
    new_chunk: Callable[[], Chunk],
    entries: Callable[[Chunk], Field],
    add: Callable[[Field, Row], ProtoMessage],
    token: Callable[[Key], str],
    chunk_size: int,
    after: Key | None,
) -> AsyncIterator[Chunk]:
    """Streams the rows after `after` as chunks of at most `chunk_size` rows and MAX_CHUNK_BYTES.

    Args:
        fetch: reads one keyset batch of at most `limit` rows strictly after a key.
        key: the keyset position of a row.
        new_chunk: an empty response message.
        entries: the response's repeated field the rows go into.
        add: appends a row's proto to that field and returns it; built in place, no row's
            proto is copied into the chunk afterwards.
        token: the page token that resumes right after a key.
        chunk_size: the most rows a chunk holds.
        after: where to start; None for the beginning.

    Yields:
        Chunks in key order. Each but the last carries the token that resumes after its last
        row; the last carries none. A chunk holds at least one row, even one past the cap.

    Raises:
        MemstoreError: what `fetch` raises (e.g. Unavailable).
    """
    meter = _Meter(chunk_size)
    chunk = new_chunk()
    field = entries(chunk)
    count = size = 0
    last: Row | None = None
    async with contextlib.aclosing(_batches(fetch, key, after, meter)) as batches:
        async for batch in batches:
            batch_bytes = 0
            # The export's hot path, run once per row: locals only, no call it can do without.
            for row in batch:
                body = add(field, row).ByteSize()
                # Bytes the entry takes in the chunk: tag, length varint, body.
                entry_size = 1 + (body.bit_length() + 6) // 7 + body if body else 2
                batch_bytes += entry_size
                count += 1
                if (count > chunk_size or size + entry_size > MAX_CHUNK_BYTES) and count > 1:
                    # This row starts the next chunk: the current one is complete and, since
                    # a row follows it, not the last; its token resumes right after `last`.
                    del field[-1]
                    assert last is not None
                    chunk.next_page_token = token(key(last))
                    yield chunk
                    chunk = new_chunk()
                    field = entries(chunk)
                    add(field, row)
                    count, size = 1, 0
                size += entry_size
                last = row
            meter.add(batch_bytes, len(batch))
    if count:
        yield chunk


class WireChunk:
    """A streamed response already serialized: its repeated field's entries, then its token.

    The server's response serializer sends `data` as it is; `rows` is how many entries it
    holds (for the stream metrics, which cannot count them without parsing).
    """

    __slots__ = ("data", "rows")

    def __init__(self, data: bytes, rows: int) -> None:
        self.data = data
        self.rows = rows


def _token_field(token: str) -> bytes:
    # next_page_token is field 2 of every chunk message: tag, length, the (ASCII) token.
    data = token.encode()
    return b"\x12" + _varint(len(data)) + data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 127:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


async def wire_chunks(
    *,
    fetch: Callable[[Key | None, int], Awaitable[Page[WireRows[Key]]]],
    token: Callable[[Key], str],
    chunk_size: int,
    after: Key | None,
) -> AsyncIterator[WireChunk]:
    """Streams the rows after `after` as serialized chunks, from rows PostgreSQL encoded.

    The bytes counterpart of `chunks`, for a chunk message whose repeated field is field 1
    and whose next_page_token is field 2, cut by the same rule (at most `chunk_size` rows and
    MAX_CHUNK_BYTES, at least one row). Per row, Python only adds its size: no object is
    built for it.

    Args:
        fetch: reads one keyset batch of at most `limit` rows strictly after a key, as one
            WireRows (none when no row follows).
        token: the page token that resumes right after a key.
        chunk_size: the most rows a chunk holds.
        after: where to start; None for the beginning.

    Yields:
        Chunks in key order, each but the last with the token that resumes after its last
        row; the last carries none.

    Raises:
        MemstoreError: what `fetch` raises (e.g. Unavailable).
    """
    meter = _Meter(chunk_size)
    pieces: list[bytes] = []  # the current chunk's entries from earlier batches
    count = size = 0
    previous: WireRows[Key] | None = None  # the batch before this one (its last row's key)
    async with contextlib.aclosing(_batches(fetch, _last_key, after, meter)) as batches:
        async for batch in batches:
            for rows in batch:
                data, start, offset = rows.entries, 0, 0
                # The export's hot path, run once per row: integers only.
                for i, entry_size in enumerate(rows.sizes):
                    if (count >= chunk_size or size + entry_size > MAX_CHUNK_BYTES) and count:
                        # Row i starts the next chunk; the current one ends at the row before.
                        ended = rows.key(i - 1) if i else _last_key(previous)
                        pieces.append(data[start:offset])
                        body = b"".join(pieces) + _token_field(token(ended))
                        yield WireChunk(body, count)
                        pieces, start, count, size = [], offset, 0, 0
                    count += 1
                    size += entry_size
                    offset += entry_size
                pieces.append(data[start:])
                previous = rows
                meter.add(len(data), len(rows.sizes))
    if count:
        yield WireChunk(b"".join(pieces), count)


def _last_key(rows: WireRows[Key] | None) -> Key:
    assert rows is not None  # a chunk ends at a batch's start only after an earlier batch
    return rows.key(len(rows.sizes) - 1)


async def _batches(
    fetch: Callable[[Key | None, int], Awaitable[Page[Row]]],
    key: Callable[[Row], Key],
    after: Key | None,
    meter: _Meter,
) -> AsyncGenerator[list[Row], None]:
    # Keyset batches: a pooled connection is held only while one batch is read, never while
    # the caller is slow to take chunks. The next batch is read while this one is turned
    # into protos, so PostgreSQL's work overlaps Python's; memory holds two batches.
    pending: asyncio.Future[Page[Row]] | None = asyncio.ensure_future(
        fetch(after, meter.batch_limit())
    )
    try:
        while pending is not None:
            page = await pending
            pending = None
            if page.has_more and page.items:
                following = fetch(key(page.items[-1]), meter.batch_limit())
                pending = asyncio.ensure_future(following)
            yield page.items
    finally:
        # The caller went away (or failed) with a batch still pending: cancel it, and
        # collect its outcome either way so no "exception never retrieved" is logged.
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, MemstoreError):
                await pending


class _Meter:
    """Average serialized size of the rows streamed so far, to size the next batch."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.bytes = 0
        self.rows = 0

    def add(self, size: int, rows: int) -> None:
        self.bytes += size
        self.rows += rows

    def batch_limit(self) -> int:
        # Large rows make a chunk hold fewer of them; read about one chunk's bytes per batch
        # so that memory stays near one chunk whatever the rows weigh.
        average = max(1, self.bytes // max(1, self.rows))
        return max(1, min(self.chunk_size, MAX_CHUNK_BYTES // average + 1))

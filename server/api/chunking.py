"""The one chunker behind every server stream: prefetched keyset batches, byte-bounded chunks."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf.message import Message as ProtoMessage

from server.domain import Page, WireRows, WireRun
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


T = TypeVar("T")
Row = TypeVar("Row")
Raw = TypeVar("Raw")
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
    return b"\x12" + varint(len(data)) + data


def varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 127:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


async def wire_chunks(
    *,
    fetch: Callable[[Key | None, int], Awaitable[WireRun[Key] | None]],
    fetch_rows: Callable[[Key | None, int], Awaitable[Page[WireRows[Key]]]],
    token: Callable[[Key], str],
    chunk_size: int,
    after: Key | None,
) -> AsyncIterator[WireChunk]:
    """Streams the rows after `after` as serialized chunks, each encoded whole by PostgreSQL.

    The bytes counterpart of `chunks`, for a chunk message whose repeated field is field 1
    and whose next_page_token is field 2, cut by the same rule (at most `chunk_size` rows and
    MAX_CHUNK_BYTES, at least one row). One statement per chunk hands over its entries as one
    value: Python does nothing per row. Only a run past the byte cap is read again row by row
    (`fetch_rows`, each entry's size and key) to be cut where the rule says.

    Args:
        fetch: the next at most `limit` rows strictly after a key as one WireRun, or None
            when no row follows.
        fetch_rows: the same rows as WireRows (sizes and keys), for a run to cut.
        token: the page token that resumes right after a key.
        chunk_size: the most rows a chunk holds.
        after: where to start; None for the beginning.

    Yields:
        Chunks in key order, each but the last with the token that resumes after its last
        row; the last carries none. A chunk is sent once the next one is read (or known not
        to exist), so that it carries a token only when a row follows it.

    Raises:
        MemstoreError: what `fetch` or `fetch_rows` raises (e.g. Unavailable).
    """

    meter = _Meter(chunk_size)

    async def run_after(key: Key | None) -> tuple[WireRun[Key] | None, bool]:
        # (the chunk after `key`, whether rows may follow it). Each read asks for about the
        # rows that fit in the chunk's bytes left, by the rows' average so far: a read of
        # chunk_size rows of 60 KB each (60 MB) cut to four, then read again from the fifth,
        # made an export of large users read each row ~250 times and the server's memory
        # rise by hundreds of MB. A chunk may join several reads.
        runs: list[WireRun[Key]] = []
        rows = size = 0
        last = key
        while rows < chunk_size:
            limit = meter.run_limit(chunk_size - rows, MAX_CHUNK_BYTES - size)
            run = await fetch(last, limit)
            if run is None:
                return _joined(runs), False
            meter.add(len(run.entries), run.rows)
            if size + len(run.entries) > MAX_CHUNK_BYTES:
                # Past the cap: its rows one by one, to cut where the rule says.
                page = await fetch_rows(last, limit)
                if page.items:
                    cut = _cut(page.items[0], MAX_CHUNK_BYTES - size, first=not rows)
                    if cut is not None:
                        runs.append(cut)
                return _joined(runs), True
            runs.append(run)
            rows, size, last = rows + run.rows, size + len(run.entries), run.last
            if run.rows < limit:
                return _joined(runs), False  # the table ends here
        return _joined(runs), True

    held: WireRun[Key] | None = None  # read, not yet sent: does a row follow it?
    pending: asyncio.Future[tuple[WireRun[Key] | None, bool]] | None
    pending = asyncio.ensure_future(run_after(after))
    try:
        while pending is not None:
            run, more = await pending
            pending = None
            if run is None:
                break
            if more:
                # Read the next chunk while this one's predecessor goes out.
                pending = await _read_ahead(run_after(run.last))
            if held is not None:
                yield WireChunk(held.entries + _token_field(token(held.last)), held.rows)
            held = run
        if held is not None:
            yield WireChunk(held.entries, held.rows)
    finally:
        # The caller went away (or failed) with a chunk still pending: cancel it, and
        # collect its outcome either way so no "exception never retrieved" is logged.
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, MemstoreError):
                await pending


async def wire_row_chunks(
    *,
    fetch: Callable[[Key | None, int], Awaitable[Page[Raw]]],
    key: Callable[[Raw], Key],
    encode: Callable[[Raw], Awaitable[WireRows[Key]]],
    token: Callable[[Key], str],
    chunk_size: int,
    after: Key | None,
    batch_chunks: int = 1,
) -> AsyncIterator[WireChunk]:
    """Streams the rows after `after` as serialized chunks cut from batches the server encodes.

    The bytes counterpart of `chunks` for batches the server encodes itself (ExportMessages,
    server/api/message_wire.py): the same rule (at most `chunk_size` rows and
    MAX_CHUNK_BYTES, at least one row), the same cuts whatever the batches' sizes (a chunk
    may span batches), the same prefetching and batch sizing. Python works per chunk, not per
    row: each cut is a bisection of the batch's running entry sizes. A batch is read as it
    comes (`fetch`) and encoded once the next one is asked for (`encode`), so that
    PostgreSQL reads the next batch while this process encodes and sends the last.

    Args:
        fetch: one keyset batch of at most `limit` rows strictly after a key, as a page of
            at most one batch as read; has_more when rows may follow it.
        key: the keyset position of a batch's last row, as read.
        encode: a batch as read into its WireRows (the same rows: its last row's key is
            `key`'s).
        token: the page token that resumes right after a key.
        chunk_size: the most rows a chunk holds.
        after: where to start; None for the beginning.
        batch_chunks: about how many chunks' worth of rows a batch holds (at most
            `batch_chunks * chunk_size` rows): fewer, larger batches spread each one's fixed
            cost (a statement, its encoding's array calls) over more rows.

    Yields:
        Chunks in key order. Each but the last carries the token that resumes after its last
        row; the last carries none.

    Raises:
        MemstoreError: what `fetch` raises (e.g. Unavailable).
    """
    meter = _Meter(chunk_size, batch_chunks)
    parts: list[memoryview] = []
    count = size = 0
    # The chunk's last row so far: its batch and index, for its key when the chunk is sent.
    last: tuple[WireRows[Key], int] | None = None

    async with contextlib.aclosing(_batches(fetch, key, after, meter)) as batches:
        async for page in batches:
            for read in page:
                rows = await encode(read)
                ends = list(itertools.accumulate(rows.sizes, initial=0))
                total = len(rows.sizes)
                data = memoryview(rows.entries)
                start = 0
                while start < total:
                    # Rows [start, stop) join the chunk: as many as the row count and byte cap
                    # allow, and the first row of an empty chunk whatever its size.
                    most = min(total, start + chunk_size - count)
                    room = ends[start] + MAX_CHUNK_BYTES - size  # below ends[start] past the cap
                    stop = max(start, bisect.bisect_right(ends, room, start, most + 1) - 1)
                    if stop == start and not count:
                        stop = start + 1
                    if stop > start:
                        parts.append(data[ends[start] : ends[stop]])
                        count += stop - start
                        size += ends[stop] - ends[start]
                        last = (rows, stop - 1)
                    if stop < total:
                        # Row `stop` starts the next chunk: this one is complete and, since a
                        # row follows it, not the last; its token resumes right after `last`.
                        assert last is not None
                        held, index = last
                        yield WireChunk(
                            b"".join(parts) + _token_field(token(held.key(index))), count
                        )
                        parts.clear()
                        count = size = 0
                    start = stop
                meter.add(ends[-1], total)
    if count:
        yield WireChunk(b"".join(parts), count)


def _cut(rows: WireRows[Key], room: int, *, first: bool) -> WireRun[Key] | None:
    # The longest leading run of entries within `room` bytes (at least one if `first`: a
    # chunk holds one row whatever its size); None when not even one fits.
    count = size = 0
    for entry_size in rows.sizes:
        if size + entry_size > room and (count or not first):
            break
        count += 1
        size += entry_size
    return WireRun(rows.entries[:size], count, rows.key(count - 1)) if count else None


def _joined(runs: list[WireRun[Key]]) -> WireRun[Key] | None:
    # Consecutive runs as one; None for none.
    if len(runs) <= 1:
        return runs[0] if runs else None
    return WireRun(b"".join(r.entries for r in runs), sum(r.rows for r in runs), runs[-1].last)


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
                pending = await _read_ahead(fetch(key(page.items[-1]), meter.batch_limit()))
            yield page.items
    finally:
        # The caller went away (or failed) with a batch still pending: cancel it, and
        # collect its outcome either way so no "exception never retrieved" is logged.
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, MemstoreError):
                await pending


async def _read_ahead(read: Awaitable[T]) -> asyncio.Future[T]:
    # `read` as a task whose first step has run, so its statement is on its way before the
    # caller works on what it has: a task runs only once the loop is free, and without this
    # turn the next read went out only once the stream next suspended, at gRPC's send, and
    # PostgreSQL's read of the next batch and the work on this one took turns (ExportMessages
    # and ListUsersChunked 1.2-1.5x slower: docs/performance.md, "The next batch read while
    # this one is encoded", "The next chunk read while this one is sent").
    task = asyncio.ensure_future(read)
    try:
        await asyncio.sleep(0)
    except BaseException:
        task.cancel()  # the caller was cancelled in that turn: nothing will await the read
        raise
    return task


#: The most rows a stream reads at once before it has measured any: 64 of the largest rows
#: (a user or session of 64 KiB of metadata) are 4 MiB, where chunk_size of them were 64 MB.
FIRST_READ_ROWS = 64


class _Meter:
    """Average serialized size of the rows streamed so far, to size the next batch (of about
    `chunks` chunks' worth of rows)."""

    def __init__(self, chunk_size: int, chunks: int = 1) -> None:
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.bytes = 0
        self.rows = 0

    def add(self, size: int, rows: int) -> None:
        self.bytes += size
        self.rows += rows

    def run_limit(self, rows: int, room: int) -> int:
        """How many rows to read for a chunk that takes `rows` more and has `room` bytes
        left: about as many as fit by the average so far (one more, so that a read under the
        room says the chunk is full only when it is), at most `rows`. Until rows are
        measured, FIRST_READ_ROWS at most: rows of unknown weight may be large."""
        if not self.rows:
            return max(1, min(rows, FIRST_READ_ROWS))
        average = max(1, self.bytes // self.rows)
        return max(1, min(rows, room // average + 1))

    def batch_limit(self) -> int:
        # Large rows make a chunk hold fewer of them; read about `chunks` chunks' bytes per
        # batch so that memory stays near that whatever the rows weigh.
        if not self.rows:
            # Until rows are measured, FIRST_READ_ROWS at most, as for run_limit: the two
            # batches read before any is measured were chunk_size rows each, and sessions of
            # 60 KB of metadata grew the server by ~400 MB in one ExportSessions.
            return max(1, min(self.chunk_size, FIRST_READ_ROWS))
        average = max(1, self.bytes // self.rows)
        return max(
            1, min(self.chunks * self.chunk_size, self.chunks * MAX_CHUNK_BYTES // average + 1)
        )

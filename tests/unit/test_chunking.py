"""The one chunker, over an in-memory keyset: cuts, tokens, prefetch and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memstore.v1 import resources_pb2
from memstore.v1 import user_service_pb2 as pb
from server.api.chunking import (
    FIRST_READ_ROWS,
    MAX_CHUNK_BYTES,
    chunks,
    wire_chunks,
    wire_row_chunks,
)
from server.domain import Page, WireRows, WireRun
from server.errors import Unavailable

Row = tuple[int, str]


class Table:
    """Rows keyed by their first item; records every batch read."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.reads: list[tuple[int | None, int]] = []
        self.gate: asyncio.Event | None = None
        self.waiting: list[asyncio.Task[Any]] = []

    async def fetch(self, after: int | None, limit: int) -> Page[Row]:
        self.reads.append((after, limit))
        if self.gate is not None and len(self.reads) > 1:
            task = asyncio.current_task()
            assert task is not None
            self.waiting.append(task)
            await self.gate.wait()
        await asyncio.sleep(0)
        found = [r for r in self.rows if after is None or r[0] > after]
        return Page(found[:limit], has_more=len(found) > limit)


def _add(users: Any, row: Row) -> resources_pb2.User:
    user: resources_pb2.User = users.add(user_id=f"u{row[0]}", email=row[1])
    return user


def _stream(table: Table, chunk_size: int, after: int | None = None) -> AsyncIterator[Any]:
    return chunks(
        fetch=table.fetch,
        key=lambda row: row[0],
        new_chunk=pb.ListUsersChunkedResponse,
        entries=lambda chunk: chunk.users,
        add=_add,
        token=lambda key: f"after-{key}",
        chunk_size=chunk_size,
        after=after,
    )


async def _all(table: Table, chunk_size: int, after: int | None = None) -> list[Any]:
    return [c async for c in _stream(table, chunk_size, after)]


def _ids(chunk: pb.ListUsersChunkedResponse) -> list[str]:
    return [u.user_id for u in chunk.users]


async def test_chunks_hold_chunk_size_rows_and_resume_after_the_last() -> None:
    table = Table([(i, "") for i in range(25)])
    got = await _all(table, 10)
    assert [len(c.users) for c in got] == [10, 10, 5]
    assert [c.next_page_token for c in got] == ["after-9", "after-19", ""]
    assert [u for c in got for u in _ids(c)] == [f"u{i}" for i in range(25)]
    # An exact multiple ends on a full chunk with no token, and no empty chunk follows.
    assert [c.next_page_token for c in await _all(Table(table.rows[:20]), 10)] == ["after-9", ""]
    assert await _all(Table([]), 10) == []
    assert [_ids(c) for c in await _all(table, 10, after=21)] == [["u22", "u23", "u24"]]


async def test_chunks_are_cut_by_bytes_and_a_huge_row_travels_alone() -> None:
    rows = [(i, "x" * 60_000) for i in range(10)] + [(10, "y" * (MAX_CHUNK_BYTES + 1))]
    rows += [(11, "z")]
    got = await _all(Table(rows), 1000)
    sizes = [c.ByteSize() - len(c.next_page_token) - 2 for c in got]
    assert [len(c.users) for c in got] == [4, 4, 2, 1, 1]
    assert all(s <= MAX_CHUNK_BYTES for s in sizes[:3])
    # Each full chunk was cut only because the next row would not fit.
    assert all(s + 60_000 > MAX_CHUNK_BYTES for s in sizes[:2])
    assert [c.next_page_token for c in got] == ["after-3", "after-7", "after-9", "after-10", ""]


async def test_the_next_batch_is_read_while_this_one_is_sent() -> None:
    table = Table([(i, "") for i in range(30)])
    stream = _stream(table, 10)
    first = await anext(stream)
    assert _ids(first)[-1] == "u9"
    # A full chunk leaves when the next row is known; the batch after that one is already
    # being read (its read begun before the rows of the one before it were worked on), to be
    # read while this chunk is sent. No more than that one: two batches held at most.
    assert len(table.reads) == 3
    await asyncio.sleep(0)
    assert len(table.reads) == 3
    rest = [c async for c in stream]
    assert [len(c.users) for c in rest] == [10, 10]
    assert table.reads == [(None, 10), (9, 10), (19, 10)]


async def test_batches_shrink_to_about_one_chunk_of_bytes() -> None:
    table = Table([(i, "x" * 20_000) for i in range(200)])
    got = await _all(table, 20)
    assert {len(c.users) for c in got[:-1]} == {13}
    assert sum(len(c.users) for c in got) == 200
    # The first two batches are asked for before any row is measured (chunk_size rows, under
    # FIRST_READ_ROWS here); from then on a batch holds about one chunk's bytes (13 rows),
    # not chunk_size rows.
    limits = [limit for _, limit in table.reads]
    assert limits[:2] == [20, 20]
    assert set(limits[2:]) == {14}, limits


async def test_batches_read_before_any_row_is_measured_hold_at_most_first_read_rows() -> None:
    # ExportSessions over sessions of 60 KB of metadata read its first two batches at
    # chunk_size (1000) rows each, asked for before any row was measured: the server grew by
    # ~400 MB (docs/reliability.md, "ExportSessions read 1,000 sessions at a time"). Both
    # now hold FIRST_READ_ROWS at most, and the batches after them about one chunk's bytes.
    table = Table([(i, "x" * 60_000) for i in range(300)])
    got = await _all(table, 1000)
    assert sum(len(c.users) for c in got) == 300
    limits = [limit for _, limit in table.reads]
    assert limits[:2] == [FIRST_READ_ROWS, FIRST_READ_ROWS]
    assert set(limits[2:]) == {MAX_CHUNK_BYTES // 60_010 + 1}, limits


async def test_closing_the_stream_cancels_and_collects_the_pending_batch() -> None:
    # Rows of 100 KB: the first chunk is cut by bytes inside the first batch.
    table = Table([(i, "x" * 100_000) for i in range(30)])
    table.gate = asyncio.Event()
    stream = _stream(table, 10)
    assert len((await anext(stream)).users) == 2
    await asyncio.sleep(0)
    assert len(table.waiting) == 1
    await stream.aclose()  # type: ignore[attr-defined]
    pending = table.waiting[0]
    assert pending.done() and pending.cancelled()


async def test_a_failed_batch_ends_the_stream_with_its_error() -> None:
    table = Table([(i, "") for i in range(30)])
    fetch = table.fetch

    async def failing(after: int | None, limit: int) -> Page[Row]:
        if after is not None:
            raise Unavailable("database unreachable")
        return await fetch(after, limit)

    table.fetch = failing  # type: ignore[method-assign]
    stream = _stream(table, 10)
    with pytest.raises(Unavailable):
        async for _ in stream:
            pass


def _wire_fetch(table: Table, short: list[int]) -> Any:
    """Table's batches as WireRows of serialized `users` entries (what message_wire makes);
    a batch is cut short to the next of `short` rows, if any, so chunks span batches."""

    async def fetch(after: int | None, limit: int) -> Page[WireRows[int]]:
        page = await table.fetch(after, limit)
        rows = page.items[: short.pop(0)] if short and page.items else page.items
        if not rows:
            return Page([], has_more=False)
        entries = [
            pb.ListUsersChunkedResponse(
                users=[_add(pb.ListUsersChunkedResponse().users, r)]
            ).SerializeToString()
            for r in rows
        ]
        keys = [r[0] for r in rows]
        wire = WireRows(b"".join(entries), [len(e) for e in entries], keys.__getitem__)
        return Page([wire], has_more=page.has_more or len(rows) < len(page.items))

    return fetch


def _wire_key(rows: WireRows[int]) -> int:
    return rows.key(len(rows.sizes) - 1)


async def _as_read(rows: WireRows[int]) -> WireRows[int]:
    return rows  # _wire_fetch's batches come encoded


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(
        st.sampled_from([0, 1, 100, 60_000, 130_000, MAX_CHUNK_BYTES - 8, MAX_CHUNK_BYTES + 1]),
        max_size=40,
    ),
    chunk_size=st.integers(min_value=1, max_value=12),
    short=st.lists(st.integers(min_value=1, max_value=5), max_size=8),
)
async def test_wire_row_chunks_are_the_object_chunks_bytes(
    sizes: list[int], chunk_size: int, short: list[int]
) -> None:
    # The same rows through `chunks` (protos) and `wire_row_chunks` (encoded batches, some
    # cut short): the same chunks, byte for byte, tokens included.
    rows = [(i, "x" * size) for i, size in enumerate(sizes)]
    expected = [c.SerializeToString() for c in await _all(Table(rows), chunk_size)]
    got = [
        c
        async for c in wire_row_chunks(
            key=_wire_key,
            encode=_as_read,
            fetch=_wire_fetch(Table(rows), list(short)),
            token=lambda key: f"after-{key}",
            chunk_size=chunk_size,
            after=None,
        )
    ]
    assert [c.data for c in got] == expected
    assert [c.rows for c in got] == [
        len(pb.ListUsersChunkedResponse.FromString(c).users) for c in expected
    ]


async def test_wire_row_batches_hold_about_batch_chunks_chunks_of_bytes() -> None:
    table = Table([(i, "x" * 20_000) for i in range(200)])
    got = [
        c
        async for c in wire_row_chunks(
            key=_wire_key,
            encode=_as_read,
            fetch=_wire_fetch(table, []),
            token=lambda key: f"after-{key}",
            chunk_size=20,
            after=None,
            batch_chunks=4,
        )
    ]
    assert {c.rows for c in got[:-1]} == {13}
    assert sum(c.rows for c in got) == 200
    # The first two batches are asked for before any row is measured: chunk_size rows (under
    # FIRST_READ_ROWS here), as `chunks` reads them; from then on about four chunks' bytes
    # (13 rows each), at most 4 * chunk_size rows.
    limits = [limit for _, limit in table.reads]
    assert limits[:2] == [20, 20]
    assert set(limits[2:]) == {53}, limits


async def test_the_next_batch_is_asked_for_before_this_one_is_encoded() -> None:
    # PostgreSQL reads batch N+1 while the server encodes and sends batch N: its statement is
    # sent (the fetch has begun and waits on the database) before N is encoded. Without
    # this, a batch's encoding and its successor's read took turns (ExportMessages 1.4x
    # slower: docs/performance.md, "The next batch read while this one is encoded").
    table = Table([(i, "x") for i in range(50)])
    events: list[str] = []
    fetch = _wire_fetch(table, [])

    async def recorded_fetch(after: int | None, limit: int) -> Page[WireRows[int]]:
        events.append(f"read after {after}")
        return await fetch(after, limit)  # waits on the table, as on the database

    async def recorded_encode(rows: WireRows[int]) -> WireRows[int]:
        events.append(f"encode up to {_wire_key(rows)}")
        return rows

    got = [
        c
        async for c in wire_row_chunks(
            fetch=recorded_fetch,
            key=_wire_key,
            encode=recorded_encode,
            token=lambda key: f"after-{key}",
            chunk_size=10,
            after=None,
        )
    ]
    assert sum(c.rows for c in got) == 50
    assert events == [
        "read after None",
        "read after 9",
        "encode up to 9",
        "read after 19",
        "encode up to 19",
        "read after 29",
        "encode up to 29",
        "read after 39",
        "encode up to 39",
        "encode up to 49",
    ]


async def test_the_chunk_after_next_is_asked_for_before_this_one_is_sent() -> None:
    # ListUsersChunked: chunk N goes out once N+1 is read (so it carries a token only when a
    # row follows it), and PostgreSQL reads N+2 meanwhile: its statement is sent (the fetch
    # has begun and waits on the database) before N is handed to gRPC. Without this, it went
    # out only once gRPC's send suspended (the stream 1.3x slower: docs/performance.md,
    # "The next chunk read while this one is sent").
    table = Table([(i, "x") for i in range(40)])
    events: list[str] = []

    async def fetch(after: int | None, limit: int) -> WireRun[int] | None:
        events.append(f"read after {after}")
        page = await table.fetch(after, limit)  # waits on the table, as on the database
        if not page.items:
            return None
        return WireRun(b"\x0a\x00" * len(page.items), len(page.items), page.items[-1][0])

    async def fetch_rows(after: int | None, limit: int) -> Page[WireRows[int]]:
        raise AssertionError("no run passes the byte cap")

    async for chunk in wire_chunks(
        fetch=fetch,
        fetch_rows=fetch_rows,
        token=lambda key: f"after-{key}",
        chunk_size=10,
        after=None,
    ):
        events.append(f"send {chunk.rows}")
    assert events == [
        "read after None",
        "read after 9",
        "read after 19",
        "send 10",
        "read after 29",
        "send 10",
        "read after 39",
        "send 10",
        "send 10",
    ]

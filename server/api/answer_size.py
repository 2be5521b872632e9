"""How large a unary answer may be: pages stop short by bytes, whole answers are refused.

A row can be large (a message of 1 MiB content and 64 KiB metadata; a user or session of 64 KiB
metadata), so a page of `page_size` rows can pass what gRPC sends (the server's
`grpc.max_send_message_length`: it answered RESOURCE_EXHAUSTED naming no field) or what a client
accepts (4 MiB unless the client raises `grpc.max_receive_message_length`). A page read by
token therefore ends at the row that would take it past PAGE_BYTES, with a next_page_token (as
AIP-158 allows: a page may hold fewer rows than page_size); a page read by page_number cannot
end early without skipping rows on the next number, and an answer that is not a page (GetMemory,
SearchMemory) must hold what it was asked, so those are refused past what the server can send,
naming the field that asked for too much.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from server import off_loop
from server.api import convert
from server.api.validation import MAX_CONTENT_BYTES, MAX_ID_CHARS, MAX_TEXT_CHARS
from server.domain import (
    MAX_METADATA_BYTES,
    JsonObject,
    Message,
    Page,
    SearchResult,
    Session,
    StoredJson,
)
from server.errors import InvalidArgument
from server.search.service import Memory, Searcher
from server.serving import wire

T = TypeVar("T")

#: The largest request memstore accepts (SPEC: 16 MiB). Larger is RESOURCE_EXHAUSTED.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: The largest answer the server sends: room past the request's cap for what the server adds to
#: what it accepted (AddMemory echoes 1000 messages with their uuids, times and sequences, about
#: 40 KB). At the request's cap, an accepted write near it committed and was then answered
#: RESOURCE_EXHAUSTED (tests/grpc/test_limits.py).
MAX_ANSWER_BYTES = MAX_REQUEST_BYTES + 1024 * 1024
#: A page's rows stop before this: gRPC clients accept 4 MiB by default, and the page's other
#: fields (its token, total_size) take far less than the 64 KiB left.
PAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024

_MIB = 1024 * 1024


def page_rows(response: Any, field: str, *, by_number: bool, in_pieces: bool = False) -> int:
    """How many of `response`'s `field` rows fit in a page; drops the rest (the first always
    stays: one row is at most ~1.1 MiB). `in_pieces`: weighed row by row (in a thread, for a
    large page), each a short call into protobuf's C: upb weighs a message by encoding it,
    and a page of 3 MiB weighed whole held the GIL, so the event loop, 40 ms.

    Raises:
        InvalidArgument: the page was asked for by page_number and does not fit (field
            page_size): ending it early would make the next page_number skip rows.
    """
    rows = getattr(response, field)
    sizes = [row.ByteSize() for row in rows] if in_pieces else []
    if in_pieces:
        size = wire.head(response).ByteSize() + sum(s + _tag_and_length(s) for s in sizes)
    else:
        size = response.ByteSize()
    if size <= PAGE_BYTES:
        return len(rows)
    if by_number:
        raise _numbered_page_too_large(f"this page's {len(rows)} rows are {size / _MIB:.1f} MiB")
    keep = len(rows)
    while keep > 1 and size > PAGE_BYTES:
        keep -= 1
        row = sizes[keep] if in_pieces else rows[keep].ByteSize()
        size -= row + _tag_and_length(row)
    del rows[keep:]
    return keep


def last_of_page(
    response: Any, field: str, page: Page[T], *, by_number: bool, in_pieces: bool = False
) -> T | None:
    """The row a page's next_page_token goes on from, once `response`'s `field` rows (those of
    `page`) are cut to what fits (page_rows, weighing `in_pieces`); None when no row follows.

    Raises:
        InvalidArgument: as page_rows.
    """
    if by_number and page.cut:
        # The store stopped reading at PAGE_BYTES of the rows' text: the page is larger still.
        raise _numbered_page_too_large(f"this page's rows pass {PAGE_BYTES / _MIB:.2f} MiB")
    kept = page_rows(response, field, by_number=by_number, in_pieces=in_pieces)
    if kept and (page.has_more or kept < len(page.items)):
        return page.items[kept - 1]
    return None


def _numbered_page_too_large(what: str) -> InvalidArgument:
    return InvalidArgument.field(
        "page_size",
        f"{what}, more than a page holds ({PAGE_BYTES / _MIB:.2f} MiB, what gRPC clients "
        "accept by default): ask for a smaller page_size, or page with page_token, whose pages "
        "end early when their rows are large",
    )


#: The most bytes the store counts for a user's or session's row of a list (budget_list_size):
#: its metadata as PostgreSQL prints it (at most MAX_METADATA_BYTES as compact JSON; the
#: printed text adds a space after each ',' and ':', at most half again) and its ids and
#: names (at most four of 256 characters of up to 4 bytes).
LIST_ROW_BYTES = 2 * MAX_METADATA_BYTES + 4 * max(MAX_ID_CHARS, MAX_TEXT_CHARS) * 4


def list_budget(rows: int, cap: int) -> int | None:
    """The bytes of metadata and ids the store reads a list of `rows` users or sessions up
    to: `cap` (PAGE_BYTES for a gRPC page, MAX_ANSWER_BYTES for a REST answer), or None where
    `rows` rows cannot pass it (30 for a gRPC page, 131 for REST), which are read whole, without
    the running sum (docs/reliability.md, "Answers read only up to what they may send")."""
    return cap if rows * LIST_ROW_BYTES > cap else None


#: The most bytes the store counts for a message: its content and, as LIST_ROW_BYTES counts a
#: list's row, its metadata as printed (GetMemory's window; SearchMemory and recall count
#: content alone).
MESSAGE_ROW_BYTES = MAX_CONTENT_BYTES + LIST_ROW_BYTES


def memory_budget(rows: int) -> int | None:
    """The bytes the store reads `rows` messages up to (MAX_ANSWER_BYTES, then refused by
    refuse_cut_answer): GetMemory's `lastn` messages and `relevant_limit` memories,
    SearchMemory's `limit` results. None where `rows` of the largest messages
    (MESSAGE_ROW_BYTES) cannot pass it (15 or fewer): an agent's turn (`lastn` 6, 5 memories)
    and a search of the default 10 read their rows whole, without the running sum
    (docs/reliability.md)."""
    return MAX_ANSWER_BYTES if rows * MESSAGE_ROW_BYTES > MAX_ANSWER_BYTES else None


def refuse_cut_answer(field: str, asked: str) -> InvalidArgument:
    """The refusal of an answer whose rows the store stopped reading at MAX_ANSWER_BYTES of
    their text (Page.cut): it would be larger still, so it is refused as check_answer and
    check_text_answer refuse one measured past it, naming `field`."""
    return InvalidArgument.field(
        field,
        f"{asked} make an answer of more than the {MAX_ANSWER_BYTES / _MIB:.0f} MiB one answer "
        "may be: ask for fewer",
    )


async def read_memory(
    searcher: Searcher, project_id: int, session_id: str, lastn: int, relevant_limit: int
) -> Memory:
    """GetMemory's memory for gRPC and REST alike: its messages and memories each read up to
    memory_budget of what asked for them, refused naming lastn when that stopped the messages
    (refuse_cut_recall words the memories' refusal, each adapter measuring its own answer).

    Raises:
        InvalidArgument: the session's last `lastn` messages pass MAX_ANSWER_BYTES (lastn).
        Unavailable: the database cannot be reached.
    """
    memory = await searcher.get_memory(
        project_id,
        session_id,
        lastn,
        relevant_limit,
        budget=memory_budget(lastn),
        relevant_budget=memory_budget(relevant_limit),
    )
    if memory.cut:
        raise refuse_cut_answer("lastn", f"the session's last messages (lastn {lastn})")
    return memory


async def refuse_cut_recall(
    searcher: Searcher,
    memory: Memory,
    request: tuple[int, str, int],
    *,
    messages: int,
    measure: Callable[[list[SearchResult]], int],
    content_budget: Callable[[int], int],
    asked: str,
) -> InvalidArgument:
    """The refusal of a GetMemory whose memories the store stopped reading at MAX_ANSWER_BYTES
    of their content (Memory.relevant_cut), naming the field check_answer (or
    check_text_answer) names: the one of the larger part, lastn on a tie. `messages` is the
    window's size and `measure` the memories' by the adapter's measure; `request` is
    (project_id, session_id, relevant_limit). Where the memories read are not already larger,
    they are read again only up to `content_budget(messages)` bytes of content, enough to
    tell whether they pass the window's size."""
    if measure(memory.relevant) <= messages:
        project_id, session_id, relevant_limit = request
        again = await searcher.get_memory(
            project_id,
            session_id,
            0,
            relevant_limit,
            budget=None,
            relevant_budget=content_budget(messages),
        )
        if not again.relevant_cut and measure(again.relevant) <= messages:
            return refuse_cut_answer("lastn", asked)
    return refuse_cut_answer("relevant_limit", asked)


def recall_text_size(results: Iterable[SearchResult]) -> int:
    """text_size of memories."""
    return text_size(r.message for r in results)


def check_answer(response: Any, asked: str, **fields: str) -> None:
    """Refuses an answer the server could not send. `fields` maps each request field that asked
    for rows to the answer's field holding them; the error names the one whose rows are
    largest.

    Raises:
        InvalidArgument: `response` is larger than MAX_ANSWER_BYTES.
    """
    size = response.ByteSize()
    if size <= MAX_ANSWER_BYTES:
        return
    field = max(fields, key=lambda f: sum(r.ByteSize() for r in getattr(response, fields[f])))
    raise InvalidArgument.field(
        field,
        f"{asked} make an answer of {size / _MIB:.1f} MiB, more than the "
        f"{MAX_ANSWER_BYTES / _MIB:.0f} MiB one answer may be: ask for fewer",
    )


def check_text_answer(asked: str, **fields: Iterable[Message]) -> None:
    """Refuses a REST answer of messages whose text passes MAX_ANSWER_BYTES, as check_answer
    refuses the gRPC answer of the same call. `fields` maps each query value that asked for
    messages to them; the error names the one whose text is largest. Content and role are
    counted in characters (a lower bound of their bytes; no text is encoded to measure it);
    metadata as its compact JSON, measured only until the sum passes the cap. Before, REST
    answered GetMemory's lastn=1000 of 1 MiB messages with 1 GB of JSON, built in memory on
    the event loop, and (metadata not counted) lastn=1000 of messages of 59 KB of metadata
    with 49 MB, where gRPC refuses past 17 MiB.

    Raises:
        InvalidArgument: the messages' text is more than MAX_ANSWER_BYTES.
    """
    sizes = dict.fromkeys(fields, 0)
    size = 0
    for field, rows in fields.items():
        if size > MAX_ANSWER_BYTES:
            break
        for message in rows:
            row = len(message.content) + len(message.role) + metadata_chars(message.metadata)
            sizes[field] += row
            size += row
            if size > MAX_ANSWER_BYTES:
                break
    if size <= MAX_ANSWER_BYTES:
        return
    field = max(sizes, key=sizes.__getitem__)
    raise InvalidArgument.field(
        field,
        f"{asked} make an answer of more than {size / _MIB:.1f} MiB, more than the "
        f"{MAX_ANSWER_BYTES / _MIB:.0f} MiB one answer may be: ask for fewer",
    )


def check_rows_answer(field: str, asked: str, sizes: Iterable[int]) -> None:
    """Refuses a REST list of users or sessions whose metadata passes MAX_ANSWER_BYTES,
    `sizes` being each row's metadata in characters (metadata_chars; read only until their sum
    passes), naming `field` (the page size). They were not capped:
    `sessions-ordered?page_size=1000` over sessions of 59 KB of metadata answered 49 MB of
    JSON, rendered on the event loop.

    Raises:
        InvalidArgument: the rows' metadata is more than MAX_ANSWER_BYTES.
    """
    size = 0
    for row in sizes:
        size += row
        if size > MAX_ANSWER_BYTES:
            raise refuse_cut_answer(field, asked)


def text_size(messages: Iterable[Message]) -> int:
    """The characters of messages' content and role: what the store's read budget counts
    (check_text_answer adds their metadata)."""
    return sum(len(m.content) + len(m.role) for m in messages)


def text_at_least(messages: Iterable[Message], limit: int) -> int:
    """About the characters of messages' content, role and metadata, counted only until they
    reach `limit`: whether an answer of them is large, without measuring a large one whole.
    Metadata the store parsed from a large result is counted by its stored text's length
    (StoredJson); other metadata, small or built here, as Python prints it (repr: within a
    fifth of its compact JSON, and a sixth of json.dumps' time for a small object, 1 µs, on
    every GetMemory)."""
    return _at_least((len(m.content) + len(m.role) + _printed(m.metadata) for m in messages), limit)


def metadata_at_least(metadata: Iterable[JsonObject | str], limit: int) -> int:
    """As text_at_least, for a list of users or sessions: their metadata (an object counted
    as text_at_least counts it, or the JSON text of a UserRecord), what their answer's cost
    grows with (an id is one value, an object of 800 keys 800)."""
    return _at_least(map(_printed, metadata), limit)


def _at_least(sizes: Iterable[int], limit: int) -> int:
    size = 0
    for row in sizes:
        size += row
        if size >= limit:
            break
    return size


def _printed(metadata: JsonObject | str) -> int:
    if isinstance(metadata, str):
        return len(metadata)
    if isinstance(metadata, StoredJson):
        return metadata.text_bytes
    return len(repr(metadata)) if metadata else 0


async def page_answer(
    size: int,
    build: Callable[[], Any],
    field: str,
    page: Page[T],
    *,
    by_number: bool,
    token: Callable[[T], str],
) -> bytes:
    """A page's answer serialized: built by `build` from `page`'s rows (in `field`), cut to
    what fits (last_of_page), its next_page_token `token(last row)` when a row follows. In a
    thread when `size` (metadata_at_least or text_at_least of the rows) reaches
    OFF_LOOP_BYTES: a page of wide rows is tenths of a second of protobuf to build, weigh and
    serialize (tests/reliability/test_loop_stalls.py), which on the loop every other caller
    of either port waited for; a small one stays on the loop, cheaper than the hop.

    Raises:
        InvalidArgument: as page_rows.
    """
    return await off_loop.run(
        size, _page_answer, size, build, field, page, by_number=by_number, token=token
    )


async def sessions_page_answer(
    response: Any, page: Page[Session], *, by_number: bool, token: Callable[[Session], str]
) -> bytes:
    """page_answer of a page of sessions: `response` (a ListSessionsResponse or
    ListUserSessionsResponse, its other fields set) given `page`'s sessions, weighed by their
    metadata.

    Raises:
        InvalidArgument: as page_rows.
    """

    def build() -> Any:
        for session in page.items:
            convert.session_to_proto(session, response.sessions.add())
        return response

    size = metadata_at_least((s.metadata for s in page.items), off_loop.OFF_LOOP_BYTES)
    return await page_answer(size, build, "sessions", page, by_number=by_number, token=token)


def _page_answer(
    size: int,
    build: Callable[[], Any],
    field: str,
    page: Page[T],
    *,
    by_number: bool,
    token: Callable[[T], str],
) -> bytes:
    response = build()
    in_pieces = size >= off_loop.OFF_LOOP_BYTES
    last = last_of_page(response, field, page, by_number=by_number, in_pieces=in_pieces)
    if last is not None:
        response.next_page_token = token(last)
    return wire.serialized(response, size)


def checked_answer(response: Any, size: int, asked: str, **fields: str) -> bytes:
    """`response` serialized (in pieces when `size` is large: serving/wire.py), refused as
    check_answer refuses it when too large. Serialized before it is weighed: ByteSize costs as
    much, in one call; only an answer too large to send is weighed again, to be refused.

    Raises:
        InvalidArgument: as check_answer.
    """
    data = wire.serialized(response, size)
    if len(data) > MAX_ANSWER_BYTES:
        check_answer(response, asked, **fields)
    return data


def metadata_chars(metadata: JsonObject) -> int:
    """The characters of `metadata` as a REST answer writes it (compact, non-ASCII as is)."""
    if not metadata:
        return 0
    return len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")))


def _tag_and_length(size: int) -> int:
    # A repeated message field's row on the wire: its tag (one byte for the field numbers of
    # the list answers, all below 16) and its length as a varint.
    return 1 + max(1, (size.bit_length() + 6) // 7)

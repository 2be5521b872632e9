"""What /api/v1 and /api/v2 share: reading users, sessions and messages from JSON bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import Response

from server import off_loop
from server.api import answer_size
from server.api import validation as val
from server.api.search import DEFAULT_RELEVANT_LIMIT, MAX_SEARCH_LIMIT
from server.domain import (
    ROLE_TYPES,
    USER_RECORD_METADATA,
    JsonObject,
    MetadataChange,
    NewMessage,
    Page,
    Session,
    UserChanges,
)
from server.errors import InvalidArgument
from server.rest import body as b
from server.rest import convert as c
from server.rest import params
from server.rest.answers import json_answer, json_bytes
from server.rest.stream import JsonArrayStream
from server.store import Store

_USER_TEXT = ("email", "first_name", "last_name")


def new_user(data: JsonObject) -> tuple[str, dict[str, str], JsonObject]:
    """user_id, the text fields and metadata of a user to create.

    Raises:
        InvalidArgument: naming each bad field.
    """
    v = val.Violations()
    user_id = b.checked_str(v, data, "user_id", val.check_id)
    texts = {name: b.checked_str(v, data, name, val.check_name) for name in _USER_TEXT}
    metadata = b.metadata(v, data.get("metadata"), "metadata") or {}
    v.raise_if_any()
    return user_id, texts, metadata


def user_changes(data: JsonObject) -> UserChanges:
    """The fields a Zep user update sets: absent or null leaves a field as it is (Zep's
    rule); metadata is merged (null values remove keys, which Zep cannot).

    Raises:
        InvalidArgument: naming each bad field.
    """
    v = val.Violations()
    texts = {name: b.optional_str(v, data, name) for name in _USER_TEXT}
    for name, text in texts.items():
        if text is not None:
            val.check_name(v, name, text)
    metadata = b.metadata(v, data.get("metadata"), "metadata")
    v.raise_if_any()
    return UserChanges(
        email=texts["email"],
        first_name=texts["first_name"],
        last_name=texts["last_name"],
        metadata=MetadataChange(metadata) if metadata else None,
    )


def new_session(data: JsonObject, *, require_id: bool) -> tuple[str | None, str | None, JsonObject]:
    """session_id (None: the server makes one), user_id and metadata of a session to create.

    Raises:
        InvalidArgument: naming each bad field.
    """
    v = val.Violations()
    session_id = b.checked_str(v, data, "session_id", partial(val.check_id, required=require_id))
    user_id = b.checked_str(v, data, "user_id", partial(val.check_id, required=False))
    metadata = b.metadata(v, data.get("metadata"), "metadata") or {}
    v.raise_if_any()
    return session_id or None, user_id or None, metadata


def metadata_patch(data: JsonObject) -> MetadataChange | None:
    """The metadata merge of a session or message update; None changes nothing.

    Raises:
        InvalidArgument: metadata is not an object or breaks a limit.
    """
    v = val.Violations()
    metadata = b.metadata(v, data.get("metadata"), "metadata")
    v.raise_if_any()
    return MetadataChange(metadata) if metadata else None


def new_messages(data: JsonObject) -> list[NewMessage]:
    """The messages of a memory write, checked as AddMemory checks them.

    Raises:
        InvalidArgument: naming each bad field (`messages[2].role_type`).
    """
    items = data.get("messages")
    v = val.Violations()
    if not isinstance(items, list):
        got = "missing" if items is None else f"{b.kind(items)}, not an array"
        raise InvalidArgument.field("messages", f"is required: an array of messages ({got})")
    if not 1 <= len(items) <= val.MAX_MESSAGES:
        raise InvalidArgument.field(
            "messages", f"has {len(items)} messages; send 1 to {val.MAX_MESSAGES}"
        )
    messages: list[NewMessage] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        prefix = f"messages[{i}]"
        if not isinstance(item, dict):
            v.add(prefix, f"must be an object, not {b.kind(item)}")
            continue
        messages.append(_new_message(v, item, prefix, i, seen))
    v.raise_if_any()
    return messages


def _new_message(
    v: val.Violations, item: JsonObject, prefix: str, index: int, seen: dict[str, int]
) -> NewMessage:
    role = b.checked_str(v, item, "role", val.check_name, f"{prefix}.role")
    role_type = role_type_of(v, item.get("role_type"), f"{prefix}.role_type")
    content = b.checked_str(v, item, "content", val.check_content, f"{prefix}.content")
    metadata = b.metadata(v, item.get("metadata"), f"{prefix}.metadata") or {}
    message_uuid = b.optional_str(v, item, "uuid", f"{prefix}.uuid")
    if message_uuid:
        message_uuid = val.message_uuid(v, f"{prefix}.uuid", message_uuid)
        if message_uuid in seen:
            v.add(f"{prefix}.uuid", f"repeats messages[{seen[message_uuid]}].uuid")
        seen.setdefault(message_uuid, index)
    return NewMessage(role, role_type, content, metadata, message_uuid or None)


def role_type_of(v: val.Violations, value: Any, field: str) -> str:
    """A Zep role type (lowercase name); absent, null or "" is norole."""
    if value is None or value == "":
        return "norole"
    if isinstance(value, str) and value in ROLE_TYPES:
        return value
    v.add(field, f"{str(value)[:64]!r} is not one of {', '.join(ROLE_TYPES)}")
    return "norole"


#: GetMemory's `lastn` when /api/v1 gives none (or 0): Zep 0.x's server answered its
#: `memory.message_window`, 12 unless configured (with no summary, which memstore never has).
#: LangChain's ZepChatMessageHistory.messages asks so, and saw half its history at 6.
V1_DEFAULT_LASTN = 12


def lastn_and_recall(
    lastn: int | None, relevant: int | None, default_lastn: int = val.DEFAULT_LASTN
) -> tuple[int, int]:
    """GetMemory's lastn (default 6, /api/v1's 12; at most 1000) and relevant_limit (default
    5, at most 100).

    Raises:
        InvalidArgument: relevant_limit above its maximum.
    """
    count = min(lastn or default_lastn, val.MAX_PAGE_SIZE)
    if relevant is None:
        return count, DEFAULT_RELEVANT_LIMIT
    if relevant > MAX_SEARCH_LIMIT:
        raise InvalidArgument.field(
            "relevant_limit", f"must be between 0 and {MAX_SEARCH_LIMIT} (got {relevant})"
        )
    return count, relevant


#: Sessions per store read of a user's session list, which Zep does not page: what one read
#: holds in memory (at 64 KiB of metadata each, at most ~6.5 MB of JSON) whatever the count.
USER_SESSIONS_PAGE = 100


async def user_sessions(
    store: Store, project: int, user_id: str, *, nested: bool = False
) -> JsonArrayStream:
    """Every live session of a user, oldest first, as a JSON array (Zep's route is not paged)
    written as the store's pages of USER_SESSIONS_PAGE are read; `nested`: inside another
    array.

    Raises:
        NotFound: no user has this id (the first page is read before the answer starts).
    """
    first = await store.list_user_sessions(project, user_id, None, USER_SESSIONS_PAGE)

    async def pages() -> AsyncIterator[list[bytes]]:
        page = first
        while True:
            # In a thread when the page's metadata is large (server/off_loop.py): a page of
            # 100 sessions of 4,000 keys held the loop both ports share 0.08-0.09 s
            # (tests/reliability/test_loop_stalls.py).
            yield await off_loop.run(sessions_size(page), _sessions_json, page.items)
            if not page.has_more or not page.items:
                return
            last = page.items[-1]
            after = (last.created_at, last.session_id)
            page = await store.list_user_sessions(project, user_id, after, USER_SESSIONS_PAGE)

    return JsonArrayStream(pages(), nested=nested)


def _sessions_json(sessions: list[Session]) -> list[bytes]:
    # JsonArrayStream's batch: each session's JSON.
    return [json_bytes(c.session(s)) for s in sessions]


def not_whole(field: str, rows: str, paging: str, *, number: str = "cursor") -> InvalidArgument:
    """The refusal of a whole listing (a list without its page size `field`, which Zep
    answers with every row) that holds more than `rows`: cut to them, the caller would take
    the first rows for all of them. `number` is the parameter that pages with `field`."""
    return InvalidArgument.field(
        field,
        f"absent, the whole listing is asked for, and it holds more than {rows}: page it "
        f"with {field} and {number} ({paging})",
    )


class Window(NamedTuple):
    """The rows a listing by offset asks for: `size` rows from `offset`, or, `whole`, every
    row (answered up to `size`, MAX_PAGE_SIZE, and refused past it); `field` is the page
    size's parameter, which a refusal names."""

    offset: int
    size: int
    whole: bool
    field: str


def numbered_window(
    request: Request, number: str, size: str, *, aliases: tuple[str, str] | None = None
) -> Window:
    """The window of a v2 listing by 1-based page `number` of `size` rows (or by their
    `aliases`, the other spelling, refused beside them).

    Without a size Zep answers every row whatever the page number (bun reads a LIMIT of 0 as
    none, and the offset, (number - 1) * 0, is 0): so does memstore, up to MAX_PAGE_SIZE
    rows. Until 2026-12-03 it answered the first 50.

    Raises:
        InvalidArgument: a bad page number or size (page_size says which), naming it.
    """
    number_alias, size_alias = aliases or (None, None)
    page = params.query_int(request, number, minimum=1, alias=number_alias)
    count = page_size(request, size, alias=size_alias)
    field = size_alias if size_alias and params.query_value(request, size_alias) else size
    if count is None:
        return Window(0, val.MAX_PAGE_SIZE, True, field)
    return Window(((page or 1) - 1) * count, count, False, field)


def page_size(request: Request, name: str, *, alias: str | None = None) -> int | None:
    """A page size of a route that pages by offset (`name`, or `alias`): 1 to MAX_PAGE_SIZE,
    None when absent.

    Raises:
        InvalidArgument: not a whole number from 1 to MAX_PAGE_SIZE, naming the parameter.
            A larger size is refused, not cut to the largest: the caller counts the next
            page's offset (a page number, a cursor of rows) by the size it asked for, so a
            page cut short would skip the rows between (zep-python's list_chunked with a
            chunk_size of 2,000 read rows 0-999, then 2,000-2,999).
    """
    return params.query_int(request, name, minimum=1, maximum=val.MAX_PAGE_SIZE, alias=alias)


async def list_users(
    store: Store,
    project: int,
    window: Window,
    paging: tuple[str, str],
    *,
    flat: bool = False,
    newest_first: bool = False,
) -> Response:
    """A window of users by (created_at, user_id), oldest first or `newest_first`, as Zep's
    UserListResponse (as its list of users alone if `flat`: 1.x). `paging`: the parameter
    that pages with the window's size and the SDK call that pages, which a refusal names.

    Raises:
        InvalidArgument: the page is more than one answer may be (naming the window's field,
            its size); a whole window and more than its size of users follow its offset.
    """
    size, field = window.size, window.field
    page = await store.list_user_records(
        project,
        None,
        size,
        offset=window.offset,
        count=True,
        budget=answer_size.list_budget(size, answer_size.MAX_ANSWER_BYTES),
        newest_first=newest_first,
    )
    if page.cut:
        raise answer_size.refuse_cut_answer(field, f"{size} users")
    if window.whole and page.has_more:
        raise not_whole(field, f"{size} users", paging[1], number=paging[0])

    def build() -> dict[str, Any] | list[dict[str, Any]]:
        # The metadata's text as PostgreSQL prints it: its ", " and ": " a little more than
        # the compact JSON of the answer.
        sizes = (len(u[USER_RECORD_METADATA]) for u in page.items)
        answer_size.check_rows_answer(field, f"{len(page.items)} users", sizes)
        users = [c.user_record(r) for r in page.items]
        if flat:
            return users
        return {"users": users, "row_count": len(users), "total_count": page.total_size or 0}

    metadata = (u[USER_RECORD_METADATA] for u in page.items)
    return await json_answer(
        answer_size.metadata_at_least(metadata, off_loop.OFF_LOOP_BYTES), build
    )


def sessions_answer(page: Page[Session], field: str) -> list[dict[str, Any]]:
    """A page of sessions as Zep's Session models.

    Raises:
        InvalidArgument: their metadata is more than one answer may be (naming `field`, the
            page's size).
    """
    sizes = (answer_size.metadata_chars(s.metadata) for s in page.items)
    answer_size.check_rows_answer(field, f"{len(page.items)} sessions", sizes)
    return [c.session(s) for s in page.items]


def sessions_size(page: Page[Session]) -> int:
    """metadata_at_least of a page's sessions: whether their answer is built off the loop."""
    metadata = (s.metadata for s in page.items)
    return answer_size.metadata_at_least(metadata, off_loop.OFF_LOOP_BYTES)


async def list_messages(store: Store, project: int, session_id: str, window: Window) -> Response:
    """A window of a session's live messages, oldest first, as Zep's MessageListResponse.

    Raises:
        NotFound: the session is absent or soft-deleted.
        InvalidArgument: the page's messages are more than one answer may be, or a whole
            window holds more than its size (naming limit).
    """
    size = window.size
    page = await store.list_messages(
        project, session_id, None, size, offset=window.offset, budget=answer_size.MAX_ANSWER_BYTES
    )
    if page.cut:
        raise answer_size.refuse_cut_answer("limit", f"{size} messages")
    if window.whole and page.has_more:
        raise not_whole("limit", f"{size} messages", "memory.get_session_messages")

    def build() -> dict[str, Any]:
        answer_size.check_text_answer(f"{len(page.items)} messages", limit=page.items)
        messages = [c.message(m) for m in page.items]
        total = page.total_size or 0
        return {"messages": messages, "row_count": len(messages), "total_count": total}

    text = answer_size.text_at_least(page.items, off_loop.OFF_LOOP_BYTES)
    return await json_answer(text, build)

"""Request checks that collect FieldViolations and raise one InvalidArgument naming each.

Metadata and containment filters have checks of their own: server/api/metadata_checks.py.
"""

from __future__ import annotations

import re
import unicodedata
import uuid as uuid_lib
from collections.abc import Iterable
from datetime import datetime
from typing import Literal, Protocol

from google.protobuf import field_mask_pb2, timestamp_pb2

from server.domain import (
    CONTROL_CHARACTERS,
    MAX_SNAPSHOT_HOLD,
    ROLE_TYPES,
    SNAPSHOT_ID,
    from_micros,
)
from server.errors import FieldViolation, InvalidArgument

MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 256
MAX_CONTENT_BYTES = 1024 * 1024
MAX_MESSAGES = 1000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
#: A stream's rows per chunk when the request names none: as many as a chunk may hold (a
#: chunk also stops at 256 KiB), so any row of 16 bytes or more makes every chunk but the
#: last at least 16 KB (SPEC: streamed messages sized by bytes, 16-256 KB).
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_LASTN = 6

_ORDER_BY = re.compile(r"^\s*(created_at|updated_at)(?:\s+(asc|desc))?\s*$", re.IGNORECASE)
# Timestamp.seconds bounds of 0001-01-01 and 9999-12-31T23:59:59 (what datetime can hold).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
#: The last microsecond of 9999, datetime's largest value.
_MAX_MICROS = (_MAX_SECONDS + 1) * 1_000_000 - 1
# The join controls ZWNJ and ZWJ are format characters that spell words (Persian, Indic
# scripts) and emoji sequences; PRECIS (RFC 8264) allows them in context too.
_JOIN_CONTROLS = frozenset("\u200c\u200d")
# Characters an id must not hold besides controls: invisible format characters (bidi
# overrides and isolates, zero-width spaces, BOM...) and line/paragraph separators, which
# make two different ids look alike or reorder the text they are printed in.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp"})


class Violations:
    """Collects FieldViolations of one request; `raise_if_any` raises them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        """Records one bad field."""
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        """Raises InvalidArgument with every recorded violation, if there are any."""
        if self.items:
            raise InvalidArgument(list(self.items))


def check_id(v: Violations, field: str, value: str, *, required: bool = True) -> None:
    """An id: 1-256 characters, no control or invisible format characters, no whitespace at
    either end (so not only whitespace)."""
    if not value:
        if required:
            v.add(field, "is required")
        return
    if len(value) > MAX_ID_CHARS:
        v.add(field, f"is {len(value)} characters long; at most {MAX_ID_CHARS} are allowed")
    if CONTROL_CHARACTERS.search(value):
        v.add(field, "must not contain control characters")
    elif not value.isprintable():  # the fast path: printable text has none of these
        invisible = next((c for c in value if _is_invisible(c)), None)
        if invisible is not None:
            v.add(field, _invisible_description(invisible))
    if value.isspace():
        v.add(field, "is only whitespace")
    elif value[0].isspace() or value[-1].isspace():
        v.add(field, "must not begin or end with whitespace")


def has_visible(value: str) -> bool:
    """Whether `value` holds a character that shows: not whitespace, not an invisible format
    character (a zero-width space or joiner, a byte order mark)."""
    return any(
        not c.isspace() and unicodedata.category(c) not in _INVISIBLE_CATEGORIES for c in value
    )


def _is_invisible(char: str) -> bool:
    return unicodedata.category(char) in _INVISIBLE_CATEGORIES and char not in _JOIN_CONTROLS


def _invisible_description(char: str) -> str:
    name = unicodedata.name(char, "")
    found = f"U+{ord(char):04X} {name}" if name else f"U+{ord(char):04X}"
    return (
        "must not contain invisible format or separator characters such as bidirectional "
        f"overrides (found {found})"
    )


def check_text(v: Violations, field: str, value: str, max_chars: int = MAX_TEXT_CHARS) -> None:
    """A short free-text field: at most `max_chars` characters, no NUL."""
    if len(value) > max_chars:
        v.add(field, f"is {len(value)} characters long; at most {max_chars} are allowed")
    if "\x00" in value:
        v.add(field, "must not contain NUL characters")


def check_name(v: Violations, field: str, value: str) -> None:
    """A short text that names or identifies (email, first and last name, a message's role):
    check_text, and no control characters. A line break in a role wrote a line of its own
    into GetMemory's ready-to-prompt context; an escape sequence recolours a terminal. (A
    backup restores these fields with check_text alone: rows written before this check.)"""
    check_text(v, field, value)
    if "\x00" not in value and CONTROL_CHARACTERS.search(value):
        v.add(
            field,
            "must not contain control characters (tab, line breaks, escapes) or line "
            "separators (U+2028, U+2029)",
        )


def check_content(v: Violations, field: str, value: str) -> None:
    """Message content: at most 1 MiB of UTF-8, no NUL. It may be empty: an assistant's
    turn that only calls a tool has no text (LangChain sends it so, and Zep stores it;
    refused, the whole turn was lost)."""
    # 4 bytes per character at most: short strings need no encoding to measure.
    if len(value) * 4 > MAX_CONTENT_BYTES:
        size = len(value.encode("utf-8"))
        if size > MAX_CONTENT_BYTES:
            v.add(field, f"is {size} bytes of UTF-8; at most {MAX_CONTENT_BYTES} are allowed")
    if "\x00" in value:
        v.add(field, "must not contain NUL characters")


def role_type(v: Violations, field: str, value: int) -> str:
    """The stored role type of a RoleType enum value; UNSPECIFIED is "norole"."""
    if value == 0:
        return "norole"
    if 1 <= value <= len(ROLE_TYPES):
        return ROLE_TYPES[value - 1]
    v.add(field, f"{value} is not a RoleType value")
    return "norole"


def clamp_size(v: Violations, field: str, value: int, default: int) -> int:
    """page_size/chunk_size/lastn: negative is invalid, 0 the default, above 1000 is 1000."""
    if value < 0:
        v.add(field, f"must not be negative (got {value})")
        return default
    if value == 0:
        return default
    return min(value, MAX_PAGE_SIZE)


def page_number(v: Violations, value: int, page_token: str) -> int | None:
    """A 1-based page number, or None when not given; excludes page_token."""
    if value < 0:
        v.add("page_number", f"must not be negative (got {value})")
        return None
    if value and page_token:
        v.add("page_number", "cannot be combined with page_token; send one of them")
        return None
    return value or None


class PagedRequest(Protocol):
    """A list request paged by page_token (keyset) or page_number (OFFSET)."""

    page_size: int
    page_token: str
    page_number: int


def page_window(v: Violations, request: PagedRequest) -> tuple[int, int | None]:
    """(page size, OFFSET) of a paged list request; the OFFSET is None on the keyset path.

    The one rule of ListUsers, ListSessions and ListMessages: page_number is 1-based,
    excludes page_token, and skips (page_number - 1) pages of page_size.
    """
    size = clamp_size(v, "page_size", request.page_size, DEFAULT_PAGE_SIZE)
    number = page_number(v, request.page_number, request.page_token)
    return size, (number - 1) * size if number is not None else None


def snapshot(v: Violations, field: str, value: str, *, required: bool = False) -> str | None:
    """A snapshot id of BackupService.OpenSnapshot, or None when not given."""
    if not value:
        if required:
            v.add(field, "is required")
        return None
    if SNAPSHOT_ID.fullmatch(value) is None:
        v.add(field, f"{value[:64]!r} is not a snapshot id of OpenSnapshot")
        return None
    return value


def hold_seconds(v: Violations, field: str, value: int, default: int) -> int:
    """OpenSnapshot's hold: 0 the default, 1 to MAX_SNAPSHOT_HOLD seconds."""
    if not 0 <= value <= MAX_SNAPSHOT_HOLD:
        v.add(field, f"must be 0 (the default, {default}) to {MAX_SNAPSHOT_HOLD} (got {value})")
        return default
    return value or default


def message_uuid(v: Violations, field: str, value: str) -> str:
    """A message uuid in canonical form (lowercase hex with dashes)."""
    if not value:
        v.add(field, "is required")
        return value
    try:
        return str(uuid_lib.UUID(value))
    except ValueError:
        v.add(field, f"{value[:64]!r} is not a UUID")
        return value


def update_mask(
    v: Violations, mask: field_mask_pb2.FieldMask, allowed: Iterable[str]
) -> set[str] | None:
    """The paths of an update mask, or None when the request has none (or an empty one)."""
    allowed = tuple(allowed)
    paths = list(mask.paths)
    if not paths:
        return None
    # "*" names every field, beside others too (["*", "email"] was refused as an unknown "*").
    unknown = [p for p in paths if p not in allowed and p != "*"]
    if unknown:
        v.add(
            "update_mask",
            f"unknown path(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}",
        )
    if "*" in paths:
        return set(allowed)
    return set(paths) - set(unknown)


def order_by(v: Violations, value: str) -> tuple[Literal["created_at", "updated_at"], bool]:
    """Parses "created_at|updated_at [asc|desc]" into (field, descending)."""
    if not value.strip():
        return "created_at", False
    match = _ORDER_BY.match(value)
    if match is None:
        v.add(
            "order_by",
            f'{value[:100]!r} is not supported; use "created_at" or "updated_at", '
            'optionally followed by " asc" or " desc"',
        )
        return "created_at", False
    field: Literal["created_at", "updated_at"] = (
        "updated_at" if match.group(1).lower() == "updated_at" else "created_at"
    )
    return field, (match.group(2) or "asc").lower() == "desc"


def timestamp(v: Violations, field: str, value: timestamp_pb2.Timestamp) -> datetime | None:
    """A bound as an exact UTC datetime (nanoseconds rounded up, right for >= and <)."""
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 10**9:
        v.add(field, "is outside the range of years 1-9999")
        return None
    micros = value.seconds * 1_000_000 + -(-value.nanos // 1000)
    # Rounding up the last nanosecond of 9999 (protobuf's largest Timestamp, a common "no
    # bound") passed datetime's range; datetime's last microsecond bounds the same rows.
    return from_micros(min(micros, _MAX_MICROS))


def time_range(
    v: Violations,
    after_field: str,
    after: datetime | None,
    before_field: str,
    before: datetime | None,
) -> None:
    """A range [after, before) that holds no instant is a caller's mistake (swapped bounds),
    not a question whose answer is nothing."""
    if after is not None and before is not None and after >= before:
        v.add(before_field, f"must be later than {after_field}")

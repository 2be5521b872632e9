"""Request checks that collect FieldViolations and raise one InvalidArgument naming each."""

from __future__ import annotations

import json
import math
import re
import unicodedata
import uuid as uuid_lib
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2

from server.domain import (
    CONTROL_CHARACTERS,
    MAX_EXACT_INT,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    MAX_SNAPSHOT_HOLD,
    ROLE_TYPES,
    SNAPSHOT_ID,
    JsonObject,
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
#: Why a REST body's integer beyond MAX_EXACT_INT is refused (gRPC's Struct cannot carry one).
INEXACT_INTEGER = (
    "is an integer beyond +-2^53 (9007199254740992), which memstore holds as a double and "
    "would round; send it as a string, or as a float if rounding is fine"
)

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


#: Metadata whose JSON is surely larger than this (a lower bound of its bytes passes it) is
#: refused without walking the rest. A request of 16 MiB holds a million tiny values, and
#: walking them all, to learn a size far past the limit, held the event loop (every call of
#: the process) for seconds; a REST body of 16 MiB, for 40 s. Twice the limit: metadata
#: just past it is still refused with its exact size.
SIZE_BOUND = 2 * MAX_METADATA_BYTES


class _FarTooLarge(Exception):
    """The walk passed SIZE_BOUND."""


def far_too_large(field: str) -> FieldViolation:
    """The violation of metadata whose JSON is surely larger than SIZE_BOUND."""
    return FieldViolation(
        field,
        f"is more than {SIZE_BOUND} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed",
    )


def metadata(v: Violations, field: str, value: struct_pb2.Struct) -> JsonObject:
    """A Struct as a dict: at most 64 KiB as PostgreSQL prints it (see json_size), at most 32
    levels deep, no NUL, no NaN or Infinity."""
    if not value.fields:
        return {}  # the common case: nothing to walk, "{}" is 2 bytes
    walk = _StructWalk(field)
    try:
        result = walk.struct(value, field, 1)
    except _FarTooLarge:
        v.items.append(far_too_large(field))
        return {}
    if walk.problems:
        # Each violation names the exact key path (e.g. `metadata.a.b[2]`); ten say enough.
        v.items.extend(walk.problems[:10])
        return {}
    size = json_size(result, walk.float_extra)
    if size > MAX_METADATA_BYTES:
        v.add(field, f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are allowed")
    return result


#: The most array elements a metadata_contains filter may hold, those of nested arrays
#: included. PostgreSQL's jsonb @> looks each of them up in the stored array by reading it
#: from its start (jsonb arrays are not sorted; an object element is compared with every
#: object there), so a filter costs a scan of each matching row's array per element: 100
#: elements against 200 sessions holding 10,000 took 18.5 s, 1,000 the 30 s statement
#: timeout. Bounded, a row costs at most this many scans (tests/grpc/test_filter_cost.py).
MAX_FILTER_ELEMENTS = 8


def containment(v: Violations, field: str, value: struct_pb2.Struct) -> JsonObject:
    """A containment filter (jsonb @>): metadata, of at most MAX_FILTER_ELEMENTS array
    elements in all."""
    result = metadata(v, field, value)
    check_filter_elements(v, field, result)
    return result


def check_filter_elements(v: Violations, field: str, value: JsonObject) -> None:
    """Records a violation when `value`, a containment filter, holds more than
    MAX_FILTER_ELEMENTS array elements (at any depth)."""
    elements = _array_elements(value)
    if elements > MAX_FILTER_ELEMENTS:
        v.add(
            field,
            f"holds {elements} array elements (nested ones included); a containment filter "
            f"may hold at most {MAX_FILTER_ELEMENTS}, since each is looked up by a scan of "
            "every stored array",
        )


def _array_elements(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_array_elements(item) for item in value.values())
    if isinstance(value, list):
        return len(value) + sum(_array_elements(item) for item in value)
    return 0


def json_size(value: JsonObject, float_extra: int | None = None) -> int:
    """The bytes of `value` in PostgreSQL's jsonb text form: `octet_length(metadata::text)`.

    That form separates with ", " and ": " (json.dumps' defaults), leaves non-ASCII
    characters unescaped and prints numbers in full decimal (1e+20 as 21 digits); the
    store's merge check counts the same bytes in SQL. `float_extra`, when known, is what
    the floats add over their repr.
    """
    if float_extra is None:
        float_extra = _float_extra(value)
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8")) + float_extra


def _float_extra(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_float_extra(item) for item in value.values())
    if isinstance(value, list):
        return sum(_float_extra(item) for item in value)
    return _decimal_extra(value) if isinstance(value, float) else 0


def _decimal_extra(number: float) -> int:
    # psycopg sends json.dumps' repr (1e+20); jsonb keeps it as numeric, printed in full.
    text = repr(number)
    return len(format(Decimal(text), "f")) - len(text)


class _StructWalk:
    """Struct to dict, like json_format.MessageToDict but integral numbers come back as int
    (so 1 is stored as 1, not 1.0) and every problem is reported with its key path."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.problems: list[FieldViolation] = []
        self.float_extra = 0
        self.too_deep = False
        #: A lower bound of the JSON bytes seen so far (each character is a byte or more).
        self.bound = 0

    def _count(self, chars: int) -> None:
        self.bound += chars
        if self.bound > SIZE_BOUND:
            raise _FarTooLarge

    def struct(self, struct: struct_pb2.Struct, path: str, level: int) -> JsonObject:
        out: JsonObject = {}
        self._count(2 * max(len(struct.fields), 1))  # {} and a ", " between members
        for key, item in struct.fields.items():
            self._count(len(key) + 4)  # "key":_
            if "\x00" in key:
                self.problems.append(FieldViolation(path, f"key {key!r} contains a NUL character"))
            out[key] = self.value(item, f"{path}.{key}", level)
        return out

    def value(self, item: struct_pb2.Value, path: str, level: int) -> Any:
        """The value of `item`, found inside a container at `level` (the object is 1)."""
        kind = item.WhichOneof("kind")
        if kind in {"struct_value", "list_value"} and level >= MAX_METADATA_DEPTH:
            self._nested_too_deep(path)
            return None
        if kind == "struct_value":
            return self.struct(item.struct_value, path, level + 1)
        if kind == "list_value":
            self._count(2 * max(len(item.list_value.values), 1))  # [] and a ", " between items
            return [
                self.value(element, f"{path}[{i}]", level + 1)
                for i, element in enumerate(item.list_value.values)
            ]
        self._count(len(item.string_value) + 2 if kind == "string_value" else 1)  # "" or 0
        if kind == "string_value":
            if "\x00" in item.string_value:
                self.problems.append(FieldViolation(path, "contains a NUL character"))
            return item.string_value
        if kind == "number_value":
            return self.number(item.number_value, path)
        if kind == "bool_value":
            return item.bool_value
        return None  # null_value, or a Value with no kind set: JSON null

    def number(self, number: float, path: str) -> int | float | None:
        if not math.isfinite(number):
            # Over REST, JSON's 1e400 reads as Infinity: say so, not only "Infinity".
            self.problems.append(
                FieldViolation(
                    path,
                    "is NaN, Infinity or beyond a double's range (+-1.8e308), which JSON "
                    "cannot hold",
                )
            )
            return None
        if number.is_integer() and abs(number) <= MAX_EXACT_INT:
            return int(number)
        self.float_extra += _decimal_extra(number)
        return number

    def _nested_too_deep(self, path: str) -> None:
        # Named by the field itself (as when the parser refuses deeper requests, which
        # server/serving/malformed.py words), with the path where the limit was crossed.
        if not self.too_deep:
            self.too_deep = True
            where = path if len(path) <= 200 else path[:200] + "..."
            self.problems.append(
                FieldViolation(
                    self.root,
                    f"is nested more than {MAX_METADATA_DEPTH} levels of objects and arrays "
                    f"deep (at {where})",
                )
            )


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

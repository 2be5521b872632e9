"""Plain domain objects that the store returns and the servicers convert to protos."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, Literal, TypeVar

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The project of every call while no API key exists (created by migrations/0001).
DEFAULT_PROJECT_ID = 1

#: Role types as stored in messages.role_type (the proto enum without its prefix).
ROLE_TYPES = ("user", "assistant", "system", "tool", "function", "norole")

#: Control characters (C0, DEL, C1) and the line and paragraph separators U+2028 and U+2029,
#: which break a line as \n does wherever Unicode's line breaks are honoured (Python's
#: splitlines, most renderers, log shippers) but are no control characters: refused in names
#: (api/validation.py), escaped in text log lines (serving/log_format.py).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: What PostgreSQL's exported snapshot ids look like (a virtual transaction id and a
#: counter, `00000003-0000001B-1`): BackupService's snapshots; anything else is refused
#: before it reaches SQL, where the id is a literal (server/store/snapshots.py).
SNAPSHOT_ID = re.compile(r"[0-9A-F]{8}-[0-9A-F]{8}-[0-9]{1,10}\.[0-9a-f]{16}")
#: How long OpenSnapshot holds a snapshot by default, and at most, in seconds.
DEFAULT_SNAPSHOT_HOLD = 3600
MAX_SNAPSHOT_HOLD = 86400
#: The largest metadata object stored, in bytes of PostgreSQL's jsonb text form (what
#: `octet_length(metadata::text)` counts: ", " and ": " separators, numbers in full decimal),
#: so the request check in Python and the merge check in SQL measure the same bytes.
MAX_METADATA_BYTES = 64 * 1024

#: The deepest metadata accepted, in levels of objects and arrays (the object itself is 1).
#: protobuf's parser refuses 100 nested messages, about 33 levels of Struct; at 32, every
#: request and response holding metadata parses, the deepest (SearchMemoryResponse) included.
MAX_METADATA_DEPTH = 32

#: The largest integer magnitude a double (a Struct's number) holds exactly; every integer
#: up to it is exact, and 2^53 + 1 is the first that rounds.
MAX_EXACT_INT = 2**53

JsonObject = dict[str, Any]


def _stored_int(text: str) -> int | float:
    # An integer of stored JSON past +-2^53 was a double: no request stores such an integer
    # (REST refuses one, metadata_checks.INEXACT_INTEGER; a Struct's numbers are doubles), and
    # jsonb prints a double in full decimal (1.5e300 as 301 digits).
    value = int(text)
    return value if -MAX_EXACT_INT <= value <= MAX_EXACT_INT else float(value)


#: Parses JSON the store kept (jsonb's text) as json.loads does, but reads an integer past
#: +-2^53 as the double it was stored from, so that 1.5e300 reads back over REST as the float
#: sent, not as an integer of 301 digits (tests/rest/test_http.py::
#: test_floats_of_any_size_read_back_as_the_floats_sent).
decode_stored_json = json.JSONDecoder(parse_int=_stored_int).decode


class StoredJson(dict[str, Any]):
    """A JSON object the store parsed from a large result (server/store/db.py fetch_rows), and
    `text_bytes`, the length of its stored text: an answer weighs it by that
    (answer_size.text_at_least) rather than by printing it on the loop, which for a vector of
    floats is 30 ns a byte (about 8 ms for the 256 KiB that decide an answer is large)."""

    __slots__ = ("text_bytes",)

    def __init__(self, value: JsonObject, text_bytes: int) -> None:
        super().__init__(value)
        self.text_bytes = text_bytes


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class User:
    """A row of users, with the number of its live sessions."""

    user_id: str
    email: str
    first_name: str
    last_name: str
    metadata: JsonObject
    created_at: datetime
    updated_at: datetime
    session_count: int


@dataclass(frozen=True, slots=True)
class Session:
    """A row of sessions; deleted_at is set only while soft-deleted."""

    session_id: str
    user_id: str | None
    metadata: JsonObject
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    message_count: int
    last_message_at: datetime | None
    #: The sequence of the next message; read only by the backup export (0 elsewhere).
    next_sequence: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    """A row of messages (one memory item)."""

    uuid: str
    session_id: str
    sequence: int
    role: str
    role_type: str
    content: str
    metadata: JsonObject
    created_at: datetime
    updated_at: datetime
    #: Set only on a soft-deleted message (read only by the export with include_deleted).
    deleted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append with AddMemory, already validated."""

    role: str
    role_type: str
    content: str
    metadata: JsonObject
    #: The caller's uuid (canonical form), which makes a retry append nothing twice; None
    #: lets the server make one.
    uuid: str | None = None


@dataclass(frozen=True, slots=True)
class MetadataChange:
    """How to change a metadata object: merge a JSON merge patch, or replace it whole."""

    patch: JsonObject
    replace: bool = False


@dataclass(frozen=True, slots=True)
class UserChanges:
    """The fields UpdateUser changes; None leaves a field as it is."""

    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    metadata: MetadataChange | None = None


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """Filters and order of ListSessions; also the query a page token is bound to."""

    user_id: str | None = None
    show_deleted: bool = False
    order_field: Literal["created_at", "updated_at"] = "created_at"
    descending: bool = False
    created_after: datetime | None = None
    created_before: datetime | None = None
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    metadata_contains: JsonObject | None = None


#: A keyset position for users and sessions: (timestamp of the order column, id).
TimeKey = tuple[datetime, str]

#: A keyset position in the message export: (session_id, sequence).
MessageKey = tuple[str, int]

#: A user as the hot list paths (ListUsers, ListUsersChunked) read it: a plain tuple, one
#: object per row instead of a dict and a dataclass. (user_id, email, first_name, last_name,
#: metadata as JSON text, created_at and updated_at in integer microseconds since the epoch,
#: session_count); see convert.add_user_record.
UserRecord = tuple[str, str, str, str, str, int, int, int]
#: Where a UserRecord holds its metadata's JSON text.
USER_RECORD_METADATA: Final = 4


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of rows; has_more tells whether a row follows the last one."""

    items: list[T]
    has_more: bool
    total_size: int | None = None
    #: Ended early by the store's byte budget: rows follow, fewer were read than asked for.
    cut: bool = False


K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class WireRows(Generic[K]):
    """Consecutive rows already encoded as a stream chunk's repeated-field entries.

    `entries` is protobuf wire bytes made by PostgreSQL (each entry its tag, length and
    message, in key order); `sizes` the bytes of each entry; `key(i)` the keyset position of
    the i-th row, computed only where a chunk ends.
    """

    entries: bytes
    sizes: list[int]
    key: Callable[[int], K]


@dataclass(frozen=True, slots=True)
class WireRun(Generic[K]):
    """Consecutive rows already encoded as one stream chunk's repeated-field entries.

    `entries` is protobuf wire bytes made by PostgreSQL (each entry its tag, length and
    message, in key order), `rows` how many entries they hold, `last` the last one's keyset
    position. Unlike WireRows, nothing per row: the whole run is one value.
    """

    entries: bytes
    rows: int
    last: K


@dataclass(frozen=True, slots=True)
class MessageColumns:
    """A keyset batch of messages as PostgreSQL hands it over for ExportMessages: a few values
    for the whole batch, nothing per message (sql/export.sql, `export_message_columns`).

    `lengths` holds four big-endian int4 per message (the UTF-8 bytes of session_id, role,
    content and the metadata's jsonb text); `fixed` 41 bytes per message (sequence as int8,
    uuid, created_at and updated_at as timestamptz's binary value, role_type's first byte);
    the texts are concatenated in key order; `deleted` holds the set deleted_at values only,
    and `deleted_mask` one byte per message, 1 where deleted_at is set.
    """

    rows: int
    lengths: bytes
    fixed: bytes
    session_ids: bytes
    roles: bytes
    contents: bytes
    metadata: bytes
    deleted: bytes | None
    deleted_mask: bytes
    #: Messages of the page were left out by the batch's byte budget: more follow.
    cut: bool = False


@dataclass(frozen=True, slots=True)
class DeletedCounts:
    """What a delete removed."""

    sessions: int = 0
    messages: int = 0


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """What one purge run hard-deleted."""

    sessions: int = 0
    messages: int = 0
    batches: int = 0
    details: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RecountReport:
    """What `memstore recount` found: the users it checked, those whose kept count of live
    sessions was off their rows and was corrected, and (on Citus) the users that sessions
    name and no row holds."""

    users: int = 0
    corrected: int = 0
    orphaned_users: int = 0


#: Why a periodic purge did not run (Store.purge_if_due): another process's purge held the
#: database's turn, or one had started within the interval.
PurgeSkip = Literal["other_holder", "recent"]


def to_micros(value: datetime) -> int:
    """Integer microseconds since the Unix epoch, exactly (no float on the way)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    """The UTC datetime `micros` microseconds after the Unix epoch, exactly."""
    return _EPOCH + timedelta(microseconds=micros)


#: How SearchMemory ranks: words (full-text), meaning (vectors), or both fused.
SearchType = Literal["hybrid", "full_text", "semantic"]


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """What SearchMemory (and recall) look for, in which messages; validated."""

    text: str
    search_type: SearchType = "hybrid"
    limit: int = 10
    user_id: str | None = None
    session_ids: tuple[str, ...] | None = None
    role_types: tuple[str, ...] | None = None
    metadata_contains: JsonObject | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    #: None: plain relevance order; otherwise maximal marginal relevance with this lambda.
    mmr_lambda: float | None = None


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One found message, the session's user and its score (higher is better)."""

    message: Message
    user_id: str | None
    score: float


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """The results of a search, best first, and how they were ranked."""

    results: list[SearchResult]
    #: Whether vector similarity took part in the ranking.
    semantic: bool
    #: Live messages in scope whose embedding is still due (they rank by words only).
    unembedded: int = 0
    #: Why semantic ranking did not take part, when it did not; empty otherwise.
    note: str = ""
    #: The results stop short of the limit: with the rest they would pass the byte budget.
    cut: bool = False


@dataclass(frozen=True, slots=True)
class RestoreCounts:
    """How many rows of one kind a restore wrote, and how many were already there as given."""

    created: int = 0
    existing: int = 0


@dataclass(frozen=True, slots=True)
class BackupSource:
    """What a backup is of: a project's name, and an opaque id of it in this database."""

    project: str
    source_id: str


@dataclass(frozen=True, slots=True)
class Restored:
    """What one restore call did, by kind."""

    users: RestoreCounts
    sessions: RestoreCounts
    messages: RestoreCounts

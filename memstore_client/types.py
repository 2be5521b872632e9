"""Plain Python views of memstore's resources: dicts for Structs, datetimes for Timestamps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from memstore.v1 import resources_pb2, session_service_pb2

from . import _checks
from ._checks import MAX_EXACT_INT
from .errors import ArgumentTypeError

JsonObject = dict[str, Any]

#: Role types as memstore names them (Zep's names); the proto enum adds ROLE_TYPE_.
ROLE_TYPES = ("user", "assistant", "system", "tool", "function", "norole")


def to_datetime(value: timestamp_pb2.Timestamp) -> datetime:
    """A timezone-aware UTC datetime, exact to the microsecond memstore stores."""
    return value.ToDatetime(tzinfo=UTC)


def optional_datetime(value: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    """The datetime of a Timestamp field, or None when the field is unset."""
    return to_datetime(value) if present else None


def to_dict(value: struct_pb2.Struct) -> JsonObject:
    """A Struct as a plain dict, its keys (nested ones too) in sorted order. Struct numbers
    are doubles: whole ones within ±2**53 come back as int, every other number as float."""
    if not value.fields:
        return {}  # the common case, and MessageToDict is slow
    plain: JsonObject = _ints(json_format.MessageToDict(value))
    return plain


def _ints(value: Any) -> Any:
    if isinstance(value, dict):
        # A Struct is a protobuf map, which upb iterates in an order its hash seed picks
        # afresh in each process: two backups or exports of unchanged rows differed byte for
        # byte (tests/grpc/test_backup.py). Sorted, the dicts and the JSON written from
        # them are the same in every run.
        return {k: _ints(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_INT:
        return int(value)
    return value


def to_struct(value: JsonObject | None, field: str = "metadata") -> struct_pb2.Struct | None:
    """A Struct from a dict (None stays None so the request leaves the field unset).

    Raises:
        InvalidArgument: the dict is too deep, or holds an integer beyond ±2**53 (see
            _checks.json_object), named as `field`; ArgumentTypeError for a non-JSON value.
    """
    if value is None:
        return None
    _checks.json_object(field, value)
    out = struct_pb2.Struct()
    out.update(value)
    return out


def role_type_number(name: str, field: str = "role_type") -> resources_pb2.RoleType.ValueType:
    """The RoleType enum number of "user", "assistant", ... (or of "ROLE_TYPE_USER").

    Raises:
        ArgumentTypeError: `name` is not a str, named as `field` (`role_types[0]`).
        InvalidArgument: it is no role type, named so: a plain ValueError named neither the
            argument nor the message it was in.
    """
    _checks.text(field, name)
    key = name.upper()
    key = key if key.startswith("ROLE_TYPE_") else "ROLE_TYPE_" + key
    try:
        return resources_pb2.RoleType.Value(key)
    except ValueError:
        raise _checks.invalid(
            field, f"must be one of {', '.join(ROLE_TYPES)}, not {name!r}"
        ) from None


def role_type_name(number: int) -> str:
    """ "user", "assistant", ... of an enum number ("norole" for unspecified)."""
    name = resources_pb2.RoleType.Name(number).removeprefix("ROLE_TYPE_").lower()  # type: ignore[arg-type]
    return "norole" if name == "unspecified" else name


@dataclass(frozen=True, slots=True)
class User:
    """A user, as UserService returns it."""

    user_id: str
    email: str
    first_name: str
    last_name: str
    metadata: JsonObject
    created_at: datetime
    updated_at: datetime
    session_count: int

    @classmethod
    def from_proto(cls, p: resources_pb2.User) -> User:
        """The user of a User proto."""
        return cls(
            user_id=p.user_id,
            email=p.email,
            first_name=p.first_name,
            last_name=p.last_name,
            metadata=to_dict(p.metadata),
            created_at=to_datetime(p.created_at),
            updated_at=to_datetime(p.updated_at),
            session_count=p.session_count,
        )


@dataclass(frozen=True, slots=True)
class Session:
    """A session; deleted_at is set only on a soft-deleted one."""

    session_id: str
    user_id: str | None
    metadata: JsonObject
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    message_count: int
    last_message_at: datetime | None
    #: Set only by the backup export (include_deleted): the sequence of the next message.
    next_sequence: int = 0

    @classmethod
    def from_proto(cls, p: resources_pb2.Session) -> Session:
        """The session of a Session proto."""
        return cls(
            session_id=p.session_id,
            user_id=p.user_id or None,
            metadata=to_dict(p.metadata),
            created_at=to_datetime(p.created_at),
            updated_at=to_datetime(p.updated_at),
            deleted_at=optional_datetime(p.deleted_at, p.HasField("deleted_at")),
            message_count=p.message_count,
            last_message_at=optional_datetime(p.last_message_at, p.HasField("last_message_at")),
            next_sequence=p.next_sequence,
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One memory item. To add one, set role, role_type and content (and metadata; uuid
    too to choose the id yourself, else the client picks a random one)."""

    content: str
    role: str = ""
    role_type: str = "norole"
    metadata: JsonObject = field(default_factory=dict)
    #: Set on messages memstore returns; optional when adding (a UUID, unique per session).
    uuid: str = ""
    #: Output only: set on messages memstore returns.
    sequence: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: Output only: set on a soft-deleted message (exported with include_deleted).
    deleted_at: datetime | None = None

    @classmethod
    def from_proto(cls, p: resources_pb2.Message) -> Message:
        """The message of a Message proto."""
        return cls(
            content=p.content,
            role=p.role,
            role_type=role_type_name(p.role_type),
            metadata=to_dict(p.metadata),
            uuid=p.uuid,
            sequence=p.sequence,
            created_at=to_datetime(p.created_at),
            updated_at=to_datetime(p.updated_at),
            deleted_at=optional_datetime(p.deleted_at, p.HasField("deleted_at")),
        )

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], field: str = "message") -> Message:
        """The message of a dict of its fields, as `memory.add` takes one; errors name it as
        `field`. Python's own words for a misspelt or missing key named no message.

        Raises:
            ArgumentTypeError: a key is no field of Message, or content is missing.
        """
        names = cls.__dataclass_fields__
        for key in fields:
            if key not in names:
                raise _checks.invalid(
                    field,
                    f"has no field {key!r} (content, role, role_type, metadata, uuid)",
                    ArgumentTypeError,
                )
        if "content" not in fields:
            raise _checks.invalid(f"{field}.content", "is missing", ArgumentTypeError)
        return cls(**fields)

    def to_proto(self, field: str = "message") -> resources_pb2.Message:
        """The Message proto AddMemory reads (uuid, role, role_type, content, metadata); errors
        name the fields as `field`.content and so on."""
        _checks.text(f"{field}.uuid", self.uuid)
        _checks.text(f"{field}.content", self.content)
        _checks.text(f"{field}.role", self.role)
        p = resources_pb2.Message(
            uuid=self.uuid,
            role=self.role,
            role_type=role_type_number(self.role_type, f"{field}.role_type"),
            content=self.content,
        )
        if self.metadata:
            _checks.json_object(f"{field}.metadata", self.metadata)
            p.metadata.update(self.metadata)
        return p


@dataclass(frozen=True, slots=True)
class Memory:
    """GetMemory's answer: the last messages, oldest first, their session, and what the
    user's other sessions hold that is relevant to them.

    found is False (and session None, messages empty) for an unknown or deleted session.
    `context` is `relevant_messages` as ready-to-prompt text (Zep's memory.context).
    `relevant_unavailable` is True where the user's other sessions could not be read (a
    Citus worker holding some of them out of reach): the messages are whole, the memories
    empty; a later call may have them.
    """

    messages: list[Message]
    session: Session | None
    found: bool
    relevant_messages: list[SearchResult] = field(default_factory=list)
    context: str = ""
    relevant_unavailable: bool = False


@dataclass(frozen=True, slots=True)
class SearchResult:
    """A message found by search (or recalled), its session, that session's user, its score."""

    message: Message
    session_id: str
    user_id: str | None
    score: float

    @classmethod
    def from_proto(cls, p: session_service_pb2.SearchResult) -> SearchResult:
        """The result of a memstore.v1.SearchResult proto."""
        return cls(Message.from_proto(p.message), p.session_id, p.user_id or None, p.score)


@dataclass(frozen=True, slots=True)
class SearchResults:
    """SearchMemory's answer, best first, and how it was ranked.

    `semantic` says whether meaning (vectors) took part; `unembedded_messages` how many
    messages in scope were ranked by words only for want of their embedding yet; `note`
    why semantic ranking was left out, when it was.
    """

    results: list[SearchResult]
    semantic: bool
    unembedded_messages: int
    note: str


@dataclass(frozen=True, slots=True)
class UserPage:
    """One page of users, the cursor of the next page (None on the last page), and the
    number of the project's users (counted when a listing starts)."""

    users: list[User]
    next_cursor: str | None
    total_size: int = 0


@dataclass(frozen=True, slots=True)
class MessagePage:
    """One page of a session's messages, oldest first, the next page's token, and the
    number of the session's live messages."""

    messages: list[Message]
    next_page_token: str | None
    total_size: int = 0


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of sessions, the number of matching sessions, and the next page's token."""

    sessions: list[Session]
    total_size: int
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class UserSessionPage:
    """One page of a user's live sessions, oldest first, and the next page's token."""

    sessions: list[Session]
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class RestoreCounts:
    """How many rows of one kind a restore wrote, and how many were already there as given."""

    created: int
    existing: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot the server holds (backup.open_snapshot): the export streams given it as
    `snapshot` read the database as it was when it was opened. Release it with
    backup.close_snapshot; it is released at `expires_at` at the latest."""

    snapshot: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class BackupSource:
    """What a backup is of: the project's name, and an opaque id of the project in the
    server's database (another for another project or database)."""

    project: str
    source_id: str


@dataclass(frozen=True, slots=True)
class Restored:
    """What one restore call did, by kind."""

    users: RestoreCounts
    sessions: RestoreCounts
    messages: RestoreCounts


@dataclass(frozen=True, slots=True)
class ExportedMessage:
    """A message of the ExportMessages stream, with its session id."""

    session_id: str
    message: Message


def set_time(target: timestamp_pb2.Timestamp, value: datetime | None, field: str) -> None:
    """Sets a Timestamp from a timezone-aware datetime (left unset for None)."""
    if value is None:
        return
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise _checks.invalid(field, "must be a timezone-aware datetime")
    target.FromDatetime(value)


def user_backup_proto(user: User, field: str = "user") -> resources_pb2.User:
    """A User as Restore reads it: every field, timestamps as they were; errors name the
    fields as `field`.user_id and so on (`users[3].user_id`)."""
    _checks.text(f"{field}.user_id", user.user_id)
    _checks.text(f"{field}.email", user.email)
    _checks.text(f"{field}.first_name", user.first_name)
    _checks.text(f"{field}.last_name", user.last_name)
    p = resources_pb2.User(
        user_id=user.user_id,
        email=user.email,
        first_name=user.first_name,
        last_name=user.last_name,
        metadata=to_struct(user.metadata, f"{field}.metadata"),
    )
    set_time(p.created_at, user.created_at, f"{field}.created_at")
    set_time(p.updated_at, user.updated_at, f"{field}.updated_at")
    return p


def session_backup_proto(session: Session, field: str = "session") -> resources_pb2.Session:
    """A Session as Restore reads it: deleted_at and last_message_at included; errors name
    the fields as `field`.session_id and so on."""
    _checks.text(f"{field}.session_id", session.session_id)
    _checks.text(f"{field}.user_id", session.user_id, optional=True)
    _checks.integer(f"{field}.next_sequence", session.next_sequence, bits=64)
    p = resources_pb2.Session(
        session_id=session.session_id,
        user_id=session.user_id or "",
        metadata=to_struct(session.metadata, f"{field}.metadata"),
        next_sequence=session.next_sequence,
    )
    set_time(p.created_at, session.created_at, f"{field}.created_at")
    set_time(p.updated_at, session.updated_at, f"{field}.updated_at")
    set_time(p.deleted_at, session.deleted_at, f"{field}.deleted_at")
    set_time(p.last_message_at, session.last_message_at, f"{field}.last_message_at")
    return p


def message_backup_proto(
    row: ExportedMessage, field: str = "message"
) -> session_service_pb2.ExportedMessage:
    """An exported message as Restore reads it: uuid, sequence and timestamps included;
    errors name the fields as `field`.message.content and so on."""
    _checks.text(f"{field}.session_id", row.session_id)
    m = row.message
    _checks.instance(f"{field}.message", m, Message)
    _checks.integer(f"{field}.message.sequence", m.sequence, bits=64)
    p = session_service_pb2.ExportedMessage(session_id=row.session_id)
    p.message.CopyFrom(m.to_proto(f"{field}.message"))
    p.message.sequence = m.sequence
    set_time(p.message.created_at, m.created_at, f"{field}.message.created_at")
    set_time(p.message.updated_at, m.updated_at, f"{field}.message.updated_at")
    set_time(p.message.deleted_at, m.deleted_at, f"{field}.message.deleted_at")
    return p

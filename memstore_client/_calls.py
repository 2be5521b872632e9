"""What each client method sends and how its answer converts: shared by sync and asyncio."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message as ProtoMessage

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us

from . import _checks
from .errors import ArgumentTypeError
from .types import (
    JsonObject,
    Memory,
    Message,
    MessagePage,
    SearchResult,
    Session,
    SessionPage,
    User,
    UserPage,
    UserSessionPage,
    to_struct,
)

Out = TypeVar("Out")

#: Which stub serves a call.
USERS = "UserService"
SESSIONS = "SessionService"
BACKUP = "BackupService"


@dataclass(frozen=True, slots=True)
class Unary(Generic[Out]):
    """One unary call: where it goes, what it sends, how its response converts."""

    service: str
    method: str
    request: ProtoMessage
    convert: Callable[[Any], Out]
    #: Safe to send again after UNAVAILABLE: repeating it changes nothing.
    idempotent: bool


@dataclass(frozen=True, slots=True)
class Stream(Generic[Out]):
    """One chunked server stream; resumed from the last chunk's token after UNAVAILABLE."""

    service: str
    method: str
    request: Any
    convert: Callable[[Any], list[Out]]
    idempotent: bool = field(default=True)


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The per-call metadata: the API key as a bearer token.

    Raises:
        ArgumentTypeError: the key is not a str.
        InvalidArgument: it holds a character a header cannot (gRPC refused it at every
            call, INTERNAL "Invalid metadata", logging its C source location to stderr).
    """
    _checks.text("api_key", api_key, optional=True)
    if not api_key:
        return ()
    if not (api_key.isascii() and api_key.isprintable()):
        bad = next(c for c in api_key if not (c.isascii() and c.isprintable()))
        raise _checks.invalid(
            "api_key",
            f"holds {bad!r}; a key is printable ASCII (memstore's are letters, "
            "digits, '_' and '-')",
        )
    return (("authorization", f"Bearer {api_key}"),)


def _ids(*, optional: bool = False, **ids: object) -> None:
    """Ids must be str (the server checks what they hold); named as the request names them."""
    for name, value in ids.items():
        _checks.text(name, value, optional=optional)


#: Free text is checked as ids are: a str, by name.
_texts = _ids


def _set_times(request: ProtoMessage, **times: datetime | None) -> None:
    """Sets the Timestamp fields named by the arguments that are not None."""
    for name, value in times.items():
        if value is None:
            continue
        if not isinstance(value, datetime):
            raise _checks.invalid(
                name, f"must be a datetime, not {type(value).__name__}", ArgumentTypeError
            )
        # protobuf reads a naive datetime as UTC: datetime.now() east or west of Greenwich
        # would move the bound by hours, silently. Restore refuses one the same way.
        if value.tzinfo is None or value.utcoffset() is None:
            raise _checks.invalid(name, "must be a timezone-aware datetime (datetime.now(UTC))")
        getattr(request, name).FromDatetime(value)


def _clear_mask(
    request: us.UpdateUserRequest | ss.UpdateSessionRequest | ss.UpdateMessageRequest,
    meta: JsonObject | None,
    *named: str,
) -> None:
    """Names "metadata" (and the fields `named`) in update_mask: with a mask, only its paths
    change, and metadata named but left empty is cleared."""
    if meta:
        raise _checks.invalid(
            "clear_metadata",
            "cannot be combined with metadata: clear it, then merge the new keys in a "
            "second call (or remove keys by setting them to None)",
        )
    request.update_mask.paths.extend([*named, "metadata"])


# -- users ---------------------------------------------------------------------


def _user(response: Any) -> User:
    return User.from_proto(response.user)


def add_user(
    user_id: str, email: str, first_name: str, last_name: str, meta: JsonObject | None
) -> Unary[User]:
    """CreateUser."""
    _ids(user_id=user_id)
    _texts(email=email, first_name=first_name, last_name=last_name)
    request = us.CreateUserRequest(
        user_id=user_id,
        email=email,
        first_name=first_name,
        last_name=last_name,
        metadata=to_struct(meta),
    )
    return Unary(USERS, "CreateUser", request, _user, idempotent=False)


def get_user(user_id: str) -> Unary[User]:
    """GetUser."""
    _ids(user_id=user_id)
    return Unary(USERS, "GetUser", us.GetUserRequest(user_id=user_id), _user, idempotent=True)


def update_user(
    user_id: str,
    email: str | None,
    first_name: str | None,
    last_name: str | None,
    meta: JsonObject | None,
    *,
    clear_metadata: bool = False,
) -> Unary[User]:
    """UpdateUser: only the arguments that are not None change; metadata is merged, or
    cleared with `clear_metadata` (sent as an update_mask)."""
    _ids(user_id=user_id)
    _texts(optional=True, email=email, first_name=first_name, last_name=last_name)
    _checks.flag("clear_metadata", clear_metadata)
    request = us.UpdateUserRequest(
        user_id=user_id,
        email=email,
        first_name=first_name,
        last_name=last_name,
        metadata=to_struct(meta),
    )
    if clear_metadata:
        given = {"email": email, "first_name": first_name, "last_name": last_name}
        _clear_mask(request, meta, *(name for name, value in given.items() if value is not None))
    return Unary(USERS, "UpdateUser", request, _user, idempotent=False)


def delete_user(user_id: str) -> Unary[None]:
    """DeleteUser: the user, its sessions and messages, in one transaction."""
    _ids(user_id=user_id)
    request = us.DeleteUserRequest(user_id=user_id)
    return Unary(USERS, "DeleteUser", request, lambda _: None, idempotent=False)


def list_users(limit: int, cursor: str | None, page_number: int = 0) -> Unary[UserPage]:
    """ListUsers; the cursor is the previous page's next_cursor, or page_number (1-based)."""
    _texts(optional=True, cursor=cursor)
    _checks.integer("limit", limit)
    _checks.integer("page_number", page_number)
    request = us.ListUsersRequest(page_size=limit, page_token=cursor or "", page_number=page_number)

    def convert(r: us.ListUsersResponse) -> UserPage:
        users = [User.from_proto(u) for u in r.users]
        return UserPage(users, r.next_page_token or None, r.total_size)

    return Unary(USERS, "ListUsers", request, convert, idempotent=True)


def list_users_chunked(chunk_size: int, page_token: str = "", snapshot: str = "") -> Stream[User]:
    """ListUsersChunked (in a held snapshot when one is named)."""
    _checks.integer("chunk_size", chunk_size)
    _texts(page_token=page_token, snapshot=snapshot)
    request = us.ListUsersChunkedRequest(
        chunk_size=chunk_size, page_token=page_token, snapshot=snapshot
    )
    return Stream(
        USERS, "ListUsersChunked", request, lambda r: [User.from_proto(u) for u in r.users]
    )


def user_sessions(user_id: str, page_token: str, page_size: int = 1000) -> Unary[UserSessionPage]:
    """One page of ListUserSessions (by default the largest the server allows)."""
    _ids(user_id=user_id)
    _texts(page_token=page_token)
    _checks.integer("page_size", page_size)
    request = us.ListUserSessionsRequest(
        user_id=user_id, page_size=page_size, page_token=page_token
    )

    def convert(r: us.ListUserSessionsResponse) -> UserSessionPage:
        return UserSessionPage(
            [Session.from_proto(s) for s in r.sessions], r.next_page_token or None
        )

    return Unary(USERS, "ListUserSessions", request, convert, idempotent=True)


# -- sessions and memory -------------------------------------------------------


def _session(response: Any) -> Session:
    return Session.from_proto(response.session)


def add_session(session_id: str, user_id: str | None, meta: JsonObject | None) -> Unary[Session]:
    """CreateSession; an empty session_id asks the server for one."""
    _ids(session_id=session_id)
    _ids(optional=True, user_id=user_id)
    request = ss.CreateSessionRequest(
        session_id=session_id, user_id=user_id or "", metadata=to_struct(meta)
    )
    return Unary(SESSIONS, "CreateSession", request, _session, idempotent=False)


def get_session(session_id: str, show_deleted: bool) -> Unary[Session]:
    """GetSession."""
    _ids(session_id=session_id)
    _checks.flag("show_deleted", show_deleted)
    request = ss.GetSessionRequest(session_id=session_id, show_deleted=show_deleted)
    return Unary(SESSIONS, "GetSession", request, _session, idempotent=True)


def update_session(
    session_id: str, meta: JsonObject | None, clear_metadata: bool = False
) -> Unary[Session]:
    """UpdateSession: the metadata is merged (a None value removes a key), or cleared."""
    _ids(session_id=session_id)
    _checks.flag("clear_metadata", clear_metadata)
    request = ss.UpdateSessionRequest(session_id=session_id, metadata=to_struct(meta))
    if clear_metadata:
        _clear_mask(request, meta)
    return Unary(SESSIONS, "UpdateSession", request, _session, idempotent=False)


def delete_session(session_id: str) -> Unary[int]:
    """DeleteSession (soft); answers how many messages were deleted with it."""
    _ids(session_id=session_id)
    request = ss.DeleteSessionRequest(session_id=session_id)
    return Unary(
        SESSIONS, "DeleteSession", request, lambda r: int(r.deleted_messages), idempotent=False
    )


def list_sessions(
    page_size: int,
    page_number: int | None,
    user_id: str | None,
    order_by: str,
    *,
    page_token: str | None = None,
    show_deleted: bool = False,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    updated_after: datetime | None = None,
    updated_before: datetime | None = None,
    metadata_contains: JsonObject | None = None,
) -> Unary[SessionPage]:
    """ListSessions: by page_token (keyset) or page_number (as Zep's SDK pages), filtered."""
    _ids(optional=True, user_id=user_id)
    _texts(order_by=order_by)
    _texts(optional=True, page_token=page_token)
    _checks.integer("page_size", page_size)
    _checks.integer("page_number", page_number or 0)
    _checks.flag("show_deleted", show_deleted)
    request = ss.ListSessionsRequest(
        page_size=page_size,
        page_number=page_number or 0,
        page_token=page_token or "",
        user_id=user_id or "",
        order_by=order_by,
        show_deleted=show_deleted,
        metadata_contains=to_struct(metadata_contains, "metadata_contains"),
    )
    _set_times(
        request,
        created_after=created_after,
        created_before=created_before,
        updated_after=updated_after,
        updated_before=updated_before,
    )

    def convert(r: ss.ListSessionsResponse) -> SessionPage:
        sessions = [Session.from_proto(s) for s in r.sessions]
        return SessionPage(sessions, r.total_size, r.next_page_token or None)

    return Unary(SESSIONS, "ListSessions", request, convert, idempotent=True)


def add_memory(
    session_id: str, messages: Sequence[Message | Mapping[str, Any]], user_id: str | None
) -> Unary[list[Message]]:
    """AddMemory; messages may be Message objects or dicts of their fields.

    A message without a uuid gets a random one here, before the first attempt: a retry then
    sends the same uuids, and the server appends nothing twice, so the call is retried.
    """
    _ids(session_id=session_id)
    _ids(optional=True, user_id=user_id)
    protos = []
    for i, m in enumerate(_checks.rows("messages", messages, (Message, Mapping))):
        field = f"messages[{i}]"
        proto = (m if isinstance(m, Message) else Message.from_fields(m, field)).to_proto(field)
        proto.uuid = proto.uuid or str(uuid.uuid4())
        protos.append(proto)
    request = ss.AddMemoryRequest(session_id=session_id, messages=protos, user_id=user_id or "")

    def convert(r: ss.AddMemoryResponse) -> list[Message]:
        return [Message.from_proto(m) for m in r.messages]

    return Unary(SESSIONS, "AddMemory", request, convert, idempotent=True)


def undelete_session(session_id: str) -> Unary[Session]:
    """UndeleteSession: restores a soft-deleted session (its deleted messages stay deleted)."""
    _ids(session_id=session_id)
    request = ss.UndeleteSessionRequest(session_id=session_id)
    return Unary(SESSIONS, "UndeleteSession", request, _session, idempotent=False)


def list_messages(
    session_id: str, page_size: int, page_token: str, page_number: int = 0
) -> Unary[MessagePage]:
    """One page of ListMessages: by page_token (keyset) or page_number (1-based)."""
    _ids(session_id=session_id)
    _texts(page_token=page_token)
    _checks.integer("page_size", page_size)
    _checks.integer("page_number", page_number)
    request = ss.ListMessagesRequest(
        session_id=session_id,
        page_size=page_size,
        page_token=page_token,
        page_number=page_number,
    )

    def convert(r: ss.ListMessagesResponse) -> MessagePage:
        messages = [Message.from_proto(m) for m in r.messages]
        return MessagePage(messages, r.next_page_token or None, r.total_size)

    return Unary(SESSIONS, "ListMessages", request, convert, idempotent=True)


def get_message(session_id: str, uuid: str) -> Unary[Message]:
    """GetMessage: one live message by uuid."""
    _ids(session_id=session_id)
    _texts(uuid=uuid)
    request = ss.GetMessageRequest(session_id=session_id, uuid=uuid)
    return Unary(
        SESSIONS, "GetMessage", request, lambda r: Message.from_proto(r.message), idempotent=True
    )


def update_message(
    session_id: str, uuid: str, meta: JsonObject | None, clear_metadata: bool = False
) -> Unary[Message]:
    """UpdateMessage: the message's metadata is merged (a None value removes a key), or
    cleared."""
    _ids(session_id=session_id)
    _texts(uuid=uuid)
    _checks.flag("clear_metadata", clear_metadata)
    request = ss.UpdateMessageRequest(session_id=session_id, uuid=uuid, metadata=to_struct(meta))
    if clear_metadata:
        _clear_mask(request, meta)
    return Unary(
        SESSIONS,
        "UpdateMessage",
        request,
        lambda r: Message.from_proto(r.message),
        idempotent=False,
    )


def clear_memory(session_id: str) -> Unary[int]:
    """ClearMemory: soft-deletes the messages, keeps the session; answers how many."""
    _ids(session_id=session_id)
    request = ss.ClearMemoryRequest(session_id=session_id)
    return Unary(
        SESSIONS, "ClearMemory", request, lambda r: int(r.deleted_messages), idempotent=False
    )


def get_memory(session_id: str, lastn: int, relevant_limit: int | None) -> Unary[Memory]:
    """GetMemory."""
    _ids(session_id=session_id)
    _checks.integer("lastn", lastn)
    if relevant_limit is not None:
        _checks.integer("relevant_limit", relevant_limit)
    request = ss.GetMemoryRequest(session_id=session_id, lastn=lastn, relevant_limit=relevant_limit)

    def convert(r: ss.GetMemoryResponse) -> Memory:
        session = Session.from_proto(r.session) if r.HasField("session") else None
        return Memory(
            [Message.from_proto(m) for m in r.messages],
            session,
            r.found,
            [SearchResult.from_proto(found) for found in r.relevant_messages],
            r.context,
            r.relevant_unavailable,
        )

    return Unary(SESSIONS, "GetMemory", request, convert, idempotent=True)

"""hypothesis strategies for hostile requests: every RPC, every field, the edges of every limit."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from hypothesis import strategies as st

from memstore.v1 import resources_pb2
from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb

#: Ids the fuzz tests create first, so that requests also hit rows that exist.
KNOWN_USER = "fuzz-user"
KNOWN_SESSION = "fuzz-session"
DELETED_SESSION = "fuzz-deleted"
#: Message uuids and page tokens of those rows, filled in by the tests before they fuzz.
KNOWN_UUIDS: list[str] = []
KNOWN_TOKENS: list[str] = []


def rare(unusual: st.SearchStrategy[Any], usual: st.SearchStrategy[Any], one_in: int = 40) -> Any:
    """`unusual` about once in `one_in` draws (for the costly ones: megabyte strings)."""
    return st.integers(0, one_in - 1).flatmap(lambda i: unusual if i == 0 else usual)


# Text a caller may send: printable, control characters and NUL, non-BMP, surrogate-free.
_any_char = st.characters(codec="utf-8")
_text = st.text(_any_char, max_size=40)

ids = st.one_of(
    st.just(""),
    st.sampled_from([KNOWN_USER, KNOWN_SESSION, DELETED_SESSION, "x", " ", "a" * 256]),
    _text,
    st.text(_any_char, min_size=250, max_size=270),
    st.text(_any_char, max_size=8).map(lambda s: s + "\x00"),
    rare(st.just("i" * 100_000), st.just("a" * 257)),
)

short_texts = st.one_of(_text, st.text(_any_char, min_size=250, max_size=270), st.just("\x00"))
contents = st.one_of(
    _text,
    st.just(""),
    rare(
        st.sampled_from(["c" * (1024 * 1024), "é" * (512 * 1024 + 1), "c" * (1024 * 1024 + 1)]),
        st.text(_any_char, min_size=1, max_size=300),
    ),
)

#: int32 fields: negative, zero, at and past every limit, the extremes of the type.
sizes = st.one_of(
    st.sampled_from([-(2**31), -1, 0, 1, 6, 50, 999, 1000, 1001, 2**31 - 1]),
    st.integers(-(2**31), 2**31 - 1),
)

#: RoleType values: every valid one, and unknown ones in both directions.
role_types = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**60), 2**60),
    _text,
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=20,
)


def _deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"d": value}
    return value


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


#: Metadata objects: small random JSON, deep (around the 100-level limit), wide, oversized.
metadatas = st.one_of(
    st.dictionaries(_text, _json, max_size=5),
    # protobuf (upb) refuses to nest messages much deeper than this in Python;
    # deeper ones are sent as raw bytes (test_fuzz._raw_requests).
    st.integers(25, 32).map(_deep),
    rare(
        st.sampled_from(
            [
                {f"k{i}": i for i in range(5000)},
                {"big": "m" * (64 * 1024)},
                {"big": "m" * (64 * 1024 - 20)},
            ]
        ),
        st.dictionaries(_text, _text, max_size=3),
    ),
).map(_struct)


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


#: Page tokens: random text, random bytes encoded as a token would be, near-valid shapes.
def _tamper(token: str, at: int) -> str:
    i = at % max(1, len(token))
    return token[:i] + ("A" if token[i : i + 1] != "A" else "B") + token[i + 1 :]


tokens = st.one_of(
    st.just(""),
    st.deferred(lambda: st.sampled_from(KNOWN_TOKENS)),
    st.builds(_tamper, st.deferred(lambda: st.sampled_from(KNOWN_TOKENS)), st.integers(0, 200)),
    _text,
    st.binary(max_size=120).map(_token),
    st.binary(max_size=120).map(lambda b: _token(b"\x01" + b)),
    st.text(_any_char, min_size=1000, max_size=1100),
)

masks = st.lists(
    st.one_of(
        st.sampled_from(["email", "first_name", "last_name", "metadata", "*", "user_id", ""]),
        _text,
    ),
    max_size=4,
).map(lambda paths: field_mask_pb2.FieldMask(paths=paths))

timestamps = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.one_of(
        st.integers(-(2**63), 2**63 - 1), st.integers(-62_135_596_800, 253_402_300_799)
    ),
    nanos=st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1)),
)

uuids = st.one_of(
    st.deferred(lambda: st.sampled_from(KNOWN_UUIDS)),
    st.uuids().map(str),
    _text,
    st.just(""),
    st.sampled_from(["not-a-uuid"]),
)

_messages = st.builds(
    resources_pb2.Message,
    role=short_texts,
    role_type=role_types,
    content=contents,
    metadata=metadatas,
)
message_lists = st.one_of(
    st.lists(_messages, max_size=4),
    rare(
        st.integers(1000, 1001).map(lambda n: [_plain()] * n),
        st.lists(_messages, min_size=1, max_size=2),
    ),
)


def _plain() -> resources_pb2.Message:
    return resources_pb2.Message(content="m", role_type=resources_pb2.ROLE_TYPE_USER)


def _maybe(strategy: st.SearchStrategy[Any]) -> Any:
    return st.one_of(st.none(), strategy)


def _build(cls: Any, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A request of `cls` with each field either unset or drawn from its strategy."""

    def make(values: dict[str, Any]) -> Any:
        return cls(**{k: v for k, v in values.items() if v is not None})

    return st.fixed_dictionaries({k: _maybe(v) for k, v in fields.items()}).map(make)


#: One strategy of hostile requests per RPC: (service, method, request strategy).
REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "UserService/CreateUser": _build(
        upb.CreateUserRequest,
        user_id=ids,
        email=short_texts,
        first_name=short_texts,
        last_name=short_texts,
        metadata=metadatas,
    ),
    "UserService/GetUser": _build(upb.GetUserRequest, user_id=ids),
    "UserService/UpdateUser": _build(
        upb.UpdateUserRequest,
        user_id=ids,
        email=short_texts,
        first_name=short_texts,
        last_name=short_texts,
        metadata=metadatas,
        update_mask=masks,
    ),
    "UserService/DeleteUser": _build(upb.DeleteUserRequest, user_id=ids),
    "UserService/ListUsers": _build(upb.ListUsersRequest, page_size=sizes, page_token=tokens),
    "UserService/ListUsersChunked": _build(
        upb.ListUsersChunkedRequest, chunk_size=sizes, page_token=tokens
    ),
    "UserService/ListUserSessions": _build(
        upb.ListUserSessionsRequest, user_id=ids, page_size=sizes, page_token=tokens
    ),
    "SessionService/CreateSession": _build(
        spb.CreateSessionRequest, session_id=ids, user_id=ids, metadata=metadatas
    ),
    "SessionService/GetSession": _build(
        spb.GetSessionRequest, session_id=ids, show_deleted=st.booleans()
    ),
    "SessionService/UpdateSession": _build(
        spb.UpdateSessionRequest, session_id=ids, metadata=metadatas, update_mask=masks
    ),
    "SessionService/DeleteSession": _build(spb.DeleteSessionRequest, session_id=ids),
    "SessionService/UndeleteSession": _build(spb.UndeleteSessionRequest, session_id=ids),
    "SessionService/ListSessions": _build(
        spb.ListSessionsRequest,
        page_size=sizes,
        page_token=tokens,
        page_number=sizes,
        user_id=ids,
        show_deleted=st.booleans(),
        order_by=st.one_of(
            st.sampled_from(["created_at", "updated_at desc", " UPDATED_AT  ASC ", "id", ";--"]),
            _text,
        ),
        created_after=timestamps,
        created_before=timestamps,
        updated_after=timestamps,
        updated_before=timestamps,
        metadata_contains=metadatas,
    ),
    "SessionService/AddMemory": _build(
        spb.AddMemoryRequest, session_id=ids, messages=message_lists, user_id=ids
    ),
    "SessionService/GetMemory": _build(spb.GetMemoryRequest, session_id=ids, lastn=sizes),
    "SessionService/ListMessages": _build(
        spb.ListMessagesRequest, session_id=ids, page_size=sizes, page_token=tokens
    ),
    "SessionService/GetMessage": _build(spb.GetMessageRequest, session_id=ids, uuid=uuids),
    "SessionService/UpdateMessage": _build(
        spb.UpdateMessageRequest,
        session_id=ids,
        uuid=uuids,
        metadata=metadatas,
        update_mask=masks,
    ),
    "SessionService/ClearMemory": _build(spb.ClearMemoryRequest, session_id=ids),
}

"""hypothesis strategies for hostile requests: every RPC, every field, the edges of every limit."""

from __future__ import annotations

import base64
from typing import Any, TypeVar

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from hypothesis import strategies as st

from memstore.v1 import backup_service_pb2 as bpb
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
#: Each seeded message as {"session_id": its session's id, "uuid": its uuid}.
KNOWN_MESSAGES: list[dict[str, str]] = []

T = TypeVar("T")


def current(values: list[T]) -> st.SearchStrategy[T]:
    """One of `values` as the list holds it when drawn (refilled by each test's seed).

    `st.sampled_from` copies its list once, at its first draw, even behind `st.deferred`:
    every later test drew the first test's uuids and tokens, rows its own seed never made."""
    return st.integers(0, 999).map(lambda i: values[i % len(values)])


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

#: int64 fields (sequences): negative, zero, small, and the extremes of the type.
longs = st.one_of(
    st.sampled_from([-(2**63), -1, 0, 1, 2, 2**31, 2**63 - 2, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)

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


#: Snapshot ids: none, well-formed ones no snapshot has (gone: FAILED_PRECONDITION), and text
#: that is no id at all (INVALID_ARGUMENT; quotes too, as the id is a literal in SQL).
snapshots = st.one_of(
    st.just(""),
    st.builds(
        "{:08X}-{:08X}-{}.{:016x}".format,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 10**9),
        st.integers(0, 2**64 - 1),
    ),
    st.text(max_size=40),
    st.sampled_from(
        [
            "00000003-0000001B-1.0123456789abcdef'; DROP TABLE users; --",
            "00000003-0000001b-1.0123456789abcdef",
            "00000003-0000001B-1",
        ]
    ),
)
#: OpenSnapshot's hold_seconds: held briefly, or out of range.
snapshot_holds = st.one_of(
    st.integers(1, 2), st.integers(-(2**31), -1), st.integers(86_401, 2**31 - 1)
)
tokens = st.one_of(
    st.just(""),
    current(KNOWN_TOKENS),
    st.builds(_tamper, current(KNOWN_TOKENS), st.integers(0, 200)),
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

#: Timestamps a backup holds: within years 1970-2033, to the nanosecond.
plausible_timestamps = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.integers(0, 2_000_000_000),
    nanos=st.one_of(st.just(0), st.integers(0, 999_999_999)),
)

uuids = st.one_of(
    current(KNOWN_UUIDS),
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


#: SearchMemory's query text: empty, blank, words that match, at and past 10,000 characters.
query_texts = st.one_of(
    _text,
    st.sampled_from(["", "   ", "m0", "m1 m2", "fuzz", "!!", "a & b | !c", "'\\"]),
    rare(st.sampled_from(["q" * 10_000, "q" * 10_001, "é " * 5_000]), _text, one_in=20),
)

#: float32 fields: inside and just outside 0-1, NaN, infinities, negative zero, any float32.
unit_floats = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0000001, -1e-9, float("nan"), float("inf")]),
    st.floats(width=32),
)

search_types = st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
search_scopes = st.one_of(
    st.lists(ids, max_size=4),
    rare(st.integers(100, 101).map(lambda n: [f"s{i}" for i in range(n)]), st.just([])),
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


#: No fields drawn together (`owned` of _mostly and _either).
_NOTHING: st.SearchStrategy[dict[str, Any]] = st.just({})


def _mostly(
    cls: Any,
    one_in: int,
    owned: st.SearchStrategy[dict[str, Any]] = _NOTHING,
    **fields: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]],
) -> Any:
    """A message of `cls` with plausible values (None: unset) in every field but, about one
    time in `one_in`, one field drawn from its hostile strategy: so that whole requests are
    often valid and get past the checks to the database, where the rows and the state they
    meet are the hostile part. `owned` draws plausible values of several fields together,
    over their own: ids that belong together, such as a session and one of its messages."""
    plausible = {name: values[0] for name, values in fields.items()}

    def spoil(name: str) -> st.SearchStrategy[dict[str, Any]]:
        return st.tuples(st.fixed_dictionaries({**plausible, name: fields[name][1]}), owned).map(
            lambda drawn: {**drawn[0], **{k: v for k, v in drawn[1].items() if k != name}}
        )

    def make(values: dict[str, Any]) -> Any:
        return cls(**{k: v for k, v in values.items() if v is not None})

    spoilt = st.sampled_from(sorted(fields)).flatmap(spoil)
    whole = st.tuples(st.fixed_dictionaries(plausible), owned).map(
        lambda drawn: {**drawn[0], **drawn[1]}
    )
    return rare(spoilt, whole, one_in).map(make)


def _either(
    cls: Any,
    owned: st.SearchStrategy[dict[str, Any]] = _NOTHING,
    **fields: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]],
) -> Any:
    """Half the time a request of every field hostile or unset (`_build`); half the time a
    plausible one (`_mostly`, one in four with one hostile field) over the seeded rows, so
    that the RPC's success and NOT_FOUND paths are reached as well as its checks."""
    hostile = _build(cls, **{name: values[1] for name, values in fields.items()})
    return st.one_of(hostile, _mostly(cls, 4, owned, **fields))


_names = st.text("abcxyz", max_size=6)
_small_metadata = st.dictionaries(st.sampled_from("abc"), st.integers(0, 3), max_size=2).map(
    _struct
)
#: The ids restored rows use: new ones and those the fuzz tests create first.
# New ids (restoring a known one with other values is a conflict, which the hostile ids
# try); messages go mostly into the seeded sessions (live and deleted), past their
# sequences 1-3, and sometimes into sessions restored before.
_restore_users = st.integers(0, 99).map(lambda i: f"r-u{i}")
_restore_sessions = st.integers(0, 99).map(lambda i: f"r-s{i}")
_message_sessions = st.one_of(
    st.sampled_from([KNOWN_SESSION, DELETED_SESSION, "fuzz-s3"]),
    st.sampled_from([KNOWN_SESSION, DELETED_SESSION, "fuzz-s3"]),
    _restore_sessions,
)
#: One backup row in this many has a hostile field: a request holds several rows.
_ROW_ODDS = 5

restore_users = _mostly(
    resources_pb2.User,
    _ROW_ODDS,
    user_id=(_restore_users, ids),
    email=(_maybe(_names), short_texts),
    first_name=(_maybe(_names), short_texts),
    last_name=(_maybe(_names), short_texts),
    metadata=(_maybe(_small_metadata), metadatas),
    created_at=(plausible_timestamps, timestamps),
    updated_at=(plausible_timestamps, timestamps),
    session_count=(_maybe(st.integers(0, 3)), longs),
)
restore_sessions = _mostly(
    resources_pb2.Session,
    _ROW_ODDS,
    session_id=(_restore_sessions, ids),
    user_id=(_maybe(st.sampled_from(["", "", KNOWN_USER, "r-u1", "nobody"])), ids),
    metadata=(_maybe(_small_metadata), metadatas),
    created_at=(plausible_timestamps, timestamps),
    updated_at=(plausible_timestamps, timestamps),
    deleted_at=(_maybe(plausible_timestamps), timestamps),
    message_count=(_maybe(st.integers(0, 3)), longs),
    last_message_at=(_maybe(plausible_timestamps), timestamps),
    next_sequence=(_maybe(st.integers(0, 30)), longs),
)
_restore_messages = _mostly(
    resources_pb2.Message,
    _ROW_ODDS,
    uuid=(st.uuids().map(str), uuids),
    role=(_maybe(_names), short_texts),
    role_type=(_maybe(st.integers(0, 6)), role_types),
    content=(st.text("abc ", min_size=1, max_size=20), contents),
    metadata=(_maybe(_small_metadata), metadatas),
    created_at=(plausible_timestamps, timestamps),
    updated_at=(plausible_timestamps, timestamps),
    sequence=(st.integers(4, 10_000), longs),
    deleted_at=(_maybe(plausible_timestamps), timestamps),
)
restore_messages = st.builds(
    spb.ExportedMessage,
    session_id=rare(ids, _message_sessions, one_in=20),
    message=_restore_messages,
)


def _with_unknown_field(value: int) -> bpb.GetBackupSourceRequest:
    """A GetBackupSourceRequest carrying `value` in field 15 (a varint), which it lacks."""
    out = bytearray(b"\x78")  # field 15, wire type 0
    while True:
        value, low = value >> 7, value & 0x7F
        out.append(low | (0x80 if value else 0))
        if not value:
            return bpb.GetBackupSourceRequest.FromString(bytes(out))


def many_users(count: int) -> bpb.RestoreRequest:
    """A Restore of `count` plain new users."""
    at = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    users = [
        resources_pb2.User(user_id=f"bulk-{count}-{i}", created_at=at, updated_at=at)
        for i in range(count)
    ]
    return bpb.RestoreRequest(users=users)


# Plausible values over the seeded rows (and one id of each kind that is not there), for the
# requests `_either` draws valid half the time.
_users = st.sampled_from([KNOWN_USER, "fuzz-user-2", "nobody"])
_new_users = st.one_of(st.integers(0, 99).map(lambda i: f"new-u{i}"), st.just(KNOWN_USER))
_sessions = st.sampled_from([KNOWN_SESSION, DELETED_SESSION, "fuzz-s3", "nobody"])
_new_sessions = st.one_of(_sessions, st.integers(0, 99).map(lambda i: f"new-s{i}"))
#: A seeded message with its own session, half the time; else the session and uuid drawn
#: apart (mostly of different sessions: NOT_FOUND).
_owned_messages = st.one_of(current(KNOWN_MESSAGES), _NOTHING)
_page_sizes = _maybe(st.integers(0, 100))
_page_numbers = _maybe(st.integers(0, 5))
_user_masks = _maybe(
    st.lists(st.sampled_from(["email", "first_name", "last_name", "metadata"]), max_size=4).map(
        lambda paths: field_mask_pb2.FieldMask(paths=paths)
    )
)
_metadata_masks = _maybe(st.just(field_mask_pb2.FieldMask(paths=["metadata"])))
_new_messages = st.lists(
    st.builds(
        resources_pb2.Message,
        role=_maybe(_names),
        role_type=st.integers(0, 6),
        content=st.text("abc ", min_size=1, max_size=20),
        metadata=_maybe(_small_metadata),
    ),
    min_size=1,
    max_size=3,
)

#: One strategy of hostile requests per RPC: (service, method, request strategy).
REQUESTS: dict[str, st.SearchStrategy[Any]] = {
    "UserService/CreateUser": _either(
        upb.CreateUserRequest,
        user_id=(_new_users, ids),
        email=(_maybe(_names), short_texts),
        first_name=(_maybe(_names), short_texts),
        last_name=(_maybe(_names), short_texts),
        metadata=(_maybe(_small_metadata), metadatas),
    ),
    "UserService/GetUser": _either(upb.GetUserRequest, user_id=(_users, ids)),
    "UserService/UpdateUser": _either(
        upb.UpdateUserRequest,
        user_id=(_users, ids),
        email=(_maybe(_names), short_texts),
        first_name=(_maybe(_names), short_texts),
        last_name=(_maybe(_names), short_texts),
        metadata=(_maybe(_small_metadata), metadatas),
        update_mask=(_user_masks, masks),
    ),
    "UserService/DeleteUser": _either(upb.DeleteUserRequest, user_id=(_users, ids)),
    "UserService/ListUsers": _build(
        upb.ListUsersRequest, page_size=sizes, page_token=tokens, page_number=sizes
    ),
    "UserService/ListUsersChunked": _build(
        upb.ListUsersChunkedRequest, chunk_size=sizes, page_token=tokens, snapshot=snapshots
    ),
    "UserService/ListUserSessions": _either(
        upb.ListUserSessionsRequest,
        user_id=(_users, ids),
        page_size=(_page_sizes, sizes),
        page_token=(st.none(), tokens),
    ),
    "SessionService/CreateSession": _build(
        spb.CreateSessionRequest, session_id=ids, user_id=ids, metadata=metadatas
    ),
    "SessionService/GetSession": _either(
        spb.GetSessionRequest,
        session_id=(_sessions, ids),
        show_deleted=(_maybe(st.booleans()), st.booleans()),
    ),
    "SessionService/UpdateSession": _either(
        spb.UpdateSessionRequest,
        session_id=(_sessions, ids),
        metadata=(_maybe(_small_metadata), metadatas),
        update_mask=(_metadata_masks, masks),
    ),
    "SessionService/DeleteSession": _either(spb.DeleteSessionRequest, session_id=(_sessions, ids)),
    "SessionService/UndeleteSession": _either(
        spb.UndeleteSessionRequest, session_id=(_sessions, ids)
    ),
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
    "SessionService/AddMemory": _either(
        spb.AddMemoryRequest,
        session_id=(_new_sessions, ids),
        messages=(_new_messages, message_lists),
        user_id=(_maybe(_users), ids),
    ),
    "SessionService/GetMemory": _build(
        spb.GetMemoryRequest, session_id=ids, lastn=sizes, relevant_limit=sizes
    ),
    "SessionService/ListMessages": _either(
        spb.ListMessagesRequest,
        session_id=(_sessions, ids),
        page_size=(_page_sizes, sizes),
        page_token=(st.none(), tokens),
        page_number=(_page_numbers, sizes),
    ),
    "SessionService/GetMessage": _either(
        spb.GetMessageRequest,
        _owned_messages,
        session_id=(_sessions, ids),
        uuid=(current(KNOWN_UUIDS), uuids),
    ),
    "SessionService/UpdateMessage": _either(
        spb.UpdateMessageRequest,
        _owned_messages,
        session_id=(_sessions, ids),
        uuid=(current(KNOWN_UUIDS), uuids),
        metadata=(_maybe(_small_metadata), metadatas),
        update_mask=(_metadata_masks, masks),
    ),
    "SessionService/ClearMemory": _either(spb.ClearMemoryRequest, session_id=(_sessions, ids)),
    "SessionService/ExportSessions": _build(
        spb.ExportSessionsRequest,
        chunk_size=sizes,
        page_token=tokens,
        include_deleted=st.booleans(),
        snapshot=snapshots,
    ),
    "SessionService/ExportMessages": _build(
        spb.ExportMessagesRequest,
        chunk_size=sizes,
        page_token=tokens,
        include_deleted=st.booleans(),
        snapshot=snapshots,
    ),
    "SessionService/SearchMemory": st.one_of(
        _build(
            spb.SearchMemoryRequest,
            text=query_texts,
            user_id=ids,
            session_ids=search_scopes,
            search_type=search_types,
            limit=sizes,
            mmr_lambda=unit_floats,
            role_types=st.lists(role_types, max_size=3),
            metadata_contains=metadatas,
            created_after=timestamps,
            created_before=timestamps,
        ),
        _mostly(
            spb.SearchMemoryRequest,
            2,
            text=(st.sampled_from(["m0", "m1 m2", "fuzz", "what was said"]), query_texts),
            user_id=(_maybe(st.sampled_from([KNOWN_USER, "fuzz-user-2", "nobody"])), ids),
            session_ids=(
                _maybe(st.lists(st.sampled_from([KNOWN_SESSION, DELETED_SESSION]), max_size=2)),
                search_scopes,
            ),
            search_type=(_maybe(st.integers(0, 3)), search_types),
            limit=(_maybe(st.integers(0, 100)), sizes),
            mmr_lambda=(_maybe(st.floats(0, 1, width=32)), unit_floats),
            role_types=(
                _maybe(st.lists(st.integers(0, 6), max_size=2)),
                st.lists(role_types, max_size=3),
            ),
            metadata_contains=(_maybe(_small_metadata), metadatas),
            created_after=(_maybe(plausible_timestamps), timestamps),
            created_before=(_maybe(plausible_timestamps), timestamps),
        ),
    ),
    # No field of its own: requests that differ by a field it does not declare (a newer
    # client's), which the server ignores.
    "BackupService/GetBackupSource": st.integers(0, 2**63).map(_with_unknown_field),
    # Always a hold: unset (0) is an hour's, and each snapshot held is a connection of the
    # test database's; one or two seconds, or out of range.
    "BackupService/OpenSnapshot": snapshot_holds.map(
        lambda hold: bpb.OpenSnapshotRequest(hold_seconds=hold)
    ),
    "BackupService/CloseSnapshot": _build(bpb.CloseSnapshotRequest, snapshot=snapshots),
    "BackupService/Restore": _mostly(
        bpb.RestoreRequest,
        4,
        # (The 1,000 rows a request may hold at most, and 1,001, are sent once by the test:
        # drawn here, hypothesis chose them in most batches, at seconds each.)
        users=(st.lists(restore_users, max_size=2), st.lists(restore_users, max_size=8)),
        sessions=(st.lists(restore_sessions, max_size=2), st.lists(restore_sessions, max_size=8)),
        messages=(st.lists(restore_messages, max_size=3), st.lists(restore_messages, max_size=8)),
        require_empty=(st.just(False), st.booleans()),
    ),
}

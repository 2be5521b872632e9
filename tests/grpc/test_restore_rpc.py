"""BackupService.Restore over the wire: fields named in errors, parents required, the empty
project checked, and a request written whole or not at all."""

from __future__ import annotations

from datetime import timedelta

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from memstore.v1 import backup_service_pb2 as bs
from memstore.v1 import backup_service_pb2_grpc
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.store import Store
from tests.grpc import Code, Sessions, Users, rpc_error

UUID = "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162"
UUID2 = "1c6f4d2b-0a9e-4d3f-88b7-2e3f40516273"
Backup = backup_service_pb2_grpc.BackupServiceStub


@pytest.fixture
def backup(channel: grpc.aio.Channel, clean_db: str) -> Backup:
    return Backup(channel)


def _at(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=1_700_000_000 + seconds, nanos=123_000)


def _user(user_id: str) -> rs.User:
    return rs.User(user_id=user_id, created_at=_at(0), updated_at=_at(5))


def _session(session_id: str, user_id: str = "") -> rs.Session:
    return rs.Session(session_id=session_id, user_id=user_id, created_at=_at(1), updated_at=_at(9))


def _message(session_id: str, sequence: int, uuid: str = UUID, **kw: object) -> ss.ExportedMessage:
    message = rs.Message(
        uuid=uuid, sequence=sequence, content="c", created_at=_at(2), updated_at=_at(3), **kw
    )  # type: ignore[arg-type]
    return ss.ExportedMessage(session_id=session_id, message=message)


async def test_bad_rows_are_named(backup: Backup) -> None:
    await rpc_error(backup.Restore(bs.RestoreRequest()), Code.INVALID_ARGUMENT, field="request")
    no_time = bs.RestoreRequest(users=[rs.User(user_id="u")])
    await rpc_error(backup.Restore(no_time), Code.INVALID_ARGUMENT, field="users[0].created_at")
    twice = bs.RestoreRequest(sessions=[_session("s"), _session("s")])
    await rpc_error(backup.Restore(twice), Code.INVALID_ARGUMENT, field="sessions[1]")
    no_uuid = bs.RestoreRequest(messages=[_message("s", 1, uuid="")])
    await rpc_error(
        backup.Restore(no_uuid), Code.INVALID_ARGUMENT, field="messages[0].message.uuid"
    )
    bad_sequence = bs.RestoreRequest(messages=[_message("s", 0)])
    await rpc_error(
        backup.Restore(bad_sequence), Code.INVALID_ARGUMENT, field="messages[0].message.sequence"
    )


async def test_parents_must_exist_and_a_failed_request_writes_nothing(
    backup: Backup, users: Users, sessions: Sessions
) -> None:
    orphan = bs.RestoreRequest(users=[_user("ann")], sessions=[_session("s", "nobody")])
    await rpc_error(backup.Restore(orphan), Code.FAILED_PRECONDITION, reason="USER_NOT_FOUND")
    # ann came in the same request: rolled back with it.
    page = await users.ListUsers(us.ListUsersRequest())
    assert page.total_size == 0
    lost = bs.RestoreRequest(messages=[_message("nowhere", 1)])
    await rpc_error(backup.Restore(lost), Code.FAILED_PRECONDITION, reason="SESSION_NOT_FOUND")
    whole = bs.RestoreRequest(
        users=[_user("ann")],
        sessions=[_session("s", "ann")],
        messages=[_message("s", 1), _message("s", 2, uuid=UUID.replace("0b", "1c"))],
        require_empty=True,
    )
    done = await backup.Restore(whole)
    assert (done.users.created, done.sessions.created, done.messages.created) == (1, 1, 2)
    session = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert session.message_count == 2 and session.updated_at == _at(9)
    again = await backup.Restore(bs.RestoreRequest(messages=whole.messages))
    assert (again.messages.created, again.messages.existing) == (0, 2)
    await rpc_error(backup.Restore(whole), Code.FAILED_PRECONDITION, reason="PROJECT_NOT_EMPTY")
    # No row and require_empty: the check alone, which memstore restore of an empty backup
    # sends (without require_empty, no row is INVALID_ARGUMENT: test_bad_rows_are_named).
    check = bs.RestoreRequest(require_empty=True)
    await rpc_error(backup.Restore(check), Code.FAILED_PRECONDITION, reason="PROJECT_NOT_EMPTY")
    other = bs.RestoreRequest(messages=[_message("s", 1, role="someone else")])
    error = await rpc_error(backup.Restore(other), Code.ALREADY_EXISTS, reason="RESTORE_CONFLICT")
    assert "messages[0] (s #1) exists with another role" in (error.details() or "")


async def test_a_request_of_no_row_with_require_empty_only_checks(backup: Backup) -> None:
    done = await backup.Restore(bs.RestoreRequest(require_empty=True))
    assert done == bs.RestoreResponse(
        users=bs.RestoreCounts(), sessions=bs.RestoreCounts(), messages=bs.RestoreCounts()
    )


async def test_a_missing_parent_is_named_by_the_callers_ids_not_internal_ones(
    backup: Backup,
) -> None:
    # Found by the red team: the error quoted PostgreSQL's DETAIL, "(project_id,
    # user_id)=(4, nouser)", the project's internal number instead of the request's row.
    orphan = bs.RestoreRequest(
        users=[_user("ann")], sessions=[_session("s0", "ann"), _session("s1", "nouser")]
    )
    error = await rpc_error(
        backup.Restore(orphan), Code.FAILED_PRECONDITION, reason="USER_NOT_FOUND"
    )
    details = error.details() or ""
    assert "sessions[1] (s1) names user 'nouser'" in details, details
    assert "project_id" not in details and ")=(" not in details, details
    lost = bs.RestoreRequest(messages=[_message("nowhere", 1)])
    error = await rpc_error(
        backup.Restore(lost), Code.FAILED_PRECONDITION, reason="SESSION_NOT_FOUND"
    )
    details = error.details() or ""
    assert "messages[0] (nowhere #1) names session 'nowhere'" in details, details
    assert "project_id" not in details, details


async def test_a_live_message_in_a_soft_deleted_session_is_refused(
    backup: Backup, channel: grpc.aio.Channel, clean_db: str
) -> None:
    # Found by the fuzz tests: it was stored and counted, so a deleted session held a live
    # message, which UndeleteSession would bring back though DeleteSession had hidden it.
    sessions = Sessions(channel)
    added = ss.AddMemoryRequest(session_id="gone", messages=[rs.Message(content="m")])
    await sessions.AddMemory(added)
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="gone"))
    stored = bs.RestoreRequest(messages=[_message("gone", 5)])
    error = await rpc_error(
        backup.Restore(stored), Code.FAILED_PRECONDITION, reason="SESSION_DELETED"
    )
    assert "messages[0] (gone #5)" in (error.details() or "")
    deleted = _session("s")
    deleted.deleted_at.CopyFrom(_at(20))
    other = "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405163"
    in_request = bs.RestoreRequest(
        sessions=[deleted], messages=[_message("s", 1, deleted_at=_at(20)), _message("s", 2, other)]
    )
    error = await rpc_error(
        backup.Restore(in_request), Code.FAILED_PRECONDITION, reason="SESSION_DELETED"
    )
    assert "messages[1] (s #2)" in (error.details() or "")
    assert "messages[0]" not in (error.details() or "")
    with psycopg.connect(clean_db) as conn:
        rows = conn.execute("SELECT session_id, sequence FROM messages ORDER BY 1, 2").fetchall()
    assert rows == [("gone", 1)]  # nothing of either request was written
    # Deleted with its session, as a backup holds it, the message is restored.
    done = await backup.Restore(
        bs.RestoreRequest(sessions=[deleted], messages=[_message("s", 1, deleted_at=_at(20))])
    )
    assert (done.sessions.created, done.messages.created) == (1, 1)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("message", "messages[0].message.sequence"),
        ("session", "sessions[0].next_sequence"),
    ],
)
async def test_a_sequence_past_2_53_is_refused_naming_it(
    backup: Backup, channel: grpc.aio.Channel, row: str, field: str
) -> None:
    # Found by the fuzz tests: a message at 2^63 - 1 overflowed its session's next sequence
    # ("request: bigint out of range"), and a session restored with that next sequence
    # refused every later AddMemory with "messages: bigint out of range".
    huge = 2**63 - 1
    session = _session("s")
    if row == "session":
        session.next_sequence = huge
        request = bs.RestoreRequest(sessions=[session])
    else:
        request = bs.RestoreRequest(sessions=[session], messages=[_message("s", huge)])
    await rpc_error(backup.Restore(request), Code.INVALID_ARGUMENT, field=field)
    # At the bound, both are restored, and the session takes more messages.
    session.next_sequence = 2**53 + 1 if row == "session" else 0
    top = bs.RestoreRequest(sessions=[session], messages=[_message("s", 2**53)])
    await backup.Restore(top)
    added = await Sessions(channel).AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[rs.Message(content="next")])
    )
    assert added.messages[0].sequence == 2**53 + 1


async def test_rows_restored_at_the_end_of_9999_stay_readable_when_touched(
    backup: Backup, users: Users, sessions: Sessions
) -> None:
    # Restore keeps a backup's times, up to the last microsecond a Timestamp (and Python)
    # holds. One microsecond past it, as the next update's strictly later updated_at, was
    # the year 10000: stored, then unreadable, and every listing and export of the project
    # failed with it.
    last = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_000)
    user = rs.User(user_id="u", created_at=_at(0), updated_at=last)
    session = rs.Session(session_id="s", user_id="u", created_at=_at(1), updated_at=last)
    message = _message("s", 1)
    message.message.updated_at.CopyFrom(last)
    await backup.Restore(bs.RestoreRequest(users=[user], sessions=[session], messages=[message]))
    meta = struct_pb2.Struct(fields={"k": struct_pb2.Value(number_value=1)})
    await users.UpdateUser(us.UpdateUserRequest(user_id="u", metadata=meta))
    await sessions.UpdateSession(ss.UpdateSessionRequest(session_id="s", metadata=meta))
    await sessions.UpdateMessage(ss.UpdateMessageRequest(session_id="s", uuid=UUID, metadata=meta))
    await sessions.AddMemory(
        ss.AddMemoryRequest(session_id="s", messages=[rs.Message(content="later")])
    )
    got = (await users.GetUser(us.GetUserRequest(user_id="u"))).user
    assert got.updated_at == last and got.metadata == meta
    listed = (await sessions.ListSessions(ss.ListSessionsRequest())).sessions
    assert [(s.session_id, s.updated_at, s.message_count) for s in listed] == [("s", last, 2)]
    page = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert [m.updated_at == last for m in page.messages] == [True, False]
    exported = [c async for c in sessions.ExportSessions(ss.ExportSessionsRequest())]
    assert [s.session_id for c in exported for s in c.sessions] == ["s"]
    chunks = [c async for c in users.ListUsersChunked(us.ListUsersChunkedRequest())]
    assert [u.user_id for c in chunks for u in c.users] == ["u"]


async def test_rows_restored_in_the_future_are_purged_once_deleted(
    backup: Backup, sessions: Sessions, store: Store
) -> None:
    # A session restored with an updated_at in the future (a backup's times are kept) was
    # deleted "after its last change", in the future too (year 9999 here): never purged,
    # whatever the retention (an audit). deleted_at is now the clock's.
    last = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_000)
    restored = [
        rs.Session(session_id=s, created_at=_at(1), updated_at=last) for s in ("gone", "cleared")
    ]
    messages = [_message(s, 1, uuid=u) for s, u in (("gone", UUID), ("cleared", UUID2))]
    for m in messages:
        m.message.updated_at.CopyFrom(last)
    await backup.Restore(bs.RestoreRequest(sessions=restored, messages=messages))
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="gone"))
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="cleared"))
    report = await store.purge(timedelta(0))
    assert (report.sessions, report.messages) == (1, 2), report
    kept = await sessions.ListSessions(ss.ListSessionsRequest(show_deleted=True))
    assert [(s.session_id, s.updated_at == last) for s in kept.sessions] == [("cleared", True)]


async def test_a_backup_of_names_and_roles_with_control_characters_still_restores(
    backup: Backup, users: Users, sessions: Sessions
) -> None:
    # CreateUser and AddMemory refuse control characters in these fields now; rows stored
    # before that, and exported, must still restore as they were.
    user = rs.User(
        user_id="u", email="a\tb@x", first_name="new\nline", created_at=_at(0), updated_at=_at(5)
    )
    message = _message("s", 1, role="esc\x1b[31m")
    request = bs.RestoreRequest(users=[user], sessions=[_session("s", "u")], messages=[message])
    await backup.Restore(request)
    read = (await users.GetUser(us.GetUserRequest(user_id="u"))).user
    assert (read.email, read.first_name) == ("a\tb@x", "new\nline")
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert [m.role for m in listed.messages] == ["esc\x1b[31m"]

"""BackupService.Restore over the wire: fields named in errors, parents required, the empty
project checked, and a request written whole or not at all."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import timestamp_pb2

from memstore.v1 import backup_service_pb2 as bs
from memstore.v1 import backup_service_pb2_grpc
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.grpc import Code, Sessions, Users, rpc_error

UUID = "0b5e3c1a-9f8d-4c2e-b7a6-1d2e3f405162"
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
    other = bs.RestoreRequest(messages=[_message("s", 1, role="someone else")])
    error = await rpc_error(backup.Restore(other), Code.ALREADY_EXISTS, reason="RESTORE_CONFLICT")
    assert "messages[0] (s #1) exists with another role" in (error.details() or "")

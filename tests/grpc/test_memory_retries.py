"""AddMemory retries over a real channel: caller-chosen uuids make a retry append nothing twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from memstore.v1 import session_service_pb2 as ss
from tests.grpc import Code, Sessions, count_rows, msg, rpc_error

BAD = Code.INVALID_ARGUMENT


def _request(session_id: str, *pairs: tuple[str, str]) -> ss.AddMemoryRequest:
    return ss.AddMemoryRequest(
        session_id=session_id, messages=[msg(content, uuid=u) for content, u in pairs]
    )


async def test_a_retry_with_the_same_uuids_answers_as_the_first_call(sessions: Sessions) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    request = _request("s", ("one", a), ("two", b))
    first = await sessions.AddMemory(request)
    assert [m.uuid for m in first.messages] == [a, b]
    again = await sessions.AddMemory(request)
    assert again == first  # same messages (uuid, sequence, created_at), same session
    listed = await sessions.ListMessages(ss.ListMessagesRequest(session_id="s"))
    assert [m.uuid for m in listed.messages] == [a, b]
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got == first.session


async def test_a_retry_of_messages_deleted_since_answers_them_deleted(sessions: Sessions) -> None:
    # "As stored": a retry after ClearMemory (or DeleteSession) appends nothing again and
    # answered the messages without their deleted_at, as if they were live, while every read
    # of the session had them gone.
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = await sessions.AddMemory(_request("s", ("one", a)))
    await sessions.ClearMemory(ss.ClearMemoryRequest(session_id="s"))
    cleared = await sessions.AddMemory(_request("s", ("one", a)))
    assert [(m.uuid, m.sequence) for m in cleared.messages] == [(a, 1)]
    assert cleared.messages[0].HasField("deleted_at")
    assert cleared.session.message_count == 0
    # A partial retry: the held message as stored, the new one live.
    mixed = await sessions.AddMemory(_request("s", ("one", a), ("two", b)))
    assert [(m.uuid, m.HasField("deleted_at")) for m in mixed.messages] == [(a, True), (b, False)]
    assert mixed.messages[0].created_at == first.messages[0].created_at
    await sessions.DeleteSession(ss.DeleteSessionRequest(session_id="s"))
    deleted = await sessions.AddMemory(_request("s", ("two", b)))
    assert deleted.messages[0].HasField("deleted_at")
    assert deleted.session.HasField("deleted_at")  # a pure retry leaves the session as it is


async def test_uuids_in_other_spellings_name_the_same_message(sessions: Sessions) -> None:
    value = uuid.uuid4()
    first = await sessions.AddMemory(_request("s", ("one", value.hex.upper())))
    assert first.messages[0].uuid == str(value)  # canonical form
    again = await sessions.AddMemory(_request("s", ("one", str(value))))
    assert again.messages == first.messages


async def test_concurrent_retries_append_once(sessions: Sessions, clean_db: str) -> None:
    request = _request("s", *((f"m{i}", str(uuid.uuid4())) for i in range(10)))
    answers = await asyncio.gather(*(sessions.AddMemory(request) for _ in range(6)))
    assert all(a.messages == answers[0].messages for a in answers)
    assert await count_rows(clean_db, "messages") == 10
    got = (await sessions.GetSession(ss.GetSessionRequest(session_id="s"))).session
    assert got.message_count == 10


async def test_a_partial_overlap_appends_the_new_messages(sessions: Sessions) -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    await sessions.AddMemory(_request("s", ("a", a), ("b", b)))
    resp = await sessions.AddMemory(_request("s", ("b", b), ("c", c)))
    assert [(m.uuid, m.sequence) for m in resp.messages] == [(b, 2), (c, 3)]
    assert resp.session.message_count == 3


async def test_a_uuid_of_another_message_is_already_exists(
    sessions: Sessions, clean_db: str
) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await sessions.AddMemory(_request("s", ("a", a)))
    error = await rpc_error(
        sessions.AddMemory(_request("s", ("b", b), ("other", a))),
        Code.ALREADY_EXISTS,
        reason="MESSAGE_ALREADY_EXISTS",
    )
    assert "messages[1].uuid" in (error.details() or "")
    assert await count_rows(clean_db, "messages") == 1


@pytest.mark.parametrize("bad", ["not-a-uuid", "1234", "g" * 32, "x" * 300])
async def test_a_uuid_that_is_no_uuid_is_invalid(
    sessions: Sessions, clean_db: str, bad: str
) -> None:
    call = sessions.AddMemory(_request("s", ("ok", str(uuid.uuid4())), ("bad", bad)))
    await rpc_error(call, BAD, field="messages[1].uuid")
    assert await count_rows(clean_db, "sessions") == 0


async def test_a_uuid_twice_in_one_request_is_invalid(sessions: Sessions, clean_db: str) -> None:
    a = uuid.uuid4()
    call = sessions.AddMemory(_request("s", ("one", str(a)), ("two", a.hex)))
    error = await rpc_error(call, BAD, field="messages[1].uuid")
    assert "messages[0].uuid" in (error.details() or "")
    assert await count_rows(clean_db, "sessions") == 0

"""ListSessions counts once per listing: the first page's total_size rides in the page token."""

from __future__ import annotations

from datetime import UTC, datetime

from memstore.v1 import session_service_pb2 as ss
from server.api.tokens import PageTokens, sessions_fingerprint
from server.domain import DEFAULT_PROJECT_ID, SessionQuery
from tests.grpc import Code, Sessions, rpc_error, tamper


async def _create(sessions: Sessions, *ids: str) -> None:
    for sid in ids:
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=sid))


async def test_later_pages_repeat_the_first_pages_total(sessions: Sessions) -> None:
    await _create(sessions, *(f"s{i}" for i in range(5)))
    first = await sessions.ListSessions(ss.ListSessionsRequest(page_size=2))
    assert first.total_size == 5
    # Rows added mid-listing: the listing keeps the count it started with (documented in
    # the proto), while its keyset still reaches the new rows.
    await _create(sessions, "s5", "s6")
    seen = [s.session_id for s in first.sessions]
    token = first.next_page_token
    while token:
        page = await sessions.ListSessions(ss.ListSessionsRequest(page_size=2, page_token=token))
        assert page.total_size == 5
        seen += [s.session_id for s in page.sessions]
        token = page.next_page_token
    assert seen == [f"s{i}" for i in range(7)]
    # A new listing counts afresh.
    again = await sessions.ListSessions(ss.ListSessionsRequest(page_size=2))
    assert again.total_size == 7


async def test_page_number_pages_count_and_their_tokens_carry_it(sessions: Sessions) -> None:
    await _create(sessions, *(f"s{i}" for i in range(5)))
    second = await sessions.ListSessions(ss.ListSessionsRequest(page_size=2, page_number=2))
    assert second.total_size == 5
    third = await sessions.ListSessions(
        ss.ListSessionsRequest(page_size=2, page_token=second.next_page_token)
    )
    assert [s.session_id for s in third.sessions] == ["s4"] and third.total_size == 5


async def test_a_token_with_an_altered_total_is_refused(sessions: Sessions) -> None:
    await _create(sessions, "a", "b", "c")
    first = await sessions.ListSessions(ss.ListSessionsRequest(page_size=1))
    await rpc_error(
        sessions.ListSessions(
            ss.ListSessionsRequest(page_size=1, page_token=tamper(first.next_page_token))
        ),
        Code.INVALID_ARGUMENT,
        field="page_token",
        reason="INVALID_PAGE_TOKEN",
    )


def test_tokens_without_a_total_still_decode() -> None:
    tokens = PageTokens(b"key")
    query = sessions_fingerprint(DEFAULT_PROJECT_ID, SessionQuery())
    at = datetime(2024, 1, 1, tzinfo=UTC)
    assert tokens.decode_time_key_total(tokens.encode_time_key(query, (at, "x")), query) == (
        (at, "x"),
        None,
    )
    with_total = tokens.encode_time_key(query, (at, "x"), 12)
    assert tokens.decode_time_key_total(with_total, query) == ((at, "x"), 12)
    assert tokens.decode_time_key(with_total, query) == (at, "x")

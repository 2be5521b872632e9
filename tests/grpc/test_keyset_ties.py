"""Keyset pages where created_at ties or differs by one microsecond: no skip, no repeat."""

from __future__ import annotations

import psycopg
from psycopg import sql

from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from tests.grpc import walk


async def _set_created_at(database_url: str, table: str, id_column: str, ids: list[str]) -> None:
    # Groups of three share one instant, and neighbouring groups are 1 µs apart: a token that
    # rounds timestamps (nanoseconds, milliseconds, float seconds) or drops the id tie-breaker
    # skips or repeats rows here.
    query = sql.SQL(
        "UPDATE {} SET created_at = %(base)s::timestamptz + %(offset)s * interval '1 microsecond'"
        ", updated_at = %(base)s::timestamptz + %(offset)s * interval '1 microsecond'"
        " WHERE {} = %(id)s"
    ).format(sql.Identifier(table), sql.Identifier(id_column))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for i, row_id in enumerate(ids):
            params = {"base": "2025-06-01 12:00:00.999998+00", "offset": i // 3, "id": row_id}
            await conn.execute(query, params)


async def test_ties_and_microsecond_neighbours(users, sessions, clean_db):
    # Ids in an order unlike their creation order, so only the tie-breaker sorts them.
    uids = [f"u{(i * 7) % 12:02d}" for i in range(12)]
    for uid in uids:
        await users.CreateUser(us.CreateUserRequest(user_id=uid))
    await _set_created_at(clean_db, "users", "user_id", uids)
    expected = sorted(uids, key=lambda u: (uids.index(u) // 3, u))
    rows, _ = await walk(users.ListUsers, us.ListUsersRequest(page_size=2), "users")
    assert [u.user_id for u in rows] == expected
    chunks = users.ListUsersChunked(us.ListUsersChunkedRequest(chunk_size=2))
    assert [u.user_id async for c in chunks for u in c.users] == expected

    sids = [f"s{(i * 5) % 12:02d}" for i in range(12)]
    for sid in sids:
        await sessions.CreateSession(ss.CreateSessionRequest(session_id=sid, user_id="u00"))
    await _set_created_at(clean_db, "sessions", "session_id", sids)
    expected = sorted(sids, key=lambda s: (sids.index(s) // 3, s))
    for order in ("created_at", "updated_at"):
        rows, _ = await walk(
            sessions.ListSessions, ss.ListSessionsRequest(page_size=2, order_by=order), "sessions"
        )
        assert [s.session_id for s in rows] == expected, order
        rows, _ = await walk(
            sessions.ListSessions,
            ss.ListSessionsRequest(page_size=2, order_by=f"{order} desc"),
            "sessions",
        )
        assert [s.session_id for s in rows] == expected[::-1], order
    rows, _ = await walk(
        users.ListUserSessions, us.ListUserSessionsRequest(user_id="u00", page_size=2), "sessions"
    )
    assert [s.session_id for s in rows] == expected

"""Zep's REST routes answer a stored value the server cannot read as its own fault: 500."""

from __future__ import annotations

import httpx
import psycopg
import pytest

#: Times PostgreSQL stores and no Python datetime holds (tests/grpc/test_unreadable_values.py).
UNREADABLE = ["10000-01-01 00:00:00+00", "infinity"]


@pytest.mark.parametrize("value", UNREADABLE)
@pytest.mark.parametrize("column", ["sessions.updated_at", "messages.created_at"])
async def test_a_time_no_datetime_holds_is_500_not_the_callers_400(
    http: httpx.AsyncClient, clean_db: str, column: str, value: str
) -> None:
    # Before: 400 INVALID_ARGUMENT naming a request field, for a request that was fine.
    messages = [{"role": "a", "role_type": "user", "content": "hi"}]
    added = await http.post("/api/v2/sessions/s/memory", json={"messages": messages})
    assert added.status_code == 200, added.text
    table, name = column.split(".")
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as conn:
        await conn.execute(
            psycopg.sql.SQL("UPDATE {} SET {} = %s::timestamptz").format(
                psycopg.sql.Identifier(table), psycopg.sql.Identifier(name)
            ),
            (value,),
        )
    routes = ["/api/v2/sessions/s/memory"]
    if table == "sessions":
        routes += ["/api/v2/sessions/s", "/api/v2/sessions-ordered", "/api/v1/sessions/s"]
    else:
        routes += ["/api/v2/sessions/s/messages"]
    for route in routes:
        reply = await http.get(route)
        assert reply.status_code == 500, (route, reply.text)
        assert reply.json() == {
            "message": "a value stored in the database could not be read; see the server log",
            "reason": "STORED_VALUE_UNREADABLE",
        }, route

"""Small helpers over psycopg connections: named queries in, dict rows out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from server.store.queries import query

Row = dict[str, Any]
Params = Mapping[str, Any]


async def fetch_all(
    conn: AsyncConnection[Any], statement: str | sql.SQL | sql.Composed, params: Params
) -> list[Row]:
    """Every row of a statement given by name (or composed), as dicts."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query(statement) if isinstance(statement, str) else statement, params)
    return await cur.fetchall()


async def fetch_one(
    conn: AsyncConnection[Any], statement: str | sql.SQL | sql.Composed, params: Params
) -> Row | None:
    """The first row of a statement given by name (or composed), or None."""
    rows = await fetch_all(conn, statement, params)
    return rows[0] if rows else None

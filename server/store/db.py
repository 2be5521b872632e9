"""Small helpers over psycopg connections: named queries in, dict rows out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from server.store.queries import query

Row = dict[str, Any]
Params = Mapping[str, Any]


_DECODE = json.JSONDecoder().decode


def load_json(data: str | bytes) -> Any:
    """A json or jsonb value as psycopg hands it over (UTF-8 bytes), as Python objects.

    What json.loads does, less its per-call work on bytes (an encoding sniff, its keyword
    checks), and none at all for the empty object most metadata is: GetMemory reads a dozen
    per call (docs/performance.md).
    """
    if data == b"{}":
        return {}
    return _DECODE(data.decode() if isinstance(data, bytes) else data)


async def configure(conn: AsyncConnection[Any]) -> None:
    """Sets up a new pooled connection: JSON read by load_json."""
    set_json_loads(load_json, conn)


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

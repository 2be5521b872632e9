"""Small helpers over psycopg connections: named queries in, dict rows out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.abc import Params as QueryParams
from psycopg.abc import QueryNoTemplate as Query
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


class StoreCursor(AsyncCursor[Any]):
    """The cursor of the store's connections: psycopg's, keeping the statement the store
    passed to execute (`statement`: a named SQL, composed, or text) for the log of a value it
    cannot read (translate.py). psycopg keeps it only in private attributes."""

    __slots__ = ("statement",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statement: Query | None = None

    async def execute(  # type: ignore[override]  # no template strings here
        self,
        query: Query,
        params: QueryParams | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> StoreCursor:
        self.statement = query
        await super().execute(query, params, prepare=prepare, binary=binary)
        return self


async def configure(conn: AsyncConnection[Any]) -> None:
    """Sets up a new pooled connection: JSON read by load_json, cursors that keep their
    statement (StoreCursor)."""
    set_json_loads(load_json, conn)
    conn.cursor_factory = StoreCursor


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

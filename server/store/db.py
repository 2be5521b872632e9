"""Small helpers over psycopg connections: named queries in, dict rows out."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, AsyncRawCursor, sql
from psycopg.abc import Params as QueryParams
from psycopg.abc import QueryNoTemplate as Query
from psycopg.postgres import types
from psycopg.pq.abc import PGresult
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from server import off_loop
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
    return await fetch_rows(cur)


async def fetch_one(
    conn: AsyncConnection[Any], statement: str | sql.SQL | sql.Composed, params: Params
) -> Row | None:
    """The first row of a statement given by name (or composed), or None."""
    rows = await fetch_all(conn, statement, params)
    return rows[0] if rows else None


#: The types whose values load_json parses.
_JSON_TYPES = frozenset({types["json"].oid, types["jsonb"].oid})


async def fetch_rows(cur: AsyncCursor[Row] | AsyncRawCursor[Row]) -> list[Row]:
    """The rows of a dict-row cursor's current result. Its JSON values are parsed in a thread
    (server/off_loop.py) when they hold OFF_LOOP_BYTES or more in all: psycopg parses them
    inside fetchall, on the loop both ports share, and AddMemory's answer of 1,000 metadata
    objects of 800 keys (9 MiB) held it 0.34 s (tests/reliability/test_loop_stalls.py). A
    smaller result is fetched as before, its JSON parsed by load_json as it is read."""
    result = cur.pgresult
    columns = _json_columns(result) if result is not None else []
    if result is None or not columns or _json_bytes(result, columns) < off_loop.OFF_LOOP_BYTES:
        return await cur.fetchall()
    set_json_loads(_unparsed, cur)
    found = await cur.fetchall()
    described = cur.description or []
    names = [described[i].name for i in columns]
    await off_loop.run(off_loop.OFF_LOOP_BYTES, _parse_json, found, names)
    return found


def _json_columns(result: PGresult) -> list[int]:
    return [i for i in range(result.nfields) if result.ftype(i) in _JSON_TYPES]


def _json_bytes(result: PGresult, columns: list[int]) -> int:
    # The bytes of the result's JSON values, counted up to OFF_LOOP_BYTES only: a large
    # result is not copied whole to learn that it is large.
    size = 0
    for row in range(result.ntuples):
        for column in columns:
            size += len(result.get_value(row, column) or b"")
        if size >= off_loop.OFF_LOOP_BYTES:
            break
    return size


def _unparsed(data: str | bytes) -> str | bytes:
    # The loader of a large result's JSON: its text, for _parse_json to parse in a thread.
    return data


def _parse_json(found: list[Row], names: list[str]) -> None:
    for row in found:
        for name in names:
            if row[name] is not None:
                row[name] = load_json(row[name])

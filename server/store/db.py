"""Small helpers over psycopg connections: named queries in, dict rows out."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection, AsyncCursor, AsyncRawCursor, sql, waiting
from psycopg.abc import Buffer, PQGen
from psycopg.abc import Params as QueryParams
from psycopg.abc import QueryNoTemplate as Query
from psycopg.adapt import Loader
from psycopg.postgres import types
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGresult
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads

from server import off_loop
from server.domain import StoredJson, decode_stored_json
from server.store.queries import query

Row = dict[str, Any]
RV = TypeVar("RV")
Params = Mapping[str, Any]


_DECODE = decode_stored_json


def load_json(data: str | bytes) -> Any:
    """A json or jsonb value as psycopg hands it over (UTF-8 bytes), as Python objects.

    What json.loads does (as decode_stored_json: an integer past +-2^53 read as the double
    it was stored from), less its per-call work on bytes (an encoding sniff, its keyword
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


#: Seconds past the statement timeout that a call without a deadline waits for PostgreSQL's
#: answer before its connection is dropped (BoundedConnection): the timeout is the server's
#: to enforce, and a server that stops answering (a Citus worker stopped under the
#: coordinator, a primary frozen) enforces nothing. Time for the cancelled statement's
#: answer to come back from a loaded server; also how long a call cancelled (at its
#: deadline) waits for its statement's cancel before the connection is dropped.
ANSWER_MARGIN_SECONDS = 2.0


class Unanswered(psycopg.OperationalError):
    """PostgreSQL did not answer within the connection's `answer_within`: the connection
    was closed under the statement (translate.py answers DEADLINE_EXCEEDED)."""


class BoundedConnection(AsyncConnection[Any]):
    """The store's pooled connection: psycopg's, with a bound on the client side for the
    database's answer (`answer_within`, seconds; None for none).

    The statement timeout is PostgreSQL's to enforce, so it ends nothing when the server does
    not answer at all: a primary that stopped, or a Citus worker that stopped while the
    coordinator waits for it (Citus cancels the worker's statement with libpq's blocking
    cancel, which waits for the silent node: docs/scaling.md). Past the bound the connection
    is closed, not cancelled, since a cancel waits for the same silent server; whatever the
    statement did may or may not have been made (as with a connection lost at COMMIT).
    """

    #: Seconds any one wait for the database (a statement, a fetch, a COMMIT) may last
    #: before the connection is dropped; StoreBase._bound_for_call sets it per call.
    answer_within: float | None = None

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = 0.1,
        timeout: float | None = None,  # noqa: ASYNC109  # psycopg's signature
    ) -> RV:
        # psycopg's AsyncConnection.wait (psycopg is pinned; tests/store/test_unanswered.py
        # fails if its private parts change), with two bounds of ours: `answer_within`, and
        # the wait after a cancel. On a call cancelled (gRPC at its deadline) psycopg asks
        # the server to cancel and waits for the answer 5 s before it closes the connection;
        # a server that stopped answering held the pooled connection that long past the
        # deadline. Here the margin.
        within = self.answer_within if timeout is None else timeout
        try:
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=within
            )
        except psycopg.errors._WaitTimeout:
            if timeout is not None:
                raise
            self.pgconn.finish()  # the pool replaces the connection
            raise Unanswered(
                f"PostgreSQL did not answer within {within:g}s; the connection was closed"
            ) from None
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            if self.pgconn.transaction_status == TransactionStatus.ACTIVE:
                await self._cancel_within(gen, interval)
            raise

    async def _cancel_within(self, gen: PQGen[Any], interval: float) -> None:
        # The statement cancelled and its answer read, within ANSWER_MARGIN_SECONDS; the
        # connection closed otherwise, as psycopg closes it past its own 5 s.
        margin = ANSWER_MARGIN_SECONDS
        try:
            await self._try_cancel(timeout=margin)
            await waiting.wait_async(gen, self.pgconn.socket, interval=interval, timeout=margin)
        except psycopg.errors.QueryCanceled:
            pass  # as asked
        except psycopg.errors._WaitTimeout:
            self.pgconn.finish()
        except BaseException as exc:  # interrupted again, or the cancel failed: state unknown
            self.pgconn.finish()
            if not isinstance(exc, Exception):
                raise


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


async def fetch_pipelined(
    conn: AsyncConnection[Any],
    statements: list[sql.SQL | sql.Composed],
    params: Mapping[str, Any],
    *,
    prepare: bool = False,
) -> list[list[Row]]:
    """The rows of each statement, all sent in one pipeline, then one Sync: one round trip
    for all of them. The results are read after the pipeline's end (they are all in by then):
    fetching inside it would flush and wait once more before the Sync's own wait, and
    fetch_rows would find no result to weigh, so psycopg parsed its JSON on the loop however
    large (a ListSessions page of 300 sessions of 800 keys held it 0.05 s,
    tests/reliability/test_loop_stalls.py).
    Searches are never prepared: a prepared search soon runs on PostgreSQL's generic plan,
    which does not know the query's words and was measured 10-20 times slower than a custom
    plan. Key lookups (`prepare`) are, after psycopg's usual five uses."""
    try:
        async with conn.pipeline():
            cursors = [conn.cursor(row_factory=dict_row) for _ in statements]
            for cursor, statement in zip(cursors, statements, strict=True):
                await cursor.execute(statement, params, prepare=None if prepare else False)
    except psycopg.Error:
        if prepare and not (conn.broken or conn.closed):
            await _forget_prepared(conn)
        raise
    return [await fetch_rows(cursor) for cursor in cursors]


async def _forget_prepared(conn: AsyncConnection[Any]) -> None:
    # psycopg counts a statement as prepared once it queued its Parse, which PostgreSQL
    # skips after an error earlier in the pipeline: on the use that prepares them (the sixth),
    # a failed first statement left the connection naming a statement that does not exist,
    # and every later call on it failed ("prepared statement _pg3_1 does not exist") until
    # the pool retired it. A transaction's rollback makes psycopg forget its prepared
    # statements; outside one (autocommit: GetMemory's recall on Citus) DEALLOCATE ALL does.
    if conn.info.transaction_status == TransactionStatus.IDLE:
        await conn.execute(query("forget_prepared"))


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
    # The store's results come in text (only export's own cursor asks for binary).
    for name in ("json", "jsonb"):
        cur.adapters.register_loader(name, _JsonView)
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


class _JsonView(Loader):
    """A large text result's JSON value as psycopg hands it over: a view of the result's
    memory (which it keeps alive), not yet copied. psycopg's own JSON loader copies it to
    bytes first, on the loop: 5 ms for a page of 100 sessions of 4,000 metadata keys
    (tests/reliability/test_loop_stalls.py); _parse_json decodes it in the thread."""

    def load(self, data: Buffer) -> Buffer:
        return data


def _parse_json(found: list[Row], names: list[str]) -> None:
    # An object keeps its text's length (StoredJson): what decides whether its answer is
    # built off the loop, known here for free.
    for row in found:
        for name in names:
            value = row[name]
            if value is None:
                continue
            size = len(value)
            if isinstance(value, memoryview):
                value = str(value, "utf-8")
            parsed = load_json(value)
            row[name] = StoredJson(parsed, size) if isinstance(parsed, dict) else parsed

"""One AddMemory call's append in its transaction (see sql/append.sql): add_memory's
statements, the race of concurrent calls adding the same uuids, and on Citus the router
statements that take add_memory's place (add_memory_citus). The calls themselves, batched into
shared commits, are add_memory.py's."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg import errors as pg

from server.errors import Unavailable
from server.store.db import Params, Row, fetch_all, fetch_one
from server.store.queries import compact, query

#: The unique key of a message's uuid in its session (migrations/0001).
_UUID_KEY = "messages_project_id_session_id_uuid_key"

#: Runs of add_memory when concurrent calls add the same uuids (see run_append).
_APPEND_ATTEMPTS = 4


def add_memory_statement(*, citus: bool, guarded: bool = False) -> sql.SQL:
    """AddMemory's statement: on plain PostgreSQL it also counts a session it inserted for its
    user; under Citus the store does that in the call's transaction (user_session_counts is
    placed with the users, a statement touching both would leave its one shard). `guarded`
    appends to a live session only (add_memory_guard), for calls naming a user that share a
    batch's transaction."""
    count = sql.SQL("") if citus else query("add_memory_count")
    guard = query("add_memory_guard") if guarded else sql.SQL("")
    statement = query("add_memory").format(
        count_session=count, guard=guard, upsert=query("add_memory_upsert")
    )
    return sql.SQL(compact(statement.as_string(None)))


#: By engine, as bench/session_counts.py swaps them; the store runs the False one only (on
#: Citus, add_memory_citus).
ADD_MEMORY = {citus: add_memory_statement(citus=citus) for citus in (False, True)}
ADD_MEMORY_GUARDED = add_memory_statement(citus=False, guarded=True)

#: AddMemory calls of up to this many messages run as router statements on Citus
#: (add_memory_citus); larger ones run add_memory, subplans and all: Citus's cost of a VALUES
#: list grows with its rows, past add_memory's round trips near 100 messages (docs/scaling.md).
CITUS_ROUTED_MESSAGES = 64

#: AddMemory's session on Citus (add_memory_citus).
ADD_MEMORY_SESSION_CITUS = sql.SQL(
    compact(
        query("add_memory_session_citus").format(upsert=query("add_memory_upsert")).as_string(None)
    )
)


@lru_cache(maxsize=64)
def add_memory_rows_citus(name: str, row: str, count: int) -> sql.SQL:
    """add_memory_messages_citus or add_memory_queue_citus (`name`) for `count` rows of
    VALUES, each `row` with its parameters numbered. The 64 last used are kept, not one per
    count: a call of up to 1,000 messages (validation.MAX_MESSAGES) makes a statement of
    ~230 kB, and one of each count would hold ~115 MB."""
    rows = sql.SQL(", ").join(query(row).format(i=sql.SQL(str(i))) for i in range(count))
    return sql.SQL(compact(query(name).format(rows=rows).as_string(None)))


async def run_append(conn: AsyncConnection[Any], statement: sql.SQL, params: Params) -> list[Row]:
    """add_memory's rows (`statement`, ADD_MEMORY's) on an autocommit connection, run again
    while it loses a uuid race.

    The statement reads which uuids the session holds in its snapshot, then waits for the
    session's row lock. A concurrent call that committed one of them meanwhile (the same
    retry, sent twice) makes the insert fail on the uuid's unique key; run again, the
    statement sees that message and answers it as stored. Each rerun follows a commit of
    another call, so a few suffice.
    """
    for attempt in range(_APPEND_ATTEMPTS):
        try:
            return await fetch_all(conn, statement, params)
        except pg.UniqueViolation as exc:
            if not _is_uuid_key(exc) or attempt + 1 == _APPEND_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


class UuidRace(Exception):
    """add_memory lost a uuid race inside a transaction, which the violation aborted."""


async def append_in_transaction(
    conn: AsyncConnection[Any], statement: sql.SQL, params: Params
) -> list[Row]:
    """run_append's statement inside the caller's transaction, which a lost uuid race aborts:
    then UuidRace, and the caller runs the whole transaction again (rerun_on_uuid_race), as the
    statement cannot simply run again in it. A savepoint would cost every call two round
    trips."""
    try:
        return await fetch_all(conn, statement, params)
    except pg.UniqueViolation as exc:
        if _is_uuid_key(exc):
            raise UuidRace from exc
        raise


async def add_memory_citus(
    conn: AsyncConnection[Any], params: Params, *, caller_uuids: bool = True
) -> list[Row]:
    """add_memory on Citus, in the caller's transaction: the rows add_memory answers, from
    router statements on the session's one shard.

    Citus plans no INSERT inside a CTE on one shard: add_memory ran there as ~8 subplans over
    intermediate results, each a round trip between coordinator and worker (docs/scaling.md,
    "AddMemory on Citus"). Here: the messages the session holds (a retry), the session's
    upsert for the others, then their rows and their queue rows, each one router statement.
    A uuid a concurrent call committed meanwhile fails the insert on its key (UuidRace: the
    caller runs the transaction again, as for add_memory). A call of more than
    CITUS_ROUTED_MESSAGES messages runs add_memory as before. Without `caller_uuids` (every uuid
    made by the server for this call, uuid4) the session holds none of them: the read of
    the held messages is skipped, one statement of four.
    """
    if len(params["uuids"]) > CITUS_ROUTED_MESSAGES:
        return await append_in_transaction(conn, ADD_MEMORY[True], params)
    held = await fetch_all(conn, "add_memory_held_citus", params) if caller_uuids else []
    taken = {int(row["ord"]) for row in held}
    differs = any(row["differs"] for row in held)
    fresh = [] if differs else [i for i in range(len(params["uuids"])) if i + 1 not in taken]
    session = await fetch_one(conn, ADD_MEMORY_SESSION_CITUS, {**params, "n": len(fresh)})
    if session is None:
        return []
    answer = {int(row["ord"]): _answer_row(row) for row in held}
    if fresh:
        answer |= await _add_fresh_citus(conn, params, session, fresh)
    # add_memory answers the session without its next_sequence (a backup's field): so here.
    session = {k: v for k, v in session.items() if k != "next_sequence"}
    if not answer:
        return [{**session, **dict.fromkeys(_HELD_COLUMNS)}]
    return [{**session, **answer[ord_]} for ord_ in sorted(answer)]


async def _add_fresh_citus(
    conn: AsyncConnection[Any], params: Params, session: Row, fresh: list[int]
) -> dict[int, Row]:
    """The request's messages `fresh` (indexes) inserted with the sequences the session's
    upsert reserved for them, and queued for embedding; their answer rows by ord. A uuid a
    concurrent call committed meanwhile fails the insert (UuidRace)."""
    first = int(session["next_sequence"]) - len(fresh)
    numbered = _numbered_messages(params, fresh, first)
    statement = add_memory_rows_citus(
        "add_memory_messages_citus", "add_memory_message_citus", len(fresh)
    )
    values = {**numbered, "at": session["last_message_at"], **key_of(params)}
    made = await append_in_transaction(conn, statement, values)
    if params["embed"]:
        queued = len(fresh) if not params["per_turn"] else 1
        due = {f"sequence_{j}": first + len(fresh) - queued + j for j in range(queued)}
        queue = add_memory_rows_citus("add_memory_queue_citus", "add_memory_due_citus", queued)
        await conn.execute(queue, {**due, **key_of(params)})
    fresh_rows = zip(fresh, made, strict=True)
    return {i + 1: _answer_row(row, ord=i + 1, differs=False) for i, row in fresh_rows}


_HELD_COLUMNS = tuple(
    f"m_{c}"
    for c in (
        *("ord", "differs", "uuid", "sequence", "role", "role_type", "content"),
        *("metadata", "created_at", "updated_at", "deleted_at"),
    )
)


def _answer_row(row: Row, **more: Any) -> Row:
    # A message of add_memory's answer, held or fresh: its columns and `more` (a fresh one's
    # ord and differs), named m_ as add_memory names them.
    return {f"m_{k}": v for k, v in {**row, **more}.items()}


def key_of(params: Params) -> dict[str, Any]:
    """The project and session of an AddMemory call's parameters."""
    return {"project_id": params["project_id"], "session_id": params["session_id"]}


def _numbered_messages(params: Params, fresh: list[int], first: int) -> dict[str, Any]:
    # add_memory_message_citus's parameters for the request's messages `fresh` (indexes),
    # taking the sequences from `first` on.
    numbered: dict[str, Any] = {}
    for j, i in enumerate(fresh):
        numbered |= {
            f"sequence_{j}": first + j,
            f"uuid_{j}": params["uuids"][i],
            f"role_{j}": params["roles"][i],
            f"role_type_{j}": params["role_types"][i],
            f"content_{j}": params["contents"][i],
            f"metadata_{j}": params["metadatas"][i],
        }
    return numbered


async def rerun_on_uuid_race(run: Callable[[], Awaitable[list[Row]]]) -> list[Row]:
    # Each rerun follows a commit of a call that added one of the uuids, so a few suffice.
    for _ in range(_APPEND_ATTEMPTS - 1):
        try:
            return await run()
        except UuidRace:
            continue
    try:
        return await run()
    except UuidRace as exc:
        raise Unavailable(
            "AddMemory lost too many races for its message uuids; retry",
            reason="CONCURRENT_WRITES",
        ) from exc


async def lock_for_revival(conn: AsyncConnection[Any], params: Params) -> Row | None:
    """The session of an AddMemory call that answered nothing (soft-deleted, or another
    user's), locked in the caller's transaction: its user and whether it is still deleted
    (lock_session_for_revival). None: the session is gone (purged)."""
    return await fetch_one(conn, "lock_session_for_revival", params)


def _is_uuid_key(exc: pg.UniqueViolation) -> bool:
    """Whether the violated key is the message uuid key.

    On Citus the violation comes from a shard's copy of the key (its name ends with the shard
    id) and reaches the coordinator as a message without a constraint name.
    """
    named = exc.diag.constraint_name or exc.diag.message_primary or ""
    return re.search(rf"\b{_UUID_KEY}(_\d+)?\b", named) is not None

"""The message methods of the Store: memory appended to, read from and cleared in sessions."""

from __future__ import annotations

import asyncio
import json
import re
import uuid as uuid_lib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg import errors as pg
from psycopg.rows import dict_row

from server import off_loop
from server.domain import Message, MetadataChange, NewMessage, Page, Session
from server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MemstoreError,
    NotFound,
    Unavailable,
)
from server.store import rows
from server.store.base import (
    StoreBase,
    factory,
    key,
    merged_too_large,
    metadata_params,
    no_such_user,
    rerun_deadlocked,
)
from server.store.budget import budget_rows
from server.store.coalesce import Batcher
from server.store.db import Params, Row, fetch_all, fetch_one, fetch_rows
from server.store.queries import compact, query
from server.store.sessions import (
    count_live_sessions,
    forget_kept_recall,
    hide_in_live_session,
    lock_live_session,
    lock_session_owner,
    own_new_session,
    session_missing,
)

#: The unique key of a message's uuid in its session (migrations/0001).
_UUID_KEY = "messages_project_id_session_id_uuid_key"

#: Runs of add_memory when concurrent calls add the same uuids (see _append).
_APPEND_ATTEMPTS = 4

#: AddMemory calls one shared commit takes at most, and such batches running at once (at
#: most the pool's size). PostgreSQL runs a batch's statements one after the other in one
#: backend: small batches on several connections kept both cores busy and beat one large
#: batch at a time (docs/performance.md).
APPEND_BATCH_CALLS = 8
APPEND_BATCHES_IN_FLIGHT = 8
#: Calls of more messages commit alone: their commit is already shared by their messages,
#: and a batch of them would hold one backend for long (AddMemory(20) batched was slower).
BATCHED_CALL_MESSAGES = 4


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


#: By engine, as bench/session_counts.py swaps them; the store runs the False one only (on
#: Citus, add_memory_citus).
_ADD_MEMORY = {citus: add_memory_statement(citus=citus) for citus in (False, True)}
_ADD_MEMORY_GUARDED = add_memory_statement(citus=False, guarded=True)


@cache
def window_fragment(*, budgeted: bool, coalesced: bool) -> sql.Composed:
    """GetMemory's window (memory_window, or memory_window_sized read newest first up to a
    byte budget by budget_rows) over the call's values: get_memory's parameters, or
    (`coalesced`) the call's row `q` and its session `s` in get_memories_recall."""
    if coalesced:
        project_id, session_id, lastn, budget = (
            "s.project_id",
            "s.session_id",
            "q.lastn",
            "q.budget",
        )
    else:
        project_id, session_id = "%(project_id)s", "%(session_id)s"
        lastn, budget = "%(lastn)s", "%(budget)s::int8"
    scan = query("memory_window_scan").format(
        project_id=sql.SQL(project_id), session_id=sql.SQL(session_id), lastn=sql.SQL(lastn)
    )
    if budgeted:
        sized = query("memory_window_sized").format(scan=scan)
        return budget_rows(sized, sql.SQL("k.sequence DESC"), sql.SQL(budget))
    return query("memory_window").format(scan=scan)


@cache
def memory_window(*, budgeted: bool) -> sql.SQL:
    """GetMemory's statement (a live session and its last `lastn` live messages, read up to
    `budget` bytes of content and metadata if `budgeted`), for callers that pipeline it with
    another read: recall sends both in one round trip."""
    window = window_fragment(budgeted=budgeted, coalesced=False)
    return sql.SQL(compact(query("get_memory").format(window=window).as_string(None)))


@cache
def list_messages_statement() -> sql.SQL:
    """ListMessages' statement: a live session and one page of its live messages, read up
    to `budget` bytes of content and metadata as printed (list_messages_sized by budget_rows)."""
    page = budget_rows(query("list_messages_sized"), sql.SQL("k.sequence"))
    return sql.SQL(compact(query("list_messages").format(page=page).as_string(None)))


class MessageMethods(StoreBase):
    """Appends, reads and soft-deletes of the messages of sessions."""

    async def add_memory(
        self, project_id: int, session_id: str, user_id: str | None, messages: list[NewMessage]
    ) -> tuple[Session, list[Message]]:
        """Upserts the session (undeleting it) and appends messages in one statement.

        A message whose uuid the session already holds is not appended again: it is answered
        as stored, so a retry with the same uuids changes nothing and answers as the first
        call did. Only new messages take sequences, count, revive the session and are queued
        for embedding. Messages come back one per request message, in request order.

        Raises:
            FailedPrecondition: the named user does not exist (reason USER_NOT_FOUND), or the
                session belongs to another user or to none (reason SESSION_USER_MISMATCH).
            AlreadyExists: a uuid names a message of the session with another role,
                role_type or content (reason MESSAGE_ALREADY_EXISTS); nothing was written.
            InvalidArgument: no messages, a uuid given twice, or a value the database rejects.
        """
        if not messages:
            raise InvalidArgument.field("messages", "at least one message is required")
        uuids = [m.uuid or str(uuid_lib.uuid4()) for m in messages]
        if len(set(uuids)) < len(uuids):
            raise InvalidArgument.field("messages", "each message needs its own uuid")
        params = {
            **key(project_id, session_id=session_id),
            "user_id": user_id,
            "uuids": uuids,
            "roles": [m.role for m in messages],
            "role_types": [m.role_type for m in messages],
            "contents": [m.content for m in messages],
            "metadatas": await _metadata_texts(messages),
            "embed": self.vectors or self.word_recall,
            "per_turn": self.word_recall,
            "revive": False,
        }
        call = _Append(params, user_id, any(m.uuid for m in messages))
        # On Citus each call stays alone: calls of several sessions in one transaction would
        # make a multi-shard transaction (two-phase commit) of a single-shard write. A call
        # naming a user shares a batch only to append to a live session (add_memory_guard):
        # making a session counts it for the user (user_session_counts), and a shared
        # transaction would hold that count's row lock while its later calls wait for their
        # sessions' locks: two batches counting for one user could wait on each other in a
        # cycle (deadlock; tests/store/test_session_counts). Such a call finds no live
        # session there and makes it alone below.
        if len(messages) <= BATCHED_CALL_MESSAGES and not self.citus:
            found = await self._appender.submit(call)
            if not found and user_id is not None:
                found = _outcome(await self._append_alone(call))
        else:
            found = _outcome(await self._append_alone(call))
        if not found:
            # The session is soft-deleted (add_memory revives only on this path, which counts
            # it live again for its user), or it belongs to another user.
            found = await self._append_reviving(call)
        if not found:
            raise FailedPrecondition(
                f"session '{session_id}' does not belong to user '{user_id}'",
                reason="SESSION_USER_MISMATCH",
            )
        for row in found:
            if row["m_differs"]:
                raise _uuid_taken(session_id, row)
        return rows.session(found[0]), rows.joined_messages(found)

    @cached_property
    def _appender(self) -> Batcher[_Append, list[Row]]:
        # Concurrent AddMemory calls share a round trip and a commit (see _append_batch).
        return Batcher(
            self._append_batch,
            max_in_flight=min(APPEND_BATCHES_IN_FLIGHT, self._pool.max_size),
            max_batch=APPEND_BATCH_CALLS,
            max_waiting_batches=self._pool.max_waiting,
        )

    async def _append_batch(self, batch: list[_Append]) -> list[list[Row] | Exception]:
        # A session at most once per transaction, the calls of one session in arrival order:
        # PostgreSQL checks a session's foreign key to its user on every update of a row
        # version its own transaction wrote (keys changed or not), so a second append to a
        # session in one transaction locked the user (FOR KEY SHARE) while holding the
        # session, the reverse of DeleteUser's order: the two waited on each other (deadlock
        # detected; tests/store/test_group_commit.py). Calls to a session already in the
        # batch go in a later round, each round a transaction after the one before.
        found: list[list[Row] | Exception] = [[] for _ in batch]
        for round_ in _rounds(batch):
            answers = await self._append_round([batch[i] for i in round_])
            for i, answer in zip(round_, answers, strict=True):
                found[i] = answer
        return found

    async def _append_round(self, batch: list[_Append]) -> list[list[Row] | Exception]:
        # Several calls: their statements in one pipeline, which PostgreSQL runs as one
        # implicit transaction committed at its Sync — one round trip and one WAL flush for
        # all, each call answered only after that commit. Any statement failing rolls back
        # the whole transaction (nothing of any call is written), and each call then runs
        # alone, so a failure in one never fails or half-writes another.
        if len(batch) > 1:
            try:
                return list(await self._append_together(batch))
            except _TogetherFailed:
                pass
        return list(await asyncio.gather(*(self._append_alone(call) for call in batch)))

    async def _append_together(self, batch: list[_Append]) -> list[list[Row]]:
        # Sessions in key order, as DeleteUser, Restore and the embedding worker lock them
        # (their statements compare ids by code points, COLLATE "C", as Python does): two
        # batches (of two processes) touching the same sessions wait, never deadlock.
        order = sorted(range(len(batch)), key=lambda i: batch[i].session_key)
        found: list[list[Row]] = [[] for _ in batch]
        async with self._connect(field="messages", single=True) as conn:
            try:
                rows_in_order = await _append_pipelined(conn, [batch[i] for i in order])
            except psycopg.Error as exc:
                if conn.broken or conn.closed:
                    raise  # the connection is gone: every call of the batch is Unavailable
                # psycopg counts the statement as prepared once it queued its Parse, which
                # the server skips after an error in the pipeline: the connection would
                # then name a statement that does not exist. The pool replaces it.
                await conn.close()
                raise _TogetherFailed from exc
        for i, result in zip(order, rows_in_order, strict=True):
            found[i] = result
        return found

    async def _append_alone(self, call: _Append) -> list[Row] | Exception:
        try:
            return await _rerun_on_uuid_race(lambda: self._append_alone_once(call))
        except MemstoreError as exc:
            return exc

    async def _append_alone_once(self, call: _Append) -> list[Row]:
        no_user = factory(no_such_user(call.user_id))
        if not self.citus:
            async with self._connect(foreign_key=no_user, field="messages", single=True) as conn:
                return await _append(conn, _ADD_MEMORY[False], call.params)
        # On Citus no foreign key checks the named user: the store does, in the transaction,
        # for a session the call made, and counts it there (own_new_session). An append to
        # the user's live session (every turn after the first) never reads the user's shard:
        # its transaction stays on the session's one shard. The user is locked after the
        # session's insert, and that is safe: DeleteUser locks the user before it deletes the
        # sessions, so either this transaction's lock comes first and DeleteUser then sees the
        # committed session, or DeleteUser commits first and the lock finds no user (the
        # insert rolls back). A session that exists was made with its user checked, and its
        # row lock (the upsert's) orders this append with DeleteUser's delete of it.
        owner = call.user_id
        async with self._connect(foreign_key=no_user, field="messages") as conn:
            found = await add_memory_citus(conn, call.params, caller_uuids=call.caller_uuids)
            if owner is not None and found and found[0]["inserted"]:
                await own_new_session(conn, call.params["project_id"], owner)
            return found

    async def _append_reviving(self, call: _Append) -> list[Row]:
        # A deadlock's victim (a DeleteUser of the session's user) runs again, whole.
        return await rerun_deadlocked(
            lambda: _rerun_on_uuid_race(lambda: self._append_reviving_once(call))
        )

    async def _append_reviving_once(self, call: _Append) -> list[Row]:
        # add_memory answered nothing: the session is soft-deleted, or another user's. Its
        # row is locked first, so whether it was deleted is exact until this commits, and a
        # revived session is counted live again for its user in the same transaction (the
        # session row, then the count: the order of every session write).
        params = {**call.params, "revive": True}
        project_id = params["project_id"]
        async with self._connect(foreign_key=factory(no_such_user(call.user_id))) as conn:
            if self.citus and call.user_id is not None:
                await lock_session_owner(conn, project_id, call.user_id)
            before = await fetch_one(conn, "lock_session_for_revival", params)
            if self.citus:
                found = await add_memory_citus(conn, params, caller_uuids=call.caller_uuids)
            else:
                found = await _append_in_transaction(conn, _ADD_MEMORY[False], params)
            if not found:
                return found
            owner = found[0]["user_id"]
            revived = before is not None and before["deleted"] and found[0]["deleted_at"] is None
            # A session purged since add_memory first ran is made anew (inserted): add_memory
            # counted it on plain PostgreSQL, the store does under Citus.
            made = bool(found[0]["inserted"]) and self.citus
            if owner is not None and (revived or made):
                await count_live_sessions(conn, project_id, owner, 1)
        return found

    async def get_memory(
        self, project_id: int, session_id: str, lastn: int, *, budget: int | None = None
    ) -> tuple[Session | None, list[Message]]:
        """The live session (None if absent/deleted) and its last `lastn` live messages.

        Messages come oldest first, read newest first up to `budget` bytes of content and
        metadata (as printed) if
        given (get_memory_with_recall, which GetMemory calls, says when that cut them).

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = {**key(project_id, session_id=session_id), "lastn": lastn, "budget": budget}
        async with self._connect(single=True) as conn:
            found = await fetch_all(conn, memory_window(budgeted=budget is not None), params)
        if not found:
            return None, []
        return rows.session(found[0]), rows.joined_messages(found)

    async def list_messages(
        self,
        project_id: int,
        session_id: str,
        after_sequence: int | None,
        limit: int,
        *,
        offset: int | None = None,
        budget: int,
    ) -> Page[Message]:
        """Live messages by sequence, strictly after `after_sequence` (keyset) or past the
        first `offset` (ListMessages' page_number); total_size is the session's live count.
        The page ends early, `cut`, where the messages before the next hold `budget` bytes of
        content and metadata (the first message is always in it).

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        params = {
            **key(project_id, session_id=session_id),
            "after_sequence": after_sequence or 0,
            "limit": limit + 1,
            "offset": offset or 0,
            "budget": budget,
        }
        async with self._connect(single=True) as conn:
            found = await fetch_all(conn, list_messages_statement(), params)
            if not found:
                raise await session_missing(conn, project_id, session_id)
        messages = rows.joined_messages(found)
        total = int(found[0]["message_count"])
        if found[-1]["m_followed"]:
            return Page(messages, has_more=True, total_size=total, cut=True)
        return Page(messages[:limit], has_more=len(messages) > limit, total_size=total)

    async def get_message(self, project_id: int, session_id: str, uuid: str) -> Message:
        """One live message of a live session.

        Raises:
            NotFound: the message or its session is absent or soft-deleted.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        params = {**key(project_id, session_id=session_id), "uuid": parse_uuid(session_id, uuid)}
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "get_message", params)
        if row is None:
            raise message_not_found(session_id, uuid)
        if row["uuid"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.message(row)

    async def update_message(
        self, project_id: int, session_id: str, uuid: str, change: MetadataChange
    ) -> Message:
        """Merges (or replaces) one live message's metadata, its session locked first.

        Raises:
            NotFound: the message or its session is absent or soft-deleted.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        params = {
            **key(project_id, session_id=session_id),
            "uuid": parse_uuid(session_id, uuid),
            **metadata_params(change),
        }
        async with self._connect(field="metadata") as conn:
            # The session first, as AddMemory, ClearMemory and DeleteSession take it before
            # its messages: the statement alone locked the message, then the session to
            # touch it, and a ClearMemory of the session deadlocked with it
            # (tests/store/test_lock_order.py).
            live = await lock_live_session(conn, project_id, session_id, to_update=True)
            row = await fetch_one(conn, "update_message", params) if live else None
        if row is None:
            raise message_not_found(session_id, uuid)
        if row["uuid"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.message(row)

    async def clear_memory(self, project_id: int, session_id: str) -> int:
        """Soft-deletes the live messages, keeps the session; returns how many.

        Raises:
            NotFound: the session is absent or soft-deleted.
        """
        async with self._connect() as conn:
            row = await hide_in_live_session(conn, "clear_memory", project_id, session_id)
            await forget_kept_recall(conn, self, project_id, session_id)
            return int(row["messages"])


def _outcome(found: list[Row] | Exception) -> list[Row]:
    if isinstance(found, Exception):
        raise found
    return found


@dataclass(frozen=True, slots=True)
class _Append:
    """One AddMemory call's statement parameters, waiting for its batch."""

    params: dict[str, Any]
    user_id: str | None
    #: Whether a message carries the caller's uuid: only then can the session hold one.
    caller_uuids: bool = True

    @property
    def session_key(self) -> tuple[int, str]:
        return self.params["project_id"], self.params["session_id"]


def _rounds(batch: list[_Append]) -> list[list[int]]:
    """The indexes of `batch` in rounds: a session's n-th call in the n-th, in batch order."""
    rounds: list[list[int]] = []
    seen: Counter[tuple[int, str]] = Counter()
    for i, call in enumerate(batch):
        nth = seen[call.session_key]
        seen[call.session_key] += 1
        if nth == len(rounds):
            rounds.append([])
        rounds[nth].append(i)
    return rounds


class _TogetherFailed(Exception):
    """A statement of a batch failed: the batch's transaction rolled back, nothing written."""


async def _append_pipelined(conn: AsyncConnection[Any], batch: list[_Append]) -> list[list[Row]]:
    # Autocommit and pipeline mode: the statements up to the Sync form one implicit
    # transaction, committed by the Sync (or rolled back whole at the first error).
    async with conn.pipeline():
        cursors = [conn.cursor(row_factory=dict_row) for _ in batch]
        for cursor, call in zip(cursors, batch, strict=True):
            statement = _ADD_MEMORY[False] if call.user_id is None else _ADD_MEMORY_GUARDED
            await cursor.execute(statement, call.params)
    return [await fetch_rows(cursor) for cursor in cursors]


async def _metadata_texts(messages: list[NewMessage]) -> list[str]:
    # Past OFF_LOOP_BYTES of JSON the rest is dumped in a thread (server/off_loop.py): the
    # metadata of 1,000 messages of 800 keys each (9 MiB) held the loop both ports share
    # 0.26 s.
    texts: list[str] = []
    size = 0
    for i, message in enumerate(messages):
        if size >= off_loop.OFF_LOOP_BYTES:
            return texts + await off_loop.run(size, _dumped, messages[i:])
        texts.append(_json_text(message))
        size += len(texts[-1])
    return texts


def _dumped(messages: list[NewMessage]) -> list[str]:
    return [_json_text(m) for m in messages]


def _json_text(message: NewMessage) -> str:
    # As JSON text (what psycopg's Jsonb would send), "{}" without a json.dumps.
    return json.dumps(message.metadata) if message.metadata else "{}"


async def _append(conn: AsyncConnection[Any], statement: sql.SQL, params: Params) -> list[Row]:
    # The statement reads which uuids the session holds in its snapshot, then waits for the
    # session's row lock. A concurrent call that committed one of them meanwhile (the same
    # retry, sent twice) makes the insert fail on the uuid's unique key; run again, the
    # statement sees that message and answers it as stored. Each rerun follows a commit of
    # another call, so a few suffice.
    for attempt in range(_APPEND_ATTEMPTS):
        try:
            return await fetch_all(conn, statement, params)
        except pg.UniqueViolation as exc:
            if not _is_uuid_key(exc) or attempt + 1 == _APPEND_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


class _UuidRace(Exception):
    """add_memory lost a uuid race inside a transaction, which the violation aborted."""


async def _append_in_transaction(
    conn: AsyncConnection[Any], statement: sql.SQL, params: Params
) -> list[Row]:
    # _append's race, inside a transaction: the uuid key violation aborts the transaction, so
    # the statement cannot simply run again in it; the caller runs the whole transaction again
    # (_rerun_on_uuid_race). A savepoint would cost every call two round trips.
    try:
        return await fetch_all(conn, statement, params)
    except pg.UniqueViolation as exc:
        if _is_uuid_key(exc):
            raise _UuidRace from exc
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
    A uuid a concurrent call committed meanwhile fails the insert on its key (_UuidRace: the
    caller runs the transaction again, as for add_memory). A call of more than
    CITUS_ROUTED_MESSAGES messages runs add_memory as before. Without `caller_uuids` (every uuid
    made by the server for this call, uuid4) the session holds none of them: the read of
    the held messages is skipped, one statement of four.
    """
    if len(params["uuids"]) > CITUS_ROUTED_MESSAGES:
        return await _append_in_transaction(conn, _ADD_MEMORY[True], params)
    held = await fetch_all(conn, "add_memory_held_citus", params) if caller_uuids else []
    taken = {int(row["ord"]) for row in held}
    differs = any(row["differs"] for row in held)
    fresh = [] if differs else [i for i in range(len(params["uuids"])) if i + 1 not in taken]
    session = await fetch_one(conn, ADD_MEMORY_SESSION_CITUS, {**params, "n": len(fresh)})
    if session is None:
        return []
    answer = {int(row["ord"]): _answer_row(row) for row in held}
    if fresh:
        first = int(session["next_sequence"]) - len(fresh)
        numbered = _numbered_messages(params, fresh, first)
        statement = add_memory_rows_citus(
            "add_memory_messages_citus", "add_memory_message_citus", len(fresh)
        )
        values = {**numbered, "at": session["last_message_at"], **key_of(params)}
        try:
            made = await fetch_all(conn, statement, values)
        except pg.UniqueViolation as exc:
            if _is_uuid_key(exc):
                raise _UuidRace from exc
            raise
        for i, row in zip(fresh, made, strict=True):
            answer[i + 1] = _answer_row(row, ord=i + 1, differs=False)
        if params["embed"]:
            queued = len(fresh) if not params["per_turn"] else 1
            due = {f"sequence_{j}": first + len(fresh) - queued + j for j in range(queued)}
            queue = add_memory_rows_citus("add_memory_queue_citus", "add_memory_due_citus", queued)
            await conn.execute(queue, {**due, **key_of(params)})
    # add_memory answers the session without its next_sequence (a backup's field): so here.
    session = {k: v for k, v in session.items() if k != "next_sequence"}
    if not answer:
        return [{**session, **dict.fromkeys(_HELD_COLUMNS)}]
    return [{**session, **answer[ord_]} for ord_ in sorted(answer)]


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


async def _rerun_on_uuid_race(run: Callable[[], Awaitable[list[Row]]]) -> list[Row]:
    # Each rerun follows a commit of a call that added one of the uuids, so a few suffice.
    for _ in range(_APPEND_ATTEMPTS - 1):
        try:
            return await run()
        except _UuidRace:
            continue
    try:
        return await run()
    except _UuidRace as exc:
        raise Unavailable(
            "AddMemory lost too many races for its message uuids; retry",
            reason="CONCURRENT_WRITES",
        ) from exc


def _uuid_taken(session_id: str, row: Row) -> AlreadyExists:
    index = int(row["m_ord"]) - 1
    return AlreadyExists(
        f"messages[{index}].uuid: message '{row['m_uuid']}' already exists in session "
        f"'{session_id}' with another role, role_type or content; resend it unchanged to "
        "retry, or give a new message a new uuid",
        reason="MESSAGE_ALREADY_EXISTS",
    )


def parse_uuid(session_id: str, value: str) -> uuid_lib.UUID:
    """The UUID of a message; a string that is no UUID names no message (NotFound)."""
    try:
        return uuid_lib.UUID(value)
    except ValueError:
        raise message_not_found(session_id, value) from None


def message_not_found(session_id: str, uuid: str) -> NotFound:
    """The error of a uuid that names no live message of a live session."""
    return NotFound(
        f"message '{uuid}' not found in session '{session_id}'", reason="MESSAGE_NOT_FOUND"
    )


def _is_uuid_key(exc: pg.UniqueViolation) -> bool:
    """Whether the violated key is the message uuid key.

    On Citus the violation comes from a shard's copy of the key (its name ends with the shard
    id) and reaches the coordinator as a message without a constraint name.
    """
    named = exc.diag.constraint_name or exc.diag.message_primary or ""
    return re.search(rf"\b{_UUID_KEY}(_\d+)?\b", named) is not None

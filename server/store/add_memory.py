"""AddMemory, the Store's method: messages appended to a session, concurrent calls sharing a
round trip and a commit; each call's statements are append.py's."""

from __future__ import annotations

import asyncio
import json
import uuid as uuid_lib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from server import off_loop
from server.domain import Message, NewMessage, Session
from server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MemstoreError
from server.store import rows
from server.store.append import (
    ADD_MEMORY,
    ADD_MEMORY_GUARDED,
    add_memory_citus,
    append_in_transaction,
    lock_for_revival,
    rerun_on_uuid_race,
    run_append,
)
from server.store.base import StoreBase, factory, key, no_such_user, rerun_deadlocked
from server.store.coalesce import Batcher
from server.store.db import Row, fetch_rows
from server.store.sessions import count_live_sessions, lock_session_owner, own_new_session

#: AddMemory calls one shared commit takes at most, and such batches running at once (at
#: most the pool's size). PostgreSQL runs a batch's statements one after the other in one
#: backend: small batches on several connections kept both cores busy and beat one large
#: batch at a time (docs/performance.md).
APPEND_BATCH_CALLS = 8
APPEND_BATCHES_IN_FLIGHT = 8
#: Calls of more messages commit alone: their commit is already shared by their messages,
#: and a batch of them would hold one backend for long (AddMemory(20) batched was slower).
BATCHED_CALL_MESSAGES = 4


class AddMemoryMethods(StoreBase):
    """AddMemory: appends of messages to sessions, made or revived as needed."""

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
            return await rerun_on_uuid_race(lambda: self._append_alone_once(call))
        except MemstoreError as exc:
            return exc

    async def _append_alone_once(self, call: _Append) -> list[Row]:
        no_user = factory(no_such_user(call.user_id))
        if not self.citus:
            async with self._connect(foreign_key=no_user, field="messages", single=True) as conn:
                return await run_append(conn, ADD_MEMORY[False], call.params)
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
        session = call.params["session_id"]
        async with self._connect(foreign_key=no_user, field="messages", session=session) as conn:
            found = await add_memory_citus(conn, call.params, caller_uuids=call.caller_uuids)
            if owner is not None and found and found[0]["inserted"]:
                await own_new_session(conn, call.params["project_id"], owner)
            return found

    async def _append_reviving(self, call: _Append) -> list[Row]:
        # A deadlock's victim (a DeleteUser of the session's user) runs again, whole.
        return await rerun_deadlocked(
            lambda: rerun_on_uuid_race(lambda: self._append_reviving_once(call))
        )

    async def _append_reviving_once(self, call: _Append) -> list[Row]:
        # add_memory answered nothing: the session is soft-deleted, or another user's. Its
        # row is locked first, so whether it was deleted is exact until this commits, and a
        # revived session is counted live again for its user in the same transaction (the
        # session row, then the count: the order of every session write).
        params = {**call.params, "revive": True}
        project_id = params["project_id"]
        no_user = factory(no_such_user(call.user_id))
        async with self._connect(
            foreign_key=no_user, session=params["session_id"], user=call.user_id
        ) as conn:
            if self.citus and call.user_id is not None:
                await lock_session_owner(conn, project_id, call.user_id)
            before = await lock_for_revival(conn, params)
            if self.citus:
                found = await add_memory_citus(conn, params, caller_uuids=call.caller_uuids)
            else:
                found = await append_in_transaction(conn, ADD_MEMORY[False], params)
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
            statement = ADD_MEMORY[False] if call.user_id is None else ADD_MEMORY_GUARDED
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


def _uuid_taken(session_id: str, row: Row) -> AlreadyExists:
    index = int(row["m_ord"]) - 1
    return AlreadyExists(
        f"messages[{index}].uuid: message '{row['m_uuid']}' already exists in session "
        f"'{session_id}' with another role, role_type or content; resend it unchanged to "
        "retry, or give a new message a new uuid",
        reason="MESSAGE_ALREADY_EXISTS",
    )

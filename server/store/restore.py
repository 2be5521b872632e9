"""The restore method of the Store: rows written back exactly as a backup holds them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from server.domain import Message, RestoreCounts, Restored, Session, User
from server.errors import AlreadyExists, FailedPrecondition, MemstoreError, Unavailable
from server.store.base import StoreBase, rerun_deadlocked
from server.store.db import Params, Row, fetch_all, fetch_one
from server.store.queries import query
from server.store.sessions import lock_session_owner
from server.store.translate import ErrorFactory

#: Conflicting rows named in one error; the rest are counted.
_NAMED_CONFLICTS = 5


class RestoreMethods(StoreBase):
    """Writes users, sessions and messages with their original values (memstore restore)."""

    async def restore(
        self,
        project_id: int,
        users: list[User],
        sessions: list[Session],
        messages: list[Message],
        *,
        require_empty: bool = False,
    ) -> Restored:
        """Writes the rows in one transaction: all of them, or none.

        A row whose key is stored with exactly these values counts as existing; derived
        values (message_count, the next sequence, session_count) follow from the rows.
        Restores of one project take turns, each waiting for the one before to commit.

        Raises:
            FailedPrecondition: require_empty and the project holds rows (PROJECT_NOT_EMPTY);
                a session names an absent user (USER_NOT_FOUND), a message an absent session
                (SESSION_NOT_FOUND).
                A live message names a soft-deleted session (SESSION_DELETED).
                The server reaches a Citus worker (CITUS_WORKER).
            AlreadyExists: a row's key is stored with other values (RESTORE_CONFLICT), also
                when another call stored it while this one ran.
            Unavailable: a row another call stored while this one ran was removed again
                before it could be compared (nothing written; the request may be resent).
        """
        if self.worker_group is not None:
            # Restores of a project take turns by an advisory lock, which is each node's own:
            # through a worker they would no longer (tests/citus/test_through_a_worker.py).
            raise FailedPrecondition(
                f"this server reaches a Citus worker (node group {self.worker_group}): "
                "Restore runs through a server on the coordinator's URL only, where Restores "
                "of one project take turns",
                reason="CITUS_WORKER",
            )
        # A transaction locking the same sessions in another order can make it a deadlock's
        # victim (on Citus, DeleteUser locks the user's sessions in no order): rolled back
        # whole, it runs again (tests/store/test_restore_races.py).
        return await rerun_deadlocked(
            lambda: self._restore_once(
                project_id, users, sessions, messages, require_empty=require_empty
            )
        )

    async def _restore_once(
        self,
        project_id: int,
        users: list[User],
        sessions: list[Session],
        messages: list[Message],
        *,
        require_empty: bool,
    ) -> Restored:
        async with self._connect(foreign_key=_missing_parent(users, sessions, messages)) as conn:
            # Before the check: the Restore before this one has committed, so project_rows
            # sees its rows (tests/store/test_restore_races.py).
            await conn.execute(query("restore_serialize"), {"project_id": project_id})
            if require_empty:
                row = await fetch_one(conn, "project_rows", {"project_id": project_id})
                if row and row["taken"]:
                    raise FailedPrecondition(
                        "the project is not empty: a restore goes into a project without "
                        "users or sessions (resume an interrupted one with --resume)",
                        reason="PROJECT_NOT_EMPTY",
                    )
            users_done = await _restore_kind(
                conn, "users", ("restore_users_existing", "restore_users"),
                {**_user_params(users), "project_id": project_id},
            )  # fmt: skip
            if self.citus:
                # No foreign key from sessions to users on Citus: the store checks and locks
                # the users the sessions name (after the request's own users are written).
                for owner in sorted({s.user_id for s in sessions if s.user_id is not None}):
                    try:
                        await lock_session_owner(conn, project_id, owner)
                    except FailedPrecondition:
                        raise _no_user(sessions, {owner}) from None
            made: list[tuple[Any, ...]] = []
            sessions_done = await _restore_kind(
                conn, "sessions", ("restore_sessions_existing", "restore_sessions"),
                {**_session_params(sessions), "project_id": project_id}, made=made,
            )  # fmt: skip
            deleted = await self._lock_message_sessions(conn, project_id, messages)
            await _count_restored_sessions(conn, project_id, made)
            params = {
                **_message_params(messages),
                "embed": self.vectors or self.word_recall,
                "per_turn": self.word_recall,
                "project_id": project_id,
            }
            messages_done = await _restore_kind(
                conn, "messages", ("restore_messages_existing", "restore_messages"), params,
                deleted=deleted,
            )  # fmt: skip
        return Restored(users_done, sessions_done, messages_done)

    async def _lock_message_sessions(
        self, conn: AsyncConnection[Any], project_id: int, messages: list[Message]
    ) -> set[str]:
        """Locks the sessions the messages name, in key order, before their counts change.

        Without the lock, restore_messages counted its messages into the sessions its
        snapshot held: a session a concurrent Restore or AddMemory committed while the
        statement ran (waiting for that call's copy of a message, say) passed the insert's
        foreign key check and was not counted (tests/store/test_restore_races.py). Locked
        here, each session is in every later snapshot of this transaction, and no other
        write appends to it, clears it or deletes it before the commit. The order is that of
        every session write: the session rows, then the count's (count_restored_sessions).

        Returns:
            The soft-deleted ones among them: locked, they stay so until the commit.

        Raises:
            FailedPrecondition: a message names a session neither stored (committed) nor in
                the request (reason SESSION_NOT_FOUND).
        """
        named = sorted({m.session_id for m in messages})
        if not named:
            return set()
        if self.citus:
            # Citus runs no multi-shard SELECT ... FOR NO KEY UPDATE: one router statement
            # per session, in the same order.
            rows: list[Row] = []
            for session_id in named:
                params = {"project_id": project_id, "session_id": session_id}
                if row := await fetch_one(conn, "restore_lock_session_citus", params):
                    rows.append(row)
        else:
            params = {"project_id": project_id, "session_ids": named}
            rows = await fetch_all(conn, "restore_lock_sessions", params)
        locked = {r["session_id"] for r in rows}
        if missing := set(named) - locked:
            raise _no_session(messages, missing)
        return {r["session_id"] for r in rows if r["deleted_at"] is not None}


async def _restore_kind(
    conn: AsyncConnection[Any],
    kind: str,
    statements: tuple[str, str],
    params: Params,
    *,
    made: list[tuple[Any, ...]] | None = None,
    deleted: set[str] | None = None,
) -> RestoreCounts:
    # `existing` finds the rows already stored, with the fields that differ; `insert` writes
    # the others (restore_messages answers its count, the plain inserts a row each, which go
    # to `made`); `deleted` holds the soft-deleted sessions the messages name.
    existing, insert = statements
    sent = len(params["session_ids" if kind != "users" else "user_ids"])
    if not sent:
        return RestoreCounts()
    found = await fetch_all(conn, existing, params)
    conflicts = [r for r in found if r["differs"]]
    if conflicts:
        raise _conflict(kind, conflicts)
    if kind == "messages":
        row = await fetch_one(conn, insert, params)
        created = int(row["created"]) if row else 0
    else:
        cur = await conn.execute(query(insert), params)
        inserted = await cur.fetchall()
        created = len(inserted)
        if made is not None:
            made.extend(inserted)
    stored = len(found)
    if created + stored != sent:
        stored = await _compare_skipped(conn, kind, existing, params, created=created, sent=sent)
    if kind == "messages":
        # Refused after the insert, as before (a conflict or an insert's error comes first);
        # the insert is rolled back with the rest.
        _refuse_live_in_deleted(params, deleted or set())
    return RestoreCounts(created=created, existing=stored)


async def _compare_skipped(
    conn: AsyncConnection[Any],
    kind: str,
    existing: str,
    params: Params,
    *,
    created: int,
    sent: int,
) -> int:
    """How many of the request's rows are stored and not by this transaction, compared again.

    A row another transaction (a CreateUser, CreateSession or AddMemory of the same id)
    inserted after `existing` read made the insert wait for that transaction, then skip the
    key once it committed: counted neither created nor existing, the row was dropped without
    a word, and a session's messages went into the other call's session
    (tests/store/test_restore_races.py). Read again, in a snapshot that holds the other's
    commit and this transaction's own rows (stored as the request gives them), it is
    compared as the rows stored before the insert were.

    Raises:
        AlreadyExists: such a row is stored with other values (RESTORE_CONFLICT).
        Unavailable: such a row was removed again before it was read (nothing written).
    """
    found = await fetch_all(conn, existing, params)
    conflicts = [r for r in found if r["differs"]]
    if conflicts:
        raise _conflict(kind, conflicts)
    if len({r["ord"] for r in found}) < sent:
        raise Unavailable(
            f"{kind} of this request were written and removed by other calls while it ran; "
            "nothing of this request was written; retry",
            reason="CONCURRENT_WRITES",
        )
    return len(found) - created


def _refuse_live_in_deleted(params: Params, deleted: set[str]) -> None:
    # The sessions were locked (_lock_message_sessions), which read their latest deleted_at:
    # it holds until the commit, so the check needs no statement of its own.
    rows = zip(params["session_ids"], params["sequences"], params["deleted"], strict=True)
    live_in_deleted = [
        (ord_, f"{sid} #{seq}")
        for ord_, (sid, seq, gone) in enumerate(rows, start=1)
        if gone is None and sid in deleted
    ]
    if live_in_deleted:
        raise _live_in_deleted(live_in_deleted)


async def _count_restored_sessions(
    conn: AsyncConnection[Any], project_id: int, inserted: list[tuple[Any, ...]]
) -> None:
    # The live sessions inserted, counted for their users in the same transaction (as every
    # session write counts them: store/sessions.py count_live_sessions), in user order. A
    # user of deleted sessions only gets its row too, at 0: the first revival of one then
    # updates the row, where it inserted it, and the insert's check of the user (FOR KEY
    # SHARE, after the session's lock) came in the reverse of DeleteUser's order: on Citus
    # the two deadlocked (an audit: 13 of 24 revivals racing DeleteUser).
    per_user: dict[str, int] = {}
    for user_id, live in inserted:
        if user_id is not None:
            per_user[user_id] = per_user.get(user_id, 0) + (1 if live else 0)
    if per_user:
        users = sorted(per_user)
        params = {
            "project_id": project_id,
            "user_ids": users,
            "deltas": [per_user[u] for u in users],
        }
        await conn.execute(query("count_restored_sessions"), params)


def _conflict(kind: str, rows: list[dict[str, Any]]) -> AlreadyExists:
    named = "; ".join(
        f"{kind}[{int(r['ord']) - 1}] ({r['id']}) exists with another {', '.join(r['differs'])}"
        for r in rows[:_NAMED_CONFLICTS]
    )
    more = f" (and {len(rows) - _NAMED_CONFLICTS} more)" if len(rows) > _NAMED_CONFLICTS else ""
    return AlreadyExists(
        f"{named}{more}; nothing of this request was written", reason="RESTORE_CONFLICT"
    )


def _live_in_deleted(rows: list[tuple[int, str]]) -> FailedPrecondition:
    # What DeleteSession leaves: a soft-deleted session's messages are all soft-deleted, so
    # none is counted, recalled, embedded, or brought back by UndeleteSession. `rows` are
    # (1-based position in the request, "session #sequence").
    named = "; ".join(f"messages[{ord_ - 1}] ({id_})" for ord_, id_ in rows[:_NAMED_CONFLICTS])
    more = f" (and {len(rows) - _NAMED_CONFLICTS} more)" if len(rows) > _NAMED_CONFLICTS else ""
    return FailedPrecondition(
        f"{named}{more}: live (no deleted_at) in a soft-deleted session, whose messages are all "
        "soft-deleted; give each its deleted_at, or restore the session live; nothing of this "
        "request was written",
        reason="SESSION_DELETED",
    )


def _no_session(messages: list[Message], missing: set[str]) -> FailedPrecondition:
    rows = [
        (f"messages[{i}] ({m.session_id} #{m.sequence})", m.session_id)
        for i, m in enumerate(messages)
    ]
    hint = "restore sessions before their messages"
    return _orphans(rows, "session", missing, hint, reason="SESSION_NOT_FOUND")


def _no_user(sessions: list[Session], missing: set[str]) -> FailedPrecondition:
    rows = [(f"sessions[{i}] ({s.session_id})", s.user_id) for i, s in enumerate(sessions)]
    hint = "restore users before their sessions"
    return _orphans(rows, "user", missing, hint, reason="USER_NOT_FOUND")


def _orphans(
    rows: Sequence[tuple[str, str | None]],
    parent: str,
    missing: set[str],
    hint: str,
    *,
    reason: str,
) -> FailedPrecondition:
    # Each row of the request naming a missing parent, by its field path and the ids the
    # caller sent: never PostgreSQL's DETAIL, which quotes the project's internal number.
    bad = [f"{row} names {parent} '{pid}'" for row, pid in rows if pid in missing]
    named = "; ".join(bad[:_NAMED_CONFLICTS])
    more = f" (and {len(bad) - _NAMED_CONFLICTS} more)" if len(bad) > _NAMED_CONFLICTS else ""
    return FailedPrecondition(
        f"{named}{more}, which is neither stored nor in the request; {hint}; nothing of this "
        "request was written",
        reason=reason,
    )


def _missing_parent(
    users: list[User], sessions: list[Session], messages: list[Message]
) -> ErrorFactory:
    """The foreign key violation of an insert, as the request's rows that caused it."""

    def build(exc: psycopg.Error) -> MemstoreError:
        # The messages insert names sessions, the sessions insert names users. The DETAIL
        # ("Key (project_id, session_id)=(4, s) is not present ...") says only which key
        # PostgreSQL met first: it picks, among the ids of the request, the one to name.
        detail = getattr(exc.diag, "message_detail", None) or ""
        found = re.search(r"=\(\d+, (.*)\) is not present", detail, re.DOTALL)
        key = found.group(1) if found else None
        # On Citus the violation comes from a shard ("messages_102040") without a table name.
        table = getattr(exc.diag, "table_name", None) or getattr(exc.diag, "message_primary", "")
        if re.search(r"\bmessages(_\d+)?\b", table or ""):
            ids = {m.session_id for m in messages}
            return _no_session(messages, {key} if key in ids else ids)
        owners = {s.user_id for s in sessions if s.user_id is not None}
        owners -= {u.user_id for u in users}
        return _no_user(sessions, {key} if key in owners else owners)

    return build


def _user_params(users: list[User]) -> dict[str, Any]:
    return {
        "user_ids": [u.user_id for u in users],
        "emails": [u.email for u in users],
        "first_names": [u.first_name for u in users],
        "last_names": [u.last_name for u in users],
        "metadatas": [Jsonb(u.metadata) for u in users],
        "created": [u.created_at for u in users],
        "updated": [u.updated_at for u in users],
    }


def _session_params(sessions: list[Session]) -> dict[str, Any]:
    return {
        "session_ids": [s.session_id for s in sessions],
        "user_ids": [s.user_id for s in sessions],
        "metadatas": [Jsonb(s.metadata) for s in sessions],
        "created": [s.created_at for s in sessions],
        "updated": [s.updated_at for s in sessions],
        "deleted": [s.deleted_at for s in sessions],
        "last_message": [s.last_message_at for s in sessions],
        "next_sequences": [s.next_sequence for s in sessions],
    }


def _message_params(messages: list[Message]) -> dict[str, Any]:
    return {
        "session_ids": [m.session_id for m in messages],
        "sequences": [m.sequence for m in messages],
        "uuids": [m.uuid for m in messages],
        "roles": [m.role for m in messages],
        "role_types": [m.role_type for m in messages],
        "contents": [m.content for m in messages],
        "metadatas": [Jsonb(m.metadata) for m in messages],
        "created": [m.created_at for m in messages],
        "updated": [m.updated_at for m in messages],
        "deleted": [m.deleted_at for m in messages],
    }

"""The session methods of the Store, and ListSessions' SQL built from whitelisted fragments."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from server.domain import MetadataChange, Page, Session, SessionQuery, TimeKey
from server.errors import AlreadyExists, FailedPrecondition, NotFound
from server.store import rows
from server.store.base import (
    StoreBase,
    factory,
    key,
    merged_too_large,
    metadata_params,
    no_such_user,
    page_of,
    rerun_deadlocked,
)
from server.store.budget import budget_rows, list_size
from server.store.db import Row, fetch_all, fetch_one, fetch_pipelined
from server.store.queries import query

#: The only columns a session list may be ordered by.
ORDER_COLUMNS = ("created_at", "updated_at")

#: (query attribute, filter fragment) of every optional filter with a value.
_VALUE_FILTERS = (
    ("user_id", "filter_user_id"),
    ("created_after", "filter_created_after"),
    ("created_before", "filter_created_before"),
    ("updated_after", "filter_updated_after"),
    ("updated_before", "filter_updated_before"),
    ("metadata_contains", "filter_metadata_contains"),
)


class SessionMethods(StoreBase):
    """Creates, reads, merge-updates, soft deletes and restores, and lists of sessions."""

    async def create_session(
        self, project_id: int, session_id: str, user_id: str | None, metadata: dict[str, object]
    ) -> Session:
        """Creates a session, optionally owned by an existing user.

        Raises:
            AlreadyExists: the session_id is taken (the message says when by a soft-deleted
                session, with reason SESSION_DELETED).
            FailedPrecondition: the named user does not exist (reason USER_NOT_FOUND).
        """
        params = {
            **key(project_id, session_id=session_id),
            "user_id": user_id,
            "metadata": Jsonb(metadata),
        }
        no_user = factory(no_such_user(user_id))
        # With a user: one transaction, which also counts the session live for the user.
        async with self._connect(
            foreign_key=no_user, single=user_id is None, session=session_id, user=user_id
        ) as conn:
            row = await fetch_one(conn, "create_session", params)
            if row is None:
                state = await fetch_one(conn, "session_state", params)
                raise session_taken(session_id, deleted=bool(state and state["deleted"]))
            if user_id is not None and self.citus:
                await own_new_session(conn, project_id, user_id)
            elif user_id is not None:
                await count_live_sessions(conn, project_id, user_id, 1)
        return rows.session(row)

    async def get_session(self, project_id: int, session_id: str, show_deleted: bool) -> Session:
        """One session; a soft-deleted one only with show_deleted.

        Raises:
            NotFound: absent, or soft-deleted and not show_deleted.
        """
        params = {**key(project_id, session_id=session_id), "show_deleted": show_deleted}
        async with self._connect(single=True, session=session_id) as conn:
            row = await fetch_one(conn, "get_session", params)
            if row is None:
                raise await session_missing(conn, project_id, session_id)
        return rows.session(row)

    async def update_session(
        self, project_id: int, session_id: str, change: MetadataChange
    ) -> Session:
        """Merges (or replaces) a live session's metadata in one statement.

        Raises:
            NotFound: the session is absent or soft-deleted.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        params = {**key(project_id, session_id=session_id), **metadata_params(change)}
        async with self._connect(single=True, session=session_id) as conn:
            row = await fetch_one(conn, "update_session", params)
            if row is None:
                raise await session_missing(conn, project_id, session_id)
        if row["session_id"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.session(row)

    async def delete_session(self, project_id: int, session_id: str) -> int:
        """Soft-deletes the session and its live messages; returns how many messages.

        Raises:
            NotFound: the session is absent or already soft-deleted.
        """
        async with self._connect(session=session_id) as conn:
            row = await hide_in_live_session(conn, "delete_session", project_id, session_id)
            await forget_kept_recall(conn, self, project_id, session_id)
            if row["user_id"] is not None:
                await count_live_sessions(conn, project_id, row["user_id"], -1)
            return int(row["messages"])

    async def undelete_session(self, project_id: int, session_id: str) -> Session:
        """Restores a soft-deleted session; its deleted messages stay deleted.

        Raises:
            NotFound: the session does not exist.
            FailedPrecondition: the session is not deleted (reason SESSION_NOT_DELETED).
        """
        params = key(project_id, session_id=session_id)

        # One transaction: the session made live is counted for its user. A deadlock's
        # victim (a DeleteUser of its user taking the rows in another order) runs again.
        async def undelete() -> Row:
            async with self._connect(session=session_id) as conn:
                row = await fetch_one(conn, "undelete_session", params)
                if row is not None and row["user_id"] is not None:
                    await count_live_sessions(conn, project_id, row["user_id"], 1)
                if row is None:
                    if await fetch_one(conn, "session_state", params) is None:
                        raise session_not_found(session_id)
                    raise FailedPrecondition(
                        f"session '{session_id}' is not deleted", reason="SESSION_NOT_DELETED"
                    )
                return row

        return rows.session(await rerun_deadlocked(undelete))

    async def list_sessions(
        self,
        project_id: int,
        query: SessionQuery,
        after: TimeKey | None,
        offset: int | None,
        limit: int,
        *,
        count: bool = True,
        budget: int | None = None,
    ) -> Page[Session]:
        """Keyset page (after) or OFFSET page (offset); total_size set when `count`.

        Counting reads every matching session, so later pages of one listing skip it and
        reuse the total of the first (ListSessions carries it in the page token). With a
        `budget`, a session is read only while the sessions before it hold less than
        `budget` bytes of metadata and ids (the first always is); `cut` then says the budget
        left sessions of the page out (and has_more is set).

        Raises:
            Unavailable: the database cannot be reached.
        """
        page_sql, count_sql, params = list_sessions_statements(
            query, after, budgeted=budget is not None
        )
        params.update(project_id=project_id, limit=limit + 1, offset=offset or 0, budget=budget)
        total: Row | None = None
        if not count:
            async with self._connect(field="metadata_contains", single=True, fans_out=True) as conn:
                found = await fetch_all(conn, page_sql, params)
        else:
            # Page and count in one round trip and one snapshot.
            async with self._connect(field="metadata_contains", fans_out=True) as conn:
                found, [total] = await fetch_pipelined(
                    conn, [page_sql, count_sql], params, prepare=True
                )
        followed = bool(found) and bool(found[-1].get("followed"))
        size = (int(total["total"]) if total else 0) if count else None
        return page_of([rows.session(r) for r in found], limit, followed=followed, total=size)


async def hide_in_live_session(
    conn: AsyncConnection[Any], statement: str, project_id: int, session_id: str
) -> Row:
    """Runs `statement` (which soft-deletes messages) on a live session; returns its row
    (`messages`, how many it hid).

    The session row is locked first, in the caller's transaction, so the statement's
    snapshot sees every message an AddMemory committed while this call waited for the lock.

    Raises:
        NotFound: the session is absent or soft-deleted.
    """
    params = key(project_id, session_id=session_id)
    row = None
    if await lock_live_session(conn, project_id, session_id):
        row = await fetch_one(conn, statement, params)
    if row is None:
        raise await session_missing(conn, project_id, session_id)
    return row


async def lock_live_session(
    conn: AsyncConnection[Any], project_id: int, session_id: str, *, to_update: bool = False
) -> bool:
    """Locks a live session's row, in the caller's transaction, before a write of its
    messages: every write takes a session's row before its messages' rows. `to_update`: as
    an UPDATE of it does, for a write that deletes nothing (FOR NO KEY UPDATE). False: the
    session is absent or soft-deleted."""
    params = key(project_id, session_id=session_id)
    statement = "lock_live_session_to_update" if to_update else "lock_live_session"
    return await fetch_one(conn, statement, params) is not None


async def forget_kept_recall(
    conn: AsyncConnection[Any], store: StoreBase, project_id: int, session_id: str
) -> None:
    """Drops the recall the worker kept for a session whose messages were all just hidden
    (ClearMemory, DeleteSession): it was picked by them, and a next message was served it
    until the worker ranked again (an audit, 2026-12-03). Nothing where none is kept."""
    if store.vectors:
        statement = "forget_recall_vectors"
    elif store.word_recall:
        statement = "forget_recall_words"
    else:
        return
    await conn.execute(query(statement), key(project_id, session_id=session_id))


async def session_missing(conn: AsyncConnection[Any], project_id: int, session_id: str) -> NotFound:
    """The error of a session that is not live: says whether it is absent or soft-deleted."""
    # Read only on the error path, so the calls that succeed pay nothing for the wording.
    row = await fetch_one(conn, "session_state", key(project_id, session_id=session_id))
    if row is None:
        return session_not_found(session_id)
    return NotFound(
        f"session '{session_id}' is soft-deleted; restore it with UndeleteSession "
        "or by adding memory to it (AddMemory; over REST, POST its /memory)",
        reason="SESSION_DELETED",
    )


def session_not_found(session_id: str) -> NotFound:
    """The error of a session id that names no session."""
    return NotFound(f"session '{session_id}' not found", reason="SESSION_NOT_FOUND")


def session_taken(session_id: str, *, deleted: bool) -> AlreadyExists:
    """The error of CreateSession on a taken id; says how to restore a soft-deleted one."""
    if not deleted:
        return AlreadyExists(
            f"session '{session_id}' already exists", reason="SESSION_ALREADY_EXISTS"
        )
    return AlreadyExists(
        f"session '{session_id}' already exists and is soft-deleted; restore it with "
        "UndeleteSession, or add memory to it (AddMemory; over REST, POST its /memory), "
        "which restores it",
        reason="SESSION_DELETED",
    )


def session_filters(q: SessionQuery) -> tuple[sql.Composable, dict[str, Any]]:
    """The AND-ed filter fragments of a query and their parameters."""
    parts: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if not q.show_deleted:
        parts.append(query("filter_live"))
    for attribute, fragment in _VALUE_FILTERS:
        value: Any = getattr(q, attribute)
        if value is None:
            continue
        parts.append(query(fragment))
        params[attribute] = Jsonb(value) if attribute == "metadata_contains" else value
    return sql.SQL(" ").join(parts), params


def list_sessions_statements(
    q: SessionQuery, after: TimeKey | None, *, budgeted: bool = False
) -> tuple[sql.Composed, sql.Composed, dict[str, Any]]:
    """(page statement, count statement, parameters) of one list_sessions call; the page
    read up to %(budget)s bytes if `budgeted` (list_sessions_budgeted).

    Raises:
        ValueError: the query orders by a column outside ORDER_COLUMNS.
    """
    if q.order_field not in ORDER_COLUMNS:
        raise ValueError(f"cannot order sessions by {q.order_field!r}")
    direction = sql.SQL("DESC" if q.descending else "ASC")
    filters, params = session_filters(q)
    keyset: sql.Composable = sql.SQL("")
    if after is not None:
        keyset = query("keyset_sessions").format(
            column=sql.Identifier("s", q.order_field), op=sql.SQL("<" if q.descending else ">")
        )
        after_ts: datetime = after[0]
        params.update(after_ts=after_ts, after_id=after[1])

    def order(alias: str) -> sql.Composed:
        column = sql.Identifier(alias, q.order_field)
        return query("order_sessions").format(
            column=column, direction=direction, alias=sql.Identifier(alias)
        )

    size = list_size("s", "session_id", "user_id") if budgeted else sql.SQL("")
    page = query("list_sessions").format(
        filters=filters, keyset=keyset, order=order("s"), size=size
    )
    if budgeted:
        rows_read = budget_rows(page, order("k"))
        page = query("list_sessions_budgeted").format(rows=rows_read, order=order("k"))
    count = query("count_sessions").format(filters=filters)
    return page, count, params


async def lock_session_owner(conn: AsyncConnection[Any], project_id: int, user_id: str) -> None:
    """Under Citus: checks and locks the user a session write names, in its transaction.

    What the sessions -> users foreign key does on plain PostgreSQL, which Citus cannot keep
    (the tables are placed by different columns): a session for an unknown user is refused,
    and DeleteUser (which locks the user FOR UPDATE) waits for the write, or it for DeleteUser.

    Raises:
        FailedPrecondition: no such user (reason USER_NOT_FOUND).
    """
    if await fetch_one(conn, "lock_session_owner", key(project_id, user_id=user_id)) is None:
        raise no_such_user(user_id)


async def own_new_session(conn: AsyncConnection[Any], project_id: int, user_id: str) -> None:
    """Under Citus, after a write made a session for `user_id` in this transaction: checks and
    locks the user (lock_session_owner) and counts the session live for them
    (count_live_sessions), in one statement on the user's shard (own_new_session), one round
    trip where they took two.

    The user is locked after the session's insert, which is safe: the only session row held
    is the new one, which DeleteUser cannot see until this commits (count_live_sessions).

    Raises:
        FailedPrecondition: no such user (reason USER_NOT_FOUND); nothing was counted.
    """
    params = key(project_id, user_id=user_id)
    if await fetch_one(conn, "own_new_session", params) is None:
        raise no_such_user(user_id)


async def count_live_sessions(
    conn: AsyncConnection[Any], project_id: int, user_id: str, delta: int
) -> None:
    """Adds `delta` to the user's number of live sessions (user_session_counts, migration
    0010), in the transaction of the session write that made one live (+1) or not (-1).

    Called after that write, so the session row is locked before the count's row: every
    session write takes them in this order, so no two writes wait on each other in a cycle.
    DeleteUser locks the user row first, then the user's sessions. The writes that take the
    user row after a session row, CreateSession and an AddMemory that made a session under
    Citus (own_new_session after the insert), hold only that new row, which DeleteUser cannot
    see until they commit and so never waits for. Under Citus the count is on the user's
    shard: the write commits with two-phase commit when the session's shard is on another
    node.
    """
    params = {"project_id": project_id, "user_id": user_id, "delta": delta}
    await conn.execute(query("count_live_sessions"), params)

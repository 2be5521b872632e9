"""The user methods of the Store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from functools import cache, cached_property
from typing import Any, cast

from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from server.domain import DeletedCounts, Page, Session, TimeKey, User, UserChanges, UserRecord
from server.errors import AlreadyExists, NotFound, Unavailable
from server.store import rows
from server.store.base import (
    START,
    StoreBase,
    factory,
    key,
    merged_too_large,
    metadata_params,
    page_of,
    rerun_deadlocked,
)
from server.store.budget import budget_rows, list_size
from server.store.coalesce import Coalescer
from server.store.db import Params, fetch_all, fetch_one
from server.store.queries import query
from server.store.translate import translated, worker_lost


class UserMethods(StoreBase):
    """Reads and writes of users (and a user's sessions)."""

    async def create_user(  # noqa: PLR0917 (the fixed Store signature)
        self,
        project_id: int,
        user_id: str,
        email: str,
        first_name: str,
        last_name: str,
        metadata: dict[str, object],
    ) -> User:
        """Creates a user.

        Raises:
            AlreadyExists: the user_id is taken.
        """
        params = {
            "project_id": project_id,
            "user_id": user_id,
            "email": email,
            "first_name": first_name,
            "last_name": last_name,
            "metadata": Jsonb(metadata),
        }
        taken = factory(
            AlreadyExists(f"user '{user_id}' already exists", reason="USER_ALREADY_EXISTS")
        )
        async with self._connect(unique=taken, single=True, user=user_id) as conn:
            row = await fetch_one(conn, "create_user", params)
        assert row is not None  # INSERT ... RETURNING without ON CONFLICT returns its row
        return rows.user(row)

    async def get_user(self, project_id: int, user_id: str) -> User:
        """One user with its live session count.

        Concurrent calls share one statement (server/store/coalesce.py); on Citus those of
        the users of one worker (placement.py), so that a worker lost or silent holds and
        fails the calls of its own users only.

        Raises:
            NotFound: no user has this id.
        """
        group = await self._node_of("users", user_id) if self.citus else None
        with translated():
            user = await self._user_loader(group).load((project_id, user_id))
        if user is None:
            raise user_not_found(user_id)
        return user

    def _user_loader(self, group: int | None) -> Coalescer[tuple[int, str], User]:
        # One coalescer per node group holding users on Citus (None: before the shard map
        # is read), one on plain PostgreSQL. Each has one batch in flight at a time, so a
        # worker that stops answering held every GetUser of the process while one shared
        # coalescer waited for it.
        loader = self._user_loaders.get(group)
        if loader is None:
            loader = Coalescer(self._get_users, max_waiting_batches=self._pool.max_waiting)
            self._user_loaders[group] = loader
        return loader

    @cached_property
    def _user_loaders(self) -> dict[int | None, Coalescer[tuple[int, str], User]]:
        return {}

    async def _get_users(
        self, keys: list[tuple[int, str]]
    ) -> Mapping[tuple[int, str], User | Exception]:
        try:
            return await self._read_users(keys)
        except Unavailable as exc:
            if not (self.citus and len(keys) > 1 and worker_lost(exc)):
                raise
        # On Citus a batch's users are those of one worker by the shard map, which may be
        # out of date (a shard moved since): where a worker lost failed a batch of several,
        # each user is read alone (one shard), so only the calls of its users fail.
        found: dict[tuple[int, str], User | Exception] = {}
        for one in keys:
            try:
                found.update(await self._read_users([one]))
            except Unavailable as exc:
                found[one] = exc
        return found

    async def _read_users(self, keys: list[tuple[int, str]]) -> dict[tuple[int, str], User]:
        by_project: dict[int, list[str]] = {}
        for project_id, user_id in keys:
            by_project.setdefault(project_id, []).append(user_id)
        found: dict[tuple[int, str], User] = {}
        # On Citus the batch's users are one worker's (by the shard map): the batch takes a
        # slot of that worker's share of the pool and goes by its fuse, as a call naming one
        # of them does (a silent worker's GetUser calls then fail at once, not each after
        # its bound).
        async with self._connect(single=True, user=keys[0][1]) as conn:
            for project_id, user_ids in by_project.items():
                params = {"project_id": project_id, "user_ids": user_ids}
                statement = "get_users_citus" if self.citus else "get_users"
                for row in await fetch_all(conn, statement, params):
                    found[project_id, row["user_id"]] = rows.user(row)
        return found

    async def update_user(self, project_id: int, user_id: str, changes: UserChanges) -> User:
        """One UPDATE; metadata merged in SQL (memstore_merge_patch).

        Raises:
            NotFound: no user has this id.
            InvalidArgument: the merged metadata would exceed the limit (reason
                METADATA_TOO_LARGE); nothing changed.
        """
        meta = changes.metadata
        params = {
            **key(project_id, user_id=user_id),
            "set_email": changes.email is not None,
            "email": changes.email,
            "set_first_name": changes.first_name is not None,
            "first_name": changes.first_name,
            "set_last_name": changes.last_name is not None,
            "last_name": changes.last_name,
            "set_metadata": meta is not None,
            **metadata_params(meta),
        }
        async with self._connect(single=True, user=user_id) as conn:
            row = await fetch_one(conn, "update_user", params)
        if row is None:
            raise user_not_found(user_id)
        if row["user_id"] is None:
            raise merged_too_large(row["metadata_bytes"])
        return rows.user(row)

    async def delete_user(self, project_id: int, user_id: str) -> DeletedCounts:
        """Hard-deletes the user, its sessions and messages in one transaction.

        On Citus, where no foreign key ties sessions to their user, sessions naming a user
        whose row is gone (lost with a worker's asynchronous standby) are deleted too: the
        privacy delete leaves nothing of the user readable even then.

        Raises:
            NotFound: no user has this id (and, on Citus, no session names it).
        """
        # PostgreSQL may end the transaction as a deadlock's victim (the race test against
        # AddMemory, tests/reliability/test_races.py::test_delete_user_races_add_memory, saw
        # it about one run in ten on plain PostgreSQL, until a shared commit stopped
        # appending twice to one session: AddMemoryMethods._append_batch); on Citus its
        # multi-shard lock of the user's sessions takes them in no order. It runs again.
        return await rerun_deadlocked(lambda: self._delete_user_once(project_id, user_id))

    async def _delete_user_once(self, project_id: int, user_id: str) -> DeletedCounts:
        params = key(project_id, user_id=user_id)
        async with self._connect(fans_out=True) as conn:
            # Lock the user, then (in a statement that sees every session created before the
            # lock) its sessions, so no message lands between count and delete.
            if await fetch_one(conn, "lock_user", params) is None:
                if not (self.citus and await _orphans_locked(conn, params)):
                    raise user_not_found(user_id)
            elif self.citus:
                await _lock_user_sessions_citus(conn, params)
            else:
                await fetch_one(conn, "lock_user_sessions", params)
            row = await fetch_one(conn, "delete_user", params)
        assert row is not None
        return DeletedCounts(sessions=int(row["sessions"]), messages=int(row["messages"]))

    async def list_users(self, project_id: int, after: TimeKey | None, limit: int) -> Page[User]:
        """Users ordered by (created_at, user_id) strictly after `after`.

        Raises:
            Unavailable: the database cannot be reached.
        """
        after_ts, after_id = after or START
        params = {"project_id": project_id, "after_ts": after_ts, "after_id": after_id}
        async with self._connect(single=True, fans_out=True) as conn:
            found = await fetch_all(conn, "list_users", {**params, "limit": limit + 1})
        return Page([rows.user(r) for r in found[:limit]], has_more=len(found) > limit)

    async def list_user_records(
        self,
        project_id: int,
        after: TimeKey | None,
        limit: int,
        *,
        offset: int | None = None,
        count: bool = False,
        budget: int | None = None,
        newest_first: bool = False,
    ) -> Page[UserRecord]:
        """list_users as plain tuples (UserRecord), for the list and export paths.

        A keyset page (after) or an OFFSET page (offset, ListUsers' page_number); with
        `count`, total_size is the number of the project's users, read in the same
        transaction (as list_sessions counts). With a `budget`, a user is read only while the
        users before it hold less than `budget` bytes of metadata and ids (the first always
        is); `cut` then says the budget left users of the page out (and has_more is set).
        Oldest first by (created_at, user_id), or with `newest_first` the reverse (Zep's
        users-ordered), which pages by offset only.

        Raises:
            Unavailable: the database cannot be reached.
            ValueError: `newest_first` with `after`.
        """
        if newest_first and after is not None:
            raise ValueError("a newest-first list of users pages by offset, not by key")
        after_ts, after_id = after or START
        params = {
            "project_id": project_id,
            "after_ts": after_ts,
            "after_id": after_id,
            "limit": limit + 1,
            "offset": offset or 0,
            "budget": budget,
        }
        total: int | None = None
        async with self._connect(single=not count, fans_out=True) as conn:
            cur = conn.cursor()
            statement = list_user_records_statement(
                budgeted=budget is not None, newest_first=newest_first
            )
            await cur.execute(statement, params)
            found: list[Any] = await cur.fetchall()
            if count:
                row = await fetch_one(conn, "count_users", params)
                total = int(row["total"]) if row else 0
        if budget is None:
            # The statement's columns are those of UserRecord, in its order.
            return page_of(cast(list[UserRecord], found), limit, total=total)
        # The same, then `followed`.
        followed = bool(found) and bool(found[-1][-1])
        users = cast(list[UserRecord], [r[:-1] for r in found])
        return page_of(users, limit, followed=followed, total=total)

    async def list_user_sessions(
        self,
        project_id: int,
        user_id: str,
        after: TimeKey | None,
        limit: int,
        *,
        budget: int | None = None,
    ) -> Page[Session]:
        """Live sessions of a user by (created_at, session_id); with a `budget`, read only up
        to it as list_user_records reads users.

        Raises:
            NotFound: no user has this id.
        """
        after_ts, after_id = after or START
        params = {
            **key(project_id, user_id=user_id),
            "after_ts": after_ts,
            "after_id": after_id,
            "limit": limit + 1,
            "budget": budget,
        }
        statement = list_user_sessions_statement(budgeted=budget is not None)
        async with self._connect(single=True, fans_out=True) as conn:
            found = await fetch_all(conn, statement, params)
        if not found:
            raise user_not_found(user_id)
        sessions = [rows.session(r) for r in found if r["session_id"] is not None]
        return page_of(sessions, limit, followed=bool(found[-1].get("followed")))


@cache
def list_user_records_statement(*, budgeted: bool, newest_first: bool = False) -> sql.Composed:
    """list_user_records' statement over its page whole, or read up to %(budget)s bytes;
    oldest first, or newest first."""
    direction = sql.SQL("DESC" if newest_first else "ASC")

    def order(alias: str) -> sql.Composed:
        return query("order_users").format(alias=sql.Identifier(alias), direction=direction)

    if not budgeted:
        page = query("list_user_records_page").format(size=sql.SQL(""), order=order("u"))
        return query("list_user_records").format(page=page, followed=sql.SQL(""), order=order("p"))
    sized = query("list_user_records_page").format(
        size=list_size("u", "user_id", "email", "first_name", "last_name"), order=order("u")
    )
    page = budget_rows(sized, order("k"))
    return query("list_user_records").format(
        page=page, followed=sql.SQL(", p.followed"), order=order("p")
    )


@cache
def list_user_sessions_statement(*, budgeted: bool) -> sql.Composed:
    """list_user_sessions' statement over its page whole, or read up to %(budget)s bytes."""
    if not budgeted:
        page = query("list_user_sessions_page").format(size=sql.SQL(""))
        return query("list_user_sessions").format(page=page, followed=sql.SQL(""))
    sized = query("list_user_sessions_page").format(size=list_size("s", "session_id", "user_id"))
    page = budget_rows(sized, sql.SQL("k.created_at, k.session_id"))
    return query("list_user_sessions").format(page=page, followed=sql.SQL(", s.followed"))


# How long DeleteUser on Citus waits for a session that its user's shard counts and its own
# shard does not show yet (_lock_user_sessions_citus); a two-phase commit lands in
# milliseconds, and one whose COMMIT PREPARED was lost waits for Citus's recovery (a minute).
SESSIONS_SETTLE_SECONDS = 5.0


async def _lock_user_sessions_citus(conn: AsyncConnection[Any], params: Params) -> None:
    """Locks a locked user's sessions on Citus, once every session its shard counts is seen.

    A session made for the user is a two-phase commit over the user's shard (its count) and
    the session's. When the user's commits first, the user's row lock is released and this
    DeleteUser can take it while the session is still only prepared on its own shard, where
    no statement sees it: deleted without it, the session would outlive its user (an audit,
    2026-12-03, with the session's worker committing late). The count on the user's shard
    already holds it, and no other session write can change that count while the user is
    locked, so the sessions are locked again until as many live ones are seen.

    Raises:
        Unavailable: (CONCURRENT_WRITES) a counted session was still not committed on its
            shard after SESSIONS_SETTLE_SECONDS; nothing was deleted.
    """
    settle_by = time.monotonic() + SESSIONS_SETTLE_SECONDS
    pause = 0.005
    while True:
        locked = await fetch_one(conn, "lock_user_sessions_citus", params)
        counted = await fetch_one(conn, "user_live_sessions", params)
        assert locked is not None  # an aggregate's one row
        if counted is None or int(locked["live"]) >= int(counted["session_count"]):
            return
        if time.monotonic() + pause > settle_by:
            raise Unavailable(
                f"user '{params['user_id']}' has a session still being committed on another "
                "node; nothing was deleted; retry",
                reason="CONCURRENT_WRITES",
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.25)


async def _orphans_locked(conn: AsyncConnection[Any], params: Params) -> bool:
    """Locks, on Citus, the sessions that name a user whose row does not exist; whether
    there are any. Only a lost write leaves such sessions (the store refuses a session for
    an unknown user, and deletes a user's sessions with it); no count of them is kept to
    wait for, as _lock_user_sessions_citus does for a live user's."""
    locked = await fetch_one(conn, "lock_user_sessions_citus", params)
    assert locked is not None  # an aggregate's one row
    return int(locked["sessions"]) > 0


def user_not_found(user_id: str) -> NotFound:
    """The error of a user id that names no user."""
    return NotFound(f"user '{user_id}' not found", reason="USER_NOT_FOUND")

"""The Store's recount: each user's kept count of live sessions made equal to the rows again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from server.domain import RecountReport
from server.store.base import StoreBase
from server.store.db import fetch_all, fetch_one
from server.store.queries import query

log = logging.getLogger(__name__)

#: Times a user found off is recounted in a row: on Citus a session write commits on the
#: user's node and the session's one after the other, so a recount between the two can take
#: the count one session short; the next pass finds it and corrects it again.
RECOUNT_PASSES = 3
#: Seconds between those passes: longer than a two-phase commit's two steps take.
PASS_PAUSE_SECONDS = 0.2
#: Users without a row whose ids the log names, at most (the report counts them all).
ORPHANS_NAMED = 20


class RecountMethods(StoreBase):
    """`memstore recount`: the counts every session write keeps, checked against the rows."""

    async def recount_sessions(self, batch_size: int = 1000) -> RecountReport:
        """Checks every user's kept count of live sessions (user_session_counts) against
        their session rows, and corrects each one found off, in batches of `batch_size`
        users, while calls go on.

        Each correction is its own transaction: the user's count row locked, their live
        sessions counted, the count set. A session write of the user waits for it or has
        committed before the count, so none is lost or counted twice (on plain PostgreSQL;
        on Citus a user found off is checked again, RECOUNT_PASSES). On Citus it also counts
        the users that sessions name and no row holds (`orphaned_users`, the first
        ORPHANS_NAMED logged by id): DeleteUser removes their sessions.

        Raises:
            Unavailable: the database cannot be reached.
        """
        checked, corrected = 0, set[tuple[int, str]]()
        async for users in self._batches("recount_users", batch_size):
            checked += len(users)
            off = await self._off(users)
            for _ in range(RECOUNT_PASSES):
                if not off:
                    break
                for user in off:
                    if await self._recount_user(*user):
                        corrected.add(user)  # once, however many passes it takes
                await asyncio.sleep(PASS_PAUSE_SECONDS if self.citus else 0)
                off = await self._off(await self._kept(off))
        # Plain PostgreSQL's foreign key keeps every session's user.
        orphans = await self._orphans(batch_size) if self.citus else 0
        return RecountReport(users=checked, corrected=len(corrected), orphaned_users=orphans)

    async def _batches(self, name: str, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        # The rows of statement `name` (recount_users, recount_named_users), a keyset batch
        # of `size` users by (project_id, user_id) at a time.
        after: tuple[int, str] = (0, "")
        while batch := await self._read(
            name, {"after_project": after[0], "after_user": after[1], "limit": size}
        ):
            yield batch
            after = (batch[-1]["project_id"], batch[-1]["user_id"])

    async def _orphans(self, batch_size: int) -> int:
        # The users that sessions name and no row holds, in batches of the named users.
        found, named = 0, list[tuple[int, str]]()
        async for batch in self._batches("recount_named_users", batch_size):
            pairs = [(r["project_id"], r["user_id"]) for r in batch]
            stored = {(r["project_id"], r["user_id"]) for r in await self._kept(pairs)}
            missing = [pair for pair in pairs if pair not in stored]
            found += len(missing)
            named.extend(missing[: ORPHANS_NAMED - len(named)])
        if found:
            log.warning(
                "%d users are named by sessions but have no row (lost with a node's writes?): "
                "%s%s; DeleteUser of each removes their sessions",
                found,
                ", ".join(f"{user_id!r} (project {project_id})" for project_id, user_id in named),
                ", ..." if found > len(named) else "",
            )
        return found

    async def _off(self, users: list[dict[str, Any]]) -> list[tuple[int, str]]:
        # The users of a batch (rows of recount_users) whose kept count is not their rows'.
        pairs = [(u["project_id"], u["user_id"]) for u in users]
        live = await self._read("recount_live", _pairs(pairs))
        counts = {(r["project_id"], r["user_id"]): r["live"] for r in live}
        return [
            (u["project_id"], u["user_id"])
            for u in users
            if counts.get((u["project_id"], u["user_id"]), 0) != u["kept"]
        ]

    async def _kept(self, users: list[tuple[int, str]]) -> list[dict[str, Any]]:
        # The kept counts of `users` now, as rows of recount_users (gone users left out).
        found = await self._read("recount_kept", _pairs(users))
        wanted = set(users)
        return [r for r in found if (r["project_id"], r["user_id"]) in wanted]

    async def _recount_user(self, project_id: int, user_id: str) -> bool:
        # Whether the user's count was off and is now their rows' (False: it was right, or
        # the user is gone).
        params = {"project_id": project_id, "user_id": user_id}
        async with self._connect() as conn:
            await conn.execute(query("recount_hold"), params)
            held = await fetch_one(conn, "recount_lock", params)
            if held is None:
                return False
            live = await fetch_one(conn, "recount_user", params)
            count = live["live"] if live else 0
            if count == held["session_count"]:
                return False
            await conn.execute(query("recount_set"), {**params, "live": count})
        return True

    async def _read(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._connect(single=True) as conn:
            return await fetch_all(conn, name, params)


def _pairs(users: list[tuple[int, str]]) -> dict[str, Any]:
    # The parameters that name some users: their ids and their projects' (matched by pairs
    # by the caller).
    return {
        "user_ids": [user_id for _, user_id in users],
        "project_ids": sorted({project_id for project_id, _ in users}),
    }

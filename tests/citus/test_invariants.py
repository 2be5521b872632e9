"""On a running Citus cluster: what the sessions -> users foreign key did, the store does.

Citus cannot keep that key (users and sessions are placed by different columns), so these
tests first prove it is gone from the cluster, then that no invariant went with it: a session
for an unknown user is refused, a DeleteUser racing session writes for its user leaves no
orphan, and DeleteUser removes sessions, messages and vectors on every shard at once.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.errors import FailedPrecondition, NotFound, Unavailable
from server.store import Store
from server.store import users as users_module
from tests.fix_db import scalar


def _msg(content: str) -> NewMessage:
    return NewMessage(role="u", role_type="user", content=content, metadata={}, uuid=None)


@pytest.fixture
async def empty(citus_url: str, citus_store: Store) -> str:
    """The cluster's data tables emptied before a test; returns the database URL."""
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE messages, sessions, users CASCADE")
    return citus_url


async def test_the_sessions_users_key_is_gone_and_the_store_refuses_unknown_users(
    citus_store: Store, empty: str
) -> None:
    keys = await scalar(
        empty,
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
        " AND conrelid = 'sessions'::regclass AND confrelid = 'users'::regclass",
    )
    assert keys == 0
    with pytest.raises(FailedPrecondition) as created:
        await citus_store.create_session(P, "s", "ghost", {})
    assert created.value.reason == "USER_NOT_FOUND"
    with pytest.raises(FailedPrecondition) as added:
        await citus_store.add_memory(P, "s", "ghost", [_msg("hello")])
    assert added.value.reason == "USER_NOT_FOUND"
    assert await scalar(empty, "SELECT count(*) FROM sessions") == 0


async def test_delete_user_racing_session_writes_leaves_no_orphan(
    citus_store: Store, empty: str
) -> None:
    await citus_store.create_user(P, "u", "", "", "", {})
    for i in range(4):
        await citus_store.add_memory(P, f"old{i}", "u", [_msg(f"m{i}")])

    async def write(i: int) -> str:
        try:
            if i % 3 == 1:
                await citus_store.create_session(P, f"new{i}", "u", {})
            elif i % 3 == 2:
                await citus_store.add_memory(P, f"new{i}", "u", [_msg(f"n{i}")])
            else:
                # An append to the user's live session naming the user, which locks only the
                # session (the user only if the delete came first and the session is made anew).
                await citus_store.add_memory(P, f"old{i % 4}", "u", [_msg(f"o{i}")])
        except FailedPrecondition as exc:
            return exc.reason
        return "written"

    writes = [write(i) for i in range(24)]
    outcomes = await asyncio.gather(citus_store.delete_user(P, "u"), *writes)
    # Every write either came first (and was deleted with the user) or was refused after.
    assert set(outcomes[1:]) <= {"written", "USER_NOT_FOUND"}
    with pytest.raises(NotFound):
        await citus_store.get_user(P, "u")
    assert await scalar(empty, "SELECT count(*) FROM sessions WHERE user_id = 'u'") == 0
    orphans = await scalar(
        empty,
        "SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM sessions s"
        " WHERE s.project_id = m.project_id AND s.session_id = m.session_id)",
    )
    assert orphans == 0


async def test_delete_user_removes_everything_on_every_shard(
    citus_store: Store, empty: str
) -> None:
    await citus_store.create_user(P, "u", "", "", "", {})
    # Enough sessions that they land on several shards of both workers.
    for i in range(24):
        await citus_store.add_memory(P, f"s{i}", "u", [_msg("a"), _msg("b")])
    shards = await scalar(
        empty,
        "SELECT count(DISTINCT get_shard_id_for_distribution_column('sessions', session_id))"
        " FROM sessions",
    )
    assert shards > 1
    deleted = await citus_store.delete_user(P, "u")
    assert (deleted.sessions, deleted.messages) == (24, 48)
    for table in ("sessions", "messages", "embedding_queue"):
        assert await scalar(empty, f"SELECT count(*) FROM {table}") == 0, table


async def test_delete_user_removes_the_sessions_of_a_user_whose_row_was_lost(
    citus_store: Store, empty: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A user row lost with a worker's asynchronous standby (docs/scaling.md, "An asynchronous
    # standby promoted") leaves its sessions on the other shards: no foreign key removes
    # them. `memstore recount` counts such users; the privacy delete answered NOT_FOUND and
    # left their sessions readable, and now deletes them, and only them.
    for user in ("u", "v"):
        await citus_store.create_user(P, user, "", "", "", {})
    for i in range(8):
        await citus_store.add_memory(P, f"s{i}", "u", [_msg("a"), _msg("b")])
    await citus_store.add_memory(P, "kept", "v", [_msg("mine")])
    await scalar(empty, f"DELETE FROM users WHERE project_id = {P} AND user_id = 'u' RETURNING 1")
    with pytest.raises(NotFound):
        await citus_store.get_user(P, "u")
    # `memstore recount` counts such a user (named by sessions, with no row), and only it.
    assert (await citus_store.recount_sessions(batch_size=1)).orphaned_users == 1
    assert f"have no row (lost with a node's writes?): 'u' (project {P});" in caplog.text
    deleted = await citus_store.delete_user(P, "u")
    assert (deleted.sessions, deleted.messages) == (8, 16)
    left = "SELECT count(*) FROM {} WHERE session_id <> 'kept'"
    for table in ("sessions", "messages", "embedding_queue"):
        assert await scalar(empty, left.format(table)) == 0, table
    assert (await citus_store.get_session(P, "kept", False)).user_id == "v"
    assert (await citus_store.recount_sessions()).orphaned_users == 0
    # Nothing of it is left now: NOT_FOUND, as for any unknown user.
    for gone in ("u", "nobody"):
        with pytest.raises(NotFound):
            await citus_store.delete_user(P, gone)


class _LateSession:
    """A session of user 'u' made as a two-phase commit whose worker commits late: the user's
    shard already counts it, and its own shard holds its insert prepared, seen by no one,
    until `commit()` (what Citus's COMMIT PREPARED does when it reaches that worker last)."""

    def __init__(self, url: str, session_id: str) -> None:
        self.url = url
        self.session_id = session_id
        self.gid = f"memstore_test_late_{session_id}"
        self.worker: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def prepare(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT nodename, nodeport, shard_name('sessions', shardid) FROM citus_shards"
                " WHERE shardid = get_shard_id_for_distribution_column('sessions', %s::text)",
                (self.session_id,),
            )
            found = await cur.fetchone()
            assert found is not None
            host, port, shard = found
            await conn.execute(
                "INSERT INTO user_session_counts AS c (project_id, user_id, session_count)"
                " VALUES (%s, 'u', 1) ON CONFLICT (project_id, user_id)"
                " DO UPDATE SET session_count = c.session_count + 1",
                (P,),
            )
        dbname = psycopg.conninfo.conninfo_to_dict(self.url)["dbname"]
        self.worker = await psycopg.AsyncConnection.connect(
            host=host, port=port, user="postgres", dbname=dbname, autocommit=True
        )
        await self.worker.execute("BEGIN")
        await self.worker.execute(
            f"INSERT INTO {shard} (project_id, session_id, user_id) VALUES (%s, %s, 'u')",
            (P, self.session_id),
        )
        await self.worker.execute(f"PREPARE TRANSACTION '{self.gid}'")

    async def commit(self) -> None:
        assert self.worker is not None
        await self.worker.execute(f"COMMIT PREPARED '{self.gid}'")

    async def close(self) -> None:
        assert self.worker is not None
        cur = await self.worker.execute(
            "SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (self.gid,)
        )
        if await cur.fetchone() is not None:
            await self.worker.execute(f"ROLLBACK PREPARED '{self.gid}'")
        await self.worker.close()


async def test_delete_user_waits_for_a_session_its_worker_commits_late(
    citus_store: Store, empty: str
) -> None:
    await citus_store.create_user(P, "u", "", "", "", {})
    await citus_store.add_memory(P, "early", "u", [_msg("hello")])
    late = _LateSession(empty, "late")
    await late.prepare()
    try:
        deleting = asyncio.create_task(citus_store.delete_user(P, "u"))
        await asyncio.sleep(0.5)
        assert not deleting.done()  # it waits for the session its user's shard counts
        await late.commit()
        deleted = await deleting
    finally:
        await late.close()
    assert deleted.sessions == 2
    assert await scalar(empty, "SELECT count(*) FROM sessions") == 0
    assert await scalar(empty, "SELECT count(*) FROM user_session_counts") == 0


async def test_delete_user_refuses_rather_than_leave_a_session_that_never_lands(
    citus_store: Store, empty: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(users_module, "SESSIONS_SETTLE_SECONDS", 0.3)
    await citus_store.create_user(P, "u", "", "", "", {})
    late = _LateSession(empty, "late")
    await late.prepare()
    try:
        with pytest.raises(Unavailable) as refused:
            await citus_store.delete_user(P, "u")
        assert refused.value.reason == "CONCURRENT_WRITES"
        assert "nothing was deleted" in str(refused.value)
        # Nothing was deleted: the user is there, and once the session lands it goes with it.
        assert (await citus_store.get_user(P, "u")).session_count == 1
        await late.commit()
        assert (await citus_store.delete_user(P, "u")).sessions == 1
    finally:
        await late.close()
    assert await scalar(empty, "SELECT count(*) FROM sessions") == 0


async def test_a_backup_snapshot_is_refused_saying_citus_has_none(citus_store: Store) -> None:
    # pg_export_snapshot holds the coordinator's snapshot only: the shards on the workers
    # would be read as they are, so OpenSnapshot says so rather than promise one moment.
    with pytest.raises(FailedPrecondition) as refused:
        await citus_store.open_snapshot(P, 60)
    assert refused.value.reason == "SNAPSHOT_UNSUPPORTED"
    assert "while nothing writes" in str(refused.value)

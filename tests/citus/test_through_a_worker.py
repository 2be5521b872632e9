"""On a running Citus cluster: calls sent through a worker instead of the coordinator.

Citus syncs its metadata to every node, so a worker routes a call as the coordinator does. A
store over a worker's URL of the cluster's database serves the per-turn calls (users,
sessions, AddMemory, GetMemory, SearchMemory in a session, ListUserSessions) and sees the
coordinator's writes, and the coordinator its; `migrate` on a worker is refused (the schema
and its record are the coordinator's); and an advisory lock is the node's own, so Restores
sent through different nodes do not take turns (docs/scaling.md, "Calls through a worker").
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo as pg_conninfo

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, SearchQuery
from server.errors import FailedPrecondition
from server.store import Store
from server.store.queries import query
from tests.fix_db import scalar


def _msg(content: str) -> NewMessage:
    return NewMessage(role="u", role_type="user", content=content, metadata={}, uuid=None)


@pytest.fixture
def worker_url(citus_url: str, citus_nodes: tuple[str, list[str]]) -> str:
    """The cluster's database, on its first worker."""
    host, port = citus_nodes[1][0].rsplit(":", 1)
    return pg_conninfo.make_conninfo(citus_url, host=host, port=port)


@pytest.fixture
async def worker_store(worker_url: str, citus_store: Store) -> AsyncIterator[Store]:
    """A store over a worker of the migrated cluster (the coordinator migrated it)."""
    st = await Store.open(worker_url, min_size=1, max_size=4)
    await st.check_vectors()  # what a start reads once migrate has run
    yield st
    await st.close()


async def test_calls_through_a_worker_see_the_coordinators_writes_and_it_theirs(
    citus_store: Store, worker_store: Store, worker_url: str
) -> None:
    assert await scalar(worker_url, "SELECT groupid FROM pg_dist_local_group") != 0
    assert (worker_store.citus, worker_store.vectors) == (True, citus_store.vectors)
    tag = secrets.token_hex(3)
    by_coordinator, by_worker = f"c{tag}", f"w{tag}"
    await citus_store.create_user(P, by_coordinator, "", "", "", {})
    await worker_store.create_user(P, by_worker, "", "", "", {})
    assert (await worker_store.get_user(P, by_coordinator)).user_id == by_coordinator
    assert (await citus_store.get_user(P, by_worker)).user_id == by_worker

    # One session written through both nodes, read through both, in one order.
    session = f"s{tag}"
    await worker_store.add_memory(P, session, by_worker, [_msg("the blue door"), _msg("one")])
    await citus_store.add_memory(P, session, None, [_msg("two")])
    await worker_store.add_memory(P, session, by_worker, [_msg("three")])
    expected = ["the blue door", "one", "two", "three"]
    for st in (worker_store, citus_store):
        found, messages = await st.get_memory(P, session, 10)
        assert found is not None
        assert (found.message_count, [m.content for m in messages]) == (4, expected)
    await citus_store.create_session(P, f"t{tag}", by_worker, {})

    search = SearchQuery(text="door", search_type="full_text", session_ids=(session,))
    found_messages, _, _ = await worker_store.search_messages(
        P, search, vector=None, model="m", limit=10, depth=40
    )
    assert [r.message.content for r, _ in found_messages] == ["the blue door"]
    page = await worker_store.list_user_sessions(P, by_worker, None, 10)
    assert sorted(s.session_id for s in page.items) == [session, f"t{tag}"]
    assert (await worker_store.get_user(P, by_worker)).session_count == 2
    assert (await citus_store.get_user(P, by_worker)).session_count == 2


async def test_migrate_through_a_worker_is_refused_and_changes_nothing(
    worker_store: Store, worker_url: str
) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        await worker_store.migrate()
    assert refused.value.reason == "CITUS_WORKER"
    assert "coordinator" in str(refused.value)
    # The coordinator's record of migrations is its own table: none was made on the worker.
    assert await scalar(worker_url, "SELECT to_regclass('schema_migrations') IS NULL")


@pytest.mark.parametrize("command", ["migrate", "serve", "embed", "purge"])
def test_memstore_through_a_worker_refuses_to_start(
    worker_url: str, citus_store: Store, command: str
) -> None:
    """`memstore serve` and `embed` migrate at their start, so they are refused there too,
    saying why; the one-shot commands (`purge`) say the same, not NOT_MIGRATED (a migrate
    they then sent the caller to was refused)."""
    ran = subprocess.run(
        [sys.executable, "-m", "server", command, "--port", "0", "--no-embedding-worker"]
        if command == "serve"
        else [sys.executable, "-m", "server", command],
        env={**os.environ, "DATABASE_URL": worker_url},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = ran.stdout + ran.stderr
    assert ran.returncode == 1, said
    assert "reaches a Citus worker" in said
    assert "with the coordinator's URL" in said


async def test_restores_through_different_nodes_do_not_take_turns(
    citus_url: str, worker_url: str, citus_store: Store
) -> None:
    """Restore's one-at-a-time lock is an advisory lock: each node has its own."""
    params = {"project_id": P}
    async with await psycopg.AsyncConnection.connect(citus_url) as holder:
        await holder.execute(query("restore_serialize"), params)  # held to its commit
        for url, turns in ((citus_url, True), (worker_url, False)):
            async with await psycopg.AsyncConnection.connect(url) as other:
                await other.execute("SET lock_timeout = '300ms'")
                try:
                    await other.execute(query("restore_serialize"), params)
                    waited = False
                except psycopg.errors.LockNotAvailable:
                    waited = True
            assert waited is turns, url

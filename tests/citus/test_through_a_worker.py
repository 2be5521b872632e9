"""On a running Citus cluster: calls sent through a worker instead of the coordinator.

Citus syncs its metadata to every node, so a worker routes a call as the coordinator does. A
store over a worker's URL of the cluster's database serves the per-turn calls (users,
sessions, AddMemory, GetMemory, SearchMemory in a session, ListUserSessions) and sees the
coordinator's writes, and the coordinator its; `migrate` on a worker is refused (the schema
and its record are the coordinator's); and an advisory lock is the node's own, so Restores
sent through different nodes do not take turns (docs/scaling.md, "Calls through a worker").
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from psycopg import conninfo as pg_conninfo

from bench.citus_relief import KINDS, SIDES
from memstore.v1 import backup_service_pb2 as bs
from memstore.v1 import backup_service_pb2_grpc, session_service_pb2_grpc, user_service_pb2_grpc
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import user_service_pb2 as us
from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, SearchQuery
from server.errors import FailedPrecondition, NotFound
from server.store import Store
from server.store.migrate import migrations
from server.store.queries import query
from tests.fix_db import scalar
from tests.grpc import Code, msg, rpc_error
from tests.polling import until
from tests.processes import serve_memstore, stop_memstore

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("command", ["migrate", "purge", "recount"])
def test_memstore_migrate_and_the_one_shot_commands_through_a_worker_are_refused(
    worker_url: str, citus_store: Store, command: str
) -> None:
    """Only the coordinator migrates; the one-shot commands (`purge`) say the same, not
    NOT_MIGRATED (a migrate they then sent the caller to was refused)."""
    ran = subprocess.run(
        [sys.executable, "-m", "server", command],
        env={**os.environ, "DATABASE_URL": worker_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = ran.stdout + ran.stderr
    assert ran.returncode == 1, said
    assert "reaches a Citus worker" in said
    assert "with the coordinator's URL" in said


async def test_serve_through_a_worker_serves_and_leaves_restore_and_purge_to_the_coordinator(
    worker_url: str, citus_store: Store
) -> None:
    """`memstore serve` started through a worker: it checks the coordinator's record of
    migrations instead of migrating, serves the calls (seen through the coordinator), and
    refuses Restore and runs no periodic purge, which take turns by the coordinator's
    advisory locks. It refused to start there before (its start migrated)."""
    env = {**os.environ, "DATABASE_URL": worker_url}
    args = ("--no-embedding-worker", "--purge-interval", "1")
    proc, port = await asyncio.to_thread(serve_memstore, *args, env=env)
    tag = secrets.token_hex(3)
    user, session = f"wu{tag}", f"ws{tag}"
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            sessions = session_service_pb2_grpc.SessionServiceStub(channel)
            await users.CreateUser(us.CreateUserRequest(user_id=user))
            add = ss.AddMemoryRequest(
                session_id=session, user_id=user, messages=[msg("through"), msg("a worker")]
            )
            await sessions.AddMemory(add)
            memory = await sessions.GetMemory(ss.GetMemoryRequest(session_id=session))
            assert [m.content for m in memory.messages] == ["through", "a worker"]
            got = await users.GetUser(us.GetUserRequest(user_id=user))
            assert got.user.session_count == 1
            backup = backup_service_pb2_grpc.BackupServiceStub(channel)
            at = timestamp_pb2.Timestamp(seconds=1_700_000_000)
            restore = bs.RestoreRequest(
                users=[rs.User(user_id=f"r{tag}", created_at=at, updated_at=at)]
            )
            await rpc_error(
                backup.Restore(restore), Code.FAILED_PRECONDITION, reason="CITUS_WORKER"
            )
            await asyncio.sleep(2)  # past the purge interval: a purge would have run
    finally:
        code, out = await asyncio.to_thread(stop_memstore, proc)
    assert code == 0, out
    assert "serving through Citus worker node group" in out, out
    assert "no periodic purge here" in out, out
    assert "purge removed" not in out, out
    assert "Traceback" not in out, out
    # What the worker's server wrote is the cluster's: the coordinator reads it.
    found, messages = await citus_store.get_memory(P, session, 10)
    assert found is not None and found.user_id == user
    assert [m.content for m in messages] == ["through", "a worker"]
    assert (await citus_store.get_user(P, user)).session_count == 1
    with pytest.raises(NotFound):
        await citus_store.get_user(P, f"r{tag}")  # the refused Restore wrote nothing


async def test_a_worker_serves_only_once_the_coordinator_has_migrated(
    citus_url: str, worker_url: str, worker_store: Store
) -> None:
    """A server of a newer memstore started through a worker, before the coordinator was
    migrated to it, is refused and names what is missing and where to migrate."""
    last = migrations()[-1][0]
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        await conn.execute("DELETE FROM schema_migrations WHERE name = %s", (last,))
        try:
            with pytest.raises(FailedPrecondition) as refused:
                await worker_store.migrate_to_serve()
        finally:
            await conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (last,))
    assert refused.value.reason == "NOT_MIGRATED"
    assert last in str(refused.value) and "coordinator's URL" in str(refused.value)
    assert worker_store.worker_group is None
    assert await worker_store.migrate_to_serve() == []  # migrated: it serves
    assert worker_store.worker_group == await scalar(
        worker_url, "SELECT groupid FROM pg_dist_local_group"
    )


async def test_embed_through_a_worker_embeds_what_the_coordinator_queued(
    citus_url: str, worker_url: str, citus_store: Store
) -> None:
    """`memstore embed` checks the coordinator's record as a server does, then works the
    queue: its claims are row locks, the shards' own wherever a call comes from, and the
    model it records goes to a reference table, which a worker writes too."""
    session = f"e{secrets.token_hex(3)}"
    await citus_store.add_memory(P, session, None, [_msg("queued through the coordinator")])
    queued = f"SELECT count(*) FROM embedding_queue WHERE session_id = '{session}'"
    assert await scalar(citus_url, queued) == 1
    proc = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-m", "server", "embed"],
        env={**os.environ, "DATABASE_URL": worker_url},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        async def settled() -> bool:
            return await scalar(citus_url, queued) == 0

        assert await until(settled, within=120), "the queue row was never settled"
        if citus_store.vectors:
            embedded = f"SELECT count(*) FROM message_embeddings WHERE session_id = '{session}'"
            assert await scalar(citus_url, embedded) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert "worker running" in out and "Traceback" not in out, out


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


def test_bench_citus_relief_runs_on_tiny_data(
    citus_url: str, worker_url: str, citus_nodes: tuple[str, list[str]], citus_store: Store
) -> None:
    """`python -m bench.citus_relief` (docs/scaling.md, "What serving through a worker takes
    off the coordinator"): calls through a worker are routed there, the coordinator idle."""
    others = []
    for node in citus_nodes[1][1:]:
        host, port = node.rsplit(":", 1)
        others += ["--other-url", pg_conninfo.make_conninfo(citus_url, host=host, port=port)]
    run = subprocess.run(
        [sys.executable, "-m", "bench.citus_relief", "--coordinator-url", citus_url,
         "--worker-url", worker_url, *others, "--rounds", "1", "--seconds", "1",
         "--sessions", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)  # stdout is the JSON alone
    nodes = {"coordinator", "worker", *(f"other_{i}" for i in range(len(others) // 2))}
    for kind in KINDS:
        through = {side: found[kind][side] for side in SIDES}
        assert all(f["calls_per_s"] > 0 for f in through.values()), found
        assert all(set(f["cpu_us_per_call"]) == nodes for f in through.values()), found
        by_coordinator = through["coordinator"]["cpu_us_per_call"]["coordinator"]
        by_worker = through["worker"]["cpu_us_per_call"]["coordinator"]
        assert by_worker < by_coordinator / 2, found

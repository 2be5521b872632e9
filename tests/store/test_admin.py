"""Store: migrations, the shared token key, the purge, the merge function, error translation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from psycopg import errors as pg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, SessionQuery
from server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemstoreError,
    Unavailable,
)
from server.store import Store
from server.store.migrate import migrations, required_extension
from server.store.store import _session_options
from server.store.translate import translated
from tests.fix_db import scratch_database, usable_extensions


def msg(content: str) -> NewMessage:
    return NewMessage(role="r", role_type="user", content=content, metadata={})


@pytest.fixture
def fresh_url(server_url: str) -> Iterator[str]:
    """An empty database on the run's server, dropped afterwards."""
    with scratch_database(server_url, "memstore_fresh") as url:
        yield url


async def test_migrate_applies_once_under_the_lock(fresh_url: str) -> None:
    first = await Store.open(fresh_url, min_size=1, max_size=2)
    second = await Store.open(fresh_url, min_size=1, max_size=2)
    try:
        results = await asyncio.gather(first.migrate(), second.migrate())
        # Every migration, but those needing an extension this server lacks or this role may
        # not create (pgvector on CI's PostgreSQL 15, reached as a plain role): they wait,
        # unrecorded, for it to be installed (tests/store/test_vector_mode.py says why).
        usable = usable_extensions(fresh_url)
        names = [name for name, text in migrations() if required_extension(text) in (None, *usable)]
        assert sorted(results, key=len) == [[], names]
        assert await first.migrate() == []  # idempotent
        key = await first.token_key()
        assert len(key) == 32
        assert await second.token_key() == key  # every worker shares one key
    finally:
        await first.close()
        await second.close()
    async with await psycopg.AsyncConnection.connect(fresh_url) as conn:
        cur = await conn.execute("SELECT name FROM schema_migrations ORDER BY name")
        assert [r[0] for r in await cur.fetchall()] == names
        cur = await conn.execute("SELECT project_id, name FROM projects")
        assert await cur.fetchall() == [(P, "default")]


async def test_token_key_survives_restarts(store: Store, database_url: str) -> None:
    key = await store.token_key()
    other = await Store.open(database_url, min_size=1, max_size=1)
    try:
        assert await other.token_key() == key
    finally:
        await other.close()


async def test_open_unreachable_database_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="database unavailable"):
        await Store.open("postgresql://nobody@127.0.0.1:1/none", timeout=0.5)


async def test_open_says_why_the_database_refused(server_url: str) -> None:
    # The pool only times out: every wrong URL (no such database, a bad option, a typo) was
    # "cannot connect within 5.0s", and the operator was left to guess.
    url = psycopg.conninfo.make_conninfo(server_url, dbname="memstore_no_such_db")
    with pytest.raises(Unavailable, match='database "memstore_no_such_db" does not exist'):
        await Store.open(url, timeout=0.5)
    # A pool that keeps no connection opens without trying one: it said only "couldn't get
    # a connection after 2.00 sec", at the first call.
    with pytest.raises(Unavailable, match='database "memstore_no_such_db" does not exist'):
        await Store.open(url, timeout=0.5, min_size=0)


@pytest.mark.parametrize("url", ["garbage", "host=h nosuchoption=1", "mysql://u:secret@h/db"])
async def test_open_refuses_a_url_libpq_cannot_read_at_once(url: str) -> None:
    # Retried for the whole timeout before, though no retry could ever connect.
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable, match="is not a PostgreSQL URL or connection string") as got:
        await Store.open(url, timeout=5)
    assert asyncio.get_running_loop().time() - started < 1
    assert "secret" not in str(got.value)  # libpq's message quotes the URL: not repeated


async def test_pooled_connections_never_jit_compile(store: Store) -> None:
    # On Citus every AddMemory's plan passed jit_above_cost: 280 ms a call with LLVM's
    # compilation against 31 ms without (docs/scaling.md "JIT off").
    async with store._pool.connection() as conn:
        assert await (await conn.execute("SHOW jit")).fetchone() == ("off",)


def test_a_statement_timeout_under_half_a_millisecond_is_one_not_none() -> None:
    # round() made --statement-timeout 0.0004 the 0 that turns PostgreSQL's limit off.
    assert "statement_timeout=1" in _session_options("", 0.0004)["options"].split()


@pytest.mark.parametrize(
    ("statement_timeout", "connect_ms"), [(30.0, "5000"), (4.0, "2000"), (1.0, "1000"), (0.0, None)]
)
def test_citus_connects_to_a_worker_within_half_the_statement_timeout(
    statement_timeout: float, connect_ms: str | None
) -> None:
    # Below the statement timeout, so that a silent worker fails a call as a worker not
    # reached, which its share's fuse counts (server/store/fuse.py); 1 to 5 s; Citus's own
    # 30 s without a statement timeout.
    options = _session_options("", statement_timeout)["options"].split()
    found = [o.split("=")[1] for o in options if o.startswith("citus.node_connection_timeout=")]
    assert found == ([connect_ms] if connect_ms else [])


def test_a_node_connection_timeout_the_url_sets_is_kept() -> None:
    # Where the cluster's nodes connect slowly (SSL under load), the operator's own wins over
    # half the statement timeout; the statement timeout is still memstore's.
    url = "postgresql:///db?options=-c%20citus.node_connection_timeout%3D15000"
    options = _session_options(url, 4.0)["options"].split()
    found = [o for o in options if o.startswith("citus.node_connection_timeout=")]
    assert found == ["citus.node_connection_timeout=15000"]
    assert "statement_timeout=4000" in options


async def test_a_store_connects_with_the_urls_node_connection_timeout(database_url: str) -> None:
    # The same, as the server has it: on plain PostgreSQL the setting is a placeholder, on
    # Citus the coordinator's (and `make test-citus` runs this there).
    url = make_conninfo(database_url, options="-c citus.node_connection_timeout=15000")
    store = await Store.open(url, min_size=1, max_size=1, statement_timeout=4.0)
    try:
        async with store._connect(single=True) as conn:
            cur = await conn.execute("SELECT current_setting('citus.node_connection_timeout')")
            assert await cur.fetchone() in {("15000",), ("15s",)}
    finally:
        await store.close()


async def test_the_shares_of_the_pool_are_citus_only(store: Store) -> None:
    # /metrics' memstore_citus_share_* (server/serving/metrics.py): on Citus the share of the
    # worker a call reached and the fan-outs' share, every slot given back; on plain
    # PostgreSQL no share is ever taken, so those families have no samples.
    await store.add_memory(P, "shared", None, [msg("hello")])
    await store.get_memory(P, "shared", 6)
    await store.list_sessions(P, SessionQuery(), None, None, 10)
    states = store.share_states()
    if not store.citus:
        assert states == []
        return
    assert len(states) >= 2 and states[0].node_group is None, states
    assert all(s.in_flight == s.waiting == s.refused == 0 and not s.blown for s in states)


async def test_purge_removes_only_expired_soft_deleted_rows(store: Store, clean_db: str) -> None:
    await store.add_memory(P, "live", None, [msg("keep1"), msg("keep2")])
    await store.add_memory(P, "cleared", None, [msg("old1"), msg("old2"), msg("old3")])
    await store.clear_memory(P, "cleared")
    await store.add_memory(P, "cleared", None, [msg("fresh")])
    await store.add_memory(P, "dead", None, [msg("d1"), msg("d2")])
    await store.delete_session(P, "dead")
    await store.add_memory(P, "recent", None, [msg("r1")])
    await store.delete_session(P, "recent")
    await _age_deleted_rows(clean_db, 2, ["cleared", "dead"])

    report = await store.purge(timedelta(days=1), batch_size=2)

    assert (report.sessions, report.messages) == (1, 5)
    assert report.batches == 4  # messages 2 + 2 + 1, then one batch of sessions
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(
            "SELECT session_id, content FROM messages ORDER BY session_id, sequence"
        )
        assert await cur.fetchall() == [
            ("cleared", "fresh"),
            ("live", "keep1"),
            ("live", "keep2"),
            ("recent", "r1"),
        ]
        cur = await conn.execute("SELECT session_id FROM sessions ORDER BY session_id")
        assert [r[0] for r in await cur.fetchall()] == ["cleared", "live", "recent"]
    again = await store.purge(timedelta(days=1))
    assert (again.sessions, again.messages, again.batches) == (0, 0, 0)
    everything = await store.purge(timedelta(0))
    assert (everything.sessions, everything.messages) == (1, 1)
    assert (await store.get_memory(P, "live", 10))[1][0].content == "keep1"


async def _age_deleted_rows(url: str, days: int, session_ids: list[str] | None = None) -> None:
    """Moves the soft-deleted rows' deleted_at `days` back (of these sessions only, if given)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for table in ("sessions", "messages"):
            await conn.execute(
                sql.SQL(
                    # In UTC, where the arithmetic is immutable: Citus refuses a stable
                    # function over a column (timestamptz - interval) in an UPDATE.
                    "UPDATE {} SET deleted_at ="
                    " (deleted_at AT TIME ZONE 'UTC' - make_interval(days => %s))"
                    " AT TIME ZONE 'UTC' WHERE deleted_at IS NOT NULL"
                    " AND (%s::text[] IS NULL OR session_id = ANY(%s::text[]))"
                ).format(sql.Identifier(table)),
                [days, session_ids, session_ids],
            )


async def test_purge_skips_rows_a_write_holds_and_never_waits(store: Store, clean_db: str) -> None:
    await store.add_memory(P, "cleared", None, [msg("old1"), msg("old2"), msg("old3")])
    await store.clear_memory(P, "cleared")
    await store.add_memory(P, "cleared", None, [msg("fresh")])
    for session_id in ("held", "free"):
        await store.add_memory(P, session_id, None, [msg("gone")])
        await store.delete_session(P, session_id)
    await _age_deleted_rows(clean_db, 2)
    async with await psycopg.AsyncConnection.connect(clean_db) as holder:
        # A write in progress holds an expired message and an expired session (as AddMemory
        # reviving it would): the purge skips both rather than wait, on Citus too, where it
        # once waited (a multi-shard DELETE cannot skip a row).
        await holder.execute(
            "SELECT 1 FROM messages WHERE session_id = 'cleared' AND sequence = 1 FOR UPDATE"
        )
        await holder.execute("SELECT 1 FROM sessions WHERE session_id = 'held' FOR UPDATE")
        report = await asyncio.wait_for(store.purge(timedelta(days=1), batch_size=2), 20)
        assert (report.sessions, report.messages) == (1, 4)  # free; old2, old3 and both gone
        await holder.rollback()
    report = await store.purge(timedelta(days=1), batch_size=2)
    assert (report.sessions, report.messages) == (1, 1)  # held; old1
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute("SELECT session_id, content FROM messages")
        assert await cur.fetchall() == [("cleared", "fresh")]
        cur = await conn.execute("SELECT session_id FROM sessions")
        assert await cur.fetchall() == [("cleared",)]


@pytest.mark.parametrize(
    ("target", "patch", "expected"),
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
async def test_merge_patch_follows_rfc_7396(
    store: Store, database_url: str, target: object, patch: object, expected: object
) -> None:
    # The examples of RFC 7396 appendix A (a JSON null patch stands for `null`).
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT memstore_merge_patch(%s, %s)",
            (Jsonb(target), Jsonb(patch) if patch is not None else Jsonb(None)),
        )
        row = await cur.fetchone()
    assert row is not None and row[0] == expected


async def test_translation_maps_every_driver_error() -> None:
    cases: list[tuple[Exception, type[MemstoreError]]] = [
        (pg.UniqueViolation("dup"), AlreadyExists),
        (pg.ForeignKeyViolation("fk"), FailedPrecondition),
        (pg.QueryCanceled("cancel"), DeadlineExceeded),
        (pg.CheckViolation("check"), InvalidArgument),
        (pg.InvalidTextRepresentation("bad"), InvalidArgument),
        (pg.ProgramLimitExceeded("too big"), InvalidArgument),
        (psycopg.OperationalError("conn refused"), Unavailable),
        (pg.AdminShutdown("bye"), Unavailable),
        (PoolTimeout("no connection"), Unavailable),
        (pg.SyntaxError("oops"), MemstoreError),
    ]
    for exc, expected in cases:
        with pytest.raises(MemstoreError) as info, translated(field="payload"):
            raise exc
        assert type(info.value) is expected, exc
        assert isinstance(info.value.__cause__, psycopg.Error)
    with pytest.raises(InvalidArgument) as bad, translated(field="payload"):
        raise pg.DataError("bad value")
    assert bad.value.violations[0].field == "payload"


async def test_unavailable_when_the_pool_cannot_serve(database_url: str) -> None:
    small = await Store.open(database_url, min_size=1, max_size=1, timeout=0.2)
    try:
        async with small._pool.connection():  # hold the only connection
            with pytest.raises(Unavailable, match="database unavailable"):
                await small.get_memory(P, "s", 1)
    finally:
        await small.close()

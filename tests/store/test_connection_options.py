"""Store: the connection options a database URL gives are kept beside memstore's own, and
pgvector, where a connection cannot see it or sees it only later, is waited for, then used
for every message.

memstore sends its session settings (time zone, JIT off, the statement timeout) as libpq's
`options`; given as a keyword they replaced the URL's, so a URL naming a schema
(`options=-csearch_path=tenant_a`) was silently ignored: every tenant's tables were made and
read in `public`, one tenant's server listing another's users (an audit).
"""

from __future__ import annotations

import logging

import psycopg
import pytest
from psycopg import conninfo as pg_conninfo

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.search import OpenAIEmbedder
from server.search.worker import EmbeddingWorker
from server.store import Store
from tests.fake_embedder import serving
from tests.fix_db import scalar, scratch_database, usable_extensions


def _said(content: str) -> NewMessage:
    return NewMessage(role="kai", role_type="user", content=content, metadata={})


async def _migrated_store_in(url: str, schema: str) -> Store:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    tenant = pg_conninfo.make_conninfo(url, options=f"-c search_path={schema}")
    store = await Store.open(tenant, min_size=1, max_size=2)
    await store.migrate()
    return store


async def test_a_schema_the_url_names_holds_the_tables(
    server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with scratch_database(server_url, "memstore_schema", cluster=False) as url:
        a = await _migrated_store_in(url, "tenant_a")
        with caplog.at_level(logging.WARNING, logger="server.store.migrate"):
            b = await _migrated_store_in(url, "tenant_b")
        try:
            # pgvector, where the server has it, was made in tenant_a's schema (the first on
            # its search_path), which tenant_b's does not name: its vector migrations wait,
            # saying so, where they failed with a traceback and held back every later one.
            assert not b.vectors
            if a.vectors:
                said = " ".join(r.getMessage() for r in caplog.records)
                assert "installed in schema 'tenant_a'" in said and "search_path" in said
            await a.create_user(P, "alice", "", "", "", {})
            assert [u.user_id for u in (await b.list_users(P, None, 10)).items] == []
            assert [u.user_id for u in (await a.list_users(P, None, 10)).items] == ["alice"]
        finally:
            await a.close()
            await b.close()
        with psycopg.connect(url) as conn:
            placed = conn.execute(
                "SELECT to_regclass('tenant_a.users') IS NOT NULL,"
                " to_regclass('tenant_b.users') IS NOT NULL, to_regclass('public.users')"
            ).fetchone()
        assert placed == (True, True, None)


async def test_messages_stored_before_pgvector_are_embedded_once_it_is_usable(
    server_url: str,
) -> None:
    # An audit: with pgvector installed after messages were stored, migration 0007 applied at
    # the next start and queued nothing of them: never embedded, not found by meaning, and
    # nothing said so. Here pgvector is made where the first server's search_path cannot see
    # it (so it runs without, as before the install), then a server that sees it migrates.
    # Under `make test-citus` the database spans the cluster: pgvector added to a running
    # cluster whose tables are distributed already.
    with scratch_database(server_url, "memstore_later") as url:
        if "vector" not in usable_extensions(url):
            store = await Store.open(url, min_size=1, max_size=2)
            try:
                await store.migrate()
                assert not store.vectors  # this role and server have no pgvector to use
            finally:
                await store.close()
            return
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA ext")
            conn.execute("CREATE EXTENSION vector SCHEMA ext")
        before = await Store.open(url, min_size=1, max_size=2)
        seeing = pg_conninfo.make_conninfo(url, options="-c search_path=public,ext")
        after = await Store.open(seeing, min_size=1, max_size=2)
        try:
            await before.migrate()
            assert not before.vectors
            said = [_said("my dog is called Biscuit"), _said("and my cat Pixel")]
            await before.add_memory(P, "s", None, said)
            assert "0007_vectors" in await after.migrate()
            assert after.vectors
            # The server started without pgvector, still running, leaves the queue alone: its
            # recall worker settled the rows by words, and they were never embedded.
            assert await EmbeddingWorker(before, None).run_once() == 0
            with serving() as fake:
                worker = EmbeddingWorker(after, OpenAIEmbedder(fake.url, "m", dimensions=3))
                assert await worker.drain() == 2
        finally:
            await before.close()
            await after.close()
        assert await scalar(url, "SELECT count(*) FROM message_embeddings") == 2
        if await scalar(url, "SELECT count(*) FROM pg_extension WHERE extname = 'citus'"):
            # On a cluster whose tables were distributed before pgvector could be used, the
            # vector tables 0007 makes then are placed with their sessions as the others.
            placed = await scalar(
                url,
                "SELECT count(DISTINCT colocation_id) || ' ' || string_agg(DISTINCT"
                " citus_table_type || ':' || distribution_column, ',') FROM citus_tables"
                " WHERE table_name::text IN"
                " ('sessions', 'messages', 'message_embeddings', 'session_embeddings')",
            )
            assert placed == "1 distributed:session_id", placed


async def test_a_connection_that_may_not_create_migrates_a_migrated_database(
    store: Store, database_url: str
) -> None:
    # An audit: a role that may only read and write rows could not start a server on a
    # database whose migrations were all applied (migrate ran CREATE TABLE IF NOT EXISTS,
    # which needs the CREATE privilege even where the table is). A read-only connection
    # stands in for such a role: it may create nothing either, on every engine here.
    await store.migrate()
    reading = pg_conninfo.make_conninfo(database_url, options="-c default_transaction_read_only=on")
    bound = await Store.open(reading, min_size=1, max_size=2)
    try:
        assert await bound.migrate() == []
        assert bound.vectors == store.vectors
    finally:
        await bound.close()

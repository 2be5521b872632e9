"""Applies the numbered migrations in server/store/migrations/, each once, under a lock."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from importlib import resources
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from server.errors import FailedPrecondition, Unavailable
from server.store.distribute import citus_present, citus_worker_group, distribute
from server.store.queries import query

log = logging.getLogger(__name__)

#: Seconds a migration waits for a table's lock before it gives way to the calls queued
#: behind its request, and the first pause before it tries again (doubling, to a minute).
MIGRATION_LOCK_SECONDS = 2.0
MIGRATION_RETRY_SECONDS = 1.0

#: A migration's first line may name an extension it needs: `-- requires extension: vector`.
_REQUIRES = re.compile(r"\A--\s*requires extension:\s*(\w+)\s*$", re.M)


def migrations() -> list[tuple[str, str]]:
    """(name, SQL) of every migration file, in the order they apply."""
    folder = resources.files("server.store").joinpath("migrations")
    files = sorted((e for e in folder.iterdir() if e.name.endswith(".sql")), key=lambda e: e.name)
    return [(e.name.removesuffix(".sql"), e.read_text("utf-8")) for e in files]


async def apply_migrations(conn: AsyncConnection[Any]) -> list[str]:
    """Applies pending migrations on an autocommit connection; returns their names.

    The session-level advisory lock makes concurrent starts of several workers
    wait for the first one instead of racing to create the same tables. A migration
    that requires an extension the server cannot provide is skipped and not recorded,
    so it applies at the first start after the extension is installed.

    Raises:
        FailedPrecondition: (CITUS_WORKER) the connection reached a Citus worker.
    """
    await refuse_a_citus_worker(conn)
    cur = await conn.execute(query("try_lock_migrations"))
    locked = await cur.fetchone()
    if not (locked and locked[0]):
        # Another process migrates (a long migration, or one waiting for a table's lock):
        # this one waited without a word, and its callers met "connection refused" (an audit).
        log.warning("waiting for another process's migration of this database to end")
        await conn.execute(query("lock_migrations"))
    try:
        done = await _applied(conn)
        if done is None:
            # Only when missing: CREATE ... IF NOT EXISTS needs the CREATE privilege even
            # where the table is there, and a role that may only read and write rows could
            # not start a server on a database whose migrations were all applied (an audit).
            await conn.execute(query("create_schema_migrations"))
            done = set()  # the record just made holds none
        _warn_if_newer(done)
        applied: list[str] = []
        for name, text in migrations():
            if name in done or not await _requirements_met(conn, name, text):
                continue
            await _apply(conn, name, text)
            log.info("applied migration %s", name)
            applied.append(name)
        if await citus_present(conn):
            # On a Citus coordinator the same tables are then distributed (once).
            await distribute(conn)
        return applied
    finally:
        await conn.execute(query("unlock_migrations"))


async def refuse_a_citus_worker(conn: AsyncConnection[Any]) -> None:
    """Refuses a connection to a Citus worker (Citus 11+, whose workers have the metadata):
    memstore migrates, and reads its record of migrations, through the coordinator only.

    Raises:
        FailedPrecondition: (CITUS_WORKER) the connection reached a worker.
    """
    if (group := await citus_worker_group(conn)) is not None:
        # On a worker, memstore's tables are Citus's copies of the coordinator's, and the
        # record of migrations (a table of the coordinator's own) is not there: every
        # migration was found pending, an empty schema_migrations was made on the worker, and
        # the first failed on 'relation "projects" already exists' (an internal error); the
        # one-shot commands said NOT_MIGRATED and sent the caller to a migrate refused here.
        raise FailedPrecondition(
            f"this database URL reaches a Citus worker (node group {group}): memstore's schema "
            "is made and migrated through the coordinator only; run `memstore migrate` (or "
            "start a server) with the coordinator's URL",
            reason="CITUS_WORKER",
        )


async def missing_migrations(conn: AsyncConnection[Any], *, on_worker: bool = False) -> list[str]:
    """This memstore's migrations the database lacks, changing nothing; those that wait for
    an extension not usable here (pgvector not created, or on no schema this connection
    searches) are not missing: a migrate would skip them too.

    Args:
        on_worker: the connection reached a Citus worker (a server's start there): the
            coordinator's record is read, through the worker.

    Raises:
        FailedPrecondition: (CITUS_WORKER) the connection reached a Citus worker, which
            holds no record of migrations, and `on_worker` is not set; (NOT_MIGRATED) on a
            worker, the coordinator has no record yet.
        Unavailable: on a worker, the coordinator could not be asked.
    """
    if on_worker:
        done = await _applied_on_coordinator(conn)
        _warn_if_newer(done)  # as a migrate at a server's start warns
    else:
        await refuse_a_citus_worker(conn)
        done = await _applied(conn) or set()
    missing: list[str] = []
    for name, text in migrations():
        if name in done:
            continue
        if (extension := required_extension(text)) is not None:
            cur = await conn.execute(query("extension_available"), {"name": extension})
            row = await cur.fetchone()
            if row is None or not row[1] or not row[3]:
                continue
        missing.append(name)
    return missing


async def _applied(conn: AsyncConnection[Any]) -> set[str] | None:
    """The names of the migrations the database records as applied; None when it has no
    record of them yet (no schema_migrations table)."""
    cur = await conn.execute(query("schema_migrations_exist"))
    present = await cur.fetchone()
    if not (present and present[0]):
        return None
    cur = await conn.execute(query("applied_migrations"))
    return {str(row[0]) for row in await cur.fetchall()}


async def _applied_on_coordinator(conn: AsyncConnection[Any]) -> set[str]:
    """On a Citus worker: the names of the migrations the coordinator records as applied
    (schema_migrations is the coordinator's own table; Citus's run_command_on_coordinator
    reads it over the worker's connection to the coordinator)."""
    cur = await conn.execute(query("coordinator_applied_migrations"))
    row = await cur.fetchone()
    if row is not None and row[0]:
        return {name for name in str(row[1]).split(",") if name}
    said = str(row[1]) if row is not None else "no answer"
    if "does not exist" in said:
        raise FailedPrecondition(
            "the Citus coordinator holds no record of memstore's migrations: run `memstore "
            "migrate` with the coordinator's URL first",
            reason="NOT_MIGRATED",
        )
    raise Unavailable(f"the Citus coordinator could not be asked for its migrations: {said}")


async def _apply(conn: AsyncConnection[Any], name: str, text: str) -> None:
    # Each migration and its record commit together, or not at all. Waiting for a table's
    # lock (a pg_dump, a long report reading it), its request for ACCESS EXCLUSIVE held
    # every later query of the table behind it: the running servers' calls stalled (22 s in
    # an audit, DEADLINE_EXCEEDED past 30). It waits MIGRATION_LOCK_SECONDS at most, then
    # lets them go and tries again later.
    for attempt in itertools.count():
        try:
            async with conn.transaction():
                wait = {"ms": str(round(MIGRATION_LOCK_SECONDS * 1000))}
                await conn.execute(query("migration_lock_timeout"), wait)
                # The text is a file shipped in the package, never caller input.
                await conn.execute(sql.SQL(text))
                await conn.execute(query("record_migration"), {"name": name})
            return
        except psycopg.errors.LockNotAvailable:
            delay = min(MIGRATION_RETRY_SECONDS * 2**attempt, 60.0)
            log.warning(
                "migration %s waits for a lock another transaction holds on a table it "
                "changes; it let the calls queued behind it go, and tries again in %.0fs",
                name,
                delay,
            )
            await asyncio.sleep(delay)


def _warn_if_newer(done: set[str]) -> None:
    # A newer memstore migrated this database: this one knows nothing of what its migrations
    # keep. An old server left running through 0010 wrote sessions its counts never saw (an
    # audit); said at every start, so that a rollback or a forgotten server is seen.
    known = {name for name, _ in migrations()}
    if unknown := sorted(done - known):
        log.warning(
            "the database has migrations this memstore does not know (%s): a newer memstore "
            "migrated it, and this one may not keep what they keep (counts, indexes); run "
            "the newer one",
            ", ".join(unknown),
        )


def required_extension(text: str) -> str | None:
    """The extension a migration's first line says it needs, if any."""
    match = _REQUIRES.match(text)
    return match.group(1) if match else None


async def _requirements_met(conn: AsyncConnection[Any], name: str, text: str) -> bool:
    extension = required_extension(text)
    if extension is None:
        return True
    cur = await conn.execute(query("extension_available"), {"name": extension})
    row = await cur.fetchone()
    if row is None:
        log.warning(
            "migration %s skipped: the PostgreSQL server has no %r extension; it applies at "
            "the first start after the extension is installed",
            name,
            extension,
        )
        return False
    if not row[1]:
        # Available but not created, and creating it needs a privilege this role may lack.
        try:
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(extension))
                )
        except (
            psycopg.errors.InsufficientPrivilege,
            psycopg.errors.ReadOnlySqlTransaction,
        ) as exc:
            log.warning(
                "migration %s skipped: cannot create extension %r (%s); ask a superuser to run "
                "CREATE EXTENSION %s in this database",
                name,
                extension,
                exc.diag.message_primary,
                extension,
            )
            return False
    elif not row[3]:
        # Made in a schema this connection does not search (another tenant's, or pgvector
        # put in `public` while the search_path names only the role's own): the migration
        # failed on "type vector does not exist", a traceback, and every later one waited.
        log.warning(
            "migration %s skipped: extension %r is installed in schema %r, which is not on "
            "this connection's search_path; add it (e.g. options=-csearch_path=<yours>,%s in "
            "the database URL) and the migration applies at the next start",
            name,
            extension,
            row[2],
            row[2],
        )
        return False
    return True

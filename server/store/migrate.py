"""Applies the numbered migrations in server/store/migrations/, each once, under a lock."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, sql

from server.store.queries import query

log = logging.getLogger(__name__)


def migrations() -> list[tuple[str, str]]:
    """(name, SQL) of every migration file, in the order they apply."""
    folder = resources.files("server.store").joinpath("migrations")
    files = sorted((e for e in folder.iterdir() if e.name.endswith(".sql")), key=lambda e: e.name)
    return [(e.name.removesuffix(".sql"), e.read_text("utf-8")) for e in files]


async def apply_migrations(conn: AsyncConnection[Any]) -> list[str]:
    """Applies pending migrations on an autocommit connection; returns their names.

    The session-level advisory lock makes concurrent starts of several workers
    wait for the first one instead of racing to create the same tables.
    """
    await conn.execute(query("lock_migrations"))
    try:
        await conn.execute(query("create_schema_migrations"))
        cur = await conn.execute(query("applied_migrations"))
        done = {str(row[0]) for row in await cur.fetchall()}
        applied: list[str] = []
        for name, text in migrations():
            if name in done:
                continue
            # Each migration and its record commit together, or not at all.
            async with conn.transaction():
                # The text is a file shipped in the package, never caller input.
                await conn.execute(sql.SQL(text))
                await conn.execute(query("record_migration"), {"name": name})
            log.info("applied migration %s", name)
            applied.append(name)
        return applied
    finally:
        await conn.execute(query("unlock_migrations"))

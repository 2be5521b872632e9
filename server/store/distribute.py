"""On Citus, the layout migrate gives memstore's tables: which are distributed, by what, with what.

The same numbered migrations build the tables on plain PostgreSQL and on a Citus coordinator;
where the `citus` extension is created in the database, `distribute` then turns them into
distributed and reference tables (idempotent: a table Citus already manages is left alone).
docs/scaling.md explains the choices; tests/citus proves them on a running cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection, sql

from server.store.queries import query

log = logging.getLogger(__name__)

#: Small tables every node reads: copied to every node, joinable with anything.
REFERENCE = ("projects", "settings", "api_keys", "embedding_models")
#: (table, distribution column, co-locate with): each table is placed by one column. Users by
#: their id; a session and everything under it (messages, vectors, queue) by the session id,
#: so a call naming one session reaches one shard and its writes are one local transaction.
DISTRIBUTED = (
    ("users", "user_id", "none"),
    # Each user's live session count (migration 0010) on the user's shard: GetUser and
    # UpdateUser read one shard.
    ("user_session_counts", "user_id", "users"),
    ("sessions", "session_id", "none"),
    ("messages", "session_id", "sessions"),
    ("embedding_queue", "session_id", "sessions"),
    ("message_embeddings", "session_id", "sessions"),
    ("session_embeddings", "session_id", "sessions"),
    # Recall kept by words where vectors are not (migration 0012), with its session.
    ("session_word_recall", "session_id", "sessions"),
)
#: Foreign keys Citus cannot keep (they join rows placed by different columns); the store
#: enforces what they did (store/sessions.py, store/users.py; tests/citus proves it).
NOT_ENFORCEABLE = {("sessions", "users")}


async def citus_present(conn: AsyncConnection[Any]) -> bool:
    """Whether the database is a Citus database (the extension is created in it): its
    coordinator's, or a worker's (citus_worker_group tells them apart)."""
    cur = await conn.execute(query("citus_present"))
    row = await cur.fetchone()
    return bool(row and row[0])


async def citus_worker_group(conn: AsyncConnection[Any]) -> int | None:
    """The node group of the Citus worker this connection reached, or None: not a worker
    (plain PostgreSQL, or the coordinator, group 0)."""
    if not await citus_present(conn):
        return None
    cur = await conn.execute(query("citus_node_group"))
    row = await cur.fetchone()
    group = int(row[0]) if row else 0
    return group or None


async def distribute(conn: AsyncConnection[Any]) -> list[str]:
    """Distributes the tables Citus does not manage yet, in one transaction; returns them.

    Foreign keys among the tables are dropped first (Citus distributes a table only when the
    tables it references are already distributed or reference tables, and a table referenced
    by a local one not at all), then made again, except those in NOT_ENFORCEABLE.
    """
    cur = await conn.execute(query("citus_tables"))
    managed = {str(row[0]) for row in await cur.fetchall()}
    existing = await _existing_tables(conn)
    todo = [t for t in (*REFERENCE, *(d[0] for d in DISTRIBUTED)) if t in existing]
    todo = [t for t in todo if t not in managed]
    if not todo:
        return []
    async with conn.transaction():
        await conn.execute(query("sequential_mode"))
        cur = await conn.execute(query("citus_foreign_keys"), {"tables": todo})
        keys = [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in await cur.fetchall()]
        for table, name, _, _ in keys:
            drop = query("drop_foreign_key").format(
                table=sql.Identifier(table), name=sql.Identifier(name)
            )
            await conn.execute(drop)
        cur = await conn.execute(query("citus_triggers"), {"tables": todo})
        triggers = [(str(r[0]), str(r[1]), str(r[2])) for r in await cur.fetchall()]
        for table, name, _ in triggers:
            drop = query("drop_trigger").format(
                table=sql.Identifier(table), name=sql.Identifier(name)
            )
            await conn.execute(drop)
        for table in REFERENCE:
            if table in todo:
                await conn.execute(query("citus_reference_table"), {"table": table})
        for table, column, colocate_with in DISTRIBUTED:
            if table in todo:
                await conn.execute(
                    query("citus_distributed_table"),
                    {"table": table, "column": column, "colocate_with": colocate_with},
                )
        for table, name, referenced, definition in keys:
            if (table, referenced) in NOT_ENFORCEABLE:
                log.info("citus: %s.%s is enforced by the store, not a foreign key", table, name)
                continue
            # The definition is PostgreSQL's own text of a constraint it already held.
            add = query("add_foreign_key").format(
                table=sql.Identifier(table),
                name=sql.Identifier(name),
                definition=sql.SQL(definition),
            )
            await conn.execute(add)
        if triggers:
            await conn.execute(query("unsafe_triggers"))
        for _, _, definition in triggers:
            # PostgreSQL's own text of a trigger it already held.
            await conn.execute(sql.SQL(definition))
    log.info("citus: distributed %s", ", ".join(todo))
    return todo


async def _existing_tables(conn: AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(query("existing_tables"))
    return {str(row[0]) for row in await cur.fetchall()}

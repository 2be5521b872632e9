"""What Citus does with each named statement: EXPLAIN it on the cluster, read the task counts."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from importlib import resources
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from server.store.queries import parse

_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
#: A value for every parameter a statement may name: one session, one user, one message.
VALUES: dict[str, Any] = {
    "project_id": 1,
    "user_id": "user-1",
    "user_ids": ["user-1"],
    "tables": ["users", "sessions"],
    "session_id": "session-1",
    "exclude_session": "session-1",
    "session_ids": ["session-1"],
    "project_ids": [1],
    "uuid": uuid.UUID(int=1),
    "uuids": [uuid.UUID(int=1)],
    "roles": ["user"],
    "role_types": ["user"],
    "contents": ["hello"],
    "metadatas": [Jsonb({})],
    "metadata": Jsonb({}),
    "patch": Jsonb({"a": 1}),
    "metadata_contains": Jsonb({"a": 1}),
    "replace_metadata": False,
    "max_metadata_bytes": 65536,
    "set_email": True,
    "set_first_name": False,
    "set_last_name": False,
    "set_metadata": True,
    "email": "a@example.com",
    "first_name": "",
    "last_name": "",
    "show_deleted": False,
    "lastn": 6,
    "lastns": [6],
    "limits": [5],
    "budgets": [1 << 20],
    "relevant_budgets": [1 << 20],
    "limit": 50,
    "offset": 0,
    "after_ts": _NOW,
    "after_id": "",
    "after_sequence": 0,
    "after_session": "",
    "after_project": 0,
    "created_after": _NOW,
    "created_before": _NOW,
    "updated_after": _NOW,
    "updated_before": _NOW,
    "cutoff": _NOW,
    "batch_size": 100,
    "retention": "7 days",
    "embed": True,
    "per_turn": False,
    "model": "m",
    "text": "hello world",
    "vector": "[1,0,0]",
    "vectors": ["[1,0,0]"],
    "sequences": [1],
    "window": 4,
    "words": 32,
    "lease": 30.0,
    "least": 30.0,
    "most": 3600.0,
    "cap": 10_000,
    "candidates": 50,
    "text_weight": 0.3,
    "nearest_floor": 0.4,
    "with_vectors": False,
    "query": "'hello' | 'world'",
    "nearest": [0.1],
    "recall_sessions": ["session-2"],
    "owner": "user-1",
    "recall_sequences": [1],
    "recall_scores": [0.5],
    "chosen": [uuid.UUID(int=1)],
    "chosen_scores": [0.5],
    "chosen_sessions": ["session-2"],
    "chosen_sequences": [1],
    "candidate": b"k" * 32,
    "name": "default",
    "project": "default",
    "prefix": "msk_000000000000",
    "salt": b"s",
    "digest": b"d",
    "label": "",
    "include_deleted": False,
    "budget": 1 << 20,
    "emails": ["a@example.com"],
    "first_names": [""],
    "last_names": [""],
    "created": [_NOW],
    "updated": [_NOW],
    "deleted": [None],
    "last_message": [_NOW],
    "next_sequences": [1],
    "revive": False,
    "delta": 1,
    "after_user": "",
    "live": 0,
    "hold_ms": 60_000,
    "ms": "3600000",  # long_statement_timeout's set_config value
    "deltas": [1],
    "n": 2,
    "at": _NOW,
    **{
        f"{name}_{i}": value
        for i in range(2)
        for name, value in (
            ("sequence", i + 1),
            ("uuid", uuid.UUID(int=i + 1)),
            ("role", "user"),
            ("role_type", "user"),
            ("content", "hello"),
            ("metadata", Jsonb({})),
        )
    },
}


#: Files whose statements build the schema rather than serve calls: not planned.
_SCHEMA_FILES = ("migrate.sql", "distribute.sql")


def named_statements() -> dict[str, str]:
    """Every named query of server/store/sql/*.sql that serves calls (DML), by name."""
    found: dict[str, str] = {}
    for entry in resources.files("server.store").joinpath("sql").iterdir():
        if entry.name.endswith(".sql") and entry.name not in _SCHEMA_FILES:
            found.update(parse(entry.read_text("utf-8"), entry.name))
    dml = re.compile(r"^(?:--[^\n]*\n|\s)*(SELECT|WITH|INSERT|UPDATE|DELETE|AND)\b", re.I)
    return {n: t for n, t in found.items() if dml.match(t)}


async def task_counts(conn: AsyncConnection[Any], statement: sql.Composable) -> list[int]:
    """The Task Count of every distributed job in the statement's plan (its subplans too).

    One count of 1 everywhere is a router plan: the statement runs on one shard (one node).
    A statement on local or reference tables only has no distributed job at all.
    """
    return await task_counts_with(conn, statement, VALUES)


async def task_counts_with(
    conn: AsyncConnection[Any], statement: sql.Composable, params: dict[str, Any]
) -> list[int]:
    """task_counts with parameters of the caller's choosing."""
    plan = await explain(conn, statement, params)
    return [int(n) for n in re.findall(r'"Task Count": (\d+)', plan)]


async def explain(
    conn: AsyncConnection[Any], statement: sql.Composable, params: dict[str, Any]
) -> str:
    """The statement's plan on the cluster (EXPLAIN, not run), as JSON text."""
    cur = await conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement), params, prepare=False
    )
    row = await cur.fetchone()
    assert row is not None
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return json.dumps(plan)

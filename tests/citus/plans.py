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

from server.store.queries import parse, query

_NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
#: A value for every parameter a statement may name: one session, one user, one message.
VALUES: dict[str, Any] = {
    "project_id": 1,
    "user_id": "user-1",
    "user_ids": ["user-1"],
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
    "model": "m",
    "text": "hello world",
    "vector": "[1,0,0]",
    "vectors": ["[1,0,0]"],
    "sequences": [1],
    "window": 4,
    "lease": 30.0,
    "candidates": 50,
    "text_weight": 0.3,
    "with_vectors": False,
    "recall_sessions": ["session-2"],
    "recall_sequences": [1],
    "recall_scores": [0.5],
    "candidate": b"k" * 32,
    "name": "default",
    "project": "default",
    "prefix": "msk_000000000000",
    "salt": b"s",
    "digest": b"d",
    "label": "",
}


def named_statements() -> dict[str, str]:
    """Every named block of server/store/sql/*.sql, by name."""
    found: dict[str, str] = {}
    for entry in resources.files("server.store").joinpath("sql").iterdir():
        if entry.name.endswith(".sql"):
            found.update(parse(entry.read_text("utf-8"), entry.name))
    return found


def compose(name: str, **fragments: str) -> sql.Composable:
    """A named statement with its {placeholders} filled by other named fragments."""
    parts = {k: query(v) if v else sql.SQL("") for k, v in fragments.items()}
    return query(name).format(**parts) if parts else query(name)


async def task_counts(conn: AsyncConnection[Any], statement: sql.Composable) -> list[int]:
    """The Task Count of every distributed job in the statement's plan (its subplans too).

    One count of 1 everywhere is a router plan: the statement runs on one shard (one node).
    A statement on local or reference tables only has no distributed job at all.
    """
    cur = await conn.execute(
        sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement), VALUES, prepare=False
    )
    row = await cur.fetchone()
    assert row is not None
    plan = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return [int(n) for n in re.findall(r'"Task Count": (\d+)', json.dumps(plan))]

"""Store: a pipeline of prepared statements that fails leaves its connection usable.

psycopg prepares a statement on its sixth use and counts it as prepared once it queued the
Parse; PostgreSQL skips everything after an error in a pipeline, that Parse too. Outside a
transaction (GetMemory's recall on Citus pipelines its two reads in autocommit) the
connection then named a statement that did not exist, and every later call on it failed until
the pool retired it (an hour). db.fetch_pipelined makes psycopg forget them after a failure.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from server.store.db import fetch_pipelined

#: The first divides by the parameter: 0 fails it, and the pipeline with it.
STATEMENTS = [
    sql.SQL("SELECT 1 / %(d)s::int AS a"),
    sql.SQL("SELECT 2 + %(d)s::int AS b"),
]


async def test_a_failed_pipeline_of_prepared_statements_leaves_the_connection_usable(
    database_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for _ in range(5):
            assert await fetch_pipelined(conn, STATEMENTS, {"d": 1}, prepare=True) == [
                [{"a": 1}],
                [{"b": 3}],
            ]
        # The sixth use prepares both statements, and the first fails.
        with pytest.raises(psycopg.errors.DivisionByZero):
            await fetch_pipelined(conn, STATEMENTS, {"d": 0}, prepare=True)
        for _ in range(7):  # past the next preparing use too
            assert await fetch_pipelined(conn, STATEMENTS, {"d": 1}, prepare=True) == [
                [{"a": 1}],
                [{"b": 3}],
            ]

"""On a running Citus cluster: recall ranked apart answers what the one statement answers.

GetMemory ranks recall on the request path where the worker has kept none, and the embedding
worker ranks it to keep it. As one statement, Citus ran the session's own reads inside the
ranking (its words, its window's vectors, its user, the nearest memories) as subplans, each a
round trip through the coordinator. On Citus the store now computes the query on the
session's shard first (recall_query_citus), then with vectors the nearest memories
(recall_nearest_citus, one fan-out), and ranks with them given (docs/scaling.md, "Recall
ranked on Citus"). These tests run both forms on the same data and compare the answers, with
and without vectors, read whole and up to a byte budget; and count the subplans left.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import AsyncRawCursor, sql
from psycopg.rows import dict_row

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.search.service import RECALL_WINDOW
from server.store import Store
from server.store.db import StoreCursor
from server.store.recall import recall_positional
from tests.citus.plans import explain
from tests.fix_db import expected_vectors

MODEL = "test-model"
WORDS = [
    *("bees", "honey", "garden", "weather", "travel", "paris"),
    *("coffee", "music", "books", "river", "mountain", "code"),
]


@pytest.fixture(scope="module")
async def seeded(citus_url: str, citus_store: Store) -> str:
    """A user of 8 sessions of 12 messages (random vectors for all but the last message of
    each), another user's session sharing their words, and a session of nobody."""
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        await conn.execute("TRUNCATE messages, sessions, users CASCADE")
    for user in ("ranked", "other"):
        await citus_store.create_user(P, user, "", "", "", {})
    for s in range(8):
        messages = [
            NewMessage(
                role="u",
                role_type="user" if i % 2 else "assistant",
                content=f"{WORDS[(s + i) % 12]} and {WORDS[(s * 5 + i) % 12]} said {i}",
                metadata={"i": i},
            )
            for i in range(12)
        ]
        await citus_store.add_memory(P, f"ranked-{s}", "ranked", messages)
    bees = NewMessage(role="u", role_type="user", content="bees honey", metadata={})
    await citus_store.add_memory(P, "other-0", "other", [bees])
    await citus_store.add_memory(P, "nobody-0", None, [bees])
    if citus_store.vectors:
        rng = np.random.default_rng(7)
        async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT session_id, sequence FROM messages"
                " WHERE sequence < 12 OR session_id NOT LIKE 'ranked-%%'"
            )
            for session_id, sequence in await cur.fetchall():
                vector = rng.normal(size=8)
                vector /= np.linalg.norm(vector)
                await conn.execute(
                    "INSERT INTO message_embeddings"
                    " (project_id, session_id, sequence, model, embedding)"
                    " VALUES (%s, %s, %s, %s, %s::vector)",
                    (P, session_id, sequence, MODEL, str(vector.tolist())),
                )
    return citus_url


async def _one_statement(store: Store, params: dict[str, Any], vector: bool) -> list[Row]:
    # The ranking as plain PostgreSQL runs it (one statement), on the cluster.
    statement, names = recall_positional(vector, params["budget"] is not None)
    async with store._connect(single=True) as conn:
        cursor = AsyncRawCursor(conn, row_factory=dict_row)
        await cursor.execute(statement, [params[n] for n in names], prepare=False)
        return await cursor.fetchall()


Row = dict[str, Any]


def _answer(found: list[Row]) -> list[tuple[Any, ...]]:
    return [
        (r["uuid"], r["session_id"], r["sequence"], round(r["score"], 9), r.get("followed"))
        for r in found
    ]


def _vectors_expected(store: Store) -> bool:
    expected = expected_vectors()
    assert expected is None or store.vectors == expected, "the cluster's pgvector mode"
    return store.vectors


@pytest.mark.parametrize("vector", [False, True], ids=["words", "vectors"])
@pytest.mark.parametrize("budget", [None, 120], ids=["whole", "budgeted"])
@pytest.mark.parametrize("session", ["ranked-0", "ranked-5", "other-0", "nobody-0", "absent"])
async def test_recall_ranked_apart_answers_what_the_one_statement_answers(
    citus_store: Store, seeded: str, vector: bool, budget: int | None, session: str
) -> None:
    if vector and not _vectors_expected(citus_store):
        pytest.skip("this cluster has no pgvector: recall ranks by words only")
    assert citus_store.citus
    model = MODEL if vector else None
    params = {
        **citus_store._recall_params(P, session, RECALL_WINDOW, model, 5),
        "budget": budget,
    }
    one = await _one_statement(citus_store, params, vector)
    async with citus_store._connect(single=True) as conn:
        apart = await citus_store._ranked_rows(conn, params, model, budget)
    assert _answer(apart) == _answer(one)
    if session.startswith("ranked"):
        # The comparison compares something: the user's other sessions were ranked.
        assert one and {r["session_id"] for r in one} <= {f"ranked-{i}" for i in range(8)}
        assert session not in {r["session_id"] for r in one}


async def test_recall_ranked_apart_runs_the_sessions_reads_on_its_shard_not_in_subplans(
    citus_url: str, citus_store: Store, seeded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each statement the ranking runs on Citus, EXPLAINed on the cluster. The query is one
    # task on the session's shard; with vectors the nearest memories are one fan-out; the
    # ranking by words is one fan-out, and with vectors only search_hybrid's own subplans
    # are left (the given query sent to the workers, and each candidate list, by words and
    # by vectors, read in a fan-out and normalized on the coordinator): the one statement
    # planned 5 subplans by words and 17 with vectors, each a round trip.
    vector = _vectors_expected(citus_store)
    ran: list[tuple[Any, Any]] = []
    execute, raw = StoreCursor.execute, AsyncRawCursor.execute

    async def recording(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        ran.append((query, params))
        run = raw if isinstance(self, AsyncRawCursor) else execute
        return await run(self, query, params, **kw)

    monkeypatch.setattr(StoreCursor, "execute", recording)
    monkeypatch.setattr(AsyncRawCursor, "execute", recording)
    model = MODEL if vector else None
    params = {**citus_store._recall_params(P, "ranked-3", RECALL_WINDOW, model, 5)}
    async with citus_store._connect(single=True) as conn:
        assert await citus_store._ranked_rows(conn, params, model, None)
    monkeypatch.undo()
    one, names = recall_positional(vector)
    assert isinstance(ran[-1][0], bytes) and ran[-1][0] != one
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        plans = [await _plan(conn, statement, values) for statement, values in ran]
        before = await _plan(conn, one, [{**params, "budget": None}[n] for n in names])
    query_plan, *fan_outs, ranking_plan = plans
    assert _tasks(query_plan) == [1] and _subplans(query_plan) == 0
    assert len(fan_outs) == (1 if vector else 0)
    for plan in fan_outs:
        assert len(_tasks(plan)) == 1 and _subplans(plan) == 0, plan[:2000]
    assert _subplans(ranking_plan) == (5 if vector else 0)
    assert _subplans(before) == (17 if vector else 5)


async def _plan(conn: psycopg.AsyncConnection[Any], statement: Any, values: Any) -> str:
    # A recorded statement's plan: the ranking has $n placeholders and its values in order.
    if isinstance(statement, bytes):
        text = re.sub(r"\$(\d+)", lambda m: f"%(p{m.group(1)})s", statement.decode())
        values = {f"p{i + 1}": v for i, v in enumerate(values)}
    else:
        text = statement if isinstance(statement, str) else statement.as_string(conn)
    return await explain(conn, sql.SQL(text), values)


def _tasks(plan: str) -> list[int]:
    return [int(n) for n in re.findall(r'"Task Count": (\d+)', plan)]


def _subplans(plan: str) -> int:
    # Citus's JSON plan holds a "PlannedStmt" for each distributed subplan.
    return plan.count('"PlannedStmt"')

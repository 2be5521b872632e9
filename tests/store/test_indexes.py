"""Every list order and filter is served by an index: checked with EXPLAIN on the real SQL.

The tables are small in a test, where a sequential scan and a sort would win on cost; with
seq scans and sorts priced out (enable_seqscan/enable_sort off), the planner still picks
them when no index can serve the query, so a Seq Scan or a Sort node in the plan means an
index is missing. That is what would make a page deep in a big table cost more than the
first.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import SessionQuery
from server.search.service import RECALL_WINDOW
from server.store import Store
from server.store.base import START
from server.store.kept_recall import kept_recall_statement
from server.store.messages import list_messages_statement, memory_window
from server.store.queries import query
from server.store.recall import RECALL_NEAREST_FLOOR, RECALL_WORDS, recall_statement
from server.store.search import HYBRID_TEXT_WEIGHT
from server.store.sessions import list_sessions_statements
from server.store.users import list_user_records_statement, list_user_sessions_statement

NOW = datetime(2024, 6, 1, tzinfo=UTC)


def _plan(url: str, statement: sql.Composable, params: dict[str, Any]) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_sort = off")
        explain = sql.SQL("EXPLAIN (FORMAT JSON) {}").format(statement)
        row = conn.execute(explain, params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


def _sorts_a_page(sort: dict[str, Any]) -> bool:
    # A Sort whose input reads only CTE Scans orders what an earlier, LIMITed step made (a
    # page, or counts for its rows), never a table: PostgreSQL 15 re-sorts the joined page
    # of list_users where 18 keeps its order. The CTEs' own plans are checked on their own.
    inputs = [c for c in sort.get("Plans", []) if c.get("Parent Relationship") != "InitPlan"]
    scans = [n for c in inputs for n in _nodes(c) if n["Node Type"].endswith("Scan")]
    return bool(scans) and all(n["Node Type"] == "CTE Scan" for n in scans)


def _assert_indexed(plan: dict[str, Any], *, sort_allowed: bool = False) -> set[str]:
    nodes = _nodes(plan)
    kinds = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in kinds, plan
    if not sort_allowed:
        sorts = [n for n in nodes if n["Node Type"] in ("Sort", "Incremental Sort")]
        assert all(_sorts_a_page(n) for n in sorts), plan
    return {n["Index Name"] for n in nodes if "Index Name" in n}


SESSION_QUERIES = [
    SessionQuery(order_field=field, descending=desc, user_id=user, show_deleted=deleted)
    for field, desc, user, deleted in itertools.product(
        ("created_at", "updated_at"), (False, True), (None, "u1"), (False, True)
    )
] + [
    SessionQuery(created_after=NOW, created_before=NOW),
    SessionQuery(order_field="updated_at", updated_after=NOW, updated_before=NOW),
    SessionQuery(user_id="u1", created_after=NOW, descending=True),
    SessionQuery(metadata_contains={"plan": "pro"}),
]


@pytest.mark.parametrize("q", SESSION_QUERIES, ids=repr)
@pytest.mark.parametrize("deep", [False, True], ids=["first", "keyset"])
@pytest.mark.parametrize("budgeted", [False, True], ids=["whole", "budgeted"])
def test_every_session_list_order_and_filter_has_an_index(
    clean_db: str, q: SessionQuery, deep: bool, budgeted: bool
) -> None:
    page, _, params = list_sessions_statements(q, (NOW, "s1") if deep else None, budgeted=budgeted)
    params.update(project_id=P, limit=51, offset=0, budget=1 << 22)
    plan = _plan(clean_db, page, params)
    used = _assert_indexed(plan)
    assert used, "an index must provide the page order"
    if q.user_id is not None:
        # A user's sessions are found through the index, not filtered out of all sessions.
        conditions = " ".join(n.get("Index Cond", "") for n in _nodes(plan))
        assert "user_id" in conditions, plan


def test_metadata_contains_uses_the_gin_index(clean_db: str) -> None:
    # Real statistics rather than priced-out scans: 3000 sessions, one in a thousand matching.
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, metadata)"
            " SELECT 1, 's' || i, jsonb_build_object('tag', i % 1000, 'plan', 'free')"
            " FROM generate_series(1, 3000) AS i"
        )
        conn.execute("ANALYZE sessions")
    _, count, params = list_sessions_statements(SessionQuery(metadata_contains={"tag": 7}), None)
    params.update(project_id=P)
    with psycopg.connect(clean_db) as conn:
        explain = sql.SQL("EXPLAIN (FORMAT JSON) {}").format(count)
        row = conn.execute(explain, params).fetchone()
    assert row is not None
    used = {n.get("Index Name") for n in _nodes(row[0][0]["Plan"])}
    assert "sessions_metadata_idx" in used


@pytest.mark.parametrize(
    "name",
    [
        "list_users",
        *("list_user_records", "list_user_records_budgeted"),
        *("list_user_records_newest", "list_user_records_newest_budgeted"),
    ],
)
def test_user_lists_and_their_session_counts_use_indexes(clean_db: str, name: str) -> None:
    params = {"project_id": P, "after_ts": START[0], "after_id": "", "limit": 101, "offset": 0}
    statements = {
        "list_user_records": list_user_records_statement(budgeted=False),
        "list_user_records_budgeted": list_user_records_statement(budgeted=True),
        # REST's users-ordered, newest first: the same index, read backward.
        "list_user_records_newest": list_user_records_statement(budgeted=False, newest_first=True),
        "list_user_records_newest_budgeted": list_user_records_statement(
            budgeted=True, newest_first=True
        ),
    }
    params["budget"] = 1 << 22
    used = _assert_indexed(_plan(clean_db, statements.get(name) or query(name), params))
    assert "users_created_idx" in used
    # session_count: each listed user's row of user_session_counts (migration 0010), by key.
    assert "user_session_counts_pkey" in used


def test_user_chunk_and_its_session_counts_use_indexes(clean_db: str) -> None:
    params = {"project_id": P, "after_ts": START[0], "after_id": "", "limit": 1000}
    plan = _plan(clean_db, query("list_user_chunk"), params)
    used = _assert_indexed(plan)
    # The entries reach string_agg in key order from the page's own scan, so its ORDER BY
    # sorts nothing: PostgreSQL 16 on shows a Sort node where it would (as it did when the
    # page was joined to its counts), 15 sorts inside the aggregate and shows none either way.
    assert not [n for n in _nodes(plan) if n["Node Type"] in ("Sort", "Incremental Sort")], plan
    assert "users_created_idx" in used
    # session_count: the batch's rows of user_session_counts (migration 0010), by key.
    assert "user_session_counts_pkey" in used


def _assert_planned_once(
    url: str, statement: sql.Composable, calls: list[dict[str, Any]]
) -> list[list[tuple[Any, ...]]]:
    """Runs `statement` once per parameters in `calls`, prepared, on a connection of its own,
    and asserts that PostgreSQL kept one generic plan: it plans the first five executions
    for their values, then weighs the generic plan against them, and a statement whose
    custom plans look cheaper is planned again at every call. Returns each call's rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        found = [cur.execute(statement, params, prepare=True).fetchall() for params in calls]
        row = conn.execute(
            "SELECT sum(generic_plans)::int, sum(custom_plans)::int FROM pg_prepared_statements"
        ).fetchone()
    assert row is not None
    generic, custom = row
    assert custom <= 6 and generic >= len(calls) - 6, row
    return found


def _seed_users(url: str, count: int) -> None:
    # `count` users a second apart, every tenth with 2 live sessions counted, and statistics.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (project_id, user_id, created_at)"
            " SELECT %s, 'u' || g, '2024-01-01'::timestamptz + g * interval '1 s'"
            " FROM generate_series(1, %s) g",
            [P, count],
        )
        conn.execute(
            "INSERT INTO user_session_counts (project_id, user_id, session_count)"
            " SELECT project_id, user_id, 2 FROM users WHERE user_id LIKE '%%3'"
        )
        conn.execute("ANALYZE users, user_session_counts")


#: Twelve keyset pages of 20 of _seed_users' users, each starting 100 users after the last.
_USER_PAGES = [
    {
        "project_id": P,
        "after_ts": datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=100 * k),
        "after_id": "",
        "limit": 20,
    }
    for k in range(12)
]


def test_user_chunk_is_planned_once(clean_db: str) -> None:
    # ListUsersChunked's statement (list_user_chunk, prepared after psycopg's five uses) runs
    # on a generic plan once PostgreSQL has weighed it: with the limit and the key visible to
    # each custom plan, the generic one (a tenth of the table per page) looked dearer and
    # every chunk was planned again (~0.3 ms of PostgreSQL's CPU per 1,000 users,
    # docs/performance.md, "A chunk's statement planned once").
    _seed_users(clean_db, 3000)  # enough users that a tenth of them is many pages
    for rows in _assert_planned_once(clean_db, query("list_user_chunk"), _USER_PAGES):
        assert rows[0][1] == 20, rows


def test_user_wire_is_planned_once(clean_db: str) -> None:
    # ListUsersChunked's statement for a chunk past the byte cap (list_user_wire, each
    # entry's size and key) is planned once, as list_user_chunk: with the limit and the key
    # in sight each custom plan looked cheaper than the generic one, and every batch was
    # planned again (docs/performance.md, "GetUser's statement planned once").
    _seed_users(clean_db, 3000)
    pages = _assert_planned_once(clean_db, query("list_user_wire"), _USER_PAGES)
    for k, rows in enumerate(pages):
        _, sizes, _, user_ids = rows[0]
        assert len(sizes) == 20 and user_ids[0] == f"u{max(100 * k, 1)}", rows


def test_get_user_is_planned_once(clean_db: str) -> None:
    # GetUser's statement (get_users: the ids of the calls the coalescer gathered, one to
    # sixteen, most often one or two) runs on a generic plan once PostgreSQL has weighed it:
    # with the array in sight, each custom plan of fewer ids than the generic plan's guess
    # (ten) looked cheaper, and every GetUser was planned again (docs/performance.md,
    # "GetUser's statement planned once").
    _seed_users(clean_db, 3000)
    sizes = [1, 2, 1, 1, 3, 1, 2, 8, 1, 16, 1, 2]
    batches = [[f"u{100 * k + j}" for j in range(1, n + 1)] for k, n in enumerate(sizes)]
    batches[4].append("nobody")  # an id with no user is simply absent
    calls = [{"project_id": P, "user_ids": ids} for ids in batches]
    found = _assert_planned_once(clean_db, query("get_users"), calls)
    for ids, rows in zip(batches, found, strict=True):
        counts = {r[0]: r[7] for r in rows}
        assert counts == {i: 2 if i.endswith("3") else 0 for i in ids if i != "nobody"}, rows


def test_user_sessions_messages_and_memory_use_indexes(clean_db: str) -> None:
    cases = [
        ("list_user_sessions", {"user_id": "u1", "after_ts": NOW, "after_id": "", "limit": 51}),
        (
            "list_user_sessions_budgeted",
            {"user_id": "u1", "after_ts": NOW, "after_id": "", "limit": 51, "budget": 1 << 22},
        ),
        (
            "list_messages",
            {"session_id": "s1", "after_sequence": 0, "limit": 51, "offset": 0, "budget": 1 << 22},
        ),
        ("get_memory", {"session_id": "s1", "lastn": 6}),
        ("get_memory_budgeted", {"session_id": "s1", "lastn": 1000, "budget": 1 << 24}),
        ("get_users", {"user_ids": ["u1", "u2"]}),
    ]
    statements = {
        "get_memory": memory_window(budgeted=False),
        "get_memory_budgeted": memory_window(budgeted=True),
        "list_messages": list_messages_statement(),
        "list_user_sessions": list_user_sessions_statement(budgeted=False),
        "list_user_sessions_budgeted": list_user_sessions_statement(budgeted=True),
    }
    for name, params in cases:
        # get_memory and list_messages sort the few rows of one page back into order.
        _assert_indexed(
            _plan(clean_db, statements.get(name) or query(name), {"project_id": P, **params}),
            sort_allowed=name.startswith(("get_memory", "list_messages", "list_user_sessions")),
        )


#: Words every seeded message holds, so each one matches recall's query.
_RECALL_WORDS = (
    "garden tomatoes basil compost seedlings watering mulch greenhouse trellis harvest "
    "pruning aphids ladybugs zucchini peppers cucumbers raised beds soil fertiliser sunlight"
)


def _seed_recall_users(
    conn: psycopg.Connection[Any], prefix: str, users: int, sessions: int, per: int
) -> None:
    # `users` users of `sessions` sessions of `per` messages, each holding _RECALL_WORDS.
    params = {"p": prefix, "users": users, "sessions": sessions, "per": per, "w": _RECALL_WORDS}
    conn.execute(
        "INSERT INTO users (project_id, user_id)"
        " SELECT 1, %(p)s || u FROM generate_series(1, %(users)s) AS u",
        params,
    )
    conn.execute(
        "INSERT INTO sessions (project_id, session_id, user_id, message_count, next_sequence)"
        " SELECT 1, %(p)s || u || '-' || j, %(p)s || u, %(per)s, %(per)s + 1"
        " FROM generate_series(1, %(users)s) AS u, generate_series(1, %(sessions)s) AS j",
        params,
    )
    conn.execute(
        "INSERT INTO messages (project_id, session_id, sequence, role, role_type, content)"
        " SELECT 1, %(p)s || u || '-' || j, i, 'user', 'user', %(w)s || ' note ' || i"
        " FROM generate_series(1, %(users)s) AS u, generate_series(1, %(sessions)s) AS j,"
        " generate_series(1, %(per)s) AS i",
        params,
    )
    # Statistics, and the GIN index's pending list merged, as autovacuum leaves a real table.
    conn.execute("VACUUM ANALYZE users, sessions, messages")


def _recall_buffers(conn: psycopg.Connection[Any], vectors: bool) -> int:
    params = {
        "project_id": P,
        "exclude_session": "me1-1",
        "window": RECALL_WINDOW,
        "words": RECALL_WORDS,
        "model": "m",
        "limit": 5,
        "candidates": 20,
        "with_vectors": False,
        "text_weight": HYBRID_TEXT_WEIGHT,
        "nearest_floor": RECALL_NEAREST_FLOOR,
    }
    explain = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(
        recall_statement(vectors)
    )
    row = conn.execute(explain, params).fetchone()
    assert row is not None
    plan = row[0][0]["Plan"]
    assert plan["Actual Rows"] == 5, plan
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


def test_recall_reads_the_users_messages_not_every_users(clean_db: str, store: Store) -> None:
    # Recall ranks on the request path without pgvector (and before the worker kept a
    # session's recall): its query is every word of the session's last messages. Through the
    # GIN index those words' posting lists span every user of the project, read once per
    # session of the user: GetMemory then slowed as the project grew (1.8 s at 65,000
    # messages, docs/search.md). The pages it reads must not grow with other users' messages.
    with psycopg.connect(clean_db, autocommit=True) as conn:
        _seed_recall_users(conn, "me", users=1, sessions=4, per=10)
        _seed_recall_users(conn, "crowd", users=10, sessions=2, per=50)
        small = _recall_buffers(conn, store.vectors)
        _seed_recall_users(conn, "throng", users=100, sessions=2, per=50)
        large = _recall_buffers(conn, store.vectors)
    # 11,000 messages of others instead of 1,000: the same pages (the sessions table and its
    # indexes grow by a few).
    assert large <= small + 10, (small, large)


def test_get_memory_with_recall_is_planned_once(clean_db: str) -> None:
    # GetMemory with recall for 8 coalesced calls (get_memories_recall, prepared after
    # psycopg's five uses) runs on a generic plan once PostgreSQL has weighed it: with its
    # arrays' lengths visible to each custom plan, the generic one looked dearer and every
    # statement was planned again (~1 ms of PostgreSQL's CPU each, docs/performance.md).
    calls = 8
    with psycopg.connect(clean_db, autocommit=True) as conn:
        # Enough rows that a plan's cost outweighs the planning PostgreSQL charges itself.
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, next_sequence)"
            " SELECT %s, 's' || g, 5 FROM generate_series(0, 1999) g",
            [P],
        )
        conn.execute(
            "INSERT INTO messages (project_id, session_id, sequence, content)"
            " SELECT project_id, session_id, q, 'hello' FROM sessions, generate_series(1, 4) q"
        )
        conn.execute("ANALYZE sessions, messages")
        vectors = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
        statement = kept_recall_statement("get_memories_recall", vectors=vectors is not None)
        budgeted = kept_recall_statement(
            "get_memories_recall", vectors=vectors is not None, budgeted=True
        )
        relevant = kept_recall_statement(
            "get_memories_recall", vectors=vectors is not None, relevant_budgeted=True
        )
    params = {
        "project_id": P,
        "model": "m",
        "session_ids": [f"s{k}" for k in range(calls)],
        "lastns": [6] * calls,
        "limits": [5] * calls,
        "budgets": [1 << 24] * calls,
        "relevant_budgets": [1 << 24] * calls,
    }
    _assert_planned_once(clean_db, statement, [params] * 12)
    # GetMemory past lastn 17 (read up to the answer's bytes): the same.
    _assert_planned_once(clean_db, budgeted, [{**params, "lastns": [1000] * calls}] * 12)
    # And past relevant_limit 17: its kept memories read up to the answer's bytes too.
    _assert_planned_once(clean_db, relevant, [{**params, "limits": [20] * calls}] * 12)

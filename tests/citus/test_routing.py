"""On a running Citus cluster: which shards each statement of the store reaches.

Every named statement is EXPLAINed on the coordinator of a three-node cluster (two workers,
8 shards per distributed table) with parameters naming one session, one user, one message.
A statement a call naming one session or one user runs must be a router plan (one task),
GetUser and UpdateUser included (session_count is read from user_session_counts, placed with
the users); ListUserSessions, which reads all of a user's sessions, reads on one shard and
fans out once over sessions; GetMemory's kept recall reads its keys on the session's shard and
the memories on the shards of the sessions they name only; every other statement touching a
distributed table must be one of the named fan-outs below (docs/scaling.md lists the same).
A new statement that is none of these fails the test until it is classified.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from server.domain import DEFAULT_PROJECT_ID, NewMessage, SearchQuery, SessionQuery
from server.store import Store
from server.store.append import (
    ADD_MEMORY_SESSION_CITUS,
    add_memory_rows_citus,
    add_memory_statement,
)
from server.store.db import StoreCursor
from server.store.export import export_sessions_statement
from server.store.kept_recall import kept_recall_statement
from server.store.messages import list_messages_statement, memory_window
from server.store.placement import ShardMaps
from server.store.queries import query
from server.store.recall import recall_nearest_citus, recall_query_citus, recall_statement
from server.store.search import (
    budgeted_ranking,
    candidates_statement,
    chosen_statement,
    ranking_statement,
    search_filters,
)
from server.store.sessions import list_sessions_statements
from server.store.users import list_user_records_statement, list_user_sessions_statement
from tests.citus.plans import VALUES, explain, named_statements, task_counts, task_counts_with

#: Statements of calls naming one session or one user: one shard (a router plan).
ONE_SHARD = {
    "add_memory_held_citus": "AddMemory: the request's messages the session holds",
    "add_memory_session_citus": "AddMemory: the session made or appended to",
    "add_memory_messages_citus": "AddMemory: the new messages",
    "add_memory_queue_citus": "AddMemory: the new messages' queue rows",
    "get_memory": "GetMemory",
    "get_memory_budgeted": "GetMemory of a lastn past 17, read up to the answer's bytes",
    "list_messages": "ListMessages",
    "get_message": "GetMessage",
    "update_message": "UpdateMessage",
    "clear_memory": "ClearMemory",
    "create_session": "CreateSession",
    "session_state": "CreateSession on a taken id",
    "get_session": "GetSession",
    "update_session": "UpdateSession",
    "lock_live_session": "DeleteSession, ClearMemory",
    "lock_live_session_to_update": "UpdateMessage",
    "delete_session": "DeleteSession",
    "undelete_session": "UndeleteSession",
    "recall_query_text": "GetMemory's recall: the words of the session's last messages",
    "recall_query_citus": "recall ranked on Citus: the session's user, words and vectors",
    "recall_query_citus_words": "the same by words (no pgvector)",
    "recall_kept_keys_citus": "GetMemory's kept recall: the keys the worker kept",
    "recall_kept_keys_citus_words": "the same, kept by words (no pgvector)",
    "recall_live_citus": "GetMemory's kept recall: the memories, on their sessions' shards only",
    "save_recall": "the embedding worker keeping one session's recall",
    "save_word_recall": "the recall worker (no pgvector) keeping one session's recall by words",
    "create_user": "CreateUser",
    "get_users_citus": "GetUser (one id; concurrent calls coalesced into one statement)",
    "update_user": "UpdateUser",
    "count_live_sessions": "every session write that makes a session live or not: its user's count",
    "lock_session_for_revival": "AddMemory reviving a soft-deleted session",
    "forget_recall_vectors": "ClearMemory and DeleteSession dropping the kept recall",
    "forget_recall_words": "ClearMemory and DeleteSession dropping the kept recall (words)",
    "lock_user": "DeleteUser's first step",
    "user_live_sessions": "DeleteUser's count of the user's live sessions, on Citus",
    "lock_session_owner": "AddMemory reviving a user's soft-deleted session, on Citus",
    "own_new_session": "CreateSession, and AddMemory making a user's session, on Citus",
    "restore_lock_session_citus": "Restore on Citus: each session its messages name, locked",
    "search_in_one_session": "SearchMemory with one session id",
    "search_in_one_session_words": "the same, hybrid without vectors (scored as hybrid's)",
    "search_in_one_session_budgeted": "the same past a limit of 17, read up to the answer's bytes",
    "search_in_one_session_candidates": "SearchMemory with mmr_lambda and one session id",
    "search_in_one_session_unembedded": "SearchMemory with one session id: its unembedded count",
    "search_chosen": "SearchMemory with mmr_lambda: the chosen, on their sessions' shards only",
    "search_chosen_budgeted": "the same past a limit of 17, read up to the answer's bytes",
    "purge_messages_in_shard": "the purge: one shard's part of a batch",
    "purge_sessions_in_shard": "the purge: one shard's part of a batch",
    "recount_hold": "memstore recount: the user's count row made to lock",
    "recount_lock": "memstore recount: the user's count row locked",
    "recount_set": "memstore recount: the user's count corrected",
    "recount_kept": "memstore recount: the kept counts of the users found off, on their shards",
}
#: Single-user reads of all the user's sessions: the user on one shard, then one fan-out over
#: the sessions (a user's sessions are placed by their session ids: docs/scaling.md).
ONE_SHARD_AND_ONE_FAN_OUT = {
    "list_user_sessions": "ListUserSessions",
    "list_user_sessions_budgeted": "ListUserSessions past 30 rows, read up to the bytes",
}
#: Named fan-outs: project-wide listings and exports, DeleteUser, the purge, user-scope
#: search, the embedding worker's queue sweeps.
FAN_OUT = {
    "list_users": "ListUsers",
    "list_user_records": "ListUsers",
    "list_user_records_budgeted": "ListUsers past 30 rows (REST 131), read up to the bytes",
    "list_user_records_newest": "REST users-ordered (newest first)",
    "list_user_records_newest_budgeted": "REST users-ordered past 131 rows, read up to the bytes",
    "list_user_chunk_citus": "ListUsersChunked (a chunk of the users' protobuf bytes as one value)",
    "list_user_wire_citus": "ListUsersChunked (a chunk past the byte cap, cut by each user's size)",
    "count_users": "ListUsers' total_size",
    "list_sessions": "ListSessions",
    "list_sessions_budgeted": "ListSessions past 30 rows (REST 131), read up to the bytes",
    "count_sessions": "ListSessions' total_size",
    "export_sessions": "ExportSessions",
    "export_messages": "ExportMessages (a batch whose timestamps a datetime cannot hold)",
    "export_message_columns": "ExportMessages (a batch as a few concatenated columns)",
    "delete_user": "DeleteUser (a multi-shard transaction: two-phase commit)",
    "lock_user_sessions_citus": "DeleteUser's lock of the user's sessions",
    "purge_pick_messages_citus": "the purge: one batch picked over every shard",
    "purge_pick_sessions_citus": "the purge: one batch picked over every shard",
    "search_user_scope": "SearchMemory over a user's sessions",
    "search_user_scope_words": "the same, hybrid without vectors (scored as hybrid's)",
    "search_project_scope_words": "SearchMemory over the project, hybrid without vectors",
    "search_project_scope": "SearchMemory over the project",
    "search_user_scope_budgeted": "SearchMemory over a user's sessions, past a limit of 17",
    "search_project_scope_budgeted": "SearchMemory over the project, past a limit of 17",
    "search_user_scope_candidates": "SearchMemory with mmr_lambda over a user's sessions",
    "search_project_scope_candidates": "SearchMemory with mmr_lambda over the project",
    "search_user_scope_unembedded": "SearchMemory over a user's sessions: its unembedded count",
    "search_project_scope_unembedded": "SearchMemory over the project: its unembedded count",
    "recall_nearest_citus": "recall ranked on Citus: the nearest memory of each window vector",
    "recall_rank_citus": "the embedding worker ranking a session's recall (GetMemory unkept)",
    "recall_rank_citus_words": "the same by words (no pgvector)",
    "recall_rank_citus_budgeted": "GetMemory ranking recall past a relevant_limit of 20",
    "recall_rank_citus_words_budgeted": "the same by words (no pgvector)",
    "embedding_lag": "metrics: the queue's length",
    "release_embeddings": "the embedding worker giving a batch back",
    "renew_embeddings": "the embedding worker holding a batch's lease while its model works",
    "defer_embeddings": "the embedding worker putting off messages the model failed on alone",
    "settle_word_recall": "the recall worker (no pgvector) removing a batch from the queue",
    "save_embeddings": "the embedding worker writing one batch's vectors",
    "queue_reindex": "memstore reindex",
    "reindex_total": "memstore reindex",
    "embedding_model_used": "memstore reindex, at its end: a model's vectors still read",
    "queue_word_recall": "memstore reindex without pgvector: sessions with no kept recall",
    "project_rows": "Restore's require_empty: does the project hold a user or session",
    "restore_users_existing": "Restore: the batch's users already stored (ids span shards)",
    "restore_sessions_existing": "Restore: as restore_users_existing",
    "restore_messages_existing": "Restore: as restore_users_existing",
    "restore_messages": "Restore: a batch's messages and their sessions' counts",
    "claim_embeddings_citus": "the embedding worker leasing the oldest due messages",
    "any_due_citus": "the embedding worker, after a claim that lost its race",
    "refresh_session_embeddings_citus": "the embedding worker: recall vectors of a batch",
    "recount_users": "memstore recount: a batch of users with their kept counts",
    "recount_live": "memstore recount: the batch's users' live sessions",
    "recount_user": "memstore recount: one user's live sessions, under their count's lock",
    "recount_named_users": "memstore recount on Citus: a batch of the users sessions name",
}
#: Statements on the small shared tables (reference tables: a copy on every node, one task).
REFERENCE = {
    "create_project",
    "get_project",
    "get_backup_source",
    "list_projects",
    "create_api_key",
    "find_api_key",
    "match_api_keys",
    "revoke_api_key",
    "list_api_keys",
    "any_api_key",
    "token_key",
    "record_embedding_model",
    "other_embedding_models",
    "forget_embedding_model",
    "last_purge_started",
    "record_purge_start",
}
#: Statements only plain PostgreSQL runs: on Citus the store runs the *_citus variant (or,
#: for lock_embedded_sessions, nothing: docs/scaling.md).
PLAIN_ONLY = {
    # One statement of INSERT CTEs, ~8 subplans on Citus: add_memory_citus runs its steps.
    "add_memory",
    "lock_user_sessions",
    "purge_messages",
    "purge_sessions",
    "claim_embeddings",
    "lock_embedded_sessions",
    "restore_lock_sessions",
    "refresh_session_embeddings",
    "get_memories_recall",
    "get_memories_recall_words",
    "get_memories_recall_budgeted",
    "get_memories_recall_budgeted_words",
    "get_memories_recall_relevant_budgeted",
    "get_memories_recall_relevant_budgeted_words",
    # Their LIMIT behind a scalar subquery, which Citus refuses in a multi-shard query.
    "list_user_chunk",
    "list_user_wire",
    # Its ids behind a scalar subquery, by which Citus cannot prune: every shard.
    "get_users",
    # The session's own reads inside the ranking, 5 subplans by words and 17 with vectors:
    # recall_query_citus, recall_nearest_citus and recall_rank_citus instead.
    "recall_rank",
    "recall_rank_words",
    "recall_rank_budgeted",
    "recall_rank_words_budgeted",
}
#: Statements on reference or coordinator-local tables only, and fragments.
_NOT_DISTRIBUTED_PREFIXES = (
    "filter_",
    "search_filter_",
    "recall_filter_",
    "keyset_",
    "order_",
    "memory_window",
    "budget_",
)
_TEMPLATES = {
    *("list_sessions", "count_sessions", "recall_query_vector"),
    *("recall_query_citus", "recall_nearest_citus", "recall_given_text", "recall_given_vector"),
    *("get_memories_recall", "recall_kept_keys_citus", "get_memory"),
    *("list_messages", "list_messages_sized"),
    *("kept_recall", "kept_recall_sized"),
    *("add_memory_session_citus", "add_memory_messages_citus", "add_memory_queue_citus"),
    *("list_user_records", "list_user_records_page"),
    *("list_user_sessions", "list_user_sessions_page", "list_sessions_budgeted"),
    *("export_sessions", "export_sessions_sized"),
}
_SEARCH = (
    *("search_full_text", "search_semantic", "search_hybrid", "search_words", "count_unembedded"),
    *("search_budgeted", "search_sized", "search_candidates", "search_chosen_budgeted"),
)


def _statements() -> dict[str, sql.Composable]:
    """Every statement to plan, by name; templates filled as the store fills them."""
    found: dict[str, sql.Composable] = {}
    for name in named_statements():
        if name.startswith(_NOT_DISTRIBUTED_PREFIXES) or name in _TEMPLATES or name in _SEARCH:
            continue
        found[name] = query(name)
    found["add_memory"] = add_memory_statement(citus=False)
    found["add_memory_session_citus"] = ADD_MEMORY_SESSION_CITUS
    for name, row in (("messages", "message"), ("queue", "due")):
        found[f"add_memory_{name}_citus"] = add_memory_rows_citus(
            f"add_memory_{name}_citus", f"add_memory_{row}_citus", 2
        )
    page, count, _ = list_sessions_statements(SessionQuery(), None)
    found["list_sessions"], found["count_sessions"] = page, count
    budgeted_page, _, _ = list_sessions_statements(SessionQuery(), None, budgeted=True)
    found["list_sessions_budgeted"] = budgeted_page
    for budgeted, suffix in ((False, ""), (True, "_budgeted")):
        found[f"list_user_records{suffix}"] = list_user_records_statement(budgeted=budgeted)
        found[f"list_user_records_newest{suffix}"] = list_user_records_statement(
            budgeted=budgeted, newest_first=True
        )
        found[f"list_user_sessions{suffix}"] = list_user_sessions_statement(budgeted=budgeted)
    for name in ("get_memories_recall", "recall_kept_keys_citus"):
        found[name] = kept_recall_statement(name, vectors=True)
        found[f"{name}_words"] = kept_recall_statement(name, vectors=False)
    found["get_memories_recall_budgeted"] = kept_recall_statement(
        "get_memories_recall", vectors=True, budgeted=True
    )
    found["get_memories_recall_budgeted_words"] = kept_recall_statement(
        "get_memories_recall", vectors=False, budgeted=True
    )
    for vectors, suffix in ((True, ""), (False, "_words")):
        found[f"get_memories_recall_relevant_budgeted{suffix}"] = kept_recall_statement(
            "get_memories_recall", vectors=vectors, budgeted=True, relevant_budgeted=True
        )
    found["get_memory"] = memory_window(budgeted=False)
    found["get_memory_budgeted"] = memory_window(budgeted=True)
    found["list_messages"] = list_messages_statement()
    found["export_sessions"] = export_sessions_statement()
    text = query("search_query_text")
    # Scoped as SearchMemory in one session is (the store's own filters).
    one_session, _ = search_filters(SearchQuery(text="x", session_ids=("session-1",)))
    scopes: dict[str, sql.Composable] = {
        "search_in_one_session": one_session,
        "search_user_scope": query("search_filter_user"),
        "search_project_scope": sql.SQL(""),
    }
    searches = {name: compose_search(text, scope) for name, scope in scopes.items()}
    for name, statement in searches.items():
        found[name] = statement
        found[f"{name}_words"] = compose_search(text, scopes[name], "search_words")
        found[f"{name}_unembedded"] = query("count_unembedded").format(filters=scopes[name])
        found[f"{name}_budgeted"] = budgeted_ranking(statement, True)
        found[f"{name}_candidates"] = candidates_statement(statement)
    found["search_chosen_budgeted"] = chosen_statement(True)
    found["recall_rank"] = recall_statement(True)
    found["recall_rank_words"] = recall_statement(False)
    found["recall_rank_budgeted"] = recall_statement(True, budgeted=True)
    found["recall_rank_words_budgeted"] = recall_statement(False, budgeted=True)
    for vector, suffix in ((True, ""), (False, "_words")):
        found[f"recall_query_citus{suffix}"] = recall_query_citus(vector)
        found[f"recall_rank_citus{suffix}"] = recall_statement(vector, citus=True)
        found[f"recall_rank_citus{suffix}_budgeted"] = recall_statement(
            vector, budgeted=True, citus=True
        )
    found["recall_nearest_citus"] = recall_nearest_citus()
    return found


def compose_search(
    words: sql.Composable, scope: sql.Composable, ranking: str = "search_full_text"
) -> sql.Composed:
    """A ranking by words (search_full_text, or hybrid's without vectors: search_words) over
    one scope fragment (empty: the whole project)."""
    match, distance = query("search_match_index"), query("search_distance_query")
    return ranking_statement(ranking, words, scope, match, distance)


@pytest.fixture(scope="module")
async def plans(citus_url: str, citus_store: Store) -> dict[str, list[int] | str]:
    """Task counts of every statement's plan on the cluster (or the error Citus gave)."""
    found: dict[str, list[int] | str] = {}
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        for name, statement in _statements().items():
            try:
                found[name] = await task_counts(conn, statement)
            except psycopg.errors.FeatureNotSupported as exc:
                found[name] = str(exc).splitlines()[0]
    return found


def test_the_store_sees_citus_and_migrate_distributed_the_tables(citus_store: Store) -> None:
    assert citus_store.citus


#: docs/scaling.md's placement table: each table's kind, distribution column and co-location
#: group (a name here; tables of one group share Citus's colocation id, groups differ).
PLACEMENT = {
    "projects": ("reference", "<none>", "shared"),
    "settings": ("reference", "<none>", "shared"),
    "api_keys": ("reference", "<none>", "shared"),
    "embedding_models": ("reference", "<none>", "shared"),
    "users": ("distributed", "user_id", "users"),
    "user_session_counts": ("distributed", "user_id", "users"),
    "sessions": ("distributed", "session_id", "sessions"),
    "messages": ("distributed", "session_id", "sessions"),
    "embedding_queue": ("distributed", "session_id", "sessions"),
    "message_embeddings": ("distributed", "session_id", "sessions"),
    "session_embeddings": ("distributed", "session_id", "sessions"),
    "session_word_recall": ("distributed", "session_id", "sessions"),
}
#: Tables migrations 0007 and 0021 make only where pgvector is.
VECTOR_TABLES = {"message_embeddings", "session_embeddings", "embedding_models"}


async def test_the_cluster_places_the_tables_as_the_scaling_page_says(
    citus_url: str, citus_store: Store
) -> None:
    # Read back from the cluster (citus_tables), not from distribute.py: the page's table was
    # read from the code, and nothing checked that the cluster holds it.
    async with await psycopg.AsyncConnection.connect(citus_url) as conn:
        cur = await conn.execute(
            "SELECT table_name::text, citus_table_type, distribution_column, colocation_id"
            " FROM citus_tables"
        )
        placed = {r[0]: r[1:] for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint"
            " WHERE contype = 'f'"
        )
        keys = {(r[0], r[1]) for r in await cur.fetchall()}
    expected = {t for t in PLACEMENT if citus_store.vectors or t not in VECTOR_TABLES}
    assert set(placed) == expected
    groups: dict[str, set[int]] = {}
    for table in expected:
        kind, column, group = PLACEMENT[table]
        assert placed[table][:2] == (kind, column), (table, placed[table])
        groups.setdefault(group, set()).add(placed[table][2])
    # One colocation id per group, and a different one for each group.
    assert all(len(ids) == 1 for ids in groups.values()), groups
    assert len({next(iter(ids)) for ids in groups.values()}) == len(groups)
    # The foreign keys Citus keeps (co-located, or to a reference table), and the one it
    # cannot (sessions -> users, placed by different columns: the store enforces it).
    assert {("messages", "sessions"), ("user_session_counts", "users")} <= keys
    assert ("sessions", "users") not in keys


@pytest.mark.parametrize("name", sorted(ONE_SHARD))
def test_calls_naming_one_session_or_user_reach_one_shard(plans: dict[str, Any], name: str) -> None:
    assert plans[name] == [1] * len(plans[name]) and plans[name], (
        f"{name} ({ONE_SHARD[name]}) is not a router plan on Citus: tasks {plans[name]}"
    )


@pytest.fixture(scope="module")
async def whole_plans(citus_url: str, citus_store: Store) -> dict[str, str]:
    """The plans of the ONE_SHARD statements on the cluster, as JSON text."""
    statements = _statements()
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        return {name: await explain(conn, statements[name], VALUES) for name in ONE_SHARD}


@pytest.mark.parametrize("name", sorted(ONE_SHARD))
def test_calls_naming_one_session_or_user_run_without_subplans(
    whole_plans: dict[str, str], name: str
) -> None:
    # One job of one task: the statement is sent whole to the shard, in one round trip
    # between coordinator and worker, with no intermediate result made first.
    plan = whole_plans[name]
    counts = [int(n) for n in re.findall(r'"Task Count": (\d+)', plan)]
    assert counts == [1] and '"Subplans"' not in plan, f"{name} ({ONE_SHARD[name]}): {plan}"


@pytest.mark.parametrize("name", sorted(ONE_SHARD_AND_ONE_FAN_OUT))
def test_user_reads_read_the_user_on_one_shard_and_fan_out_once(
    plans: dict[str, Any], name: str
) -> None:
    counts = plans[name]
    assert isinstance(counts, list), f"{name}: Citus refused it: {counts}"
    fanned = [n for n in counts if n > 1]
    assert len(fanned) == 1 and counts.count(1) >= 1, f"{name}: tasks {counts}"


@pytest.mark.parametrize("name", sorted(FAN_OUT))
def test_named_fan_outs_plan_on_citus(plans: dict[str, Any], name: str) -> None:
    counts = plans[name]
    assert isinstance(counts, list), f"{name}: Citus refused it: {counts}"
    # A fan-out that became a router plan belongs in ONE_SHARD (and docs/scaling.md).
    assert any(n > 1 for n in counts), f"{name} reaches one shard now: tasks {counts}"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_shared_tables_are_read_and_written_on_one_node(plans: dict[str, Any], name: str) -> None:
    counts = plans[name]
    assert isinstance(counts, list) and counts and set(counts) == {1}, f"{name}: {counts}"


def test_every_statement_on_distributed_tables_is_classified(plans: dict[str, Any]) -> None:
    known = ONE_SHARD.keys() | ONE_SHARD_AND_ONE_FAN_OUT.keys() | FAN_OUT.keys() | REFERENCE
    unclassified = sorted(
        name
        for name, counts in plans.items()
        if name not in known | PLAIN_ONLY and (not isinstance(counts, list) or counts)
    )
    assert not unclassified, f"statements to classify for Citus: {unclassified}"
    refused = sorted(n for n, c in plans.items() if not isinstance(c, list))
    assert set(refused) <= PLAIN_ONLY, f"Citus refuses: {refused}"


async def test_kept_recall_reaches_only_the_shards_of_the_sessions_it_names(
    citus_url: str, citus_store: Store
) -> None:
    # GetMemory's recall reads memories of the user's other sessions: however many shards the
    # cluster has, only those sessions' shards, and after psycopg prepares the statement too.
    statement = query("recall_live_citus")
    sessions = [f"session-{i}" for i in range(20)]
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        shard_of = {}
        for session in sessions:
            cur = await conn.execute(
                "SELECT get_shard_id_for_distribution_column('messages', %s::text)", (session,)
            )
            row = await cur.fetchone()
            assert row is not None
            shard_of[session] = row[0]
        assert len(set(shard_of.values())) > 3, "the ids must spread over the shards"
        for named in (sessions[:1], sessions[:5], sessions):
            params = {
                "project_id": 1,
                "owner": "user-1",
                "recall_sessions": named,
                "recall_sequences": [1, 2],
            }
            counts = await task_counts_with(conn, statement, params)
            assert counts == [len({shard_of[s] for s in named})], (named, counts)
        # Prepared (psycopg prepares after five uses; PostgreSQL may then plan it generically).
        remote: list[str] = []
        conn.add_notice_handler(lambda d: remote.append(d.message_primary or ""))
        for _ in range(8):
            await conn.execute(statement, {**params, "recall_sessions": sessions[:2]})
        await conn.execute("SET citus.log_remote_commands = on")
        await conn.execute("SET client_min_messages = log")
        await conn.execute(statement, {**params, "recall_sessions": sessions[3:5]})
        await conn.execute("RESET client_min_messages")
        shards = {int(n) for n in re.findall(r"messages_(\d+) ", " ".join(remote))}
        assert shards == {shard_of[s] for s in sessions[3:5]}, remote


async def test_add_memory_runs_router_statements_without_subplans(
    citus_url: str, citus_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every statement AddMemory runs on the cluster, on each of its paths (a new session with
    # and without a user, an append with a retried message, a revival), planned as one job of
    # one task: no subplan over intermediate results, each a round trip between coordinator
    # and worker (docs/scaling.md, "AddMemory on Citus").
    ran, recording = _recorder(monkeypatch)

    def msg(content: str, uuid: str | None = None) -> NewMessage:
        return NewMessage(role="u", role_type="user", content=content, metadata={}, uuid=uuid)

    p, kept = DEFAULT_PROJECT_ID, "00000000-0000-0000-0000-00000000a001"
    await citus_store.create_user(p, "routed-user", "", "", "", {})
    # The store's shard maps (placement.py: the coordinator's catalog, read every 30 s) are
    # read here, before the calls recorded.
    await citus_store.get_user(p, "routed-user")
    recording(True)
    await citus_store.add_memory(p, "routed-1", None, [msg("a", kept), msg("b")])
    await citus_store.add_memory(p, "routed-1", None, [msg("a", kept), msg("c")])
    await citus_store.add_memory(p, "routed-2", "routed-user", [msg("a", None)])
    recording(False)
    await citus_store.delete_session(p, "routed-2")
    recording(True)
    await citus_store.add_memory(p, "routed-2", "routed-user", [msg("revived")])
    recording(False)
    assert ran
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        async for text, plan in _plans_of(conn, ran):
            counts = [int(n) for n in re.findall(r'"Task Count": (\d+)', plan)]
            whole = counts == [1] and '"Subplans"' not in plan and "INSERT/SELECT" not in plan
            assert whole, f"{counts}: {text[:300]}"


async def test_an_append_naming_its_sessions_user_stays_on_the_sessions_shard(
    citus_url: str, citus_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An agent naming its user on every turn: each turn after the one that made the session
    # runs on the session's shard group alone. The user's shard (another one here) is neither
    # read nor locked, so a turn is one shard's local transaction, not a two-phase commit.
    p, user = DEFAULT_PROJECT_ID, "turning-user"
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:

        async def range_of(table: str, value: str) -> int:
            cur = await conn.execute(
                "SELECT shardminvalue::int FROM pg_dist_shard"
                " WHERE shardid = get_shard_id_for_distribution_column(%s, %s::text)",
                (table, value),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        users_range = await range_of("users", user)
        for i in range(64):
            session = f"turning-{i}"
            session_range = await range_of("sessions", session)
            if session_range != users_range:
                break
        assert session_range != users_range

    def msg(content: str) -> NewMessage:
        return NewMessage(role="u", role_type="user", content=content, metadata={})

    await citus_store.create_user(p, user, "", "", "", {})
    await citus_store.add_memory(p, session, user, [msg("first turn")])
    ran, recording = _recorder(monkeypatch)
    recording(True)
    await citus_store.add_memory(p, session, user, [msg("second turn")])
    recording(False)
    shards: set[int] = set()
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        async for text, plan in _plans_of(conn, ran):
            named = {int(n) for n in re.findall(r'"Relation Name": "\w+?_(\d+)"', plan)}
            assert named, f"no shard in the plan of {text[:200]}"
            shards |= named
        cur = await conn.execute(
            "SELECT logicalrelid::text, shardminvalue::int FROM pg_dist_shard"
            " WHERE shardid = ANY(%s)",
            (sorted(shards),),
        )
        reached = {(table, int(low)) for table, low in await cur.fetchall()}
    assert {low for _, low in reached} == {session_range}, reached
    assert "users" not in {table for table, _ in reached}, reached


@pytest.mark.parametrize("table", ["users", "sessions"])
async def test_the_shard_maps_find_the_worker_holding_each_key(
    citus_url: str, citus_store: Store, table: str
) -> None:
    # GetUser's shared reads are grouped by the worker holding each user, and an agent's
    # turn takes a slot of its session's worker's share of the pool (placement.py): the
    # group the maps find is the one Citus placed the key's shard on.
    ids = [f"key-{i}" for i in range(300)] + ["", "é日本🙂", "x" * 40]
    maps = ShardMaps()
    async with await psycopg.AsyncConnection.connect(citus_url, autocommit=True) as conn:
        await maps.read(conn)
        cur = await conn.execute(
            "SELECT p.groupid FROM unnest(%s::text[]) WITH ORDINALITY AS t(i, n)"
            " JOIN pg_dist_placement p"
            " ON p.shardid = get_shard_id_for_distribution_column(%s::regclass, t.i) ORDER BY t.n",
            (ids, table),
        )
        placed = [row[0] for row in await cur.fetchall()]
    assert [maps.group_of(table, i) for i in ids] == placed
    assert len(set(placed)) == 2, placed  # both workers hold keys


def _recorder(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[tuple[Any, Any]], Callable[[bool], None]]:
    """The statements (and parameters) the store runs while recording is switched on."""
    ran: list[tuple[Any, Any]] = []
    execute = StoreCursor.execute

    async def recording(self: StoreCursor, query: Any, params: Any = None, **kw: Any) -> Any:
        ran.append((query, params))
        return await execute(self, query, params, **kw)

    def switch(on: bool) -> None:
        monkeypatch.setattr(StoreCursor, "execute", recording if on else execute)

    return ran, switch


async def _plans_of(
    conn: psycopg.AsyncConnection[Any], ran: list[tuple[Any, Any]]
) -> AsyncIterator[tuple[str, str]]:
    """Each recorded statement's text and its plan on the cluster, transaction control left out."""
    for statement, params in ran:
        text = statement if isinstance(statement, str) else statement.as_string(conn)
        if re.match(r"\s*(BEGIN|COMMIT|ROLLBACK|SET|SAVEPOINT)\b", text, re.I):
            continue
        yield text, await explain(conn, sql.SQL(text), params or {})

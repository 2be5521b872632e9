"""Every statement of the store names its distribution key, or is a known multi-shard one.

docs/scaling.md plans for Citus with users distributed by (project_id, user_id) and sessions
and messages co-located by (project_id, session_id). A statement stays on one shard only
when each table it touches is pinned by equality on both key columns, to a parameter or to
the key of a row already pinned (a co-located join). This test reads the named SQL blocks in
server/store/sql/*.sql and fails when a statement reaches a table without its key, unless
the statement is listed below with the reason it must fan out; the list is the one
docs/scaling.md gives, and the test also fails when an entry has gone stale.
"""

from __future__ import annotations

import re
from importlib import resources

from server.store.queries import parse

#: Distribution column (after project_id) of each distributed table.
KEYS = {"users": "user_id", "sessions": "session_id", "messages": "session_id"}

#: (statement, table) pairs that reach a table across shards, and why that is accepted.
MULTI_SHARD = {
    ("list_users", "users"): "a project-wide listing: scatter, then merge by created_at",
    ("list_user_records", "users"): "ListUsers and the export: as list_users",
    ("list_users", "sessions"): "session_count of each listed user (see get_users)",
    ("list_user_records", "sessions"): "session_count of each listed user (see get_users)",
    ("get_users", "users"): "concurrent GetUser calls coalesced into one statement; under "
    "Citus, coalesce per shard (group the ids by shard) or read one id per statement",
    ("get_users", "sessions"): "session_count: a user's sessions live on their session ids' "
    "shards; a counter kept on the user row would make it single-shard",
    ("update_user", "sessions"): "session_count, as get_users",
    ("list_user_sessions", "sessions"): "a user's sessions span shards (router: users; "
    "the sessions part is a fan-out merged by created_at)",
    ("lock_user_sessions", "sessions"): "DeleteUser locks every session of the user",
    ("delete_user", "sessions"): "DeleteUser removes every session of the user",
    ("delete_user", "messages"): "DeleteUser removes the messages of those sessions",
    ("list_sessions", "sessions"): "a project-wide listing: scatter, then merge by the order",
    ("count_sessions", "sessions"): "total_size of a project-wide listing",
    ("count_users", "users"): "total_size of ListUsers, a project-wide listing",
    ("project_rows", "users"): "Restore's require_empty: whether the project holds a user",
    ("project_rows", "sessions"): "Restore's require_empty: whether it holds a session",
    ("restore_users_existing", "users"): "Restore: the batch's users already stored, "
    "looked up by a list of ids (a batch spans shards)",
    ("restore_sessions_existing", "sessions"): "Restore: as restore_users_existing",
    ("restore_messages_existing", "messages"): "Restore: as restore_users_existing",
    ("restore_messages", "sessions"): "Restore: the counts of the sessions of a batch",
    ("purge_messages", "messages"): "the purge sweeps soft-deleted rows of every shard",
    ("purge_sessions", "sessions"): "the purge sweeps soft-deleted rows of every shard",
    ("purge_sessions", "messages"): "with the messages of the purged sessions",
    ("export_sessions", "sessions"): "ExportSessions: a project-wide stream, as list_sessions",
    ("export_messages", "messages"): "ExportMessages: every message of the project, merged "
    "by (session_id, sequence)",
    ("export_messages", "sessions"): "ExportMessages: the live check of each message's "
    "session (co-located with it)",
    ("search_full_text", "sessions"): "SearchMemory in a user's or the project's scope: the "
    "scope's sessions span shards (one session's search is pinned by session_ids)",
    ("search_semantic", "sessions"): "SearchMemory, as search_full_text",
    ("search_semantic", "messages"): "SearchMemory, as search_full_text",
    ("search_hybrid", "sessions"): "SearchMemory and GetMemory's recall over the user's other "
    "sessions, as search_full_text",
    ("search_hybrid", "messages"): "SearchMemory and recall, as search_full_text",
    ("count_unembedded", "sessions"): "SearchMemory's unembedded count, over the same scope",
    ("count_unembedded", "messages"): "SearchMemory's unembedded count, over the same scope",
    ("claim_embeddings", "messages"): "the embedding worker claims the oldest queued messages "
    "of every shard",
    ("refresh_session_embeddings", "messages"): "the recall vectors of every session one "
    "embedding batch touched",
    ("get_memory_recall", "messages"): "GetMemory's kept recall: messages of the user's other "
    "sessions, which span shards",
    ("get_memory_recall", "sessions"): "GetMemory's kept recall: the live check of those "
    "sessions (the window's part stays on its session's shard)",
    ("lock_embedded_sessions", "sessions"): "the embedding worker locks the sessions of one "
    "batch, which span shards",
    ("save_embeddings", "messages"): "the embedding worker writes the vectors of one batch, "
    "whose messages span shards",
    ("queue_reindex", "messages"): "memstore reindex sweeps every message",
    ("reindex_total", "messages"): "memstore reindex counts every message",
}

#: List fragments composed into list_sessions (checked through it), not statements.
_FRAGMENT = re.compile(r"^(filter|keyset|order)_")
_REF = re.compile(
    r"\b(FROM|JOIN|UPDATE|INTO|USING)\s+(users|sessions|messages)\b(?:\s+(?:AS\s+)?(\w+))?",
    re.IGNORECASE,
)
_NOT_ALIAS = {"where", "on", "set", "using", "select", "left", "join", "order", "for", "with"}
_TO_PARAM = re.compile(r"\b(\w+)\.(\w+)\s*=\s*%\(\w+\)s")
_TO_COLUMN = re.compile(r"\b(\w+)\.(\w+)\s*=\s*(\w+)\.(\w+)\b")


def statements() -> dict[str, str]:
    """Every named statement of server/store/sql/*.sql (fragments left out)."""
    found: dict[str, str] = {}
    for entry in resources.files("server.store").joinpath("sql").iterdir():
        if entry.name.endswith(".sql"):
            found.update(parse(entry.read_text("utf-8"), entry.name))
    return {n: s for n, s in found.items() if not _FRAGMENT.match(n)}


def _pinned(statement: str) -> set[tuple[str, str]]:
    """(alias, column) pairs bound by equality to a parameter, directly or via a join."""
    pinned = {(a, c) for a, c in _TO_PARAM.findall(statement)}
    joins = _TO_COLUMN.findall(statement)
    while True:
        more = set()
        for a, c, b, d in joins:
            if (b, d) in pinned and (a, c) not in pinned:
                more.add((a, c))
            if (a, c) in pinned and (b, d) not in pinned:
                more.add((b, d))
        if not more:
            return pinned
        pinned |= more


def fan_outs(name: str, statement: str) -> set[tuple[str, str]]:
    """(statement, table) for each table the statement reaches without its distribution key."""
    pinned = _pinned(statement)
    found = set()
    for match in _REF.finditer(statement):
        keyword, table, alias = match.group(1).upper(), match.group(2), match.group(3)
        if alias is None or alias.lower() in _NOT_ALIAS:
            alias = table
        key = KEYS[table]
        if keyword == "INTO":
            # An insert lands on the shard of the key values it writes.
            columns = statement[match.end() :].split(")", 1)[0]
            ok = "project_id" in columns and key in columns
        else:
            ok = (alias, "project_id") in pinned and (alias, key) in pinned
        if not ok:
            found.add((name, table))
    return found


def test_every_statement_carries_its_distribution_key_or_is_a_known_fan_out() -> None:
    found: set[tuple[str, str]] = set()
    for name, statement in statements().items():
        found |= fan_outs(name, statement)
    unexplained = sorted(found - MULTI_SHARD.keys())
    assert not unexplained, (
        f"statements that reach a table without its distribution key: {unexplained}; pin "
        "(project_id, user_id|session_id), or list them in MULTI_SHARD and docs/scaling.md"
    )
    stale = sorted(MULTI_SHARD.keys() - found)
    assert not stale, f"MULTI_SHARD entries that now carry their key: {stale}"


def test_the_agent_hot_path_stays_on_one_shard() -> None:
    # What an agent calls on every turn must never fan out.
    hot = [
        "add_memory",
        "get_memory",
        "list_messages",
        "get_session",
        "create_session",
        "update_session",
        "get_message",
        "update_message",
        "create_user",
    ]
    every = statements()
    for name in hot:
        assert fan_outs(name, every[name]) == set(), name


def test_the_checker_catches_a_missing_key() -> None:
    bad = "SELECT m.content FROM messages m WHERE m.project_id = %(project_id)s"
    assert fan_outs("bad", bad) == {("bad", "messages")}
    joined = (
        "SELECT m.content FROM sessions s JOIN messages m ON m.project_id = s.project_id"
        " AND m.session_id = s.session_id"
        " WHERE s.project_id = %(project_id)s AND s.session_id = %(session_id)s"
    )
    assert fan_outs("joined", joined) == set()

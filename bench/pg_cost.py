"""What AddMemory(1) costs PostgreSQL, and which part of the schema that cost is for.

    .venv/bin/python -m bench.pg_cost [--database-url postgresql://postgres@127.0.0.1/postgres]

Makes one scratch database per variant (`pg_cost_<variant>_<pid>`, this run's own, dropped WITH
(FORCE) at the end): the migrated schema, seeded alike (sessions of `--sessions` without a user, as
`make bench`'s writes group appends to, each with a few messages, and users' sessions beside them),
then in every variant but `base` one part of the schema removed (an index, the generated tsvector
column, a foreign key). Each round runs `--calls` AddMemory(1) calls in each variant, the variants'
order alternating between rounds, each call the store's statement prepared and committed alone
(synchronous_commit on) over the sessions in turn; it reads the backend's CPU time from /proc
(schedstat) before and after, so parsing, planning, executing and committing all count. `touch_0011`
puts back migration 0011's memstore_touch, which PostgreSQL does not inline (migration 0015).
Prints, per variant, the median backend CPU per call and the median of the per-round ratios to
`base` (which a busy machine moves less than the raw figures), and the share of the session updates
that were HOT.

Needs the PostgreSQL server on this machine (its backends' /proc entries), and a role that
may create databases; pgvector is used where migrate can create it (`--get-memory` then reads
recall kept as vectors, else kept by words, and says which).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import uuid
from typing import Any

import psycopg
from psycopg import sql

from bench import env
from bench.rounds import (
    SCRATCH_SERVER,
    add_database_url,
    alternate,
    in_turn,
    parser,
    ratios,
    spread,
)
from server.store.append import add_memory_statement
from server.store.queries import query

#: Each variant: the SQL that removes its part from a migrated, seeded database.
VARIANTS: dict[str, str] = {
    "base": "",
    "no_metadata_gin": "DROP INDEX sessions_metadata_idx",
    "no_updated_idx": "DROP INDEX sessions_updated_idx; DROP INDEX sessions_user_updated_idx",
    "no_session_idx": (
        "DROP INDEX sessions_metadata_idx, sessions_updated_idx, sessions_user_updated_idx,"
        " sessions_created_idx, sessions_user_idx, sessions_user_live_idx, sessions_deleted_idx"
    ),
    "no_search": "ALTER TABLE messages DROP COLUMN search",
    "no_message_fk": "ALTER TABLE messages DROP CONSTRAINT messages_project_id_session_id_fkey",
    "no_queue": "",
    # Migration 0011's memstore_touch, which PostgreSQL cannot inline (0015's it can).
    "touch_0011": (
        "CREATE OR REPLACE FUNCTION memstore_touch(now timestamptz, last timestamptz)"
        " RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$"
        " SELECT greatest(now, last + interval '1 microsecond') $$"
    ),
}
_TEXT = "The user said they prefer vegetarian food and live near the sea. " * 3


def _cpu_ns(pid: int) -> int:
    # A backend's time on a CPU so far, in ns (the scheduler's count: /proc's utime and stime
    # are in 10 ms ticks, too coarse for rounds of a few hundred calls).
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _params(session: str, k: int, embed: bool) -> dict[str, Any]:
    return {
        "project_id": 1,
        "session_id": session,
        "user_id": None,
        "uuids": [str(uuid.uuid4())],
        "roles": ["user"],
        "role_types": ["user"],
        "contents": [f"{_TEXT} #{k}"],
        "metadatas": ["{}"],
        "embed": embed,
        "per_turn": False,
        "revive": False,
    }


def _seed(url: str, sessions: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (project_id, user_id)"
            " SELECT 1, 'u' || g FROM generate_series(1, 1000) g"
        )
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, user_id, message_count, next_sequence,"
            " last_message_at) SELECT 1, 'user-' || g, 'u' || (g % 1000 + 1), 4, 5, now()"
            " FROM generate_series(1, 10000) g"
        )
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, message_count, next_sequence,"
            " last_message_at) SELECT 1, 'bench-1-' || g, 4, 5, now()"
            " FROM generate_series(0, %s - 1) g",
            (sessions,),
        )
        conn.execute(
            "INSERT INTO messages (project_id, session_id, sequence, role, role_type, content)"
            " SELECT 1, s.session_id, q, 'user', 'user', %s || q FROM sessions s,"
            " generate_series(1, 4) q",
            (_TEXT,),
        )
        conn.execute("VACUUM ANALYZE")


def _migrated(url: str, name: str, sessions: int) -> str:
    """Makes database `name`, migrated as `memstore migrate` does and seeded; returns its URL.

    Migrate creates pgvector where the role may (migrations 0007 and 0008 are skipped where it
    may not, as on a server whose role is no superuser: recall is then kept by words)."""
    db_url = env.fresh_database(url, name)
    from server.__main__ import main as server_main

    with contextlib.redirect_stdout(sys.stderr):  # migrate prints what it applied
        if server_main(["migrate", "--database-url", db_url]) not in (0, None):
            raise SystemExit("migration failed")
    _seed(db_url, sessions)
    return db_url


def _drop(admin: psycopg.Connection[Any], names: list[str]) -> None:
    for name in names:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def measure(
    url: str, variants: list[str], sessions: int, rounds: int, calls: int
) -> dict[str, dict[str, Any]]:
    """Backend CPU per AddMemory(1) by variant: medians, ratios to base, HOT share."""
    names = {v: env.own_name(f"pg_cost_{v}") for v in variants}
    conns: dict[str, psycopg.Connection[Any]] = {}
    with psycopg.connect(url, autocommit=True) as admin:
        _drop(admin, list(names.values()))
        try:
            _migrated(url, names["base"], sessions)
            for v, name in names.items():
                if v != "base":
                    admin.execute(
                        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                            sql.Identifier(name), sql.Identifier(names["base"])
                        )
                    )
            for v, name in names.items():
                conninfo = psycopg.conninfo.make_conninfo(url, dbname=name)
                conns[v] = conn = psycopg.connect(conninfo, autocommit=True)
                for part in filter(None, VARIANTS[v].split(";")):
                    conn.execute(part)
                conn.execute("VACUUM ANALYZE")
            per_call, vs_base = _time_variants(conns, variants, sessions, rounds, calls)
            return {v: _summary(conn, per_call[v], vs_base[v]) for v, conn in conns.items()}
        finally:
            for conn in conns.values():
                conn.close()
            _drop(admin, list(names.values()))


def _time_variants(
    conns: dict[str, psycopg.Connection[Any]],
    variants: list[str],
    sessions: int,
    rounds: int,
    calls: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    # Per variant, the backend CPU per call of each round (µs) and its ratio to base's.
    statement = add_memory_statement(citus=False)
    k = 0

    def one_round(v: str) -> float:
        nonlocal k
        conn = conns[v]
        pid = conn.info.backend_pid
        embed = v != "no_queue"
        before = _cpu_ns(pid)
        for c in range(calls):
            k += 1
            params = _params(f"bench-1-{(k + c) % sessions}", k, embed)
            conn.execute(statement, params, prepare=True).fetchall()
        return (_cpu_ns(pid) - before) / calls / 1000

    per_call = alternate(variants, rounds, one_round)
    return per_call, {v: ratios(per_call[v], per_call["base"]) for v in variants}


def _summary(
    conn: psycopg.Connection[Any], per_call: list[float], ratios: list[float]
) -> dict[str, Any]:
    # The backend's counts reach pg_stat_user_tables when it next goes idle (PostgreSQL 15+).
    conn.execute("SELECT pg_stat_force_next_flush()")
    counts = conn.execute(
        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'sessions'"
    ).fetchone()
    size = conn.execute(
        "SELECT pg_total_relation_size('sessions'), pg_total_relation_size('messages')"
    ).fetchone()
    assert counts is not None and size is not None
    n_upd, n_hot = counts
    return {
        "backend_cpu_us": round(statistics.median(per_call)),
        "rounds_us": [round(x) for x in per_call],
        "vs_base": round(spread(ratios).median, 3),
        "sessions_hot_share": round(n_hot / n_upd, 3) if n_upd else None,
        "sessions_bytes": size[0],
        "messages_bytes": size[1],
    }


def get_memory_cost(url: str, sessions: int, rounds: int, calls: int) -> dict[str, Any]:
    """Backend CPU per GetMemory(lastn 6, recall 5) statement (get_memories_recall) for 1 and
    8 coalesced calls: as the store sends it (`auto`, PostgreSQL's choice of plan) against
    planned at every call (`force_custom_plan`, which the statement got before its arrays
    went behind subqueries). One seeded database; rounds alternate the two. `kept_recall`
    says which table the statement read kept recall from, as the store would on this server:
    `vectors` (session_embeddings) where migrate could create pgvector, else `words`
    (session_word_recall)."""
    from server.store.kept_recall import kept_recall_statement

    name = env.own_name("pg_cost_get_memory")
    conns: dict[str, psycopg.Connection[Any]] = {}
    with psycopg.connect(url, autocommit=True) as admin:
        _drop(admin, [name])
        try:
            db_url = _migrated(url, name, sessions)
            modes = ("auto", "force_custom_plan")
            for mode in modes:
                conns[mode] = psycopg.connect(db_url, autocommit=True)
                conns[mode].execute(sql.SQL("SET plan_cache_mode = {}").format(sql.SQL(mode)))
            ready = conns["auto"].execute(query("vectors_ready")).fetchone()
            vectors = bool(ready and ready[0])
            statement = kept_recall_statement("get_memories_recall", vectors=vectors)
            found: dict[str, list[float]] = {f"{m}_{n}": [] for m in modes for n in (1, 8)}
            k = 0
            for r in range(rounds):
                for mode in in_turn(modes, r):
                    conn = conns[mode]
                    pid = conn.info.backend_pid
                    for n in (1, 8):
                        before = _cpu_ns(pid)
                        for _ in range(calls):
                            k += 1
                            params = _recall_params(k, n, sessions)
                            conn.execute(statement, params, prepare=True).fetchall()
                        found[f"{mode}_{n}"].append((_cpu_ns(pid) - before) / calls / 1000)
        finally:
            for conn in conns.values():
                conn.close()
            _drop(admin, [name])
    medians = {key: round(statistics.median(v)) for key, v in found.items()}
    return {**medians, "kept_recall": "vectors" if vectors else "words"}


def _recall_params(k: int, n: int, sessions: int) -> dict[str, Any]:
    from server.store.kept_recall import NO_BUDGET

    return {
        "project_id": 1,
        "model": "bench",
        "session_ids": [f"bench-1-{(k * n + j) % sessions}" for j in range(n)],
        "lastns": [6] * n,
        "limits": [5] * n,
        # As the store sends an agent turn (lastn 6, 5 memories): neither read is budgeted.
        "budgets": [NO_BUDGET] * n,
        "relevant_budgets": [NO_BUDGET] * n,
    }


def main(argv: list[str] | None = None) -> int:
    """Prints the medians as JSON."""
    p = parser("pg_cost", __doc__, rounds=21, calls=300, calls_help="calls per variant and round")
    add_database_url(p, help=SCRATCH_SERVER)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--get-memory",
        action="store_true",
        help="GetMemory's statement instead: as sent against planned at every call",
    )
    p.add_argument("--sessions", type=int, default=2000)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    if "base" not in variants:
        variants.insert(0, "base")
    url = env.server_url(args.database_url, env.ROOT / ".data")
    if args.get_memory:
        found = get_memory_cost(url, args.sessions, args.rounds, args.calls)
        print(json.dumps(found, indent=2))
        return 0
    print(json.dumps(measure(url, variants, args.sessions, args.rounds, args.calls), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

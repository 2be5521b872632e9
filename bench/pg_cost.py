"""What AddMemory(1) costs PostgreSQL, and which part of the schema that cost is for.

    .venv/bin/python -m bench.pg_cost [--database-url postgresql://postgres@127.0.0.1/postgres]

Makes one scratch database per variant (`pg_cost_<variant>`, dropped at the end): the
migrated schema, seeded alike (sessions of `--sessions` without a user, as `make bench`'s
writes group appends to, each with a few messages, and users' sessions beside them), then in
every variant but `base` one part of the schema removed (an index, the generated tsvector
column, a foreign key). Each round runs `--calls` AddMemory(1) calls in each variant, the
variants' order alternating between rounds, each call the store's statement prepared and
committed alone (synchronous_commit on) over the sessions in turn; it reads the backend's CPU
time from /proc (schedstat) before and after, so parsing, planning, executing and committing
all count. `touch_0011` puts back migration 0011's memstore_touch, which PostgreSQL does not
inline (migration 0015).
Prints, per variant, the median backend CPU per call and the median of the per-round ratios
to `base` (which a busy machine moves less than the raw figures), and the share of the
session updates that were HOT.

Needs the PostgreSQL server on this machine (its backends' /proc entries).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import uuid
from typing import Any

import psycopg
from psycopg import sql

from bench import env
from server.store.messages import add_memory_statement

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


def measure(
    url: str, variants: list[str], sessions: int, rounds: int, calls: int
) -> dict[str, dict[str, Any]]:
    """Backend CPU per AddMemory(1) by variant: medians, ratios to base, HOT share."""
    admin = psycopg.connect(url, autocommit=True)
    names = {v: f"pg_cost_{v}" for v in variants}
    base_url = psycopg.conninfo.make_conninfo(url, dbname=names["base"])
    for name in names.values():
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names["base"])))
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    from server.__main__ import main as server_main

    with contextlib.redirect_stdout(sys.stderr):  # migrate prints what it applied
        if server_main(["migrate", "--database-url", base_url]) not in (0, None):
            raise SystemExit("migration failed")
    _seed(base_url, sessions)
    for v, name in names.items():
        if v == "base":
            continue
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(names["base"])
            )
        )
    conns = {}
    for v, name in names.items():
        conn = psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname=name), autocommit=True)
        for part in filter(None, VARIANTS[v].split(";")):
            conn.execute(part)
        conn.execute("VACUUM ANALYZE")
        conns[v] = conn
    statement = add_memory_statement(citus=False)
    per_call: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    k = 0
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        found = {}
        for v in order:
            conn = conns[v]
            pid = conn.info.backend_pid
            embed = v != "no_queue"
            before = _cpu_ns(pid)
            for c in range(calls):
                k += 1
                params = _params(f"bench-1-{(k + c) % sessions}", k, embed)
                conn.execute(statement, params, prepare=True).fetchall()
            found[v] = (_cpu_ns(pid) - before) / calls / 1000
            per_call[v].append(found[v])
        for v in variants:
            ratios[v].append(found[v] / found["base"])
    out = {}
    for v, conn in conns.items():
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
        out[v] = {
            "backend_cpu_us": round(statistics.median(per_call[v])),
            "rounds_us": [round(x) for x in per_call[v]],
            "vs_base": round(statistics.median(ratios[v]), 3),
            "sessions_hot_share": round(n_hot / n_upd, 3) if n_upd else None,
            "sessions_bytes": size[0],
            "messages_bytes": size[1],
        }
        conn.close()
    for name in names.values():
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    admin.close()
    return out


def get_memory_cost(url: str, sessions: int, rounds: int, calls: int) -> dict[str, Any]:
    """Backend CPU per GetMemory(lastn 6, recall 5) statement (get_memories_recall) for 1 and
    8 coalesced calls: as the store sends it (`auto`, PostgreSQL's choice of plan) against
    planned at every call (`force_custom_plan`, which the statement got before its arrays
    went behind subqueries). One seeded database; rounds alternate the two."""
    from server.store.search import kept_recall_statement

    admin = psycopg.connect(url, autocommit=True)
    name = "pg_cost_get_memory"
    db_url = psycopg.conninfo.make_conninfo(url, dbname=name)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        from server.__main__ import main as server_main

        with contextlib.redirect_stdout(sys.stderr):
            if server_main(["migrate", "--database-url", db_url]) not in (0, None):
                raise SystemExit("migration failed")
        _seed(db_url, sessions)
        statement = kept_recall_statement("get_memories_recall", vectors=True)
        modes = ("auto", "force_custom_plan")
        conns = {}
        for mode in modes:
            conns[mode] = psycopg.connect(db_url, autocommit=True)
            conns[mode].execute(sql.SQL("SET plan_cache_mode = {}").format(sql.SQL(mode)))
        found: dict[str, list[float]] = {f"{m}_{n}": [] for m in modes for n in (1, 8)}
        k = 0
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                conn = conns[mode]
                pid = conn.info.backend_pid
                for n in (1, 8):
                    before = _cpu_ns(pid)
                    for _ in range(calls):
                        k += 1
                        params = {
                            "project_id": 1,
                            "model": "bench",
                            "session_ids": [f"bench-1-{(k * n + j) % sessions}" for j in range(n)],
                            "lastns": [6] * n,
                            "limits": [5] * n,
                        }
                        conn.execute(statement, params, prepare=True).fetchall()
                    found[f"{mode}_{n}"].append((_cpu_ns(pid) - before) / calls / 1000)
        for conn in conns.values():
            conn.close()
    finally:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        admin.close()
    return {key: round(statistics.median(v)) for key, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    """Prints the medians as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.pg_cost", description=__doc__)
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="a server on this machine where databases can be made (default: the bench's"
        " embedded PostgreSQL, as `python -m bench`)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--get-memory",
        action="store_true",
        help="GetMemory's statement instead: as sent against planned at every call",
    )
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--calls", type=int, default=300, help="calls per variant and round")
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

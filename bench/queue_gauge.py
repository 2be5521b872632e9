"""What a /metrics scrape's look at the embedding queue costs at a large queue, before and after.

    .venv/bin/python -m bench.queue_gauge --rows 2000000

A bench database of its own (`memstore_bench_gauge_<pid>`, dropped at the end; on --database-url's
server, or the bench's embedded one) is migrated and its embedding queue filled with `--rows` rows
(its foreign key to messages is dropped there first: neither statement reads messages), then
vacuumed and analyzed, as autovacuum leaves a table that large. Each round times both statements
inside PostgreSQL (EXPLAIN ANALYZE's execution time), in an order that alternates between rounds:
`before`, the count(*) and min() of the whole queue in one aggregate (as before the cap), and
`after`, embedding_lag as it is (counted up to QUEUE_COUNT_CAP, the age from the index). Prints each
one's median ms, the median of the per-round after/before ratios, the values each returned and the
plan nodes of `after`. With `--drained N` the oldest N rows are then deleted and autovacuum kept off
the table: a queue a worker drains (oldest first) before autovacuum has cleaned up behind it, which
both statements must read past.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import env
from bench.rounds import add_database_url, in_turn, parser, spread
from server.store.queries import query
from server.store.reindex import QUEUE_COUNT_CAP

BEFORE = sql.SQL(
    "SELECT count(*) AS queued, coalesce(extract(epoch FROM clock_timestamp()"
    " - min(enqueued_at)), 0)::float8 AS oldest FROM embedding_queue"
)
DATABASE = "memstore_bench_gauge"


def fill(url: str, rows: int, drained: int) -> None:
    """Fills the queue with `rows` rows, 100 per session, one a millisecond apart, then
    deletes the oldest `drained` of them, unvacuumed."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE embedding_queue"
            " DROP CONSTRAINT IF EXISTS embedding_queue_project_id_session_id_sequence_fkey"
        )
        conn.execute(
            "INSERT INTO embedding_queue (project_id, session_id, sequence, enqueued_at)"
            " SELECT 1, 's' || (i / 100), i %% 100 + 1,"
            "        clock_timestamp() - make_interval(secs => (%(rows)s - i) / 1000.0)"
            " FROM generate_series(0, %(rows)s - 1) AS i",
            {"rows": rows},
        )
        conn.execute("VACUUM ANALYZE embedding_queue")
        if drained:
            conn.execute("ALTER TABLE embedding_queue SET (autovacuum_enabled = off)")
            conn.execute(
                "DELETE FROM embedding_queue WHERE (project_id, session_id, sequence) IN"
                " (SELECT project_id, session_id, sequence FROM embedding_queue"
                "  ORDER BY enqueued_at LIMIT %(drained)s)",
                {"drained": drained},
            )


def _nodes(plan: dict[str, Any]) -> list[str]:
    name = plan["Node Type"]
    if "Index Name" in plan:
        name += f" {plan['Index Name']}"
    if "Actual Rows" in plan:
        name += f" (rows {plan['Actual Rows']})"
    return [name] + [n for p in plan.get("Plans", []) for n in _nodes(p)]


def measure(url: str, rounds: int, calls: int) -> dict[str, Any]:
    """Median execution ms of each statement, the median per-round ratio, values, plan."""
    statements = {"before": BEFORE, "after": query("embedding_lag")}
    params = {"cap": QUEUE_COUNT_CAP}
    times: dict[str, list[float]] = {side: [] for side in statements}
    ratios: list[float] = []
    with psycopg.connect(url, autocommit=True) as conn:
        values = {
            side: conn.execute(statement, params, prepare=False).fetchone()
            for side, statement in statements.items()
        }
        plan: list[str] = []
        for r in range(rounds):
            sides = in_turn(statements, r)
            per_round: dict[str, list[float]] = {side: [] for side in statements}
            for side in sides:
                explain = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + statements[side]
                for _ in range(calls):
                    row = conn.execute(explain, params, prepare=False).fetchone()
                    assert row is not None
                    doc = row[0] if not isinstance(row[0], str) else json.loads(row[0])
                    per_round[side].append(float(doc[0]["Execution Time"]))
                    if side == "after":
                        plan = _nodes(doc[0]["Plan"])
            for side, found in per_round.items():
                times[side].extend(found)
            ratios.append(
                statistics.median(per_round["after"]) / statistics.median(per_round["before"])
            )
    return {
        "before_ms": round(statistics.median(times["before"]), 3),
        "after_ms": round(statistics.median(times["after"]), 3),
        "after_over_before": round(spread(ratios).median, 5),
        "values": {side: list(v) if v else None for side, v in values.items()},
        "after_plan": plan,
    }


def main(argv: list[str] | None = None) -> int:
    """Prints the medians as JSON."""
    p = parser(
        "queue_gauge", __doc__, rounds=6, calls=3, calls_help="calls per statement and round"
    )
    add_database_url(p, from_env=False, help="a server to make the bench database on")
    p.add_argument("--data-dir", type=Path, default=env.ROOT / ".data")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--drained", type=int, default=0, help="oldest rows then deleted")
    args = p.parse_args(argv)
    with env.migrated_database(env.own_name(DATABASE), args.database_url, args.data_dir) as url:
        fill(url, args.rows, args.drained)
        found = measure(url, args.rounds, args.calls)
    print(
        json.dumps(
            {"rows": args.rows, "drained": args.drained, "cap": QUEUE_COUNT_CAP, **found}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

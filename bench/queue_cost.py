"""What AddMemory's queue insert costs in PostgreSQL: its statement's plan, timed in the server.

    .venv/bin/python -m bench.queue_cost --database-url postgresql://.../<a migrated database>

Three ways of the same statement, alternating every round, each call in its own transaction,
rolled back (nothing is kept): queueing nothing (without pgvector before migration 0012),
each new message (with pgvector; without it from 0012 until the turn), and the turn (the
call's last new message: without pgvector now). EXPLAIN ANALYZE times the statement and its
insert into embedding_queue inside PostgreSQL, apart from the commit, the round trip and the
server's Python, whose noise on a shared machine hides a difference of this size end to end
(docs/search.md, *What it costs writes*).
"""

from __future__ import annotations

import json
import statistics
import sys
import uuid
from typing import Any

import psycopg
from psycopg import sql

from bench.rounds import add_database_url, in_turn, parser
from server.store.append import add_memory_statement

#: Each way: (embed, per_turn), the statement's two parameters that choose what it queues.
WAYS = {"none": (False, False), "each": (True, False), "turn": (True, True)}
SIZES = (1, 20)
_TEXT = "we talked about the trip to antarctica and the penguins we hope to see there"


def _params(messages: int, way: str) -> dict[str, Any]:
    # A new session each call: AddMemory of `messages` messages making it, as bench.ab's.
    embed, per_turn = WAYS[way]
    return {
        "project_id": 1,
        "session_id": f"queue-cost-{uuid.uuid4().hex}",
        "user_id": None,
        "uuids": [str(uuid.uuid4()) for _ in range(messages)],
        "roles": ["kai"] * messages,
        "role_types": ["user"] * messages,
        "contents": [f"{_TEXT} {k}" for k in range(messages)],
        "metadatas": ["{}"] * messages,
        "embed": embed,
        "per_turn": per_turn,
        "revive": False,
    }


def _queue_insert_ms(plan: dict[str, Any]) -> float:
    # The insert into embedding_queue (a CTE's ModifyTable node); 0 when the plan has none.
    if plan.get("Node Type") == "ModifyTable" and plan.get("Relation Name") == "embedding_queue":
        return float(plan["Actual Total Time"])
    return sum(_queue_insert_ms(p) for p in plan.get("Plans", []))


def measure(url: str, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Median µs of the statement and of its queue insert, by way and number of messages."""
    statement = sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + add_memory_statement(citus=False)
    found: dict[str, tuple[list[float], list[float]]] = {
        f"{way}_{n}": ([], []) for way in WAYS for n in SIZES
    }
    with psycopg.connect(url) as conn:
        for r in range(rounds):
            ways = in_turn(WAYS, r)
            for n in SIZES:
                for way in ways:
                    for _ in range(calls):
                        row = conn.execute(statement, _params(n, way), prepare=False).fetchone()
                        conn.rollback()
                        assert row is not None
                        doc = row[0] if not isinstance(row[0], str) else json.loads(row[0])
                        found[f"{way}_{n}"][0].append(doc[0]["Execution Time"] * 1000)
                        found[f"{way}_{n}"][1].append(_queue_insert_ms(doc[0]["Plan"]) * 1000)
    return {
        key: {
            "statement_us": round(statistics.median(total)),
            "queue_insert_us": round(statistics.median(queue)),
        }
        for key, (total, queue) in found.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Prints the medians as JSON."""
    p = parser(
        "queue_cost", __doc__, rounds=6, calls=20, calls_help="calls per way, size and round"
    )
    add_database_url(p, required=True, help="a migrated memstore database")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.database_url, args.rounds, args.calls), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

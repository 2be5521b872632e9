"""What the recall statement costs the calling process (CPU per call), against another revision's.

    .venv/bin/python -m bench.recall_cpu [--before REV] [--rounds 6] [--calls 200] [--db-name NAME]

The data of bench.recall_cost (two users of 1,280 messages with random vectors). Each call
runs the recall statement (with vectors) as the store runs it, through psycopg with the
store's parameters, and reads its rows: REV's statement composed per call from REV's
sql/search.sql and sql/recall.sql and executed with its %(name)s placeholders, as REV's store
did; this checkout's as RecallMethods._rank_recall sends it (recall_positional, a raw cursor).
The two alternate which goes first each round; each round times `calls` calls of a side by
the process's CPU clock (time.process_time: psycopg's parsing and the rows' loading, not
PostgreSQL's work). First both sides rank each session of the first user: their rows must be
equal. Prints each side's median CPU per call and the statement's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from bench import rounds
from bench.recall_cost import _DB, _MESSAGES, _PER_SESSION, composer_at, recall_database
from server.store.recall import recall_positional

#: One call of a side: runs the recall statement on the connection, answers its rows.
Run = Callable[[psycopg.Connection[Any], dict[str, Any]], list[Any]]


def _composed(compose: Callable[[], sql.Composed]) -> Run:
    def run(conn: psycopg.Connection[Any], params: dict[str, Any]) -> list[Any]:
        rows: list[Any] = conn.execute(compose(), params, prepare=False).fetchall()
        return rows

    return run


def _positional(conn: psycopg.Connection[Any], params: dict[str, Any]) -> list[Any]:
    # As RecallMethods._rank_recall sends it.
    statement, names = recall_positional(True)
    with psycopg.RawCursor(conn) as cur:
        cur.execute(statement, [params[n] for n in names], prepare=False)
        return cur.fetchall()


def _cpu_per_call(
    conn: psycopg.Connection[Any], run: Run, params: dict[str, Any], calls: int
) -> float:
    start = time.process_time()
    for _ in range(calls):
        run(conn, params)
    return (time.process_time() - start) / calls * 1e6


def _same_rows(conn: psycopg.Connection[Any], sides: dict[str, Run], params: dict[str, Any]) -> int:
    """Both sides' rows for each session of the first user, which must be equal: how many."""
    sessions = _MESSAGES // _PER_SESSION
    for n in range(sessions):
        each = {**params, "session_id": f"cost-a-{n}", "exclude_session": f"cost-a-{n}"}
        found = [run(conn, each) for run in sides.values()]
        assert found[0] == found[1], f"cost-a-{n}: the two sides rank differently"
    return sessions


def main() -> None:
    parser = rounds.parser(
        "recall_cpu",
        __doc__,
        rounds=6,
        rounds_help="rounds, each side once per round",
        calls=200,
        calls_help="calls per side per round",
    )
    parser.add_argument("--before", default="main", metavar="REV", help="the revision to compare")
    parser.add_argument("--db-name", help=f"the scratch database (dropped at the end; {_DB}_<pid>)")
    args = parser.parse_args()
    compose = composer_at(args.before)
    sides: dict[str, Run] = {"before": _composed(compose), "after": _positional}
    sizes = {
        "before": len(compose().as_string(None).encode()),
        "after": len(recall_positional(True)[0]),
    }
    with recall_database(args.db_name) as (conn, params):
        same = _same_rows(conn, sides, params)
        for run in sides.values():  # warm up once each
            _cpu_per_call(conn, run, params, 5)
        cpu = rounds.alternate(
            sides, args.rounds, lambda side: _cpu_per_call(conn, sides[side], params, args.calls)
        )
    for side in sides:
        each = rounds.spread(cpu[side])
        print(
            f"{side:7s} CPU per call median {each.median:.0f} µs"
            f" ({each.low:.0f}-{each.high:.0f}), statement {sizes[side]:,} bytes"
        )
    print(f"rows equal, row for row, for each of the first user's {same} sessions")
    print(f"{rounds.ratio_line(cpu)} of {args.calls} calls")


if __name__ == "__main__":
    main()

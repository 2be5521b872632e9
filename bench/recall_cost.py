"""What the worker's recall statement costs in PostgreSQL, against another revision's.

    .venv/bin/python -m bench.recall_cost [--before REV] [--runs 15] [--db-name NAME]

A fresh database (DATABASE_URL's server, else the embedded one) holds two users of 1,280
messages in 20 sessions each, random unit vectors of 384 dimensions for every message (the
cost of an exact scan does not depend on what the vectors say). The recall statement is
composed as the worker runs it (Store._recall_params: keep RECALL_KEEP, 4 times as many
candidates per part) from this checkout's sql/search.sql and sql/recall.sql and from REV's
(default main), and each is EXPLAIN (ANALYZE, BUFFERS)ed for one session of the first user,
the two alternating which goes first each round. Prints each side's median and fastest
execution time, its buffers, and the median and range of this ÷ REV per round
(docs/search.md, Recall quality).
The statement ranks by vectors: on a server without pgvector it says so and exits 1.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from bench import env, rounds
from bench.search_data import MODEL, ChatText, embed_randomly, has_vectors, seed_user
from server.domain import DEFAULT_PROJECT_ID
from server.search.service import RECALL_WINDOW
from server.store import Store, queries
from server.store.recall import RECALL_KEEP, recall_statement

_DB = "memstore_recall_cost"
_MESSAGES, _PER_SESSION = 1280, 64


def composer_at(rev: str) -> Callable[[], sql.Composed]:
    """Composes the recall statement (with vectors) as REV's sql/search.sql and sql/recall.sql
    have it (an older REV holds recall's fragments in search.sql)."""
    named: dict[str, sql.SQL] = {}
    for name in ("search", "recall"):
        try:
            text = env.file_at(rev, f"server/store/sql/{name}.sql")
        except subprocess.CalledProcessError:
            continue  # no recall.sql at REV
        named.update({k: sql.SQL(v) for k, v in queries.parse(text, rev).items()})

    def compose() -> sql.Composed:
        scope = sql.SQL(" ").join(
            [named["recall_filter_user"], named["search_filter_other_sessions"]]
        )
        # An older recall_query_vector names only some of these fragments (none of {filters},
        # {window_vectors}, {window_scan} or {memories} at first): format ignores the others.
        scan = named.get("recall_window_scan", sql.SQL(""))
        vectors = named.get("recall_window_vectors", sql.SQL("")).format(window_scan=scan)
        fragment = named["recall_query_vector"].format(
            words=named["recall_query_text"],
            window_vectors=vectors,
            window_scan=scan,
            memories=named.get("recall_memories", sql.SQL("")).format(filters=scope),
            filters=scope,
        )
        match = named["recall_match_scan"]
        # An older search_hybrid has its full-text candidates inline, not {text_candidates}.
        candidates = named.get("search_text_candidates", sql.SQL("")).format(
            match=match, filters=scope
        )
        return named["search_hybrid"].format(
            query=fragment,
            filters=scope,
            match=match,
            distance=named["recall_distance_window"],
            text_candidates=candidates,
        )

    return compose


@contextmanager
def recall_database(
    name: str | None = None,
) -> Iterator[tuple[psycopg.Connection[Any], dict[str, Any]]]:
    """The data above in a fresh database `name` (else this run's own), ANALYZEd, dropped on
    leaving: an autocommit connection to it and the worker's recall parameters for the
    first user's first session."""
    with env.migrated_database(name or env.own_name(_DB), os.environ.get("DATABASE_URL")) as url:
        if not has_vectors(url):
            # The statement ranks by vectors: without them there is nothing to measure.
            raise SystemExit("the recall statement needs pgvector, which this PostgreSQL lacks")
        text = ChatText()
        for user in ("cost-a", "cost-b"):
            seed_user(url, text, user, prefix=user, messages=_MESSAGES, per_session=_PER_SESSION)
            embed_randomly(url, user)
        params = Store._recall_params(
            DEFAULT_PROJECT_ID, "cost-a-0", RECALL_WINDOW, MODEL, RECALL_KEEP
        )
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
            yield conn, params


def _explain(
    conn: psycopg.Connection[Any], statement: sql.Composable, params: Any
) -> tuple[float, int]:
    plan = conn.execute(
        sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}").format(statement), params
    ).fetchone()
    assert plan is not None
    top = plan[0][0]
    buffers = top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get("Shared Read Blocks", 0)
    return float(top["Execution Time"]), int(buffers)


def main() -> None:
    parser = rounds.parser(
        "recall_cost",
        __doc__,
        rounds=15,
        rounds_flag="--runs",
        rounds_help="rounds, each side once per round",
    )
    parser.add_argument("--before", default="main", metavar="REV", help="the revision to compare")
    parser.add_argument("--db-name", help=f"the scratch database (dropped at the end; {_DB}_<pid>)")
    args = parser.parse_args()
    sides = {"before": composer_at(args.before)(), "after": recall_statement(True)}
    buffers: dict[str, int] = {}
    with recall_database(args.db_name) as (conn, params):
        for statement in sides.values():  # warm the cache once each
            _explain(conn, statement, params)

        def measure(side: str) -> float:
            ms, buffers[side] = _explain(conn, sides[side], params)
            return ms

        times = rounds.alternate(sides, args.rounds, measure)
    for side in sides:
        print(
            f"{side:7s} median {statistics.median(times[side]):.1f} ms"
            f"  fastest {min(times[side]):.1f} ms  buffers {buffers[side]}"
        )
    print(rounds.ratio_line(times))


if __name__ == "__main__":
    main()

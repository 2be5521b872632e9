"""What a statement planned at every call cost PostgreSQL, against the same planned once.

    .venv/bin/python -m bench.plan_cost --statement get_users [--database-url URL]

For a statement whose parameters went behind scalar subqueries so that PostgreSQL keeps one
generic plan (docs/performance.md, "GetUser's statement planned once"): `before`, the
statement as of `--before-ref` (its parameters in sight of each custom plan, so planned at
every call), against `after`, the checkout's. One scratch database (`plan_cost_<statement>_<pid>`,
dropped at the end) of `--users` users loaded as `python -m bench` loads them; each side on a
connection of its own, its statement prepared and run a few times first, past PostgreSQL's
choice of plan (both sides' rows checked equal); each round runs `--calls` calls of each
kind (get_users: 1, 2, 8 and 16 coalesced ids; list_user_wire: a batch of 1,000 users at a
random key) on each side, the sides' order alternating between rounds. It reads the backend's
CPU time from /proc (schedstat) before and after, so parsing, planning and executing all
count, and prints per side and kind the median CPU per call, the median of the per-round
ratios after ÷ before, and how many generic and custom plans each side ran.

Needs the PostgreSQL server on this machine (its backends' /proc entries).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from bench import env
from bench.pg_cost import _cpu_ns
from bench.rounds import SCRATCH_SERVER, add_database_url, in_turn, parser, ratios, spread
from server.store import queries

#: Batch sizes of the coalesced GetUser statement (the coalescer sends one to sixteen ids,
#: most often one or two below saturation).
GET_USERS_BATCHES = (1, 2, 8, 16)
#: Users per list_user_wire batch (ListUsersChunked's default chunk).
USER_WIRE_LIMIT = 1000

#: A call's parameters, drawn at random over the loaded users (their number given).
Call = Callable[[random.Random, int], dict[str, Any]]


def _get_users_call(n: int) -> Call:
    return lambda rnd, users: {
        "project_id": 1,
        "user_ids": [f"user-{rnd.randrange(users):07d}" for _ in range(n)],
    }


def _user_wire_call(rnd: random.Random, users: int) -> dict[str, Any]:
    after = env.EPOCH + timedelta(milliseconds=rnd.randrange(max(1, users - USER_WIRE_LIMIT)))
    return {"project_id": 1, "after_ts": after, "after_id": "", "limit": USER_WIRE_LIMIT}


#: The statements timed: the file that holds each, and its kinds of call by name.
STATEMENTS: dict[str, tuple[str, dict[str, Call]]] = {
    "get_users": (
        "server/store/sql/users.sql",
        {str(n): _get_users_call(n) for n in GET_USERS_BATCHES},
    ),
    "list_user_wire": ("server/store/sql/export.sql", {str(USER_WIRE_LIMIT): _user_wire_call}),
}


def measure(
    url: str, name: str, users: int, *, rounds: int, calls: int, before_ref: str = "149b2ca"
) -> dict[str, Any]:
    """Backend CPU per call of statement `name`, before and after, by kind of call: medians,
    the median of the per-round ratios, and each side's generic and custom plans."""
    path, kinds = STATEMENTS[name]
    before = queries.parse(env.file_at(before_ref, path))[name]
    statements = {"before": sql.SQL(before), "after": queries.query(name)}
    rnd = random.Random(7)
    with env.migrated_database(env.own_name(f"plan_cost_{name}"), url) as db_url:
        env.load(db_url, users)
        conns = {s: psycopg.connect(db_url, autocommit=True) for s in statements}
        curs = {s: c.cursor(binary=True) for s, c in conns.items()}
        try:
            for call in kinds.values():  # past psycopg's five uses and PostgreSQL's five plans
                for params in (call(rnd, users) for _ in range(12)):
                    got = [
                        sorted(curs[s].execute(statements[s], params, prepare=True).fetchall())
                        for s in statements
                    ]
                    if got[0] != got[1]:
                        raise AssertionError(f"before and after differ for {params}")

            def one_side(side: str) -> dict[str, float]:
                cur, pid, found = curs[side], conns[side].info.backend_pid, {}
                for kind, call in kinds.items():
                    batches = [call(rnd, users) for _ in range(calls)]
                    start = _cpu_ns(pid)
                    for params in batches:
                        cur.execute(statements[side], params, prepare=True).fetchall()
                    found[kind] = (_cpu_ns(pid) - start) / calls / 1000
                return found

            per_round = [{s: one_side(s) for s in in_turn(statements, r)} for r in range(rounds)]
            plans = {s: _plan_counts(c) for s, c in conns.items()}
        finally:
            for conn in conns.values():
                conn.close()
    out: dict[str, Any] = {}
    for kind in kinds:
        for side in statements:
            out[f"{side}_{kind}"] = round(statistics.median(r[side][kind] for r in per_round))
        each = {side: [r[side][kind] for r in per_round] for side in statements}
        ratio = spread(ratios(each["after"], each["before"])).median
        out[f"after_over_before_{kind}"] = round(ratio, 3)
    out["plans"] = plans
    return out


def _plan_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    # How often PostgreSQL ran the connection's prepared statements on each kind of plan.
    row = conn.execute(
        "SELECT sum(generic_plans)::int, sum(custom_plans)::int FROM pg_prepared_statements"
    ).fetchone()
    assert row is not None
    return {"generic": row[0], "custom": row[1]}


def main(argv: list[str] | None = None) -> int:
    """Prints the medians as JSON."""
    p = parser(
        "plan_cost",
        __doc__,
        rounds=11,
        calls=300,
        calls_help="calls per side, kind and round",
        users=100_000,
    )
    add_database_url(p, help=SCRATCH_SERVER)
    p.add_argument("--statement", choices=sorted(STATEMENTS), default="get_users")
    p.add_argument("--before-ref", default="149b2ca", help="the commit of `before`")
    args = p.parse_args(argv)
    url = env.server_url(args.database_url, env.ROOT / ".data")
    found = measure(
        url,
        args.statement,
        args.users,
        rounds=args.rounds,
        calls=args.calls,
        before_ref=args.before_ref,
    )
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What keeping session_count beside the user costs and saves, store-level, on one database.

    .venv/bin/python -m bench.session_counts [--rounds 5] [--seconds 3] [--before-ref REF]
        [--users 200] [--database-url URL] [--db-name NAME]

Plain PostgreSQL (the bench's embedded server, or DATABASE_URL's). Each round runs every kind
on both sides, the side order alternating between rounds, so load from other jobs falls on
both alike; printed: each side's median calls/s and the median of the per-round ratios.

- add_new: AddMemory(1) making a new session for a user (16 concurrent writers), with the
  count (`counted` in add_memory, migration 0010) against the same statement without it.
- add_existing: AddMemory(1) appending to a user's existing sessions, the same two statements.
- get_user: GetUser of users with 20 live sessions, reading user_session_counts against the
  correlated count of the sessions that `--before-ref`'s get_users ran (read from git).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from bench import env, rounds
from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.store import Store, append, queries

WRITERS = 16
MESSAGE = "The user said they prefer vegetarian food and live near the sea. " * 3


def _parser() -> argparse.ArgumentParser:
    p = rounds.parser("session_counts", __doc__, rounds=5, users=200)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--before-ref", default="aa5ded7", help="commit whose get_users counted")
    rounds.add_database_url(p, from_env=False)
    rounds.add_scratch(p, env.own_name("memstore_bench_counts"))
    return p


def _before_get_users(ref: str) -> str:
    text = env.file_at(ref, "server/store/sql/users.sql")
    return queries.parse(text, f"{ref}:users.sql")["get_users"]


async def _rate(call: Callable[[int], Awaitable[Any]], seconds: float) -> float:
    done = 0
    counter = itertools.count()
    end = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call(next(counter))
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    return done / (time.perf_counter() - start)


async def main() -> None:
    args = _parser().parse_args()
    with env.migrated_database(args.db_name, args.database_url, args.data_dir) as url:
        await _measure(args, url)


async def _measure(args: argparse.Namespace, url: str) -> None:
    store = await Store.open(url, min_size=WRITERS, max_size=WRITERS)
    msg = [NewMessage(role="user", role_type="user", content=MESSAGE, metadata={})]
    users = args.users
    for u in range(users):
        await store.create_user(P, f"u{u}", "", "", "", {})
        for s in range(20):
            await store.add_memory(P, f"u{u}-s{s}", f"u{u}", msg)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    counting = append.ADD_MEMORY[False]
    plain = append.add_memory_statement(citus=True)
    after_get, before_get = (
        queries.QUERIES["get_users"],
        psycopg.sql.SQL(_before_get_users(args.before_ref)),
    )
    fresh = itertools.count()
    sides: dict[str, dict[str, Callable[[], None]]] = {
        "add_new": {
            "after": lambda: append.ADD_MEMORY.__setitem__(False, counting),
            "before": lambda: append.ADD_MEMORY.__setitem__(False, plain),
        },
        "get_user": {
            "after": lambda: queries.QUERIES.__setitem__("get_users", after_get),
            "before": lambda: queries.QUERIES.__setitem__("get_users", before_get),
        },
    }
    sides["add_existing"] = sides["add_new"]
    calls: dict[str, Callable[[int], Awaitable[Any]]] = {
        "add_new": lambda i: store.add_memory(P, f"new-{next(fresh)}", f"u{i % users}", msg),
        "add_existing": lambda i: store.add_memory(P, f"u{i % users}-s{i % 20}", None, msg),
        "get_user": lambda i: store.get_user(P, f"u{i % users}"),
    }
    rates: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for kind, call in calls.items():
            got: dict[str, float] = {}
            for side in rounds.in_turn(("after", "before"), r):
                sides[kind][side]()
                await _rate(call, 0.5)  # warm-up (and prepare) on this side
                got[side] = await _rate(call, args.seconds)
                rates.setdefault((kind, side), []).append(got[side])
            print(f"round {r} {kind}: {got}", flush=True)
    sides["add_new"]["after"]()
    sides["get_user"]["after"]()
    await store.close()
    for kind in calls:
        before = statistics.median(rates[kind, "before"])
        after = statistics.median(rates[kind, "after"])
        ratio = rounds.median_ratio(rates[kind, "after"], rates[kind, "before"])
        print(f"{kind}: before {before:,.0f}/s, after {after:,.0f}/s, after/before {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())

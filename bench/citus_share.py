"""What a worker's share of the pool (half of it) costs a healthy Citus cluster whose calls
all go to one worker.

    .venv/bin/python -m tests.citus_cluster run -- .venv/bin/python -m bench.citus_share
    .venv/bin/python -m bench.citus_share --database-url URL

On Citus each worker's calls hold at most half the pool (docs/scaling.md, "A silent worker
and the pool"): what keeps a silent worker from taking the pool from the others also caps
a busy healthy worker. Two stores over the coordinator, each with a pool of `--pool`, send
GetMemory (lastn 6) from `--in-flight` callers over `--sessions` sessions all on the shards
of one worker: `half`, as memstore runs (a share of half the pool), and `whole`, its share
lifted to the whole pool (`share_slots`). `spread` is the half store again over as many
sessions spread over every worker (where every share is used). The three alternate,
`--seconds` each per round, each round starting one later. Prints the median calls/s of
each, half ÷ whole (the cap's cost: 1.0 would be none) and half ÷ spread (medians of the
rounds' ratios, with their range), and the most calls seen holding one share's slots at
once (the cap binding: half the pool, or more where lifted).

Without --database-url it takes the cluster `tests.citus_cluster run` started (its
DATABASE_URL). The database is migrated first.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sys
import time
from collections import defaultdict
from typing import Any

import psycopg

from bench.rounds import add_database_url, parser, ratios, rotated, spread
from server.domain import DEFAULT_PROJECT_ID, NewMessage
from server.store import Store

SIDES = ("half", "whole", "spread")


def _message(content: str) -> NewMessage:
    return NewMessage(role="u", role_type="user", content=content, metadata={}, uuid=None)


async def _load(
    store: Store, sessions: list[str], seconds: float, in_flight: int
) -> tuple[int, int]:
    # Calls made, and the most calls seen holding a share's slots at once (a watcher's
    # samples, every millisecond).
    calls, most = 0, 0
    end = time.monotonic() + seconds

    async def one() -> None:
        nonlocal calls
        while time.monotonic() < end:
            await store.get_memory(DEFAULT_PROJECT_ID, random.choice(sessions), 6)
            calls += 1

    async def watch() -> None:
        nonlocal most
        while time.monotonic() < end:
            most = max([most, *(s.in_flight for s in store.share_states())])
            await asyncio.sleep(0.001)

    await asyncio.gather(watch(), *(one() for _ in range(in_flight)))
    return calls, most


def _session_sets(url: str, tag: str, per_set: int) -> tuple[list[str], list[str]]:
    # Two sets of new session names: `per_set` on the first worker's shards; as many taken in
    # turn from every worker's. Names are drawn until every worker holding sessions' shards
    # has `per_set` of them (a fixed draw of 4 x per_set left a worker short 7% of the time
    # at per_set 2), by where Citus would place each: nothing is written to find out.
    by_port: dict[int, list[str]] = defaultdict(list)

    def full() -> bool:
        return all(len(by_port[port]) >= per_set for port in ports)

    with psycopg.connect(url) as conn:
        ports = sorted(
            int(row[0])
            for row in conn.execute(
                "SELECT DISTINCT nodeport FROM citus_shards WHERE table_name = 'sessions'::regclass"
            ).fetchall()
        )
        if len(ports) < 2:
            raise SystemExit(f"the sessions' shards are on {len(ports)} worker(s): 2 needed")
        for i in range(per_set * len(ports) * 64):
            if full():
                break
            name = f"share-{tag}-{i}"
            row = conn.execute(
                "SELECT nodeport FROM citus_shards WHERE table_name = 'sessions'::regclass"
                " AND shardid = get_shard_id_for_distribution_column('sessions', %s::text)",
                [name],
            ).fetchone()
            assert row is not None
            by_port[int(row[0])].append(name)
    if not full():
        raise SystemExit(f"too few sessions on some worker: {dict(by_port)}")
    spread_set = [by_port[ports[i % len(ports)]][i // len(ports)] for i in range(per_set)]
    return by_port[ports[0]][:per_set], spread_set


async def measure(
    url: str, *, rounds: int, seconds: float, sessions: int, pool: int, in_flight: int
) -> dict[str, Any]:
    """The figures above, as a dict (see the module's doc)."""
    half = await Store.open(url, min_size=pool, max_size=pool)
    whole = await Store.open(url, min_size=pool, max_size=pool)
    whole.share_slots = pool
    try:
        for store in (half, whole):
            await store.migrate()  # which also finds the database a Citus one
        if not half.citus:
            raise SystemExit("not a Citus cluster: the shares of the pool are Citus's")
        one_worker, spread_set = _session_sets(url, secrets.token_hex(3), sessions)
        for name in dict.fromkeys(one_worker + spread_set):
            six = [_message(f"message {j} of {name}") for j in range(6)]
            await half.add_memory(DEFAULT_PROJECT_ID, name, None, six)
        runs = {
            "half": (half, one_worker),
            "whole": (whole, one_worker),
            "spread": (half, spread_set),
        }
        rates: dict[str, list[float]] = {side: [] for side in SIDES}
        most_held = dict.fromkeys(SIDES, 0)
        for r in range(rounds):
            for side in rotated(SIDES, r):
                store, chosen = runs[side]
                await _load(store, chosen, min(seconds, 1.0), in_flight)  # warm
                calls, held = await _load(store, chosen, seconds, in_flight)
                rates[side].append(calls / seconds)
                most_held[side] = max(most_held[side], held)
        medians = {side: spread(rates[side]).median for side in SIDES}
        return {
            "pool": pool,
            "share": max(1, pool // 2),
            "in_flight": in_flight,
            "calls_per_s": {side: round(rate, 1) for side, rate in medians.items()},
            "half_over_whole": _ratio(rates["half"], rates["whole"]),
            "half_over_spread": _ratio(rates["half"], rates["spread"]),
            "most_held_by_a_share": most_held,
        }
    finally:
        await half.close()
        await whole.close()


def _ratio(subject: list[float], baseline: list[float]) -> dict[str, float]:
    # The rounds' subject ÷ baseline (each round's pair): median, lowest, highest.
    found = spread(ratios(subject, baseline))
    return {
        "median": round(found.median, 3),
        "low": round(found.low, 3),
        "high": round(found.high, 3),
    }


def main(argv: list[str]) -> int:
    p = parser("citus_share", __doc__, rounds=5)
    add_database_url(p)
    p.add_argument("--seconds", type=float, default=5.0, help="each side's run in a round")
    p.add_argument("--sessions", type=int, default=32, help="sessions in each set")
    p.add_argument("--pool", type=int, default=8, help="the store's pool (a share is half)")
    p.add_argument("--in-flight", type=int, default=16, help="callers at once")
    args = p.parse_args(argv)
    if not args.database_url:
        raise SystemExit(
            "no cluster: give --database-url, or run this under "
            "`python -m tests.citus_cluster run -- ...`"
        )
    found = asyncio.run(
        measure(
            args.database_url,
            rounds=args.rounds,
            seconds=args.seconds,
            sessions=args.sessions,
            pool=args.pool,
            in_flight=args.in_flight,
        )
    )
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

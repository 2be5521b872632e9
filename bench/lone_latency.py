"""A lone caller's latency on two checkouts: one call at a time, rounds alternating.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.lone_latency --before /tmp/before

What batching costs the caller who has no one to share a batch with: GetUser (a coalesced
read) and health `Check` (no database, the baseline), each sent by one client, one call at a
time, to a server of each checkout on one bench database. Prints each side's median of the
rounds' p50 latencies (µs) per kind and the median of the per-round after ÷ before ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import grpc
from grpc_health.v1 import health_pb2

from bench import env, rounds
from bench.figures import GET_USER, HEALTH, get_user_payloads


def _parser() -> argparse.ArgumentParser:
    p = rounds.parser(
        "lone_latency", __doc__, rounds=7, calls=600, calls_help="calls per kind, side and round"
    )
    rounds.add_checkouts(p)
    p.add_argument("--users", type=int, default=1000)
    rounds.add_database_url(p, from_env=False)
    rounds.add_scratch(p, env.own_name("memstore_lone"))
    return p


def _p50_us(
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes], payloads: tuple[bytes, ...], n: int
) -> float:
    took = []
    for i in range(n):
        start = time.perf_counter()
        call(payloads[i % len(payloads)])
        took.append(time.perf_counter() - start)
    return statistics.median(took[n // 6 :]) * 1e6  # the first sixth warms up


def main(argv: list[str] | None = None) -> int:
    """Runs the rounds and prints the summary as JSON."""
    args = _parser().parse_args(argv)
    roots = {"before": args.before.resolve(), "after": args.after.resolve()}
    kinds = {
        "health": (HEALTH, (health_pb2.HealthCheckRequest().SerializeToString(),)),
        "get_user": (GET_USER, get_user_payloads(args.users, 100)),
    }
    maintenance = env.server_url(args.database_url, args.data_dir)
    url = env.fresh_database(maintenance, args.db_name)
    p50: dict[str, dict[str, list[float]]] = {s: {k: [] for k in kinds} for s in roots}
    try:
        env.migrate(url)
        env.load(url, args.users, 0)
        servers = {
            side: env.Server(url, root=root, extra_args=("--no-embedding-worker",))
            for side, root in roots.items()
        }
        channels = {side: grpc.insecure_channel(s.target) for side, s in servers.items()}
        try:
            for r in range(args.rounds):
                order = rounds.in_turn(roots, r)
                for kind, (method, payloads) in kinds.items():
                    for side in order:
                        call = channels[side].unary_unary(method, None, None)
                        p50[side][kind].append(_p50_us(call, payloads, args.calls))
        finally:
            for channel in channels.values():
                channel.close()
            for server in servers.values():
                server.stop()
    finally:
        env.drop_database(maintenance, args.db_name)
    summary: dict[str, object] = {
        side: {f"{k}_p50_us": round(statistics.median(v)) for k, v in by_kind.items()}
        for side, by_kind in p50.items()
    }
    for kind in kinds:
        ratio = rounds.median_ratio(p50["after"][kind], p50["before"][kind])
        summary[f"{kind}_after_over_before"] = round(ratio, 3)
        summary[f"{kind}_rounds_us"] = {s: [round(x) for x in p50[s][kind]] for s in roots}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two checkouts' export speed in one run: a server from each, rounds alternating between them.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.ab --before /tmp/before

Both servers run this interpreter on one bench database (loaded as `python -m bench` loads
it); each serves the `server/` of its own checkout. Every round streams ListUsersChunked and
ExportMessages whole from each server, in an order that alternates between rounds, so load
from other jobs falls on both sides alike; with --together both streams of a round run at
once, which pairs them closer still on a busy machine. Prints per-stream medians of rows/s
and of server CPU per row, and the median of the per-round after/before ratios.

Unary comparisons (`--only recall`) run each kind of call of the comparison (e.g. GetMemory
with recall, without, and health `Check`) on both servers in every round, rotating the order,
with the unary load of `python -m bench`; they print, for each side, the median of each
kind's rps and server CPU per call, the median of the per-round ratios of each kind to the
baseline kind, and the median of the per-round after/before ratios of each kind's rps.
With --together each kind runs on both servers at once, as the streams do.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench import env, rounds, unary_ab
from bench.client import run_export
from bench.figures import MESSAGES_EXPORT, USERS_EXPORT, Export


def _parser() -> argparse.ArgumentParser:
    p = rounds.parser("ab", __doc__, rounds=7, users=200_000)
    rounds.add_checkouts(p)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument(
        "--only",
        default="export,export_messages",
        help=f"comma-separated streams, or one unary comparison: {', '.join(unary_ab.COMPARISONS)}",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="a unary run's counted seconds")
    p.add_argument("--warmup", type=float, default=0.5, help="a unary run's warm-up seconds")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument(
        "--together",
        action="store_true",
        help="stream (or run each unary kind) on both servers at once, not in turn",
    )
    p.add_argument(
        "--separate-databases",
        action="store_true",
        help="a unary comparison's sides each on their own database, migrated by their own"
        " checkout and seeded alike (to compare a change of migrations)",
    )
    rounds.add_database_url(p)
    rounds.add_scratch(p, "memstore_bench_ab")
    return p


def _serves_from(root: Path) -> str:
    # Which server package a `memstore serve` started with env.Server(root=root) imports.
    code = "import server.api, memstore.v1; print(server.api.__file__)"
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env.code_env(root),
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


def _streams(
    pool: Executor, servers: list[env.Server], stream: Export, together: bool
) -> list[dict[str, float]]:
    # One whole stream from each server: one after the other, or all at once (each then
    # gets its share of the same moment's CPU, which pairs them closer on a noisy machine).
    args = (stream.method, stream.request, stream.response_type, stream.field)
    runs: list[dict[str, float]] = []
    if together:
        cpu0 = [server.cpu_seconds() for server in servers]
        futures = [pool.submit(run_export, server.target, *args) for server in servers]
        runs = [f.result() for f in futures]
        for run, server, cpu in zip(runs, servers, cpu0, strict=True):
            run["server_cpu"] = server.cpu_seconds() - cpu
        return runs
    for server in servers:
        cpu = server.cpu_seconds()
        run = pool.submit(run_export, server.target, *args).result()
        run["server_cpu"] = server.cpu_seconds() - cpu
        runs.append(run)
    return runs


def _rounds(
    pool: Executor,
    servers: dict[str, env.Server],
    count: int,
    streams: list[Export],
    together: bool,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    out: dict[str, dict[str, list[dict[str, float]]]] = {
        s.figure: {name: [] for name in servers} for s in streams
    }
    names = list(servers)
    for r in range(count):
        order = rounds.in_turn(names, r)
        for stream in streams:
            runs = _streams(pool, [servers[n] for n in order], stream, together)
            for name, run in zip(order, runs, strict=True):
                out[stream.figure][name].append(run)
                print(
                    f"round {r} {stream.figure:<16} {name:<6} {run['rows'] / run['wall']:>9,.0f} "
                    f"rows/s  {run['server_cpu'] / run['rows'] * 1e6:6.2f} µs CPU/row",
                    flush=True,
                )
    return out


def _summary(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    def rate(x: dict[str, float]) -> float:
        return x["rows"] / x["wall"]

    def cpu(x: dict[str, float]) -> float:
        return x["server_cpu"] / x["rows"] * 1e6

    before, after = runs["before"], runs["after"]
    ratios = rounds.ratios([rate(x) for x in after], [rate(x) for x in before])
    return {
        "before_rows_per_s": round(statistics.median(rate(x) for x in before)),
        "after_rows_per_s": round(statistics.median(rate(x) for x in after)),
        "after_over_before": round(rounds.spread(ratios).median, 3),
        # Every run streams the whole table: one count, that of the rows loaded.
        "rows_streamed": sorted({int(x["rows"]) for x in before + after}),
        "round_ratios": [round(x, 3) for x in ratios],
        "before_cpu_us_per_row": round(statistics.median(cpu(x) for x in before), 2),
        "after_cpu_us_per_row": round(statistics.median(cpu(x) for x in after), 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Loads the data, runs the alternating rounds, prints the summary as JSON."""
    args = _parser().parse_args(argv)
    roots = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, root in roots.items():
        print(f"{name}: serves {_serves_from(root)}", flush=True)
    if args.only in unary_ab.COMPARISONS:
        return unary_ab.main(args, roots)
    only = args.only.split(",")
    streams = [s for s in (USERS_EXPORT, MESSAGES_EXPORT) if s.figure in only]
    maintenance = env.server_url(args.database_url, args.data_dir)
    url = env.fresh_database(maintenance, args.db_name)
    try:
        env.migrate(url)
        messages = args.messages if MESSAGES_EXPORT in streams else 0
        env.load(url, args.users, messages)
        servers = {name: env.Server(url, root=root) for name, root in roots.items()}
        try:
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(len(servers), mp_context=spawn) as pool:
                runs = _rounds(pool, servers, args.rounds, streams, args.together)
        finally:
            for server in servers.values():
                server.stop()
    finally:
        env.drop_database(maintenance, args.db_name)
    summary = {figure: _summary(by_server) for figure, by_server in runs.items()}
    print(json.dumps({"users": args.users, "messages": messages, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

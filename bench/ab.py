"""Two checkouts' export speed in one run: a server from each, rounds alternating between them.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.ab --before /tmp/before

Both servers run this interpreter on one bench database (loaded as `python -m bench` loads
it); each serves the `server/` of its own checkout. Every round streams ListUsersChunked and
ExportMessages whole from each server, in an order that alternates between rounds, so load
from other jobs falls on both sides alike. Prints per-stream medians of rows/s and of server
CPU per row, and the median of the per-round after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench import env
from bench.client import run_export
from bench.figures import MESSAGES_EXPORT, USERS_EXPORT, Export


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("--before", type=Path, required=True, help="checkout of the older commit")
    p.add_argument("--after", type=Path, default=env.ROOT, help="checkout of the newer commit")
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--data-dir", type=Path, default=env.ROOT / ".data")
    p.add_argument("--db-name", default="memstore_bench_ab")
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


def _stream(pool: Executor, server: env.Server, stream: Export) -> dict[str, float]:
    cpu0 = server.cpu_seconds()
    args = (server.target, stream.method, stream.request, stream.response_type, stream.field)
    run = pool.submit(run_export, *args).result()
    run["server_cpu"] = server.cpu_seconds() - cpu0
    return run


def _rounds(
    pool: Executor, servers: dict[str, env.Server], rounds: int
) -> dict[str, dict[str, list[dict[str, float]]]]:
    streams = (USERS_EXPORT, MESSAGES_EXPORT)
    out: dict[str, dict[str, list[dict[str, float]]]] = {
        s.figure: {name: [] for name in servers} for s in streams
    }
    names = list(servers)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for stream in streams:
            for name in order:
                run = _stream(pool, servers[name], stream)
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
    ratios = [rate(a) / rate(b) for a, b in zip(after, before, strict=True)]
    return {
        "before_rows_per_s": round(statistics.median(rate(x) for x in before)),
        "after_rows_per_s": round(statistics.median(rate(x) for x in after)),
        "after_over_before": round(statistics.median(ratios), 3),
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
    maintenance = env.server_url(args.database_url, args.data_dir)
    url = env.fresh_database(maintenance, args.db_name)
    try:
        env.migrate(url)
        env.load(url, args.users, args.messages)
        servers = {name: env.Server(url, root=root) for name, root in roots.items()}
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs = _rounds(pool, servers, args.rounds)
        finally:
            for server in servers.values():
                server.stop()
    finally:
        env.drop_database(maintenance, args.db_name)
    summary = {figure: _summary(by_server) for figure, by_server in runs.items()}
    print(json.dumps({"users": args.users, "messages": args.messages, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: memstore's figures against same-run baselines, as a table and JSON lines."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import env, figures, rest, search, turns
from bench.figures import Settings

RESULTS = env.ROOT / "bench" / "results" / "latest.json"


def _parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    num = os.environ.get
    p.add_argument("--users", type=int, default=int(num("BENCH_USERS", d.users)))
    p.add_argument("--messages", type=int, default=int(num("BENCH_MESSAGES", d.messages)))
    p.add_argument("--runs", type=int, default=int(num("BENCH_RUNS", d.runs)))
    p.add_argument("--export-runs", type=int, default=int(num("BENCH_EXPORT_RUNS", d.export_runs)))
    p.add_argument("--seconds", type=float, default=float(num("BENCH_SECONDS", d.seconds)))
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--channels", type=int, default=d.channels)
    p.add_argument("--page-size", type=int, default=d.page_size)
    p.add_argument("--page-calls", type=int, default=d.page_calls)
    p.add_argument(
        "--only",
        default="unary,export,pagination,workers,search,turn,rest",
        help="comma-separated figure groups",
    )
    search.add_arguments(p)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--data-dir", type=Path, default=env.ROOT / ".data")
    p.add_argument("--db-name", default=env.BENCH_DB, help="database created (and dropped) here")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep-db", action="store_true", help="do not drop the bench database")
    return p


def _machine() -> dict[str, Any]:
    versions = {n: metadata.version(n) for n in ("grpcio", "protobuf", "psycopg", "psycopg-binary")}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        **versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Sets up the database and servers, measures the chosen figures, tears everything down."""
    only = set(args.only.split(","))
    machine = _machine()
    maintenance = env.server_url(args.database_url, args.data_dir)
    machine["postgresql"] = env.server_version(maintenance)
    url = env.fresh_database(maintenance, args.db_name)
    t0 = time.perf_counter()
    env.migrate(url)
    env.load(url, s.users, s.messages)
    setup = {
        "load_seconds": round(time.perf_counter() - t0, 1),
        "users": s.users,
        "messages": s.messages,
    }
    out: list[dict[str, Any]] = []
    if "search" in only:
        # Before the shared server starts: its embedding worker would drain the queue
        # that the search figures measure.
        out.extend(_emit(f) for f in search.figures(s, search.settings_from(args), url))
    spawn = multiprocessing.get_context("spawn")
    procs = max(s.client_procs, s.scaling_client_procs)
    # The other groups measure the server without its embedding worker: writes_embedding
    # measures what the worker costs, on its own.
    quiet = ("--no-embedding-worker",)
    one = env.Server(url, workers=1, extra_args=quiet)
    try:
        with ProcessPoolExecutor(procs, mp_context=spawn) as pool:
            if "export" in only:
                out.append(_emit(figures.export(s, pool, one, url)))
                if s.messages:
                    stream = figures.MESSAGES_EXPORT
                    out.append(_emit(figures.export(s, pool, one, url, stream)))
            if "pagination" in only:
                out.append(_emit(figures.pagination(s, one)))
            if "unary" in only:
                out.extend(_emit(f) for f in figures.unary_and_writes(s, pool, one))
            if "workers" in only:
                two = env.Server(url, workers=2, extra_args=quiet)
                try:
                    out.extend(_emit(f) for f in figures.scaling(s, pool, one, two))
                finally:
                    _check_stopped(two)
            if "turn" in only or "rest" in only:
                # Last: its user and sessions would change what the export counts.
                sessions = turns.seed(url)
                if "turn" in only:
                    out.extend(_emit(f) for f in turns.figures(s, pool, one, sessions))
                if "rest" in only:
                    out.append(_emit(rest.figure(s, pool, one, sessions)))
    finally:
        _check_stopped(one)
        if not args.keep_db:
            env.drop_database(maintenance, args.db_name)
    return {"machine": machine, "settings": s.__dict__, "setup": setup, "figures": out}


def _check_stopped(server: env.Server) -> None:
    code = server.stop()
    if code != 0:
        raise RuntimeError(f"memstore serve --workers {server.workers} exited with {code}")


def _emit(figure: dict[str, Any]) -> dict[str, Any]:
    # One machine-readable line per figure, as soon as it is known.
    print(json.dumps(figure, sort_keys=True), flush=True)
    return figure


def _note(f: dict[str, Any]) -> str:
    name = f["figure"]
    if name in search.FIGURES:
        return search.note(f)
    if name in ("export", "export_messages"):
        return (
            f"{f['export_rows_per_s']:,} vs COPY {f['copy_rows_per_s']:,} rows/s; "
            f"RSS +{f['server_rss_growth_mb']} MB"
        )
    if name == "deep_page":
        return f"{f['deep_page_ms']} vs {f['first_page_ms']} ms (page {f['depth_pages']})"
    if name == "workers_cpu":
        return (
            f"{f['two_cpu_s_per_1000']} vs {f['one_cpu_s_per_1000']} server CPU-s per 1,000 "
            "GetUser calls"
        )
    if name == "agent_turn":
        return (
            f"{f['turns_per_s']:,} turns/s vs health {f['health_rps']:,} rps; at "
            f"{f['offered_turns_per_s']} turns/s p50/p99 ms: GetMemory "
            f"{f['get_memory_p50_ms']}/{f['get_memory_p99_ms']}, AddMemory "
            f"{f['add_memory_p50_ms']}/{f['add_memory_p99_ms']}"
        )
    if name == "rest_get_memory":
        return (
            f"REST {f['rest_get_memory_rps']:,} vs gRPC {f['grpc_get_memory_rps']:,} rps; "
            f"client {f['client_cpu_cores']} cores"
        )
    if name == "workers":
        return (
            f"{f['two_rps']:,} vs {f['one_rps']:,} rps; client {f['client_cpu_cores']} cores, "
            f"server {f['server_cpu_cores']} vs {f['one_server_cpu_cores']} cores"
        )
    rates = [f"{v:,}" for k, v in sorted(f.items()) if k.endswith("_rps")]
    return " vs ".join(rates) + f" rps; client {f['client_cpu_cores']} cores"


def table(figures_: list[dict[str, Any]]) -> str:
    """The human-readable summary: figure, value, goal, verdict, and the numbers behind it."""
    lines = [f"{'figure':<20} {'value':>6}  {'goal':<32} {'verdict':<12} numbers", "-" * 120]
    for f in figures_:
        verdict = {True: "met", False: "NOT MET", None: "not judged"}[f["met"]]
        if f["figure"] == "workers" and f.get("client_bound"):
            verdict += " (client-bound)"
        goal = f["goal"] or "-"
        lines.append(f"{f['figure']:<20} {f['value']:>6.3f}  {goal:<32} {verdict:<12} {_note(f)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the bench; prints JSON lines then the table; writes the results file."""
    args = _parser().parse_args(argv)
    s = Settings(
        users=args.users,
        messages=args.messages,
        runs=args.runs,
        export_runs=args.export_runs,
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        channels=args.channels,
        page_size=args.page_size,
        page_calls=args.page_calls,
    )
    t0 = time.perf_counter()
    result = run(s, args)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(table(result["figures"]))
    missed = [f["figure"] for f in result["figures"] if f["met"] is False]
    if missed:
        print(f"goals not met: {', '.join(missed)} (see docs/performance.md)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} in {result['total_seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

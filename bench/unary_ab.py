"""Unary comparisons of `python -m bench.ab`: kinds of calls run on two checkouts' servers."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from bench import env, search_data
from bench.client import UnaryLoad, run_unary
from bench.figures import (
    ADD_MEMORY,
    GET_USER,
    HEALTH,
    Settings,
    add_memory_payloads,
    get_user_payloads,
    rps_ratios,
    unary_run,
)
from bench.rounds import in_turn, rotated
from bench.search_worker import write_round
from memstore.v1 import session_service_pb2 as pb

GET_MEMORY = "/memstore.v1.SessionService/GetMemory"

#: A comparison's calls: kind -> (method, request payloads); the first kind is the baseline.
Kinds = dict[str, tuple[str, tuple[bytes, ...]]]


def _recall(url: str) -> Kinds:
    # The search group's recall data: a user of 1,000 messages in 20 sessions, with vectors
    # and kept recall as the worker leaves them.
    if not search_data.has_vectors(url):
        raise RuntimeError("the recall comparison needs pgvector, which this PostgreSQL lacks")
    text = search_data.ChatText()
    sessions = search_data.seed_user(
        url, text, "search-user-ab", prefix="srch-ab", messages=1_000, per_session=50
    )
    search_data.embed_randomly(url, "srch-ab")
    search_data.keep_recall(url, "srch-ab")
    search_data.analyze(url)
    return _get_memory_kinds(sessions)


def _recall_words(url: str, messages: int) -> Kinds:
    # Recall ranked on the request path, by words (the only way without pgvector; with it,
    # the way of a session whose recall the worker has not kept): a user of 1,280 messages
    # in 20 sessions and, in the same project, other users of as many with `messages` in all
    # (--messages), whose words the user's share. No vectors and no kept recall, either mode.
    text = search_data.ChatText()
    sessions = search_data.seed_user(
        url, text, "search-user-ab", prefix="srch-ab", messages=1_280, per_session=64
    )
    for i in range(messages // 1_280):
        search_data.seed_user(
            url, text, f"search-other-{i}", prefix=f"srch-o{i}", messages=1_280, per_session=64
        )
    search_data.analyze(url)
    return _get_memory_kinds(sessions)


def _recall_kept_words(url: str, messages: int) -> Kinds:
    # Without pgvector, the data of recall_words with each of the user's sessions' recall kept
    # by words, as the worker keeps it since migration 0012: a checkout that reads it answers
    # from it, an older one ranks on the request path as in recall_words.
    if search_data.has_vectors(url):
        raise RuntimeError("recall_kept_words needs a PostgreSQL without pgvector")
    kinds = _recall_words(url, messages)
    search_data.keep_word_recall(url, "srch-ab")
    search_data.analyze(url)
    return kinds


def _get_memory_kinds(sessions: list[str]) -> Kinds:
    # Health (the baseline), GetMemory with recall (relevant_limit 5) and without, over
    # `sessions`.
    def get_memory(relevant: int) -> tuple[str, tuple[bytes, ...]]:
        payloads = tuple(
            pb.GetMemoryRequest(session_id=x, lastn=6, relevant_limit=relevant).SerializeToString()
            for x in sessions
        )
        return GET_MEMORY, payloads

    return {
        "health": (HEALTH, (health_pb2.HealthCheckRequest().SerializeToString(),)),
        "recall": get_memory(5),
        "no_recall": get_memory(0),
    }


def _writes(url: str) -> Kinds:
    # make bench's writes group: AddMemory of 1 and of 20 messages over many new sessions.
    return {
        "health": (HEALTH, (health_pb2.HealthCheckRequest().SerializeToString(),)),
        "add_memory_1": (ADD_MEMORY, add_memory_payloads(1)),
        "add_memory_20": (ADD_MEMORY, add_memory_payloads(20, sessions=500)),
    }


def _get_user(users: int) -> Kinds:
    # make bench's unary group: GetUser over the loaded users (--users), beside health.
    return {
        "health": (HEALTH, (health_pb2.HealthCheckRequest().SerializeToString(),)),
        "get_user": (GET_USER, get_user_payloads(users)),
    }


#: Each comparison's name and the function that seeds its data (in a database, with --messages
#: messages of other users where it has any) and builds its calls.
KINDS: dict[str, Callable[[str, int], Kinds]] = {
    "recall": lambda url, _: _recall(url),
    "recall_words": _recall_words,
    "recall_kept_words": _recall_kept_words,
    "writes": lambda url, _: _writes(url),
}
#: Comparisons whose calls are built from the loaded users' count (--users), not seeded.
USER_KINDS: dict[str, Callable[[int], Kinds]] = {"get_user": _get_user}
#: Server arguments of a comparison beyond the bench's own: writes are measured without
#: the embedding worker, as `make bench` measures them.
SERVER_ARGS: dict[str, tuple[str, ...]] = {"writes": ("--no-embedding-worker",)}

#: The comparison of the embedding worker's cost to writes (servers started per run).
WRITES_EMBEDDING = "writes_embedding"
#: Every comparison `--only` takes.
COMPARISONS = (*KINDS, *USER_KINDS, WRITES_EMBEDDING)


def _rounds(
    s: Settings,
    pool: Executor,
    servers: dict[str, env.Server],
    kinds: Kinds,
    rounds: int,
    *,
    together: bool = False,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    out: dict[str, dict[str, list[dict[str, float]]]] = {
        side: {k: [] for k in kinds} for side in servers
    }
    for r in range(rounds):
        order = in_turn(servers, r)
        for kind in rotated(kinds, r):
            # In turn (each side alone, one after the other), or both sides at once: then
            # each gets its share of the same moment's CPU, which pairs them closer on a
            # machine that other jobs load unevenly.
            groups = [order] if together else [[side] for side in order]
            for group in groups:
                for side, run in zip(
                    group, _runs(s, pool, servers, group, kinds[kind]), strict=True
                ):
                    out[side][kind].append(run)
                    print(
                        f"round {r} {side:<6} {kind:<12} {run['rps']:>8,.0f} rps "
                        f"{run['cpu_us_per_call']:7.0f} µs CPU/call",
                        flush=True,
                    )
    return out


def _runs(
    s: Settings,
    pool: Executor,
    servers: dict[str, env.Server],
    sides: list[str],
    call: tuple[str, tuple[bytes, ...]],
) -> list[dict[str, float]]:
    # One unary run on each of `sides`' servers, all at once; server CPU per call for each.
    method, payloads = call
    cpu0 = [servers[side].cpu_seconds() for side in sides]
    loads = [
        UnaryLoad(
            servers[side].target, method, payloads, s.seconds, s.warmup, s.concurrency, s.channels
        )
        for side in sides
    ]
    if len(loads) == 1:
        runs = [unary_run(pool, loads[0], 1)]
    else:
        futures = [pool.submit(run_unary, load) for load in loads]
        runs = [_rate(load, f.result()) for load, f in zip(loads, futures, strict=True)]
    for side, run, cpu in zip(sides, runs, cpu0, strict=True):
        used = servers[side].cpu_seconds() - cpu
        # CPU over the warm-up too: per call of the whole run, at the counted rate.
        # (No call finished: no cost per call to tell, rather than a division by zero.)
        calls = run["rps"] * (s.seconds + s.warmup)
        run["cpu_us_per_call"] = used / calls * 1e6 if calls > 0 else float("nan")
    return runs


def _rate(load: UnaryLoad, part: dict[str, float]) -> dict[str, float]:
    # What unary_run makes of one client process's counts.
    if part["errors"]:
        raise RuntimeError(f"{load.method}: {part['errors']} calls failed during the run")
    return {
        "rps": part["calls"] / part["wall"],
        "client_cpu_cores": part["cpu"] / part["wall"],
        "client_max_proc_cpu": part["cpu"] / part["wall"],
    }


def _ratios(a: list[dict[str, float]], b: list[dict[str, float]]) -> list[float]:
    return rps_ratios(a, b, "bench.ab")


def _summary(
    runs: dict[str, dict[str, list[dict[str, float]]]], kinds: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Each kind over the baseline (the first kind), and each over those listed after it.
    rest = kinds[1:]
    pairs = [(a, kinds[0]) for a in rest] + [
        (a, b) for i, a in enumerate(rest) for b in rest[i + 1 :]
    ]
    for side, by_kind in runs.items():
        summary: dict[str, Any] = {}
        for kind in kinds:
            summary[f"{kind}_rps"] = round(statistics.median(x["rps"] for x in by_kind[kind]))
            summary[f"{kind}_cpu_us_per_call"] = round(
                statistics.median(x["cpu_us_per_call"] for x in by_kind[kind])
            )
        for a, b in pairs:
            ratios = _ratios(by_kind[a], by_kind[b])
            summary[f"{a}_over_{b}"] = round(statistics.median(ratios), 3)
            summary[f"{a}_over_{b}_rounds"] = [round(x, 3) for x in ratios]
        out[side] = summary
    for kind in kinds:
        ratios = _ratios(runs["after"][kind], runs["before"][kind])
        out[f"{kind}_after_over_before"] = round(statistics.median(ratios), 3)
    return out


def _worker_rounds(
    s: Settings, pool: Executor, url: str, roots: dict[str, Path], rounds: int
) -> dict[str, Any]:
    # writes_embedding of `make bench` with a server per side and run: AddMemory(1) with the
    # embedding worker off (this checkout), then on for each side, the order rotating. The
    # worker always has a backlog: the OFF runs queue more than the ON runs embed.
    payloads = search_data.add_memory_payloads(search_data.ChatText(), 1, "embw", sessions=2000)
    load = UnaryLoad("", ADD_MEMORY, payloads, s.seconds, s.warmup, s.concurrency, s.channels)
    arms = [("off", roots["after"], False), *((side, roots[side], True) for side in roots)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in arms}
    embedded: dict[str, list[int]] = {name: [] for name, _, _ in arms}
    for r in range(rounds):
        for name, root, on in rotated(arms, r):
            done = write_round(s, url, pool, load, on=on, poll=0.25, root=root)
            runs[name].append(done.run)
            embedded[name].append(done.embedded_in_load)
            print(
                f"round {r} {name:<6} {done.run['rps']:>8,.0f} rps, embedded "
                f"{done.embedded_in_load} during the load, queue >= {done.queue_min}",
                flush=True,
            )
    out: dict[str, Any] = {"off_rps": round(statistics.median(x["rps"] for x in runs["off"]))}
    for side in roots:
        ratios = _ratios(runs[side], runs["off"])
        out[side] = {
            "on_rps": round(statistics.median(x["rps"] for x in runs[side])),
            "on_over_off": round(statistics.median(ratios), 3),
            "on_over_off_rounds": [round(x, 3) for x in ratios],
            "embedded_msgs_per_s": round(
                statistics.median(embedded[side]) / (s.seconds + s.warmup), 1
            ),
            "server_cpu_cores": round(
                statistics.median(x["server_cpu_cores"] for x in runs[side]), 2
            ),
        }
    out["on_after_over_before"] = round(
        statistics.median(_ratios(runs["after"], runs["before"])), 3
    )
    return out


def main(args: argparse.Namespace, roots: dict[str, Path]) -> int:
    """Seeds the comparison's data, runs the alternating rounds, prints the summary as JSON."""
    s = Settings(seconds=args.seconds, warmup=args.warmup)
    maintenance = env.server_url(args.database_url, args.data_dir)
    url = env.fresh_database(maintenance, args.db_name)
    # With --separate-databases each side has its own, migrated by its own checkout: one
    # shared database would carry the after side's migrations to the before side's server.
    # Only the writes are seeded by env.load alone (the others seed in KINDS, on `url`).
    separate = bool(getattr(args, "separate_databases", False))
    if separate and args.only != "writes":
        raise SystemExit("--separate-databases compares writes only")
    # Made and dropped here: this run's own names (env.own_name), whatever --db-name says.
    names = {name: env.own_name(f"{args.db_name}_{name}") for name in roots} if separate else {}
    urls = {name: url for name in roots}
    try:
        env.migrate(url)
        if not separate:
            env.load(url, args.users, 0)
        for name, db in names.items():
            urls[name] = env.fresh_database(maintenance, db)
            env.migrate(urls[name], roots[name])
            env.load(urls[name], args.users, 0)
        if args.only == WRITES_EMBEDDING:
            if not search_data.has_vectors(url):
                raise RuntimeError("writes_embedding needs pgvector, which this PostgreSQL lacks")
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                summary = _worker_rounds(s, pool, url, roots, args.rounds)
            print(json.dumps({"comparison": args.only, **summary}, indent=2))
            return 0
        if args.only in USER_KINDS:
            kinds = USER_KINDS[args.only](args.users)
        else:
            kinds = KINDS[args.only](url, args.messages)
        extra = ("--drain-delay", "0", *SERVER_ARGS.get(args.only, ()), *args.server_arg)
        servers = {
            name: env.Server(urls[name], root=root, extra_args=extra)
            for name, root in roots.items()
        }
        try:
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(len(servers), mp_context=spawn) as pool:
                runs = _rounds(s, pool, servers, kinds, args.rounds, together=args.together)
        finally:
            for server in servers.values():
                server.stop()
    finally:
        env.drop_database(maintenance, args.db_name)
        for db in names.values():
            env.drop_database(maintenance, db)
    print(json.dumps({"comparison": args.only, **_summary(runs, list(kinds))}, indent=2))
    return 0

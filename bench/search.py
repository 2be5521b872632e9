"""The search group of `make bench`: the embedding worker's cost, speed and lag; search; recall."""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from bench import env, search_data
from bench.client import CHANNEL_OPTIONS
from bench.figures import HEALTH, Settings, ratio_figure, unary_rounds
from bench.rounds import rotated
from bench.search_data import ChatText
from bench.search_worker import (
    embedding_lag,
    embedding_throughput,
    quantile,
    stop,
    writes_embedding,
)
from memstore.v1 import session_service_pb2 as pb

GET_MEMORY = "/memstore.v1.SessionService/GetMemory"
SEARCH_MEMORY = "/memstore.v1.SessionService/SearchMemory"
#: This group's figures, in the order they are measured.
FIGURES = ("embedding_throughput", "search_latency", "recall", "embedding_lag", "writes_embedding")
#: Messages waiting, and the age in seconds of the oldest of them.


@dataclass(frozen=True)
class SearchSettings:
    """The search group's sizes (flags of `python -m bench`); rounds and loads are Settings'."""

    #: Messages of each searched user; recall reads the sessions of the first.
    sizes: tuple[int, ...] = (1_000, 10_000)
    session_messages: int = 50
    #: Messages queued for embedding_throughput.
    backlog: int = 2_000
    lag_seconds: float = 12.0
    #: embedding_lag's offered write rate, as a share of the measured throughput.
    lag_share: float = 0.5
    #: SearchMemory (and health) calls per kind per round of search_latency.
    latency_calls: int = 20
    #: Seconds between looks at the queue.
    poll: float = 0.25


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of SearchSettings."""
    d = SearchSettings()
    p.add_argument("--search-sizes", default=",".join(str(x) for x in d.sizes))
    p.add_argument("--search-session-messages", type=int, default=d.session_messages)
    p.add_argument("--embed-backlog", type=int, default=d.backlog)
    p.add_argument("--lag-seconds", type=float, default=d.lag_seconds)
    p.add_argument("--lag-share", type=float, default=d.lag_share)
    p.add_argument("--latency-calls", type=int, default=d.latency_calls)


def settings_from(args: argparse.Namespace) -> SearchSettings:
    """SearchSettings from the parsed flags."""
    return SearchSettings(
        sizes=tuple(int(x) for x in args.search_sizes.split(",")),
        session_messages=args.search_session_messages,
        backlog=args.embed_backlog,
        lag_seconds=args.lag_seconds,
        lag_share=args.lag_share,
        latency_calls=args.latency_calls,
    )


def figures(s: Settings, ss: SearchSettings, url: str) -> Iterator[dict[str, Any]]:
    """Seeds the data, then yields the five figures as they are measured; removes the data.

    Run before any other server of the bench starts: another server's embedding worker
    would drain the queue these figures measure. Leaves the database as it found it, but
    for dead rows: the other groups count its users and sessions.
    """
    if not search_data.has_vectors(url):
        print("search figures skipped: this PostgreSQL server has no pgvector", file=sys.stderr)
        return
    text = ChatText()
    sessions = {
        size: search_data.seed_user(
            url,
            text,
            f"search-user-{size}",
            prefix=f"srch-{size}",
            messages=size,
            per_session=ss.session_messages,
        )
        for size in ss.sizes
    }
    for size in ss.sizes:
        search_data.embed_randomly(url, f"srch-{size}")
        search_data.keep_recall(url, f"srch-{size}")
    search_data.seed_user(
        url,
        text,
        "search-backlog",
        prefix="backlog",
        messages=ss.backlog,
        per_session=ss.session_messages,
    )
    backlog = search_data.queue_backlog(url, "backlog")
    search_data.analyze(url)
    throughput = embedding_throughput(url, backlog, ss.poll)
    yield throughput
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(s.client_procs, mp_context=spawn) as pool:
        server = env.Server(url, extra_args=("--drain-delay", "0"))
        try:
            yield search_latency(s, ss, server, text)
            yield recall(s, pool, server, sessions[ss.sizes[0]])
            yield embedding_lag(
                url,
                server,
                text,
                capacity=throughput["value"],
                share=ss.lag_share,
                seconds=ss.lag_seconds,
                poll=ss.poll,
            )
        finally:
            stop(server)
        figure = writes_embedding(s, pool, url, text, ss.poll)
    # What the OFF rounds queued and the ON rounds could not embed: left, that backlog
    # would feed the embedding worker of every later group's server.
    figure["queue_deleted_after"] = search_data.remove(url, ("srch-", "backlog-", "lag-", "embw-"))
    yield figure


def _search_kinds(ss: SearchSettings, text: ChatText) -> dict[str, tuple[str, tuple[bytes, ...]]]:
    queries = [text.question() for _ in range(50)]
    health = (health_pb2.HealthCheckRequest().SerializeToString(),)
    kinds: dict[str, tuple[str, tuple[bytes, ...]]] = {"health": (HEALTH, health)}
    for size in ss.sizes:
        for name, search_type in (
            ("hybrid", pb.SEARCH_TYPE_HYBRID),
            ("full_text", pb.SEARCH_TYPE_FULL_TEXT),
        ):
            payloads = tuple(
                pb.SearchMemoryRequest(
                    text=q, user_id=f"search-user-{size}", search_type=search_type, limit=10
                ).SerializeToString()
                for q in queries
            )
            kinds[f"{name}_{size}"] = (SEARCH_MEMORY, payloads)
    return kinds


def _check_search(channel: grpc.Channel, kinds: dict[str, tuple[str, tuple[bytes, ...]]]) -> None:
    # Also the warm-up: the first hybrid search loads the model.
    for name, (method, payloads) in kinds.items():
        for payload in payloads[:3]:
            data = channel.unary_unary(method, None, None)(payload, timeout=60)
            if name == "health":
                continue
            reply = pb.SearchMemoryResponse.FromString(data)
            hybrid = name.startswith("hybrid")
            if not reply.results or reply.unembedded_messages or reply.semantic != hybrid:
                raise RuntimeError(f"{name}: unexpected SearchMemory reply: {reply}")


def _query_embed_ms(text: ChatText) -> float:
    """The local model's time to embed one query, in this process: the request path's share."""
    from server.search.embedding import LocalEmbedder

    model = LocalEmbedder()
    model.load()
    times = []
    for _ in range(20):
        query = text.question()
        t0 = time.perf_counter()
        model.embed([query])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def search_latency(
    s: Settings, ss: SearchSettings, server: env.Server, text: ChatText
) -> dict[str, Any]:
    """SearchMemory latency (hybrid and full-text) per user size, beside health Check's."""
    kinds = _search_kinds(ss, text)
    names = list(kinds)
    times: dict[str, list[float]] = {n: [] for n in names}
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        _check_search(channel, kinds)
        calls = {n: channel.unary_unary(kinds[n][0], None, None) for n in names}
        for r in range(s.runs):
            for name in rotated(names, r):
                payloads = kinds[name][1]
                for i in range(ss.latency_calls):
                    payload = payloads[(r * ss.latency_calls + i) % len(payloads)]
                    t0 = time.perf_counter()
                    calls[name](payload, timeout=30)
                    times[name].append(time.perf_counter() - t0)
    ms = {n: [x * 1000 for x in v] for n, v in times.items()}
    largest = max(ss.sizes)
    figure: dict[str, Any] = {
        "figure": "search_latency",
        "value": round(quantile(ms[f"hybrid_{largest}"], 50), 2),
        "goal": None,
        "met": None,
        "largest_user_messages": largest,
        "health_p50_ms": round(quantile(ms["health"], 50), 2),
    }
    for name in names[1:]:
        figure[f"{name}_p50_ms"] = round(quantile(ms[name], 50), 2)
        figure[f"{name}_p95_ms"] = round(quantile(ms[name], 95), 2)
    figure["calls_per_kind"] = len(ms["health"])
    figure["query_embed_ms"] = round(_query_embed_ms(text), 2)
    figure["note"] = (
        "p50 ms of a hybrid search (user scope, limit 10) of the largest user; hybrid embeds "
        "the query with the local model on the request path (query_embed_ms); sequential "
        "calls; vectors are random unit vectors (the scan costs the same, ranks mean nothing)"
    )
    return figure


def recall(s: Settings, pool: Executor, server: env.Server, sessions: list[str]) -> dict[str, Any]:
    """GetMemory rps with recall (relevant_limit 5) over without (relevant_limit 0)."""
    if len(sessions) < 2:
        raise ValueError("recall needs a user with two sessions or more")
    with_recall = tuple(
        pb.GetMemoryRequest(session_id=x, relevant_limit=5).SerializeToString() for x in sessions
    )
    without = tuple(
        pb.GetMemoryRequest(session_id=x, relevant_limit=0).SerializeToString() for x in sessions
    )
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(GET_MEMORY, None, None)
        a = pb.GetMemoryResponse.FromString(call(with_recall[0], timeout=30))
        b = pb.GetMemoryResponse.FromString(call(without[0], timeout=30))
    if len(a.relevant_messages) != 5 or b.relevant_messages:
        raise RuntimeError(
            f"GetMemory recalled {len(a.relevant_messages)} and {len(b.relevant_messages)}"
            " messages with relevant_limit 5 and 0"
        )
    results = unary_rounds(
        s, pool, server, {"recall": (GET_MEMORY, with_recall), "no_recall": (GET_MEMORY, without)}
    )
    figure = ratio_figure("recall", results, "recall", "no_recall", 0.5)
    figure["sessions"] = len(sessions)
    figure["no_recall_server_cpu_cores"] = round(
        statistics.median(x["server_cpu_cores"] for x in results["no_recall"]), 2
    )
    return figure


def note(f: dict[str, Any]) -> str:
    """The table's numbers-behind for this group's figures."""
    name = f["figure"]
    if name == "embedding_throughput":
        return (
            f"msg/s over {f['measured_messages']} of {f['backlog']} queued; "
            f"{f['cpu_s_per_1000']} CPU-s per 1000; start {f['startup_seconds']} s"
        )
    if name == "search_latency":
        sizes = [k.split("_")[1] for k in f if k.startswith("hybrid_") and k.endswith("_p50_ms")]
        parts = [
            f"{n}: hybrid {f[f'hybrid_{n}_p50_ms']}/{f[f'hybrid_{n}_p95_ms']}, "
            f"full-text {f[f'full_text_{n}_p50_ms']}"
            for n in sizes
        ]
        return (
            f"ms p50 (/p95) per user messages, {'; '.join(parts)}; health {f['health_p50_ms']}, "
            f"query embedding {f['query_embed_ms']}"
        )
    if name == "embedding_lag":
        return (
            f"s median lag (p95 {f['lag_p95_s']}, max {f['lag_max_s']}) at "
            f"{f['offered_msgs_per_s']} msg/s offered; queue max {f['queue_max']}"
        )
    if name == "writes_embedding":
        return (
            f"{f['on_rps']:,} vs {f['off_rps']:,} rps; worker {f['worker_msgs_per_s']} msg/s "
            f"during ON runs, queue >= {f['queue_min_during_on_runs']}; server "
            f"{f['server_cpu_cores']} vs {f['off_server_cpu_cores']} cores"
        )
    return f"{f['recall_rps']:,} vs {f['no_recall_rps']:,} rps over {f['sessions']} sessions"

"""The figures: each a median over alternating runs, as a ratio to a same-run baseline."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from bench.client import CHANNEL_OPTIONS, UnaryLoad, run_copy, run_export, run_unary
from bench.env import Server
from bench.rounds import in_turn, ratios, rotated
from memstore.v1 import resources_pb2, session_service_pb2, user_service_pb2, user_service_pb2_grpc

HEALTH = "/grpc.health.v1.Health/Check"
GET_USER = "/memstore.v1.UserService/GetUser"
ADD_MEMORY = "/memstore.v1.SessionService/AddMemory"
LIST_CHUNKED = "/memstore.v1.UserService/ListUsersChunked"
EXPORT_MESSAGES = "/memstore.v1.SessionService/ExportMessages"
MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one bench run (flags of `python -m bench`)."""

    users: int = 1_000_000
    #: Messages for the ExportMessages figure: ~200 B of content each, over 300k sessions.
    messages: int = 200_000
    runs: int = 5
    export_runs: int = 3
    seconds: float = 3.0
    warmup: float = 0.5
    concurrency: int = 32
    channels: int = 8
    client_procs: int = 1
    scaling_client_procs: int = 2
    page_size: int = 100
    page_depth: int = 1000
    page_calls: int = 40


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _health_payloads() -> tuple[bytes, ...]:
    return (health_pb2.HealthCheckRequest().SerializeToString(),)


def get_user_payloads(users: int, count: int = 1000) -> tuple[bytes, ...]:
    """GetUser requests for users spread evenly over the loaded table."""
    step = max(1, users // count)
    return tuple(
        user_service_pb2.GetUserRequest(user_id=f"user-{i:07d}").SerializeToString()
        for i in range(0, users, step)
    )


def add_memory_payloads(batch: int, sessions: int = 2000) -> tuple[bytes, ...]:
    """AddMemory requests of `batch` messages (~200 B of content each) over many sessions."""
    content = "The user said they prefer vegetarian food and live near the sea. " * 3
    out = []
    for s in range(sessions):
        messages = [
            resources_pb2.Message(
                role="user", role_type=resources_pb2.ROLE_TYPE_USER, content=f"{content} #{k}"
            )
            for k in range(batch)
        ]
        out.append(
            session_service_pb2.AddMemoryRequest(
                session_id=f"bench-{batch}-{s}", messages=messages
            ).SerializeToString()
        )
    return tuple(out)


def unary_run(pool: Executor, load: UnaryLoad, procs: int) -> dict[str, float]:
    """One timed run split over `procs` client processes; rps, errors and client CPU summed."""
    share = replace(
        load,
        concurrency=max(1, load.concurrency // procs),
        channels=max(1, load.channels // procs),
    )
    futures = [pool.submit(run_unary, replace(share, offset=i * 7919)) for i in range(procs)]
    parts = [f.result() for f in futures]
    wall = _median([p["wall"] for p in parts])
    calls = sum(p["calls"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    if errors:
        raise RuntimeError(f"{load.method}: {errors} calls failed during the run")
    return {
        "rps": calls / wall,
        "client_cpu_cores": sum(p["cpu"] for p in parts) / wall,
        "client_max_proc_cpu": max(p["cpu"] / p["wall"] for p in parts),
    }


def unary_rounds(
    s: Settings, pool: Executor, server: Server, methods: dict[str, tuple[str, tuple[bytes, ...]]]
) -> dict[str, list[dict[str, float]]]:
    """Runs every method once per round, rotating the order, for s.runs rounds."""
    results: dict[str, list[dict[str, float]]] = {n: [] for n in methods}
    for r in range(s.runs):
        for name in rotated(methods, r):
            method, payloads = methods[name]
            load = UnaryLoad(
                server.target, method, payloads, s.seconds, s.warmup, s.concurrency, s.channels
            )
            cpu0 = server.cpu_seconds()
            run = unary_run(pool, load, s.client_procs)
            run["server_cpu_cores"] = (server.cpu_seconds() - cpu0) / (s.seconds + s.warmup)
            results[name].append(run)
    return results


def rps_ratios(
    subject: list[dict[str, float]], baseline: list[dict[str, float]], what: str
) -> list[float]:
    """Per round, subject rps over baseline rps (the rounds pair runs made at nearly the same
    moment).

    Raises:
        RuntimeError: a baseline run finished no call, so its round has no ratio; the bench
            says which instead of dividing by zero.
    """
    idle = [i for i, b in enumerate(baseline) if b["rps"] <= 0]
    if idle:
        raise RuntimeError(
            f"{what}: the baseline finished no call in round(s) {idle}; the machine is too "
            "busy or the call too slow for the run's length (raise --seconds)"
        )
    return ratios([a["rps"] for a in subject], [b["rps"] for b in baseline])


def ratio_figure(
    name: str,
    results: dict[str, list[dict[str, float]]],
    subject: str,
    baseline: str,
    goal: float | None,
) -> dict[str, Any]:
    """subject rps / baseline rps, per round, and its median."""
    per_round = rps_ratios(results[subject], results[baseline], name)
    value = _median(per_round)
    return {
        "figure": name,
        "value": round(value, 3),
        "goal": f">= {goal:.2f}" if goal is not None else None,
        "met": None if goal is None else value >= goal,
        "runs": [round(x, 3) for x in per_round],
        f"{subject}_rps": round(_median([x["rps"] for x in results[subject]])),
        f"{baseline}_rps": round(_median([x["rps"] for x in results[baseline]])),
        "client_cpu_cores": round(_median([x["client_cpu_cores"] for x in results[subject]]), 2),
        "server_cpu_cores": round(_median([x["server_cpu_cores"] for x in results[subject]]), 2),
    }


def unary_and_writes(s: Settings, pool: Executor, server: Server) -> list[dict[str, Any]]:
    """Figures 1 and 2: GetUser, then AddMemory (1 and 20), each against health Check.

    Reads and writes alternate with health in separate groups: the WAL flushing and
    checkpoints that writes leave behind would otherwise slow the reads that follow them.
    """
    health = (HEALTH, _health_payloads())
    reads = unary_rounds(
        s, pool, server, {"health": health, "get_user": (GET_USER, get_user_payloads(s.users))}
    )
    writes = unary_rounds(
        s,
        pool,
        server,
        {
            "health": health,
            "add_memory_1": (ADD_MEMORY, add_memory_payloads(1)),
            "add_memory_20": (ADD_MEMORY, add_memory_payloads(20, sessions=500)),
        },
    )
    return [
        ratio_figure("unary", reads, "get_user", "health", 0.70),
        ratio_figure("writes_1", writes, "add_memory_1", "health", 0.50),
        ratio_figure("writes_20", writes, "add_memory_20", "health", None),
    ]


def _sample_while(future: Future[Any], sample: Callable[[], int]) -> int:
    peak = sample()
    while not future.done():
        time.sleep(0.05)
        peak = max(peak, sample())
    return peak


@dataclass(frozen=True)
class Export:
    """One export stream and the COPY of the same table it is measured against."""

    figure: str
    method: str
    request: bytes
    #: The chunk's message, "module.Message" under memstore.v1, and its repeated field.
    response_type: str
    field: str
    copy: str
    #: Goal on the rows/s ratio to COPY; None reports the ratio without judging it.
    goal: float | None


USERS_EXPORT = Export(
    "export",
    LIST_CHUNKED,
    user_service_pb2.ListUsersChunkedRequest(chunk_size=1000).SerializeToString(),
    "user_service_pb2.ListUsersChunkedResponse",
    "users",
    # The columns the API shows, not users.wire (migration 0040): COPY of the same data as
    # before that column, so the baseline did not get slower by the export's own bytes.
    "COPY users (project_id, user_id, email, first_name, last_name, metadata, created_at,"
    " updated_at) TO STDOUT",
    0.50,
)
MESSAGES_EXPORT = Export(
    "export_messages",
    EXPORT_MESSAGES,
    session_service_pb2.ExportMessagesRequest(chunk_size=1000).SerializeToString(),
    "session_service_pb2.ExportMessagesResponse",
    "messages",
    # The API's columns, as for users.
    "COPY messages (project_id, session_id, sequence, uuid, role, role_type, content, metadata,"
    " created_at, updated_at, deleted_at) TO STDOUT",
    0.50,
)


Rss = tuple[int, int, int]


def export_run(
    pool: Executor, server: Server, url: str, stream: Export
) -> tuple[dict[str, float], dict[str, float], Rss]:
    """One COPY then one whole export stream: (stream, COPY, server RSS before, peak, after)."""
    copy = pool.submit(run_copy, url, stream.copy).result()
    before = server.rss_bytes()
    future = pool.submit(
        run_export, server.target, stream.method, stream.request, stream.response_type, stream.field
    )
    peak = _sample_while(future, server.rss_bytes)
    run = future.result()
    if run["rows"] != copy["rows"]:
        raise RuntimeError(f"{stream.figure} saw {run['rows']} rows, COPY {copy['rows']}")
    return run, copy, (before, peak, server.rss_bytes())


def export(
    s: Settings, pool: Executor, server: Server, url: str, stream: Export = USERS_EXPORT
) -> dict[str, Any]:
    """Figure 3: an export's rows/s over COPY's rows/s on the same table; server RSS."""
    runs = [export_run(pool, server, url, stream) for _ in range(s.export_runs)]
    streams, copies = [x[0] for x in runs], [x[1] for x in runs]
    per_round = ratios(
        [x["rows"] / x["wall"] for x in streams], [x["rows"] / x["wall"] for x in copies]
    )
    value = _median(per_round)
    growth = max(peak - before for _, _, (before, peak, _) in runs)
    rss = runs[-1][2]
    goal = "RSS growth < 100 MB"
    met = growth < 100 * MB
    if stream.goal is not None:
        goal = f">= {stream.goal:.2f} and {goal}"
        met = met and value >= stream.goal
    return {
        "figure": stream.figure,
        "value": round(value, 3),
        "goal": goal,
        "met": met,
        "runs": [round(x, 3) for x in per_round],
        "rows": streams[0]["rows"],
        "export_rows_per_s": round(_median([x["rows"] / x["wall"] for x in streams])),
        "copy_rows_per_s": round(_median([x["rows"] / x["wall"] for x in copies])),
        "export_client_cpu_s": round(_median([x["cpu"] for x in streams]), 2),
        "max_chunk_bytes": max(x["max_chunk_bytes"] for x in streams),
        "server_rss_before_mb": round(rss[0] / MB, 1),
        "server_rss_peak_mb": round(rss[1] / MB, 1),
        "server_rss_end_mb": round(rss[2] / MB, 1),
        "server_rss_growth_mb": round(growth / MB, 1),
    }


def _deep_token(stub: user_service_pb2_grpc.UserServiceStub, skip: int) -> str:
    token = ""
    while skip > 0:
        size = min(1000, skip)
        reply = stub.ListUsers(user_service_pb2.ListUsersRequest(page_size=size, page_token=token))
        token, skip = reply.next_page_token, skip - size
    return token


def pagination(s: Settings, server: Server) -> dict[str, Any]:
    """Figure 4: latency of a ListUsers page `page_depth` pages deep over the first page."""
    depth = max(2, min(s.page_depth, s.users // s.page_size))
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        token = _deep_token(stub, (depth - 1) * s.page_size)
        first = user_service_pb2.ListUsersRequest(page_size=s.page_size)
        deep = user_service_pb2.ListUsersRequest(page_size=s.page_size, page_token=token)
        firsts: list[float] = []
        deeps: list[float] = []
        for _ in range(s.runs):
            a: list[float] = []
            b: list[float] = []
            for _ in range(s.page_calls):
                for request, into in ((first, a), (deep, b)):
                    t0 = time.perf_counter()
                    reply = stub.ListUsers(request)
                    into.append(time.perf_counter() - t0)
                    assert len(reply.users) == s.page_size
            firsts.append(_median(a))
            deeps.append(_median(b))
    per_round = ratios(deeps, firsts)
    value = _median(per_round)
    return {
        "figure": "deep_page",
        "value": round(value, 3),
        "goal": "<= 1.50",
        "met": value <= 1.5,
        "runs": [round(x, 3) for x in per_round],
        "page_size": s.page_size,
        "depth_pages": depth,
        "first_page_ms": round(_median(firsts) * 1000, 2),
        "deep_page_ms": round(_median(deeps) * 1000, 2),
    }


def scaling(s: Settings, pool: Executor, one: Server, two: Server) -> list[dict[str, Any]]:
    """Figure 5: GetUser rps with 2 workers over 1 worker, from several client processes, and
    the server CPU per call of each (workers_cpu), from the same runs."""
    payloads = get_user_payloads(s.users)
    runs: dict[str, list[dict[str, float]]] = {"one": [], "two": []}
    for r in range(s.runs):
        for name, server in in_turn((("one", one), ("two", two)), r):
            load = UnaryLoad(
                server.target,
                GET_USER,
                payloads,
                s.seconds,
                s.warmup,
                s.concurrency * 2,
                s.channels * 2,
            )
            cpu0 = server.cpu_seconds()
            run = unary_run(pool, load, s.scaling_client_procs)
            run["server_cpu_cores"] = (server.cpu_seconds() - cpu0) / (s.seconds + s.warmup)
            runs[name].append(run)
    figure = ratio_figure("workers", runs, "two", "one", 1.6)
    # A client process near one full core means the client, not the server, set the pace.
    client_bound = _median([x["client_max_proc_cpu"] for x in runs["two"]]) > 0.9
    figure["client_bound"] = client_bound
    figure["one_server_cpu_cores"] = round(_median([x["server_cpu_cores"] for x in runs["one"]]), 2)
    if client_bound and not figure["met"]:
        figure["met"] = None  # not judged: the goal holds only where the client is not the limit
    return [figure, workers_cpu(runs)]


def workers_cpu(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Figure 5b: server CPU-seconds per 1,000 calls, `--workers 2` over `--workers 1`.

    A second worker has no free core on a machine it shares with the client and PostgreSQL,
    so its rps says little; its CPU per call says whether the workers pay for shared state.
    """

    def per_1000(x: dict[str, float]) -> float:
        # Server CPU over the run (warm-up included) per call at the counted rate.
        return x["server_cpu_cores"] / x["rps"] * 1000

    per_round = ratios([per_1000(x) for x in runs["two"]], [per_1000(x) for x in runs["one"]])
    value = _median(per_round)
    return {
        "figure": "workers_cpu",
        "value": round(value, 3),
        "goal": "<= 1.10",
        "met": value <= 1.10,
        "runs": [round(x, 3) for x in per_round],
        "two_cpu_s_per_1000": round(_median([per_1000(x) for x in runs["two"]]), 3),
        "one_cpu_s_per_1000": round(_median([per_1000(x) for x in runs["one"]]), 3),
    }

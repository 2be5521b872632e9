"""The `rest` group of `make bench`: Zep's REST GetMemory against gRPC GetMemory, one server.

The same sessions, the same request (last 6 messages, 5 recalled memories), the same
server process answering on both ports, in alternating rounds: REST rps ÷ gRPC rps. The
HTTP client is as thin as the gRPC one (bench/client.py): pre-built request bytes on
keep-alive connections, replies read by their content-length and not parsed.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from bench.client import cpu_seconds
from bench.env import Server
from bench.figures import Settings, rps_ratios, unary_rounds
from bench.rounds import in_turn
from bench.turns import GET_MEMORY
from memstore.v1 import session_service_pb2

#: REST ÷ gRPC GetMemory rps that docs/performance.md sets as the goal.
GOAL = 0.80
_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class HttpLoad:
    """What one client process sends: `requests` round-robin over keep-alive connections."""

    port: int
    requests: tuple[bytes, ...]
    seconds: float
    warmup: float
    concurrency: int
    offset: int = 0


def run_http(load: HttpLoad) -> dict[str, float]:
    """Runs one HTTP load in this process; returns calls, errors, wall and CPU seconds."""
    return asyncio.run(_http(load))


async def _http(load: HttpLoad) -> dict[str, float]:
    state: dict[str, Any] = {"counting": False, "stop": False, "calls": 0, "errors": 0}
    workers = [asyncio.create_task(_worker(load, i, state)) for i in range(load.concurrency)]
    await asyncio.sleep(load.warmup)
    state["counting"] = True
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.sleep(load.seconds)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    state["counting"], state["stop"] = False, True
    await asyncio.gather(*workers)
    return {"calls": state["calls"], "errors": state["errors"], "wall": wall, "cpu": cpu}


async def _worker(load: HttpLoad, index: int, state: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", load.port)
    requests, n = load.requests, len(load.requests)
    i = load.offset + index
    try:
        while not state["stop"]:
            writer.write(requests[i % n])
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            if state["counting"]:
                state["calls" if head.startswith(b"HTTP/1.1 200") else "errors"] += 1
            i += load.concurrency
    finally:
        writer.close()


def _requests(sessions: list[str]) -> tuple[bytes, ...]:
    return tuple(
        f"GET /api/v2/sessions/{quote(x, safe='')}/memory?lastn=6&relevant_limit=5 HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n\r\n".encode()
        for x in sessions
    )


def _http_run(pool: Executor, load: HttpLoad, procs: int) -> dict[str, float]:
    share = replace(load, concurrency=max(1, load.concurrency // procs))
    parts = [
        f.result()
        for f in [pool.submit(run_http, replace(share, offset=i * 7919)) for i in range(procs)]
    ]
    wall = sorted(p["wall"] for p in parts)[len(parts) // 2]
    errors = sum(p["errors"] for p in parts)
    if errors:
        raise RuntimeError(f"REST GetMemory: {errors} calls failed during the run")
    return {
        "rps": sum(p["calls"] for p in parts) / wall,
        "client_cpu_cores": sum(p["cpu"] for p in parts) / wall,
    }


def figure(s: Settings, pool: Executor, server: Server, sessions: list[str]) -> dict[str, Any]:
    """rest_get_memory: REST GetMemory rps ÷ gRPC GetMemory rps, median of s.runs rounds."""
    grpc_payloads = tuple(
        session_service_pb2.GetMemoryRequest(
            session_id=x, lastn=6, relevant_limit=5
        ).SerializeToString()
        for x in sessions
    )
    http = HttpLoad(server.http_port, _requests(sessions), s.seconds, s.warmup, s.concurrency)
    once = replace(s, runs=1)
    rest_runs: list[dict[str, float]] = []
    grpc_runs: list[dict[str, float]] = []
    for r in range(s.runs):
        # Each first in every other round.
        for kind in in_turn(("rest", "grpc"), r):
            if kind == "rest":
                rest_runs.append(_http_run(pool, http, s.client_procs))
            else:
                got = unary_rounds(once, pool, server, {"g": (GET_MEMORY, grpc_payloads)})
                grpc_runs.append(got["g"][0])
    ratios = rps_ratios(rest_runs, grpc_runs, "rest_get_memory")
    value = sorted(ratios)[len(ratios) // 2]
    return {
        "figure": "rest_get_memory",
        "value": round(value, 3),
        "goal": f">= {GOAL:.2f}",
        "met": value >= GOAL,
        "runs": [round(x, 3) for x in ratios],
        "rest_get_memory_rps": round(sorted(x["rps"] for x in rest_runs)[len(rest_runs) // 2]),
        "grpc_get_memory_rps": round(sorted(x["rps"] for x in grpc_runs)[len(grpc_runs) // 2]),
        "client_cpu_cores": round(
            sorted(x["client_cpu_cores"] for x in rest_runs)[len(rest_runs) // 2], 2
        ),
    }

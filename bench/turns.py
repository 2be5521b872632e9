"""The `turn` group of `make bench`: an agent's turn (GetMemory with recall, then AddMemory).

Agents call GetMemory(lastn 6, with recall) then AddMemory(2 messages) on every turn
(issue 15). Measured against health `Check` in the same rounds: turns/s closed loop, then
each call's latency at half that rate offered open loop, and GetMemory alone.
"""

from __future__ import annotations

import statistics
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from grpc_health.v1 import health_pb2

from bench import search_data
from bench.client import TurnLoad, run_turns
from bench.env import Server
from bench.figures import ADD_MEMORY, HEALTH, Settings, ratio_figure, unary_rounds
from bench.rounds import in_turn, ratios
from bench.search_worker import quantile
from memstore.v1 import resources_pb2, session_service_pb2

GET_MEMORY = "/memstore.v1.SessionService/GetMemory"
#: The turn user's sessions: more than the agents, so no two turns queue on one session.
SESSIONS = 64
#: Messages already in each session, and the share of a turn's max rate offered for latency.
HISTORY = 20
LATENCY_SHARE = 0.5


def seed(url: str, sessions: int = SESSIONS) -> list[str]:
    """A user whose sessions hold chat history, with vectors and kept recall where pgvector is
    (as the embedding worker leaves them); without it, recall ranks by words on the request
    path. Returns the session ids."""
    text = search_data.ChatText(seed=15)
    ids = search_data.seed_user(
        url, text, "turn-user", prefix="turn", messages=sessions * HISTORY, per_session=HISTORY
    )
    if search_data.has_vectors(url):
        search_data.embed_randomly(url, "turn")
        search_data.keep_recall(url, "turn")
    search_data.analyze(url)
    return ids


def _payloads(sessions: list[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    text = search_data.ChatText(seed=16)
    gets = tuple(
        session_service_pb2.GetMemoryRequest(
            session_id=x, lastn=6, relevant_limit=5
        ).SerializeToString()
        for x in sessions
    )
    adds = []
    for x in sessions:
        messages = [
            resources_pb2.Message(
                role="Priya", role_type=resources_pb2.ROLE_TYPE_USER, content=text.sentence()
            ),
            resources_pb2.Message(
                role="assistant",
                role_type=resources_pb2.ROLE_TYPE_ASSISTANT,
                content=text.sentence(),
            ),
        ]
        request = session_service_pb2.AddMemoryRequest(
            session_id=x, user_id="turn-user", messages=messages
        )
        adds.append(request.SerializeToString())
    return gets, tuple(adds)


def _ms(values: list[float], q: int) -> float:
    return round(quantile([v * 1000 for v in values], q), 2) if values else 0.0


def figures(
    s: Settings, pool: Executor, server: Server, sessions: list[str]
) -> list[dict[str, Any]]:
    """agent_turn (turns/s ÷ health rps; latencies at half the max) and get_memory (÷ health)."""
    gets, adds = _payloads(sessions)
    health = (HEALTH, (health_pb2.HealthCheckRequest().SerializeToString(),))
    reads = unary_rounds(s, pool, server, {"health": health, "get_memory": (GET_MEMORY, gets)})
    memory = ratio_figure("get_memory", reads, "get_memory", "health", 0.60)
    closed = TurnLoad(
        server.target,
        GET_MEMORY,
        gets,
        ADD_MEMORY,
        adds,
        s.seconds,
        s.warmup,
        s.concurrency,
        s.channels,
    )
    once = replace(s, runs=1)
    healths, turns = [], []
    for r in range(s.runs):
        # Health and turns alternate, each first in every other round.
        for kind in in_turn(("health", "turns"), r):
            if kind == "health":
                healths.append(unary_rounds(once, pool, server, {"health": health}))
            else:
                run = pool.submit(run_turns, closed).result()
                if run["errors"]:
                    raise RuntimeError(f"agent turns: {run['errors']} calls failed")
                turns.append(run["turns"] / run["wall"])
    per_round = ratios(turns, [h["health"][0]["rps"] for h in healths])
    max_rate = statistics.median(turns)
    offered = max(1.0, max_rate * LATENCY_SHARE)
    paced = pool.submit(run_turns, replace(closed, rate=offered)).result()
    if paced["errors"]:
        raise RuntimeError(f"paced agent turns: {paced['errors']} calls failed")
    value = statistics.median(per_round)
    turn = {
        "figure": "agent_turn",
        "value": round(value, 3),
        "goal": None,
        "met": None,
        "runs": [round(x, 3) for x in per_round],
        "turns_per_s": round(max_rate, 1),
        "health_rps": round(statistics.median(h["health"][0]["rps"] for h in healths)),
        "offered_turns_per_s": round(offered, 1),
        "paced_turns": paced["turns"],
        "get_memory_p50_ms": _ms(paced["get"], 50),
        "get_memory_p99_ms": _ms(paced["get"], 99),
        "add_memory_p50_ms": _ms(paced["add"], 50),
        "add_memory_p99_ms": _ms(paced["add"], 99),
        "sessions": len(sessions),
        "note": "closed loop of GetMemory(lastn 6, relevant_limit 5) then AddMemory(2) per "
        "agent; latencies open loop at half the closed loop's turns/s",
    }
    return [turn, memory]

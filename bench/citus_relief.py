"""What calls sent through a Citus worker take off the coordinator, in CPU per call of each node.

    .venv/bin/python -m tests.citus_cluster run -- .venv/bin/python -m bench.citus_relief
    .venv/bin/python -m bench.citus_relief --coordinator-url URL --worker-url URL [--other-url URL]

A store over the coordinator's URL and one over a worker's (`Store.migrate_to_serve`, as
`memstore serve` started there) send the same calls, GetMemory (lastn 6) then AddMemory(1),
over `--sessions` sessions of their own (8 calls in flight), `--seconds` a side per round,
the sides' order alternating between rounds. Around each side's run it reads every node's
CPU time from /proc: its postmaster's and its backends' (`utime`, `stime`), and what its
backends that exited meanwhile used (`cutime`, `cstime`). Prints, per kind of call and side,
the median calls/s and CPU µs per call of the coordinator, the worker the calls reach, and the
other workers, and the worker side ÷ the coordinator side of the rate and the total CPU.

Without URLs it takes the cluster `tests.citus_cluster run` started (a coordinator and two
workers on loopback, Citus installed into this machine's PostgreSQL 15; its DATABASE_URL and
MEMSTORE_CITUS_WORKERS), the first worker as the one the calls reach. The nodes must run on
this machine and the role may read `data_directory` (a superuser, or pg_read_all_settings),
whose `postmaster.pid` names the process; the database is migrated through the coordinator
first.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sys
import time
from typing import Any

import psycopg

from bench.rounds import in_turn, parser, spread
from server.domain import DEFAULT_PROJECT_ID, NewMessage
from server.store import Store

SIDES = ("coordinator", "worker")
KINDS = ("get_memory", "add_memory")
IN_FLIGHT = 8
#: Where `python -m tests.citus_cluster run` names its workers (host:port, comma-separated).
WORKERS_ENV = "MEMSTORE_CITUS_WORKERS"
_TICK = os.sysconf("SC_CLK_TCK")


def _message(content: str) -> NewMessage:
    return NewMessage(role="u", role_type="user", content=content, metadata={}, uuid=None)


def node_pid(url: str) -> int:
    """The postmaster's process id of the node `url` reaches (on this machine)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    with open(os.path.join(str(row[0]), "postmaster.pid")) as pid_file:
        return int(pid_file.readline())


def node_cpu(postmaster: int) -> float:
    """CPU seconds of a node so far: its postmaster's, its live backends', and those of the
    backends that exited (which the postmaster waited for)."""

    def fields(pid: int | str) -> list[str]:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()

    own = fields(postmaster)
    total = sum(int(x) for x in own[11:15])  # utime, stime, cutime, cstime
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            child = fields(pid)
        except OSError:  # gone meanwhile: counted in the postmaster's cutime
            continue
        if int(child[1]) == postmaster:
            total += int(child[11]) + int(child[12])
    return total / _TICK


async def _load(store: Store, kind: str, sessions: list[str], seconds: float) -> int:
    calls = 0
    end = time.monotonic() + seconds

    async def one() -> None:
        nonlocal calls
        while time.monotonic() < end:
            session = random.choice(sessions)
            if kind == "get_memory":
                await store.get_memory(DEFAULT_PROJECT_ID, session, 6)
            else:
                await store.add_memory(DEFAULT_PROJECT_ID, session, None, [_message("x y z")])
            calls += 1

    await asyncio.gather(*(one() for _ in range(IN_FLIGHT)))
    return calls


async def measure(
    coordinator_url: str,
    worker_url: str,
    other_urls: list[str],
    *,
    rounds: int,
    seconds: float,
    sessions: int,
) -> dict[str, Any]:
    """The figures above, as a dict (see the module's doc)."""
    nodes = {"coordinator": coordinator_url, "worker": worker_url}
    nodes.update({f"other_{i}": url for i, url in enumerate(other_urls)})
    pids = {name: node_pid(url) for name, url in nodes.items()}
    stores = {"coordinator": await Store.open(coordinator_url, min_size=1, max_size=IN_FLIGHT)}
    try:
        await stores["coordinator"].migrate()
        stores["worker"] = await Store.open(worker_url, min_size=1, max_size=IN_FLIGHT)
        await stores["worker"].migrate_to_serve()
        tag = secrets.token_hex(3)
        names = [f"relief-{tag}-{i}" for i in range(sessions)]
        for name in names:
            six = [_message(f"message {j} of {name}") for j in range(6)]
            await stores["coordinator"].add_memory(DEFAULT_PROJECT_ID, name, None, six)
        found: dict[str, Any] = {}
        for kind in KINDS:
            samples: dict[str, list[tuple[float, dict[str, float]]]] = {s: [] for s in SIDES}
            for r in range(rounds):
                for side in in_turn(SIDES, r):
                    await _load(stores[side], kind, names, min(seconds, 1.0))  # warm
                    before = {name: node_cpu(pid) for name, pid in pids.items()}
                    calls = await _load(stores[side], kind, names, seconds)
                    after = {name: node_cpu(pid) for name, pid in pids.items()}
                    per_call = {n: (after[n] - before[n]) / calls * 1e6 for n in pids}
                    samples[side].append((calls / seconds, per_call))
            found[kind] = _summary(samples, list(pids))
        return found
    finally:
        for store in stores.values():
            await store.close()


def _summary(
    samples: dict[str, list[tuple[float, dict[str, float]]]], nodes: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, rows in samples.items():
        cpu = {n: round(spread(p[n] for _, p in rows).median, 1) for n in nodes}
        out[side] = {
            "calls_per_s": round(spread(c for c, _ in rows).median, 1),
            "cpu_us_per_call": cpu,
            "total_cpu_us_per_call": round(sum(cpu.values()), 1),
        }
    coordinator, worker = out["coordinator"], out["worker"]
    out["worker_over_coordinator_rps"] = round(
        worker["calls_per_s"] / coordinator["calls_per_s"], 3
    )
    out["worker_over_coordinator_total_cpu"] = round(
        worker["total_cpu_us_per_call"] / coordinator["total_cpu_us_per_call"], 3
    )
    return out


def _nodes(args: Any) -> tuple[str, str, list[str]]:
    if args.coordinator_url and args.worker_url:
        return args.coordinator_url, args.worker_url, list(args.other_url)
    coordinator, workers = os.environ.get("DATABASE_URL"), os.environ.get(WORKERS_ENV)
    if not (coordinator and workers):
        raise SystemExit(
            "no cluster: give --coordinator-url and --worker-url, or run this under "
            "`python -m tests.citus_cluster run -- ...`"
        )
    urls = []
    for node in workers.split(","):
        host, port = node.rsplit(":", 1)
        urls.append(psycopg.conninfo.make_conninfo(coordinator, host=host, port=port))
    return coordinator, urls[0], urls[1:]


def main(argv: list[str]) -> int:
    p = parser("citus_relief", __doc__, rounds=4)
    p.add_argument("--seconds", type=float, default=5.0, help="each side's run in a round")
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--coordinator-url", help="the cluster's database on its coordinator")
    p.add_argument("--worker-url", help="the same database on the worker the calls reach")
    p.add_argument("--other-url", action="append", default=[], help="another worker's")
    args = p.parse_args(argv)
    coordinator, worker, others = _nodes(args)
    found = asyncio.run(
        measure(
            coordinator,
            worker,
            others,
            rounds=args.rounds,
            seconds=args.seconds,
            sessions=args.sessions,
        )
    )
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Costs compared within one test: a ratio to a baseline measured alongside, never a fixed bound.

A busy machine slows every call, so a wall-clock bound fails under load although nothing is
wrong. Two variants of one piece of work, run in turns, are slowed alike; the fastest of a few
turns of each leaves out the moments another process held the cores. Alike, but not quite on
the wall clock: the scheduler favours work that sleeps often (many short calls, each waiting on
the network) over one long burst of CPU (one wide call), so at a load average of 11 a linear
wide call measured 4 times its eight narrow pieces. CpuClock counts CPU time instead, which
waiting for a core does not add to.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import psycopg

#: Seconds spent so far, by whom: the time spent between two readings is, over the names in
#: the second, its value less the first's (0 for a name new in the second).
Reading = dict[str, float]
#: Reads a clock.
Clock = Callable[[], Awaitable[Reading]]


async def wall_clock() -> Reading:
    """Seconds on the monotonic wall clock."""
    return {"wall": time.perf_counter()}


def spent(start: Reading, end: Reading) -> float:
    """Seconds spent from `start` to `end`; a backend gone in between is left out."""
    return sum(value - start.get(name, 0.0) for name, value in end.items())


def _on_cpu_seconds(pid: int) -> float | None:
    # schedstat's first field: nanoseconds on a CPU, exact (stat's ticks are 10 ms each).
    try:
        with open(f"/proc/{pid}/schedstat") as stats:
            return int(stats.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


_ACTIVITY = "SELECT pid FROM {view} WHERE datname = current_database() AND pid <> pg_backend_pid()"


class CpuClock:
    """CPU seconds of this process (the test's in-process server and client included) and of
    the PostgreSQL backends connected to `conn`'s database.

    Where those backends' /proc entries cannot be read (PostgreSQL on another host), it reads
    the wall clock instead. On Citus the workers' backends count too.
    """

    def __init__(self, conn: psycopg.AsyncConnection[object]) -> None:
        self._conn = conn
        self._local: bool | None = None
        self._activity = _ACTIVITY.format(view="pg_stat_activity")

    async def _backends(self) -> list[int]:
        cur = await self._conn.execute(self._activity)
        return [int(row[0]) for row in await cur.fetchall()]  # type: ignore[index]

    async def _is_local(self) -> bool:
        # A pid is this machine's only if the server is: a Unix socket (no address) or loopback.
        cur = await self._conn.execute(
            "SELECT inet_server_addr() IS NULL OR host(inet_server_addr()) IN ('127.0.0.1', '::1'),"
            " pg_backend_pid()"
        )
        row = await cur.fetchone()
        assert row is not None
        local, own = bool(row[0]), int(row[1])  # type: ignore[index]
        cur = await self._conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'citus'")
        citus = await cur.fetchone()
        if citus is not None and citus[0]:  # type: ignore[index]
            # The workers' backends too, where a distributed row's merge runs (all local
            # in tests/citus_cluster.py).
            self._activity = _ACTIVITY.format(view="citus_stat_activity")
        return local and _on_cpu_seconds(own) is not None

    async def __call__(self) -> Reading:
        if self._local is None:
            self._local = await self._is_local()
        if not self._local:
            return await wall_clock()
        reading = {"self": time.process_time()}
        for pid in await self._backends():
            # Per backend: one the pool opens meanwhile counts from 0, one it closes drops out.
            if (seconds := _on_cpu_seconds(pid)) is not None:
                reading[str(pid)] = seconds
        return reading


async def fastest(
    variants: Mapping[str, Callable[[int], Awaitable[object]]],
    rounds: int = 3,
    clock: Clock = wall_clock,
) -> dict[str, float]:
    """The least `clock` time of `rounds` runs of each variant, by name.

    The variants run in turns, in reverse order every other round, so that neither always
    runs first (on a cold cache) or last; each is given the round's number, for fresh ids.
    """
    best = dict.fromkeys(variants, float("inf"))
    for round_ in range(rounds):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in names:
            start = await clock()
            await variants[name](round_)
            best[name] = min(best[name], spent(start, await clock()))
    return best

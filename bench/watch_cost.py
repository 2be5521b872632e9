"""What the send-stall watch costs a call, in process.

    .venv/bin/python -m bench.watch_cost --rounds 9 --calls 50000

Every unary answer arms `server.serving.limit.watch_send` once it is ready (a timer of
`--send-stall-timeout` and a done callback on the handler's task). This times asyncio tasks
that return at once, with and without arming it, in alternating rounds, and prints each
side's median µs per task and the median of the rounds' differences: the watch's own cost
per call, to set beside a call's server CPU (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable

from bench import rounds
from server.serving.limit import watch_send

#: Tasks started together, as concurrent calls are.
_BATCH = 100


async def _watched() -> bytes:
    watch_send(60.0)
    return b""


async def _bare() -> bytes:
    return b""


async def _us_per_task(make: Callable[[], Awaitable[bytes]], n: int) -> float:
    loop = asyncio.get_running_loop()
    batches = max(1, n // _BATCH)
    start = time.perf_counter()
    for _ in range(batches):
        await asyncio.gather(*[loop.create_task(make()) for _ in range(_BATCH)])  # type: ignore[arg-type]
    return (time.perf_counter() - start) / (batches * _BATCH) * 1e6


async def _measure(rounds_: int, calls: int) -> dict[str, list[float]]:
    sides = {"bare": _bare, "watched": _watched}
    found: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(rounds_):
        for side in rounds.in_turn(sides, r):
            found[side].append(await _us_per_task(sides[side], calls))
    return found


def main(argv: list[str] | None = None) -> int:
    """Runs the rounds and prints the summary as JSON."""
    args = rounds.parser(
        "watch_cost", __doc__, rounds=9, calls=50_000, calls_help="tasks per side and round"
    ).parse_args(argv)
    found = asyncio.run(_measure(args.rounds, args.calls))
    summary = {
        "bare_us": statistics.median(found["bare"]),
        "watched_us": statistics.median(found["watched"]),
        "watch_us": statistics.median(
            w - b for w, b in zip(found["watched"], found["bare"], strict=True)
        ),
        "rounds_us": found,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

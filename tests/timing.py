"""Costs compared within one test: a ratio to a baseline measured alongside, never a fixed bound.

A busy machine slows every call, so a wall-clock bound fails under load although nothing is
wrong. Two variants of one piece of work, run in turns, are slowed alike; the fastest of a few
turns of each leaves out the moments another process held the cores.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping


async def fastest(
    variants: Mapping[str, Callable[[int], Awaitable[object]]], rounds: int = 3
) -> dict[str, float]:
    """The fastest of `rounds` runs of each variant, in seconds, by name.

    The variants run in turns, in reverse order every other round, so that neither always
    runs first (on a cold cache) or last; each is given the round's number, for fresh ids.
    """
    best = dict.fromkeys(variants, float("inf"))
    for round_ in range(rounds):
        names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for name in names:
            start = time.perf_counter()
            await variants[name](round_)
            best[name] = min(best[name], time.perf_counter() - start)
    return best

"""Rounds that alternate which side goes first, so that load from other jobs falls on each alike."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def in_turn(sides: Iterable[T], round_: int) -> list[T]:
    """The sides in round `round_`'s order: as given in even rounds, reversed in odd ones."""
    order = list(sides)
    return order if round_ % 2 == 0 else order[::-1]


def alternate(
    sides: Iterable[str], rounds: int, measure: Callable[[str], float]
) -> dict[str, list[float]]:
    """Each side's figures, round by round: `measure(side)` once a round for each, in turn."""
    found: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in in_turn(found, r):
            found[side].append(measure(side))
    return found


def ratio_line(found: dict[str, list[float]]) -> str:
    """after ÷ before of each round: their median and range, and how many rounds."""
    ratios = [a / b for a, b in zip(found["after"], found["before"], strict=True)]
    return (
        f"after / before per round: median {statistics.median(ratios):.2f}"
        f" ({min(ratios):.2f}-{max(ratios):.2f}), {len(ratios)} rounds"
    )

"""Rounds that alternate which side goes first, so that load from other jobs falls on each alike.

Every bench module orders its rounds with `in_turn` (two sides, or variants: as given, then
reversed) or `rotated` (kinds of call: each round starts one later), reads the per-round
ratios with `ratios` and their median with `spread`, and takes its common options from `parser`.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench import env

K = TypeVar("K")
T = TypeVar("T")


def in_turn(sides: Iterable[K], round_: int) -> list[K]:
    """The sides in round `round_`'s order: as given in even rounds, reversed in odd ones."""
    order = list(sides)
    return order if round_ % 2 == 0 else order[::-1]


def rotated(sides: Iterable[K], round_: int) -> list[K]:
    """The sides in round `round_`'s order: each round starts one side later, wrapping round."""
    order = list(sides)
    if not order:
        return order
    k = round_ % len(order)
    return order[k:] + order[:k]


def alternate(
    sides: Iterable[K],
    rounds: int,
    measure: Callable[[K], T],
    *,
    order: Callable[[Iterable[K], int], list[K]] = in_turn,
) -> dict[K, list[T]]:
    """Each side's samples, round by round: `measure(side)` once a round for each, in the
    round's `order` (`in_turn` unless told)."""
    found: dict[K, list[T]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in order(found, r):
            found[side].append(measure(side))
    return found


def ratios(subject: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """subject ÷ baseline of each round (the two sides' samples of one round pair up)."""
    return [a / b for a, b in zip(subject, baseline, strict=True)]


@dataclass(frozen=True)
class Spread:
    """A figure's rounds: their median, lowest and highest, and how many."""

    median: float
    low: float
    high: float
    rounds: int


def spread(values: Iterable[float]) -> Spread:
    """The median and range of `values` (one a round)."""
    found = list(values)
    return Spread(statistics.median(found), min(found), max(found), len(found))


def median_ratio(subject: Sequence[float], baseline: Sequence[float]) -> float:
    """The median over rounds of subject ÷ baseline."""
    return spread(ratios(subject, baseline)).median


def ratio_line(found: dict[str, list[float]]) -> str:
    """after ÷ before of each round: their median and range, and how many rounds."""
    s = spread(ratios(found["after"], found["before"]))
    return (
        f"after / before per round: median {s.median:.2f}"
        f" ({s.low:.2f}-{s.high:.2f}), {s.rounds} rounds"
    )


#: The help of --database-url where it names a server to make scratch databases on.
SCRATCH_SERVER = (
    "a server on this machine where databases can be made (default: the bench's"
    " embedded PostgreSQL, as `python -m bench`)"
)


def parser(
    module: str,
    doc: str | None,
    *,
    rounds: int,
    rounds_flag: str = "--rounds",
    rounds_help: str | None = None,
    calls: int | None = None,
    calls_help: str | None = None,
    users: int | None = None,
) -> argparse.ArgumentParser:
    """`python -m bench.<module>`'s parser with the options every alternating bench has:
    its rounds and, when given defaults, --calls (per side and round) and --users."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc)
    p.add_argument(rounds_flag, dest="rounds", type=int, default=rounds, help=rounds_help)
    if calls is not None:
        p.add_argument("--calls", type=int, default=calls, help=calls_help)
    if users is not None:
        p.add_argument("--users", type=int, default=users)
    return p


def add_database_url(
    p: argparse.ArgumentParser,
    *,
    from_env: bool = True,
    required: bool = False,
    help: str | None = None,
) -> None:
    """--database-url: DATABASE_URL's by default (`from_env`), else none unless given."""
    default = os.environ.get("DATABASE_URL") if from_env and not required else None
    p.add_argument("--database-url", default=default, required=required, help=help)


def add_checkouts(p: argparse.ArgumentParser) -> None:
    """--before and --after: the two checkouts whose servers a comparison runs."""
    p.add_argument("--before", type=Path, required=True, help="checkout of the older commit")
    p.add_argument("--after", type=Path, default=env.ROOT, help="checkout of the newer commit")


def add_scratch(p: argparse.ArgumentParser, db_name: str) -> None:
    """--data-dir (of the embedded PostgreSQL) and --db-name (the bench's own database):
    `db_name` by default, env.own_name's where a run drops what it made."""
    p.add_argument("--data-dir", type=Path, default=env.ROOT / ".data")
    p.add_argument("--db-name", default=db_name, help="the database made (and dropped) here")

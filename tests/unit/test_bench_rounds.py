"""bench.rounds: which side goes first alternates round by round, and the ratio line."""

from __future__ import annotations

import pytest

from bench.rounds import alternate, in_turn, ratio_line

pytestmark = pytest.mark.unit


def test_the_order_is_reversed_every_other_round() -> None:
    assert [in_turn(("a", "b", "c"), r) for r in range(3)] == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
    ]


def test_each_side_is_measured_once_a_round_in_turn() -> None:
    calls: list[str] = []

    def measure(side: str) -> float:
        calls.append(side)
        return float(len(calls))

    found = alternate({"before": 1, "after": 2}, 3, measure)
    assert calls == ["before", "after", "after", "before", "before", "after"]
    assert found == {"before": [1.0, 4.0, 5.0], "after": [2.0, 3.0, 6.0]}


def test_the_ratio_line_pairs_the_rounds() -> None:
    line = ratio_line({"before": [2.0, 4.0, 10.0], "after": [1.0, 3.0, 10.0]})
    assert line == "after / before per round: median 0.75 (0.50-1.00), 3 rounds"

"""bench.rounds: which side goes first alternates round by round, the per-round ratios and
their median and spread, and the options every alternating bench module shares."""

from __future__ import annotations

import pytest

from bench.rounds import (
    add_database_url,
    alternate,
    in_turn,
    median_ratio,
    parser,
    ratio_line,
    ratios,
    rotated,
    spread,
)

pytestmark = pytest.mark.unit


def test_the_order_is_reversed_every_other_round() -> None:
    assert [in_turn(("a", "b", "c"), r) for r in range(3)] == [
        ["a", "b", "c"],
        ["c", "b", "a"],
        ["a", "b", "c"],
    ]


def test_two_sides_go_a_b_then_b_a() -> None:
    assert [in_turn(("a", "b"), r) for r in range(4)] == [
        ["a", "b"],
        ["b", "a"],
        ["a", "b"],
        ["b", "a"],
    ]


def test_rotated_starts_each_round_one_side_later() -> None:
    assert [rotated({"h": 0, "g": 1, "a": 2}, r) for r in range(4)] == [
        ["h", "g", "a"],
        ["g", "a", "h"],
        ["a", "h", "g"],
        ["h", "g", "a"],
    ]
    assert rotated([], 3) == []


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


def test_alternate_takes_the_order_it_is_given() -> None:
    calls: list[str] = []
    found = alternate(("a", "b", "c"), 2, lambda side: calls.append(side) or side, order=rotated)
    assert calls == ["a", "b", "c", "b", "c", "a"]
    assert found == {"a": ["a", "a"], "b": ["b", "b"], "c": ["c", "c"]}


def test_ratios_pair_the_rounds_and_their_median_and_spread() -> None:
    assert ratios([1.0, 3.0, 10.0, 6.0], [2.0, 4.0, 10.0, 2.0]) == [0.5, 0.75, 1.0, 3.0]
    s = spread([0.5, 0.75, 1.0, 3.0])
    assert (s.median, s.low, s.high, s.rounds) == (0.875, 0.5, 3.0, 4)
    assert median_ratio([1.0, 3.0, 10.0], [2.0, 4.0, 10.0]) == 0.75
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])  # a round with one side only is a slip, not a ratio


def test_the_shared_parser_holds_the_common_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://here/db")
    p = parser("x", None, rounds=7, calls=600, users=1000)
    add_database_url(p)
    args = p.parse_args([])
    assert (args.rounds, args.calls, args.users, args.database_url) == (
        7,
        600,
        1000,
        "postgresql://here/db",
    )
    assert p.prog == "python -m bench.x"
    # recall_cost's rounds are --runs on its command line.
    runs = parser("recall_cost", None, rounds=15, rounds_flag="--runs")
    assert runs.parse_args(["--runs", "3"]).rounds == 3
    assert not hasattr(runs.parse_args([]), "calls")
    apart = parser("y", None, rounds=1)
    add_database_url(apart, from_env=False)
    assert apart.parse_args([]).database_url is None

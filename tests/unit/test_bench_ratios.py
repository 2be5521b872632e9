"""The bench's same-run ratios: per round, and a clear error where a baseline round is empty."""

from __future__ import annotations

import pytest

from bench.figures import ratio_figure, rps_ratios

pytestmark = pytest.mark.unit


def _run(rps: float) -> dict[str, float]:
    return {"rps": rps, "client_cpu_cores": 0.1, "server_cpu_cores": 0.9}


def test_ratios_pair_the_rounds() -> None:
    assert rps_ratios([_run(50), _run(30)], [_run(100), _run(60)], "x") == [0.5, 0.5]


def test_a_subject_that_finished_no_call_is_a_ratio_of_zero() -> None:
    figure = ratio_figure("slow", {"a": [_run(0)], "h": [_run(10)]}, "a", "h", 0.5)
    assert figure["value"] == 0 and figure["met"] is False


def test_a_baseline_that_finished_no_call_names_the_figure_and_round() -> None:
    # It divided by zero before, with no word of which figure or why.
    with pytest.raises(
        RuntimeError, match=r"rest_get_memory: the baseline finished no call in round\(s\) \[1\]"
    ):
        rps_ratios([_run(5), _run(5)], [_run(10), _run(0)], "rest_get_memory")

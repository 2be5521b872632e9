"""Faults, hostile input and races: the promises of docs/reliability.md, each tested."""

from __future__ import annotations

from typing import Any

#: Figures measured by this run's reliability tests, printed at the end of the run.
FIGURES: dict[str, dict[str, Any]] = {}


def record(test: str, **figures: Any) -> None:
    """Keeps figures a test measured, for the end-of-run summary and docs/reliability.md."""
    FIGURES.setdefault(test, {}).update(figures)

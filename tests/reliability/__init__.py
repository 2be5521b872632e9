"""Faults, hostile input and races: the promises of docs/reliability.md, each tested."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

#: Figures measured by this run's reliability tests, printed at the end of the run.
FIGURES: dict[str, dict[str, Any]] = {}


def record(test: str, **figures: Any) -> None:
    """Keeps figures a test measured, for the end-of-run summary and docs/reliability.md."""
    FIGURES.setdefault(test, {}).update(figures)


# The fuzz profiles: the default one runs in `make test` (reproducible: the same inputs on
# every run, so a red build is a real regression); MEMSTORE_FUZZ_PROFILE=explore draws
# fresh random inputs, about 24 times as many (1,000 examples against 42), to hunt for new bugs.
settings.register_profile(
    "memstore",
    max_examples=42,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "explore", parent=settings.get_profile("memstore"), max_examples=1000, derandomize=False
)
#: The settings every fuzz test runs with (the profile MEMSTORE_FUZZ_PROFILE names).
fuzz_settings = settings.get_profile(os.environ.get("MEMSTORE_FUZZ_PROFILE", "memstore"))

"""The end-of-run summary of the figures the reliability tests measured."""

from __future__ import annotations

import json

import pytest

from tests.fix_db import ROOT
from tests.reliability import FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Prints the figures of this run and keeps them in .data/reliability-figures.json."""
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for test, figures in sorted(FIGURES.items()):
        text = ", ".join(f"{k}={v}" for k, v in figures.items())
        terminalreporter.write_line(f"{test}: {text}")
    out = ROOT / ".data" / "reliability-figures.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(FIGURES, indent=2, sort_keys=True, default=str) + "\n")

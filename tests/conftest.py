"""Loads the fixture modules every test package shares, and sorts tests into tiers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.citus_cluster import HELD_DROPS

# Before the fixture modules import grpc. The fault tests stop and start an embedded
# PostgreSQL with pg_ctl as another user, so subprocess must fork(); gRPC's fork handlers
# then crashed the child (SIGSEGV in pg_ctl) about one time in six. memstore's own command
# turns them off the same way (server/__main__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Every `memstore serve` a test starts (they inherit this environment) takes a free port for
# Zep's REST API instead of 8000, so servers of concurrent runs never collide there; a test
# that talks HTTP passes --http-port itself.
os.environ.setdefault("MEMSTORE_HTTP_PORT", "0")
# A run started in the background by a shell script (a CI job: `.ci/run ... &`) inherits
# SIGINT ignored, and so would every memstore process a test starts, which Python then leaves
# ignored: the Ctrl-C tests (tests/test_ctrl_c.py) would wait for a signal that never lands.
# A Python handler here becomes the default disposition in each child, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = (
    "tests.fix_db",
    "tests.fix_grpc",
    "tests.fix_security",
    "tests.fix_faults",
    "tests.fix_proxy",
    "tests.fix_rest",
)

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks tests/unit `unit` (no database, no process) and every other test `integration`."""
    for item in items:
        unit = item.path.is_relative_to(UNIT)
        item.add_marker(pytest.mark.unit if unit else pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Names the sessions that held a scratch database past a drop (tests/citus_cluster.py,
    drop_forced), if any did."""
    if HELD_DROPS:
        terminalreporter.section("scratch databases held past a drop")
        for line in HELD_DROPS:
            terminalreporter.write_line(line)

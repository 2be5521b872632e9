"""Loads the fixture modules every test package shares, and sorts tests into tiers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before the fixture modules import grpc. The fault tests stop and start an embedded
# PostgreSQL with pg_ctl as another user, so subprocess must fork(); gRPC's fork handlers
# then crashed the child (SIGSEGV in pg_ctl) about one time in six. memstore's own command
# turns them off the same way (server/__main__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# Every `memstore serve` a test starts (they inherit this environment) takes a free port for
# Zep's REST API instead of 8000, so servers of concurrent runs never collide there; a test
# that talks HTTP passes --http-port itself.
os.environ.setdefault("MEMSTORE_HTTP_PORT", "0")

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

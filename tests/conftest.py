"""Loads the fixture modules every test package shares."""

from __future__ import annotations

import os

# Before the fixture modules import grpc. The fault tests stop and start an embedded
# PostgreSQL with pg_ctl as another user, so subprocess must fork(); gRPC's fork handlers
# then crashed the child (SIGSEGV in pg_ctl) about one time in six. memstore's own command
# turns them off the same way (server/__main__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

pytest_plugins = (
    "tests.fix_db",
    "tests.fix_grpc",
    "tests.fix_security",
    "tests.fix_faults",
)

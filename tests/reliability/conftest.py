"""Fixtures of the reliability tests, and the summary of the figures they measured."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg import conninfo as pg_conninfo

from server.config import Config
from server.serving.app import build_server
from server.serving.embedded import EmbeddedPostgres
from server.store import Store
from tests.grpc.conftest import channel, grpc_port, sessions, users
from tests.reliability import FIGURES

# The server and stubs of the end-to-end tests, for these tests too.
__all__ = ["channel", "grpc_port", "sessions", "users"]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def restartable() -> EmbeddedPostgres:
    """An embedded PostgreSQL of the fault tests' own, which they stop and start.

    Never the run's shared server (nor the one DATABASE_URL names), so these tests run
    unchanged against an external PostgreSQL. The same data folder as tests/store's
    restart test: one server started for both.
    """
    return EmbeddedPostgres(ROOT / ".data" / "test-restart-pg")


@pytest.fixture
def fault_url(restartable: EmbeddedPostgres) -> str:
    """The URL of a fresh database on the restartable server."""
    with psycopg.connect(restartable.url("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS fault_test WITH (FORCE)")
        conn.execute("CREATE DATABASE fault_test")
    params = pg_conninfo.conninfo_to_dict(restartable.url("postgres"))
    params["dbname"] = "fault_test"
    return pg_conninfo.make_conninfo(**params)


@pytest.fixture
async def fault_store(fault_url: str) -> AsyncIterator[Store]:
    """A migrated store over fault_url."""
    store = await Store.open(fault_url, min_size=2, max_size=6, timeout=3)
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
async def fault_channel(fault_store: Store) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server of its own over fault_store."""
    server, port = await build_server(Config(host="127.0.0.1", port=0), fault_store)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


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

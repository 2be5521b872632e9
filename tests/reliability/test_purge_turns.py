"""One purge at a time per database, and one periodic purge per interval, whichever of its
servers and workers runs it: each process of a database ran its own purge every interval,
all of them at once against the same rows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.config import Config
from server.domain import PurgeReport
from server.errors import Unavailable
from server.serving.purge import OUTCOMES, PurgeMetrics, purge_once
from server.store import Store
from server.store import purge as purge_module
from server.store.queries import query
from tests.fix_db import scalar
from tests.processes import free_port, serve_memstore, stop_memstore

RETENTION = timedelta(days=7)
#: The statements of a purge's first batch, on plain PostgreSQL and on Citus.
FIRST_BATCH = {"purge_messages", "purge_messages_in_shard"}
#: The purge lock's key, as the store takes it.
_KEY = int(re.findall(r"\d+", str(query("try_lock_purge").as_string()))[0])
#: Sessions of this database that hold the purge lock now.
PURGE_LOCK_HOLDERS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    f" AND ((classid::bigint << 32) | objid::bigint) = {_KEY}"
)


def _seed(url: str, prefix: str, sessions: int) -> None:
    """Soft-deleted sessions of two messages each, deleted 8 days ago (past RETENTION)."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO sessions (project_id, session_id, deleted_at, next_sequence)"
            " SELECT 1, %s || i, now() - interval '8 days', 3 FROM generate_series(1, %s) i",
            [prefix, sessions],
        )
        conn.execute(
            "INSERT INTO messages (project_id, session_id, sequence, content, deleted_at)"
            " SELECT 1, %s || i, j, 'old', now() - interval '8 days'"
            " FROM generate_series(1, %s) i, generate_series(1, 2) j",
            [prefix, sessions],
        )


@pytest.fixture
async def replica(clean_db: str) -> AsyncIterator[Store]:
    """A second store of the test's database: another server's pool."""
    other = await Store.open(clean_db, min_size=1, max_size=4)
    await other.require_migrated()  # reads what the database is (Citus or not)
    yield other
    await other.close()


def _pause_first_batch(
    monkeypatch: pytest.MonkeyPatch,
    pause: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]],
) -> asyncio.Event:
    """Makes the next purge run `pause(conn)` before its first batch; set once it has."""
    paused = asyncio.Event()
    fetch_one = purge_module.fetch_one

    async def pausing(conn: psycopg.AsyncConnection[Any], name: Any, params: Any) -> Any:
        if name in FIRST_BATCH and not paused.is_set():
            paused.set()
            await pause(conn)
        return await fetch_one(conn, name, params)

    monkeypatch.setattr(purge_module, "fetch_one", pausing)
    return paused


async def test_one_purge_at_a_time_across_servers_and_one_per_interval(
    store: Store, replica: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await asyncio.to_thread(_seed, clean_db, "expired-", 3)
    release = asyncio.Event()

    async def held(conn: psycopg.AsyncConnection[Any]) -> None:
        await release.wait()

    paused = _pause_first_batch(monkeypatch, held)
    first = asyncio.create_task(store.purge_if_due(RETENTION, due_after=3600))
    try:
        await asyncio.wait_for(paused.wait(), 20)
        # The first server's purge holds the database's turn (its lock, on the coordinator
        # under Citus): the other's periodic run skips, `memstore purge` waits for its end.
        assert await scalar(clean_db, PURGE_LOCK_HOLDERS) == 1
        assert await replica.purge_if_due(RETENTION, due_after=3600) == "other_holder"
        on_demand = asyncio.create_task(replica.purge(RETENTION))
        await asyncio.sleep(1.5)
        assert not on_demand.done()
    finally:
        release.set()
    report = await asyncio.wait_for(first, 20)
    assert isinstance(report, PurgeReport)
    assert (report.sessions, report.messages) == (3, 6)
    # The on-demand purge ran after it: nothing left to remove.
    after = await asyncio.wait_for(on_demand, 20)
    assert (after.sessions, after.messages) == (0, 0)
    # A purge started within the interval (the on-demand one): no periodic run is due, on
    # either server; with no interval to wait, one runs again.
    await asyncio.to_thread(_seed, clean_db, "later-", 2)
    assert await store.purge_if_due(RETENTION, due_after=3600) == "recent"
    assert await replica.purge_if_due(RETENTION, due_after=3600) == "recent"
    again = await replica.purge_if_due(RETENTION, due_after=0)
    assert isinstance(again, PurgeReport) and again.sessions == 2
    assert await scalar(clean_db, PURGE_LOCK_HOLDERS) == 0


async def test_a_purge_cancelled_mid_statement_gives_its_turn_back(
    store: Store, replica: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server stopping while it purges (its task cancelled inside a statement): the lock
    # must not stay with the pooled connection, or no process of the database purges again.
    await asyncio.to_thread(_seed, clean_db, "expired-", 2)

    async def sleeping(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT pg_sleep(60)")

    paused = _pause_first_batch(monkeypatch, sleeping)
    purging = asyncio.create_task(store.purge_if_due(RETENTION, due_after=3600))
    await asyncio.wait_for(paused.wait(), 20)
    await asyncio.sleep(0.2)  # inside pg_sleep
    purging.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(purging, 20)
    assert await scalar(clean_db, PURGE_LOCK_HOLDERS) == 0
    report = await replica.purge_if_due(RETENTION, due_after=0)
    assert isinstance(report, PurgeReport) and report.sessions == 2
    # The cancelled server's pool serves on.
    assert await store.purge_if_due(RETENTION, due_after=0) == PurgeReport(
        details={"messages": 0, "sessions": 0, "session_messages": 0}
    )


async def test_every_outcome_of_a_periodic_run_is_counted(
    store: Store, replica: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await asyncio.to_thread(_seed, clean_db, "expired-", 2)
    registry = CollectorRegistry()
    metrics = PurgeMetrics(registry)
    config = Config(purge_interval=3600)
    assert await purge_once(config, store, metrics) == "ok"
    assert await purge_once(config, replica, metrics) == "skipped_recent"
    # Any session holding the lock (an operator's, a purge of another version) holds the turn.
    async with await psycopg.AsyncConnection.connect(clean_db, autocommit=True) as holder:
        await holder.execute(f"SELECT pg_advisory_lock({_KEY})")
        due = Config(purge_interval=1)  # due: the last run started more than 0.9 s ago
        await asyncio.sleep(1)
        assert await purge_once(due, replica, metrics) == "skipped_other_holder"

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("database unavailable: down for the test")

    monkeypatch.setattr(replica, "purge_if_due", down)
    assert await purge_once(config, replica, metrics) == "error"
    sample = registry.get_sample_value
    for outcome in OUTCOMES:
        assert sample("memstore_purge_runs_total", {"outcome": outcome}) == 1, outcome
    rows = {
        (table, kind): sample("memstore_purge_rows_total", {"table": table, "kind": kind})
        for table, kind in (
            ("sessions", "expired"),
            ("messages", "expired"),
            ("messages", "of_purged_session"),
        )
    }
    assert rows == {
        ("sessions", "expired"): 2,
        ("messages", "expired"): 4,
        ("messages", "of_purged_session"): 0,
    }
    assert sample("memstore_purge_duration_seconds_count", {}) == 2  # the ok and error runs
    last = sample("memstore_purge_last_success_timestamp_seconds", {})
    assert last is not None and time.time() - 60 < last <= time.time()


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The purge's samples on a metrics endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("memstore_purge")
        for s in family.samples
    }


def _runs(samples: dict[Any, float], outcome: str) -> float:
    return samples.get(("memstore_purge_runs_total", (("outcome", outcome),)), 0.0)


def _scrape_all(ports: list[int]) -> list[dict[Any, float]]:
    return [_scrape(p) for p in ports]


def _wait_for_scrapes(ports: list[int], ready: Callable[[list[dict[Any, float]]], bool]) -> Any:
    deadline = time.monotonic() + 60
    while True:
        try:
            scraped = _scrape_all(ports)
            if ready(scraped):
                return scraped
        except OSError:
            pass
        assert time.monotonic() < deadline, "the servers' purges did not run"
        time.sleep(0.2)


def _two_free_ports() -> int:
    """A loopback port that is free, and so is the next one (one per worker)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _removed_lines(output: str) -> list[dict[str, Any]]:
    """The JSON log records of purge runs that ran."""
    records = [json.loads(line) for line in output.splitlines()]
    return [r for r in records if r["message"].startswith("purge removed ")]


def test_servers_and_workers_of_one_database_purge_in_turn(clean_db: str) -> None:
    # Two workers of one server and a second server (three processes), each asked to purge
    # every second: together they purge about once a second, not three times; when the
    # first server stops, the second goes on purging; each run is counted and logged.
    env = {**os.environ, "DATABASE_URL": clean_db}
    common = ("--purge-interval", "1", "--embedder", "none", "--metrics-host", "127.0.0.1")
    workers_port = _two_free_ports()
    first, _ = serve_memstore(
        *common, "--workers", "2", "--metrics-port", str(workers_port), env=env
    )
    second: subprocess.Popen[str] | None = None
    try:
        second_port = free_port()
        second, _ = serve_memstore(*common, "--metrics-port", str(second_port), env=env)
        ports = [workers_port, workers_port + 1, second_port]
        # Every process has had its turn come up (each ran or skipped at least twice).
        _wait_for_scrapes(ports, lambda s: all(sum(_runs(x, o) for o in OUTCOMES) >= 2 for x in s))
        start = time.monotonic()
        before = _scrape_all(ports)
        time.sleep(6)
        after = _scrape_all(ports)
        window = time.monotonic() - start
        ran, skipped = (
            sum(
                _runs(a, o) - _runs(b, o) for a, b in zip(after, before, strict=True) for o in kinds
            )
            for kinds in (("ok",), ("skipped_recent", "skipped_other_holder"))
        )
        # A run is due 0.9 s after the last one started (purge.due_after): at most one per
        # 0.9 s over the window, where three processes purging on their own ran ~3 a second.
        assert 2 <= ran <= window / 0.9 + 1, (ran, window, after)
        assert skipped >= ran, (skipped, ran)
        assert all(_runs(a, "error") == 0 for a in after), after
        code, first_out = stop_memstore(first)
        assert code == 0, first_out
        # The second server alone purges what expires now, and counts it.
        expired = ("memstore_purge_rows_total", (("kind", "expired"), ("table", "sessions")))
        base = _scrape(second_port)[expired]
        seeded_at = time.time()
        _seed(clean_db, "late-", 4)
        last = _wait_for_scrapes([second_port], lambda s: s[0][expired] - base == 4)[0]
        assert last[("memstore_purge_last_success_timestamp_seconds", ())] >= seeded_at
        assert last[("memstore_purge_duration_seconds_count", ())] >= 1
    finally:
        if first.poll() is None:
            stop_memstore(first)
        if second is not None:
            code, second_out = stop_memstore(second)
    assert code == 0, second_out
    # A line per run that ran, with what it removed and how long it took.
    removed = _removed_lines(second_out)
    assert any(
        re.fullmatch(r'purge removed \{.*"sessions": 4\} in [\d.]+s', r["message"]) for r in removed
    ), removed
    assert len(_removed_lines(first_out)) + len(removed) >= 2

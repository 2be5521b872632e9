"""The embedded PostgreSQL `make run` starts when DATABASE_URL is unset: stopped with the last
memstore process that holds it, even after one was killed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from server.serving.embedded import EmbeddedPostgres
from tests.fix_db import ROOT


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under the checkout, as the other embedded servers of the tests: the server runs as a
    # user of its own when memstore runs as root, and must reach its directory.
    path = ROOT / ".data" / "test-holders-pg"
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    yield path
    # A server the test failed to see stopped is stopped here (fast shutdown), not orphaned.
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((path / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        time.sleep(1)
    shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}").stat()
    except FileNotFoundError:
        return False
    return True


def test_a_holder_killed_earlier_no_longer_keeps_postgresql_running(data_dir: Path) -> None:
    # A memstore killed (SIGKILL, or a signal before it handles signals) stayed listed as a
    # holder of the server, so every later clean stop left PostgreSQL running, for good.
    EmbeddedPostgres(data_dir).stop()  # made, then stopped: its list of holders is empty
    gone = subprocess.Popen(["true"])
    gone.wait()
    (data_dir / ".handle_pids.json").write_text(json.dumps([gone.pid]))
    pg = EmbeddedPostgres(data_dir)
    pid = pg.pid
    assert pid is not None and _running(pid)
    pg.stop()
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid), "the embedded PostgreSQL outlived its last holder"


def test_a_lock_file_whose_pid_another_process_took_does_not_block_the_start(
    data_dir: Path,
) -> None:
    # A machine or container stopped without a clean shutdown leaves postmaster.pid; after a
    # restart its pid is often another process's (in a container, often memstore's own). The
    # wheel took the server for running and PostgreSQL refused to start: memstore never
    # started again.
    pg = EmbeddedPostgres(data_dir)
    left = (data_dir / "postmaster.pid").read_text()
    pg.stop()
    deadline = time.monotonic() + 30
    while (data_dir / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    squatter = subprocess.Popen(["sleep", "60"])
    try:
        _, rest = left.split("\n", 1)
        (data_dir / "postmaster.pid").write_text(f"{squatter.pid}\n{rest}")
        pg = EmbeddedPostgres(data_dir)
        try:
            assert pg.pid not in (None, squatter.pid)
            with psycopg.connect(pg.url(), connect_timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            pg.stop()
        assert squatter.poll() is None, "the process that took the pid was left alone"
    finally:
        squatter.kill()
        squatter.wait()

"""A `memstore serve` process with Zep's REST API on, and the SDK virtualenvs that drive it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import Config
from server.serving.app import build_http
from server.serving.metrics import Metrics
from server.store import Store
from tests.processes import ROOT, free_port, serve_memstore, stop_memstore

#: Each SDK in a virtualenv of its own (their pins conflict): `make test` builds them from
#: tests/rest/sdks/NAME.txt (the Makefile target `sdks`).
SDK_VENVS = ROOT / ".venv" / "sdks"
DRIVERS = Path(__file__).resolve().parent / "rest" / "drivers"


@dataclass(frozen=True)
class ZepServer:
    """A served memstore: its REST base URL (Zep's `base_url`) and gRPC port."""

    base_url: str
    grpc_port: int
    database_url: str


@pytest.fixture(scope="session")
def zep_server(database_url: str) -> Iterator[ZepServer]:
    """`memstore serve` over the run's database with the REST API on a free port."""
    http_port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "MEMSTORE_LOG_LEVEL": "WARNING"}
    proc, port = serve_memstore(
        "--http-port", str(http_port), "--no-embedding-worker", "--purge-interval", "0", env=env
    )
    try:
        yield ZepServer(f"http://127.0.0.1:{http_port}", port, database_url)
    finally:
        stop_memstore(proc)


@pytest.fixture
def zep(zep_server: ZepServer, clean_db: str) -> ZepServer:
    """The served memstore; the data tables are empty when the test starts."""
    return zep_server


def run_sdk(sdk: str, scenario: str, base_url: str, *args: str) -> object:
    """Runs `scenario` of tests/rest/drivers/SDK.py in that SDK's virtualenv; returns what
    it printed last (JSON). Its assertions fail the calling test with their traceback."""
    python = SDK_VENVS / sdk / "bin" / "python"
    assert python.exists(), f"{python} is missing: run `make sdks` (make test does)"
    run = subprocess.run(
        [str(python), str(DRIVERS / f"{sdk}.py"), scenario, base_url, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert run.returncode == 0, f"{sdk} {scenario} failed:\n{run.stdout}\n{run.stderr}"
    lines = run.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


@contextlib.asynccontextmanager
async def rest_server(store: Store, metrics: Metrics | None = None) -> AsyncIterator[str]:
    """An in-process REST server over `store` (no embedder: words only); yields its base URL."""
    server = await build_http(
        Config(host="127.0.0.1", http_port=0, embedder="none"), store, metrics or Metrics()
    )
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop(None)

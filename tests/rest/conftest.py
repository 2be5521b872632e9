"""The in-process REST server and client every module of tests/rest talks to."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from server.serving.metrics import Metrics
from server.store import Store
from tests.fix_rest import rest_server


@pytest.fixture(scope="module")
async def metrics() -> Metrics:
    """The module's server's metrics, which a test reads back."""
    return Metrics()


@pytest.fixture(scope="module")
async def base_url(store: Store, metrics: Metrics) -> AsyncIterator[str]:
    """An in-process REST server over the run's store (no embedder: words only); a test may
    patch the store's methods to watch or fail its reads."""
    async with rest_server(store, metrics) as url:
        yield url


@pytest.fixture
async def http(base_url: str, clean_db: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of that server; the data tables are empty when the test starts."""
    # 60 s: a user of 3000 sessions is answered whole (test_user_sessions).
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        yield client

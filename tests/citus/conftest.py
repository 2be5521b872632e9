"""The Citus cluster the tests of this package run on: `make test-citus`'s, or one of their own.

Under `make test-citus` (tests/citus_cluster.py run) the run's database already spans a
cluster. Run alone (plain `make test`), these tests start a three-node cluster themselves when
Citus is installed into the machine's PostgreSQL 15, and skip, saying why, when it is not.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from server.store import Store
from tests.citus_cluster import citus_missing, cluster, cluster_workers
from tests.fix_db import scratch_database


@pytest.fixture(scope="session")
def citus_nodes() -> Iterator[tuple[str, list[str]]]:
    """The running Citus cluster: its coordinator's maintenance URL and its workers'
    host:port (`make test-citus`'s, or one started for this run)."""
    workers = cluster_workers()
    if workers:
        yield os.environ["DATABASE_URL"], workers
        return
    reason = citus_missing()
    if reason is not None:
        pytest.skip(f"Citus suite skipped: {reason}")
    with cluster() as (coordinator, nodes):
        yield coordinator.url(), [f"127.0.0.1:{w.port}" for w in nodes]


@pytest.fixture(scope="session")
def citus_url(citus_nodes: tuple[str, list[str]]) -> Iterator[str]:
    """A migrated-to-be database on a running Citus cluster (coordinator + two workers)."""
    server_url, _ = citus_nodes
    if cluster_workers():
        with scratch_database(server_url, "memstore_citus") as url:
            yield url
        return
    # A cluster of this run's own: its maintenance database spans it already.
    yield server_url


@pytest.fixture(scope="session")
async def citus_store(citus_url: str) -> AsyncIterator[Store]:
    """A store over the cluster, migrated (so its tables are distributed)."""
    st = await Store.open(citus_url, min_size=1, max_size=4)
    await st.migrate()
    yield st
    await st.close()

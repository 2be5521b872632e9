"""Store: snapshots held for a backup (server/store/snapshots.py) — released from any process
of the database, bounded per process, and released when the store closes.

Plain PostgreSQL only: on Citus open_snapshot refuses (tests/citus/test_invariants.py).
"""

from __future__ import annotations

import asyncio

import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.errors import FailedPrecondition, ResourceExhausted
from server.store import Store
from server.store import snapshots as snapshots_module


async def _read_in(store: Store, snapshot: str) -> list[str]:
    page = await store.export_sessions(P, None, 10, snapshot=snapshot)
    return [s.session_id for s in page.items]


async def test_another_process_closes_a_snapshot_and_the_reads_in_it_say_it_is_gone(
    store: Store, database_url: str, clean_db: str
) -> None:
    other = await Store.open(database_url, min_size=1, max_size=2)
    try:
        snapshot, _ = await other.open_snapshot(P, 60)
        await store.create_session(P, "later", None, {})
        assert await _read_in(store, snapshot) == []  # made after the snapshot
        assert await store.close_snapshot(P, snapshot)  # held by `other`, closed from here
        with pytest.raises(FailedPrecondition) as gone:
            await _read_in(store, snapshot)
        assert gone.value.reason == "SNAPSHOT_GONE"
        # Another project's key cannot close it either: it names the project's snapshots only.
        kept, _ = await other.open_snapshot(P, 60)
        assert not await store.close_snapshot(P + 1, kept)
        assert await _read_in(store, kept) == ["later"]
    finally:
        await other.close()
    # Closing the store released what it held.
    with pytest.raises(FailedPrecondition):
        await _read_in(store, kept)


async def test_a_process_holds_a_bounded_number_of_snapshots(
    store: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots_module, "MAX_HELD_SNAPSHOTS", 2)
    first, _ = await store.open_snapshot(P, 1)
    second, _ = await store.open_snapshot(P, 60)
    with pytest.raises(ResourceExhausted) as refused:
        await store.open_snapshot(P, 60)
    assert refused.value.reason == "TOO_MANY_SNAPSHOTS"
    await asyncio.sleep(1.5)  # the first one's hold passes: PostgreSQL ends it
    third, _ = await store.open_snapshot(P, 60)
    assert await _read_in(store, third) == []
    for snapshot in (second, third):
        assert await store.close_snapshot(P, snapshot)
    assert not await store.close_snapshot(P, first)

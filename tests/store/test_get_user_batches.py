"""GetUser calls coalesced into shared statements still answer each caller exactly."""

from __future__ import annotations

import asyncio

import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.errors import NotFound
from server.store import Store


async def test_concurrent_get_user_calls_each_get_their_own_user(
    store: Store, clean_db: str
) -> None:
    for i in range(20):
        await store.create_user(P, f"u{i}", f"u{i}@example.com", "", "", {"n": i})
    await store.create_session(P, "s1", "u3", {})
    ids = [f"u{i % 20}" for i in range(60)]
    users = await asyncio.gather(*(store.get_user(P, uid) for uid in ids))
    assert [u.user_id for u in users] == ids
    assert [u.metadata for u in users] == [{"n": i % 20} for i in range(60)]
    assert {u.user_id: u.session_count for u in users}["u3"] == 1
    # A missing id fails only its own call, not the others of its batch.
    results = await asyncio.gather(
        store.get_user(P, "u1"), store.get_user(P, "nobody"), return_exceptions=True
    )
    assert getattr(results[0], "user_id", None) == "u1"
    assert isinstance(results[1], NotFound)
    with pytest.raises(NotFound):
        await store.get_user(P, "nobody")

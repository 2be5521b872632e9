"""GetMemory calls coalesced into shared statements, those without recall among them."""

from __future__ import annotations

import asyncio

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.store import Store

# What a GetMemory asks of the store beside its session and lastn (server/search/service.py).
RECALL = {"window": 6, "model": "any-model", "budget": None}


def _said(text: str) -> list[NewMessage]:
    return [NewMessage(role="speaker", role_type="user", content=text, metadata={})]


async def test_get_memory_without_recall_shares_one_round_trip(store: Store, clean_db: str) -> None:
    # An agent that keeps its own memories asks for none (relevant_limit 0): its calls share
    # one statement, as those with recall do, rather than a round trip each. Under Citus each
    # reads its own session's shard, alone.
    await store.create_user(P, "ann", "", "", "", {})
    for i in range(20):
        await store.add_memory(P, f"s{i}", "ann" if i % 2 else None, _said(f"line {i}"))
    before = store.pool_stats().get("requests_num", 0)
    found = await asyncio.gather(
        *(
            store.get_memory_with_recall(P, f"s{i}", 1 + i % 3, limit=0, **RECALL)
            for i in range(20)
        ),
        store.get_memory_with_recall(P, "nobody", 5, limit=0, **RECALL),
    )
    requests = store.pool_stats().get("requests_num", 0) - before
    if store.citus:
        assert requests >= 21, requests
    else:
        assert requests <= 2, requests  # (a health check may borrow one meanwhile)
    for i, (session, messages, relevant, cut, relevant_cut, unavailable) in enumerate(found[:20]):
        assert session is not None and session.session_id == f"s{i}"
        assert session.user_id == ("ann" if i % 2 else None)
        assert [m.content for m in messages] == [f"line {i}"]
        assert relevant == [] and not cut and not relevant_cut and not unavailable
    assert found[20] == (None, [], [], False, False, False)


async def test_calls_with_and_without_recall_in_one_batch_each_get_their_own_answer(
    store: Store, clean_db: str
) -> None:
    await store.create_user(P, "bo", "", "", "", {})
    for i in range(6):
        await store.add_memory(P, f"b{i}", "bo", _said(f"bo bakes rye bread {i}"))
    asks = [(f"b{i}", 1 + i % 2, i % 3) for i in range(6)]
    alone = [
        await store.get_memory_with_recall(P, s, lastn, limit=limit, **RECALL)
        for s, lastn, limit in asks
    ]
    together = await asyncio.gather(
        *(
            store.get_memory_with_recall(P, s, lastn, limit=limit, **RECALL)
            for s, lastn, limit in asks
        )
    )
    assert together == alone
    assert all(r.relevant == [] for r in together[::3])  # relevant_limit 0

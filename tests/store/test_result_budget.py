"""Store: SearchMemory's results and GetMemory's memories are read up to a byte budget.

Both were read whole before the answer was measured: a limit (relevant_limit) of 100 messages
of 1 MiB was 100 MiB of content read from PostgreSQL to be refused past 17 MiB. With a budget,
the ranking statements stop where the rows before one hold the budget's bytes of content (the
best row is always read) and say that they stopped (`cut`).
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, SearchQuery, SearchType
from server.store import Store
from server.store.search import RECALL_KEEP

#: One memory: "needle" and a word too long for full-text search to index, 300,007 bytes of
#: UTF-8 (é is two). All rank alike, so the newest (the highest sequence) come first.
CONTENT = "needle " + "é" * 150_000
SIZE = len(CONTENT.encode())
#: Before the 5th row the content read is 1,200,028 bytes, past 1 MiB: 4 rows are read.
MIB = 1 << 20
MEMORIES = 10


async def _seed(store: Store) -> None:
    await store.create_user(P, "u", "", "", "", {})
    said = [NewMessage("speaker", "user", CONTENT, {}) for _ in range(MEMORIES)]
    await store.add_memory(P, "old", "u", said)
    await store.add_memory(P, "now", "u", [NewMessage("speaker", "user", "needle?", {})])


async def test_search_stops_reading_its_results_at_the_byte_budget(
    store: Store, clean_db: str
) -> None:
    await _seed(store)

    async def search(
        limit: int, budget: int | None, kind: SearchType = "full_text"
    ) -> tuple[list[int], bool]:
        query = SearchQuery(text="needle", search_type=kind, limit=limit, session_ids=("old",))
        vector = [1.0, 0.0, 0.0] if kind != "full_text" else None
        found, _, cut = await store.search_messages(
            P, query, vector=vector, model="m", limit=limit, depth=40, budget=budget
        )
        return [r.message.sequence for r, _ in found], cut

    newest = list(range(MEMORIES, 0, -1))
    assert await search(10, None) == (newest, False)
    assert await search(10, 1 << 40) == (newest, False)
    assert await search(10, MIB) == (newest[:4], True)
    assert await search(4, MIB) == (newest[:4], False)  # no row of the limit left out
    assert await search(3, MIB) == (newest[:3], False)
    assert await search(10, 1) == (newest[:1], True)  # the best is always read
    assert await search(10, 3 * SIZE) == (newest[:3], True)  # before the 4th: 3 * SIZE
    assert await search(10, 3 * SIZE + 1) == (newest[:4], True)
    if store.vectors:
        # Hybrid over messages not embedded yet ranks them by words alone; semantic finds none.
        assert await search(10, MIB, "hybrid") == (newest[:4], True)
        assert await search(10, None, "hybrid") == (newest, False)
        assert await search(10, MIB, "semantic") == ([], False)


async def _recall(
    store: Store, limit: int, budget: int | None, model: str | None = "any-model"
) -> tuple[list[int], bool]:
    found = await store.get_memory_with_recall(
        P, "now", 6, limit=limit, window=6, model=model, budget=None, relevant_budget=budget
    )
    assert [m.content for m in found.messages] == ["needle?"] and not found.cut
    assert all(r.message.session_id == "old" for r in found.relevant)
    return [r.message.sequence for r in found.relevant], found.relevant_cut


@pytest.mark.parametrize("model", ["any-model", None])
async def test_ranked_recall_stops_reading_its_memories_at_the_byte_budget(
    store: Store, clean_db: str, model: str | None
) -> None:
    # Nothing kept (and a relevant_limit past what the worker keeps): ranked on the request
    # path, by words (and the recall vector, where the session has one).
    await _seed(store)
    newest = list(range(MEMORIES, 0, -1))
    limit = RECALL_KEEP + 10
    assert await _recall(store, limit, None, model) == (newest, False)
    assert await _recall(store, limit, MIB, model) == (newest[:4], True)
    assert await _recall(store, limit, 1, model) == (newest[:1], True)
    assert await _recall(store, 4, MIB, model) == (newest[:4], False)


async def test_kept_recall_stops_reading_its_memories_at_the_byte_budget(
    store: Store, clean_db: str
) -> None:
    # As the worker keeps it: the memories' keys, best first (here the oldest first, so the
    # order read is the kept one, not the ranking's).
    await _seed(store)
    kept = {
        "project_id": P,
        "session_id": "now",
        "recall_sessions": ["old"] * MEMORIES,
        "recall_sequences": list(range(1, MEMORIES + 1)),
        "recall_scores": [1.0 - i / 100 for i in range(MEMORIES)],
    }
    with psycopg.connect(clean_db, autocommit=True) as conn:
        if store.vectors:
            conn.execute(
                "INSERT INTO session_embeddings (project_id, session_id, model, embedding,"
                " through_sequence, recall_sessions, recall_sequences, recall_scores)"
                " VALUES (%(project_id)s, %(session_id)s, 'any-model', '[1,0,0]', 1,"
                " %(recall_sessions)s, %(recall_sequences)s, %(recall_scores)s)",
                kept,
            )
        else:
            assert store.word_recall
            conn.execute(
                "INSERT INTO session_word_recall (project_id, session_id, recall_sessions,"
                " recall_sequences, recall_scores) VALUES (%(project_id)s, %(session_id)s,"
                " %(recall_sessions)s, %(recall_sequences)s, %(recall_scores)s)",
                kept,
            )
    oldest = list(range(1, MEMORIES + 1))
    assert await _recall(store, RECALL_KEEP, None) == (oldest, False)
    assert await _recall(store, RECALL_KEEP, MIB) == (oldest[:4], True)
    assert await _recall(store, RECALL_KEEP, 1) == (oldest[:1], True)
    assert await _recall(store, 4, MIB) == (oldest[:4], False)
    # Concurrent calls with a budget and without share a statement (plain PostgreSQL) and
    # each is read up to its own.
    together = await asyncio.gather(
        _recall(store, RECALL_KEEP, None), _recall(store, RECALL_KEEP, 1), _recall(store, 3, None)
    )
    assert together == [(oldest, False), (oldest[:1], True), (oldest[:3], False)]

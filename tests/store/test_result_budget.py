"""Store: SearchMemory's results and GetMemory's memories are read up to a byte budget.

Both were read whole before the answer was measured: a limit (relevant_limit) of 100 messages
of 1 MiB was 100 MiB of content read from PostgreSQL to be refused past 17 MiB. With a budget,
the ranking statements stop where the rows before one hold the budget's bytes of content (the
best row is always read) and say that they stopped (`cut`).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, SearchQuery, SearchType, SessionQuery
from server.errors import FailedPrecondition
from server.search.ranking import mmr, mmr_order
from server.search.service import Searcher
from server.store import Store
from server.store import search as search_store
from server.store.recall import RECALL_KEEP

#: One memory: "needle" and a word too long for full-text search to index, 300,007 bytes of
#: UTF-8 (é is two). All rank alike, so the newest (the highest sequence) come first.
CONTENT = "needle " + "é" * 150_000
#: A memory's bytes as the budget counts them: its content and its metadata, "{}" as printed.
SIZE = len(CONTENT.encode()) + len("{}")
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


#: A row of a list: 60,000 characters of metadata, which PostgreSQL compresses to a few
#: hundred bytes on disk (so its stored size says nothing of the answer's).
_META = {"t": "x" * 60_000}
_ROW = len('{"t": ""}') + 60_000
_ROWS = 8


async def _seed_rows(store: Store) -> None:
    await store.create_user(P, "owner", "", "", "", {})
    for i in range(_ROWS):
        await store.create_user(P, f"u{i}", "", "", "", _META)
        await store.create_session(P, f"s{i}", "owner", _META)


async def test_lists_of_users_and_sessions_stop_reading_at_the_byte_budget(
    store: Store, clean_db: str
) -> None:
    # They were read whole and measured after: ListUsers' (ListSessions') page of 1,000 rows
    # of 64 KiB of metadata was 64 MB parsed by the server to be refused past 17 MiB. With a
    # budget a row is read only while the rows before it hold less than the budget's bytes of
    # metadata as printed (and ids): 3 rows of _ROW (and their ids) before the 4th.
    # ExportSessions' batches likewise: sized by the rows measured so far, a batch of 1,000
    # sessions of 60 KB after small ones was read whole.
    await _seed_rows(store)
    budget = 3 * _ROW + 100

    async def users(limit: int, cut_at: int | None) -> tuple[int, bool, bool]:
        page = await store.list_user_records(P, None, limit, budget=cut_at)
        return len(page.items), page.has_more, page.cut

    async def sessions(limit: int, cut_at: int | None) -> tuple[int, bool, bool]:
        page = await store.list_sessions(P, SessionQuery(), None, 0, limit, budget=cut_at)
        assert all(s.metadata == _META for s in page.items)
        return len(page.items), page.has_more, page.cut

    async def of_user(limit: int, cut_at: int | None) -> tuple[int, bool, bool]:
        page = await store.list_user_sessions(P, "owner", None, limit, budget=cut_at)
        return len(page.items), page.has_more, page.cut

    # The users' page holds "owner" (no metadata) first: one row more, 4 of _ROW after it.
    assert await users(_ROWS, None) == (_ROWS, True, False)
    assert await users(_ROWS + 1, budget) == (5, True, True)
    assert await users(3, budget) == (3, True, False)  # no row of the page left out
    assert await users(_ROWS + 1, 1) == (1, True, True)  # the first is always read
    assert await users(_ROWS + 1, 1 << 40) == (_ROWS + 1, False, False)

    async def exported(limit: int, cut_at: int | None) -> tuple[int, bool, bool]:
        page = await store.export_sessions(P, None, limit, budget=cut_at or 1 << 62)
        assert all(s.metadata == _META for s in page.items)
        return len(page.items), page.has_more, page.cut

    for read in (sessions, of_user, exported):
        assert await read(_ROWS, None) == (_ROWS, False, False)
        assert await read(_ROWS, budget) == (4, True, True)
        assert await read(3, budget) == (3, True, False)
        assert await read(_ROWS, 1) == (1, True, True)
        assert await read(_ROWS, 1 << 40) == (_ROWS, False, False)


async def test_get_memorys_window_counts_its_messages_metadata_against_the_budget(
    store: Store, clean_db: str
) -> None:
    # The window's budget counted content only: lastn 1,000 of messages of "hi" and 60 KB of
    # metadata (compressed on disk to a few hundred bytes) was read whole, 60 MB, to be
    # refused past 17 MiB. Now each message counts its content and its metadata as printed.
    said = [NewMessage("speaker", "user", "hi", _META) for _ in range(_ROWS)]
    await store.add_memory(P, "meta", None, said)

    async def window(lastn: int, budget: int | None) -> tuple[list[int], bool]:
        found = await store.get_memory_with_recall(
            P, "meta", lastn, limit=0, window=6, model=None, budget=budget, relevant_budget=None
        )
        assert all(m.metadata == _META for m in found.messages)
        return [m.sequence for m in found.messages], found.cut

    newest = list(range(_ROWS, 0, -1))
    assert await window(_ROWS, None) == (sorted(newest), False)
    assert await window(_ROWS, 3 * _ROW + 100) == (sorted(newest[:4]), True)
    assert await window(4, 3 * _ROW + 100) == (sorted(newest[:4]), False)
    assert await window(_ROWS, 1) == ([_ROWS], True)  # the newest is always read


async def test_search_and_recall_count_their_results_metadata_against_the_budget(
    store: Store, clean_db: str
) -> None:
    # Their budgets counted content only: SearchMemory's (recall's) limit 100 of messages of
    # a few words and 60 KB of metadata was read whole, 6 MB, and only then measured. Now each
    # result counts its content and its metadata as printed: 4 of 8 within 3 rows and a bit.
    await store.create_user(P, "u", "", "", "", {})
    said = [NewMessage("speaker", "user", "needle x", _META) for _ in range(_ROWS)]
    await store.add_memory(P, "old", "u", said)
    await store.add_memory(P, "now", "u", [NewMessage("speaker", "user", "needle?", {})])
    budget = 3 * _ROW + 100
    newest = list(range(_ROWS, 0, -1))

    async def search(limit: int, cut_at: int | None) -> tuple[list[int], bool]:
        query = SearchQuery(
            text="needle", search_type="full_text", limit=limit, session_ids=("old",)
        )
        found, _, cut = await store.search_messages(
            P, query, vector=None, model="m", limit=limit, depth=40, budget=cut_at
        )
        return [r.message.sequence for r, _ in found], cut

    assert await search(_ROWS, None) == (newest, False)
    assert await search(_ROWS, budget) == (newest[:4], True)
    assert await search(4, budget) == (newest[:4], False)
    limit = RECALL_KEEP + 10
    assert await _recall(store, limit, None, None) == (newest, False)
    assert await _recall(store, limit, budget, None) == (newest[:4], True)


async def test_list_messages_counts_its_messages_metadata_as_printed(
    store: Store, clean_db: str
) -> None:
    # ListMessages' page sized metadata by its stored size: 60 KB of repeated text is stored
    # compressed in a few hundred bytes, so a page of 1,000 such messages was read whole, 60 MB,
    # to be refused past 17 MiB. Now each message counts its content and its metadata as
    # printed: 4 of 8 within 3 rows and a bit.
    said = [NewMessage("speaker", "user", "hi", _META) for _ in range(_ROWS)]
    await store.add_memory(P, "meta", None, said)
    budget = 3 * _ROW + 100

    async def page(limit: int, cut_at: int, after: int | None = None) -> tuple[list[int], bool]:
        found = await store.list_messages(P, "meta", after, limit, budget=cut_at)
        assert all(m.metadata == _META for m in found.items)
        return [m.sequence for m in found.items], found.cut

    oldest = list(range(1, _ROWS + 1))
    assert await page(_ROWS, 1 << 40) == (oldest, False)
    assert await page(_ROWS, budget) == (oldest[:4], True)
    assert await page(3, budget) == (oldest[:3], False)  # no message of the page left out
    assert await page(_ROWS, budget, after=4) == (oldest[4:], False)
    assert await page(_ROWS, 1) == ([1], True)  # the first is always read


class _Embedder:
    """A model for the searcher: every query is the same vector."""

    name = "m"

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0] for _ in texts]


async def test_diversified_search_reads_only_the_chosen_up_to_the_byte_budget(
    store: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SearchMemory with mmr_lambda read its candidates whole, content and metadata (up to
    # 400 of 1 MiB and 64 KiB), before choosing: here 10 of 300 KB, 3 MB, to answer a budget
    # of 1 MiB. Now the candidates come without their values and only the chosen are read,
    # up to the budget: the content read is at most the budget and one row, and it is cut.
    await _seed(store)
    read: list[int] = []
    pipelined = search_store.fetch_pipelined

    async def counting(*args: Any, **kwargs: Any) -> list[list[dict[str, Any]]]:
        found = await pipelined(*args, **kwargs)
        read.append(sum(len((r.get("content") or "").encode()) for rows in found for r in rows))
        return found

    monkeypatch.setattr(search_store, "fetch_pipelined", counting)
    searcher = Searcher(store, _Embedder())
    query = SearchQuery(text="needle", limit=MEMORIES, session_ids=("old",), mmr_lambda=0.5)
    if not store.vectors:
        with pytest.raises(FailedPrecondition):  # diversity needs vectors: refused, nothing read
            await searcher.search(P, query, budget=MIB)
        assert read == []
        return
    outcome = await searcher.search(P, query, budget=MIB)
    assert [r.message.sequence for r in outcome.results] == list(range(MEMORIES, 6, -1))
    assert outcome.cut
    assert sum(read) <= MIB + SIZE, read
    whole = await searcher.search(P, query, budget=None)
    assert [r.message.sequence for r in whole.results] == list(range(MEMORIES, 0, -1))
    assert not whole.cut


async def test_diversified_search_answers_as_when_it_read_its_candidates_whole(
    store: Store, clean_db: str
) -> None:
    # The same choice as before on generated data: candidates read whole and chosen (the old
    # path, search_messages with vectors and mmr) against candidates read without their
    # values, chosen, then read (search_candidates, mmr_order, read_chosen). By words alone
    # where vectors are not kept.
    rng = random.Random(7)
    words = ["red", "green", "blue", "cat", "dog", "sun", "rain", "tea"]
    for s in range(6):
        said = [
            NewMessage("speaker", "user", " ".join(rng.choices(words, k=5)), {"n": i})
            for i in range(30)
        ]
        await store.add_memory(P, f"s{s}", None, said)

    async def embed(texts: list[str]) -> list[list[float]]:
        return [[random.Random(t).uniform(-1, 1) for _ in range(8)] for t in texts]

    while await store.embed_due("m", 100, 6, embed):
        pass
    vector = [rng.uniform(-1, 1) for _ in range(8)] if store.vectors else None
    for text, kind, limit, lam in [
        ("red cat", "hybrid", 10, 0.5),
        ("blue tea sun", "semantic", 5, 0.3),
        ("dog", "hybrid", 20, 0.9),
        ("rain green", "hybrid", 3, 0.0),
    ]:
        query = SearchQuery(text=text, search_type=kind, limit=limit, mmr_lambda=lam)
        shape = {"vector": vector, "model": "m", "limit": 40 if limit < 10 else 4 * limit}
        old, _, _ = await store.search_messages(
            P, query, **shape, depth=shape["limit"], with_vectors=True
        )
        candidates, _ = await store.search_candidates(P, query, **shape, depth=shape["limit"])
        order = mmr_order([c.score for c in candidates], [c.vector for c in candidates], limit, lam)
        for budget in (None, 1 << 40):
            chosen, cut = await store.read_chosen(P, [candidates[i] for i in order], budget=budget)
            assert chosen == mmr(old, limit, lam) and not cut, (text, budget)
        assert len(chosen) == min(limit, len(old)) > 0

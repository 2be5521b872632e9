"""The embedding worker against a remote model that fails on one text (not a refusal): the
rest of the queue is embedded, the text is put off and tried again later, and a model down
for everything gets its batch back whole, at a bounded cost in requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage
from server.search import OpenAIEmbedder
from server.search.embedding import EmbeddingError
from server.search.worker import BATCH_SIZE, EmbeddingWorker
from server.store import Store
from server.store.embeddings import DEFER_SECONDS
from tests.fake_embedder import FakeServer, serving
from tests.fix_db import scalar
from tests.polling import until

MODEL = "test-model"
BAD = "POISON"
#: Seconds until the (one) queued row may be claimed again.
PUT_OFF_FOR = (
    "SELECT extract(epoch FROM leased_until - clock_timestamp())::float8 FROM embedding_queue"
)


def msg(content: str) -> NewMessage:
    return NewMessage(role="kai", role_type="user", content=content, metadata={})


def _posts_with(fake: FakeServer, word: str) -> int:
    return sum(any(word in text for text in body["input"]) for _, body in fake.requests)


async def _no_model_without_pgvector(store: Store, clean_db: str, fake: FakeServer) -> None:
    # Without pgvector the queue feeds recall by words: no model is asked anything.
    assert store.word_recall
    await store.add_memory(P, "pz", None, [msg(f"hello {BAD}"), msg("ordinary")])
    worker = EmbeddingWorker(store, OpenAIEmbedder(fake.url, MODEL, timeout=5, dimensions=3))
    assert await worker.run_once() == 1
    assert fake.requests == []
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0


async def test_a_message_the_model_fails_on_never_holds_back_the_others(
    store: Store, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An audit (llama.cpp-like server answering 500 for one input): the failed batch was
    # given back whole, claimed first again, and failed forever: after 25 s, 6 rows queued,
    # 0 vectors, 8 identical POSTs.
    with serving() as fake:
        fake.fail_on = BAD
        if not store.vectors:
            await _no_model_without_pgvector(store, clean_db, fake)
            return
        ordinary = [msg(f"an ordinary message number {i}") for i in range(5)]
        await store.add_memory(P, "pz", None, [msg(f"hello {BAD} message"), *ordinary])
        worker = EmbeddingWorker(
            store, OpenAIEmbedder(fake.url, MODEL, timeout=5, dimensions=3), idle_seconds=0.02
        )

        async def vectors() -> bool:
            return await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 5

        async def tried_again() -> bool:
            return _posts_with(fake, BAD) > first_tries

        async def put_off_longer() -> bool:
            # As long again as it has waited (~100 s), not the first 30 s.
            return await scalar(clean_db, PUT_OFF_FOR) > 90

        first_tries = 0
        run = asyncio.create_task(worker.run())
        try:
            with caplog.at_level(logging.WARNING):
                assert await until(vectors, within=10), "the others were never embedded"
                await asyncio.sleep(0.5)  # the worker goes on claiming; the bad one heads none
                # The batch, then the half holding it at each halving (6, 3, 2, 1): the
                # claim's order, not the messages', says how many halvings it takes.
                first_tries = _posts_with(fake, BAD)
                assert 3 <= first_tries <= 4, fake.requests
                assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 5
                queued = "SELECT sequence FROM embedding_queue"
                assert await scalar(clean_db, queued) == 1
                put_off = await scalar(clean_db, PUT_OFF_FOR)
                assert DEFER_SECONDS[0] - 5 < put_off <= DEFER_SECONDS[0]
                # Its time passed (as if it had waited 100 s): tried again, put off longer.
                async with await psycopg.AsyncConnection.connect(clean_db) as conn:
                    # Values, not expressions: Citus refuses clock_timestamp() in an UPDATE.
                    waited = datetime.now(UTC) - timedelta(seconds=100)
                    await conn.execute(
                        "UPDATE embedding_queue SET leased_until = NULL, enqueued_at = %s",
                        (waited,),
                    )
                    await conn.commit()
                assert await until(tried_again), "the bad message was never tried again"
                assert await until(put_off_longer), "the bad message was not put off longer"
                assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 1
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    # Logged by its key, with the model's reason, never with its content.
    lines = [r.getMessage() for r in caplog.records if r.name == "server.store.embeddings"]
    assert len(lines) == 2, lines
    for line in lines:
        assert "message 1 of session 'pz'" in line and "HTTP 500" in line, line
        assert BAD not in line and "ordinary" not in line, line


async def test_a_model_down_for_everything_gets_its_batch_back_whole(
    store: Store, clean_db: str
) -> None:
    # An outage is no poisoned message: the batch is not split (n POSTs a try) nor put off.
    with serving() as fake:
        if not store.vectors:
            await _no_model_without_pgvector(store, clean_db, fake)
            return
        await store.add_memory(P, "s", None, [msg(f"text {i}") for i in range(6)])
        worker = EmbeddingWorker(store, OpenAIEmbedder(fake.url, MODEL, timeout=5, dimensions=3))
        given_back = "SELECT count(*) FROM embedding_queue WHERE leased_until IS NULL"
        fake.status = 500  # fails a word too: the batch and the word, then the worker backs off
        with pytest.raises(EmbeddingError, match="HTTP 500"):
            await worker.run_once()
        assert len(fake.requests) == 2
        assert await scalar(clean_db, given_back) == 6
        fake.requests.clear()
        fake.status = 503  # overloaded: says nothing of the texts, so not even the word
        with pytest.raises(EmbeddingError, match="HTTP 503"):
            await worker.run_once()
        assert len(fake.requests) == 1
        assert await scalar(clean_db, given_back) == 6
        fake.status = 200
        assert await worker.run_once() == 6
        assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 6


async def test_one_bad_text_in_a_full_batch_costs_two_posts_per_halving(
    store: Store, clean_db: str
) -> None:
    with serving() as fake:
        fake.fail_on = BAD
        if not store.vectors:
            await _no_model_without_pgvector(store, clean_db, fake)
            return
        texts = [f"text {i}" for i in range(BATCH_SIZE)]
        texts[BATCH_SIZE // 3] = f"text {BAD}"
        await store.add_memory(P, "s", None, [msg(t) for t in texts])
        worker = EmbeddingWorker(store, OpenAIEmbedder(fake.url, MODEL, timeout=5, dimensions=3))
        assert await worker.run_once() == BATCH_SIZE - 1
        # The batch, a word, and two halves at each of log2(32) = 5 levels.
        assert len(fake.requests) == 2 + 2 * (BATCH_SIZE.bit_length() - 1)
        assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 1

"""After a change of --embedder, search says what it cannot see until `memstore reindex`.

Search reads only the current model's vectors: the messages an earlier model embedded were
found by meaning no more (semantic search answered nothing of them) and nothing said why
(an audit of stop 36). The worker now records each model it saves vectors of
(embedding_models, migration 0021); a search by meaning notes the other models stored, and
reindex forgets a model once no live message has a vector of it.
"""

from __future__ import annotations

import logging

import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import NewMessage, SearchQuery
from server.search import OpenAIEmbedder
from server.search.service import Searcher
from server.search.worker import EmbeddingWorker
from server.serving.background import warn_of_other_models
from server.store import Store
from tests.fake_embedder import FakeServer, serving
from tests.fix_db import scalar

OLD, NEW = "model-old", "model-new"


def _said(content: str) -> NewMessage:
    return NewMessage(role="kai", role_type="user", content=content, metadata={})


def _embedder(fake: FakeServer, model: str) -> OpenAIEmbedder:
    return OpenAIEmbedder(fake.url, model, timeout=5, dimensions=3)


async def _embed_all(store: Store, fake: FakeServer, model: str) -> None:
    assert await EmbeddingWorker(store, _embedder(fake, model)).drain() > 0


async def test_search_by_meaning_notes_the_models_it_cannot_read_until_reindex(
    store: Store, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    with serving() as fake:
        if not store.vectors:
            # No vectors, no models: search says it has no pgvector, nothing of models.
            assert await store.other_models(NEW) == []
            outcome = await Searcher(store, _embedder(fake, NEW)).search(P, SearchQuery("dog"))
            assert "pgvector" in outcome.note and not outcome.semantic
            return
        # Models earlier tests' servers recorded (clean_db empties the data tables only).
        await scalar(clean_db, "WITH gone AS (DELETE FROM embedding_models RETURNING 1) SELECT 1")
        await store.add_memory(P, "s", None, [_said("my dog is called Biscuit")])
        await _embed_all(store, fake, OLD)
        assert await store.other_models(NEW) == [OLD]

        # The server switched to NEW without a reindex: the old message is not found by
        # meaning, and the answer says why and what to do.
        switched = Searcher(store, _embedder(fake, NEW))
        semantic = await switched.search(P, SearchQuery("dog", search_type="semantic"))
        assert semantic.results == [] and semantic.semantic
        assert OLD in semantic.note and "memstore reindex" in semantic.note
        hybrid = await switched.search(P, SearchQuery("dog"))
        assert [r.message.content for r in hybrid.results] == ["my dog is called Biscuit"]
        assert OLD in hybrid.note
        with caplog.at_level(logging.WARNING, logger="server.serving.background"):
            await warn_of_other_models(store, _embedder(fake, NEW))
        assert any(OLD in r.getMessage() for r in caplog.records), "no warning at start"
        # The old model's own server sees nothing missing.
        kept = await Searcher(store, _embedder(fake, OLD)).search(P, SearchQuery("dog"))
        assert kept.note == ""

        # A live message still read by OLD keeps it noted; reindex's end forgets it once
        # every live message has a NEW vector.
        assert await store.forget_unused_models(NEW) == [OLD]
        queued, _ = await store.queue_reindex(NEW, None, 100)
        assert queued == 1
        await _embed_all(store, fake, NEW)
        assert await store.forget_unused_models(NEW) == []
        assert await store.other_models(NEW) == []
        assert await scalar(clean_db, "SELECT count(*) FROM embedding_models") == 1
        after = await Searcher(store, _embedder(fake, NEW)).search(
            P, SearchQuery("dog", search_type="semantic")
        )
        assert len(after.results) == 1 and after.note == ""
        # The old model's server, started again, now notes NEW.
        back = await Searcher(store, _embedder(fake, OLD)).search(P, SearchQuery("dog"))
        assert NEW in back.note

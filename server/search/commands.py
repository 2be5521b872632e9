"""`memstore embed` (the embedding worker alone) and `memstore reindex` (re-embed for a model;
without pgvector, keep the recall by words of sessions from before migration 0012)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from server.config import Config
from server.errors import FailedPrecondition, Unavailable
from server.search.embedding import Embedder, EmbeddingError
from server.search.worker import EmbeddingWorker
from server.serving.app import open_store
from server.serving.background import make_embedder, warn_of_other_models
from server.serving.shutdown import wait_for_signal
from server.settings import source
from server.store import Store

log = logging.getLogger(__name__)

#: Messages queued per statement by reindex: short transactions on a large table.
_REINDEX_BATCH = 5000


async def embed(config: Config) -> None:
    """Runs the embedding worker until SIGTERM or SIGINT (without pgvector: the recall
    worker, which keeps recall by words and runs no model)."""
    store = await open_store(config)
    try:
        await store.migrate_to_serve()
        embedder = None if store.word_recall else await _ready(store, config)
        await warn_of_other_models(store, embedder)
        worker = EmbeddingWorker(store, embedder)
        running = asyncio.create_task(worker.run())
        if embedder is None:
            log.info("recall worker running (no pgvector: recall by words)")
        else:
            log.info("embedding worker running (model %s)", embedder.name)
        await wait_for_signal()
        log.info("stopping: saving the batch in hand (grace period %.1fs)", config.grace_period)
        await worker.stop(running, config.grace_period)
    finally:
        await store.close()


async def reindex(config: Config) -> None:
    """Queues every live message lacking a vector of the configured model, then embeds them.

    Without pgvector: queues every live session of a user whose recall by words is not kept
    (its messages arrived before migration 0012), then keeps it, as the recall worker does.
    """
    store = await open_store(config)
    try:
        await store.require_migrated()
        if store.word_recall:
            await _keep_word_recall(store)
            return
        embedder = await _ready(store, config)
        total = await store.reindex_total(embedder.name)
        after: tuple[int, str, int] | None = None
        queued = 0
        while True:
            count, after = await store.queue_reindex(embedder.name, after, _REINDEX_BATCH)
            queued += count
            if after is None:
                break
        bar = _progress(total, f"embedding with {embedder.name}")
        worker = EmbeddingWorker(store, embedder)
        try:
            while done := await worker.run_once():
                bar.update(done)
        except EmbeddingError as exc:
            # One line and exit status 1, as every failure memstore's commands report (a
            # model unreachable or refusing the key was a traceback). What was embedded is
            # kept; the rest stays queued for the next run or a `memstore embed`.
            raise Unavailable(f"the embedding model failed: {exc}") from exc
        finally:
            bar.close()
        print(f"reindexed {queued} messages for model {embedder.name}")
        # Search notes the other models while they are stored; forgotten here once no live
        # message has a vector of theirs.
        if still := await store.forget_unused_models(embedder.name):
            print(
                f"live messages still have vectors of {', '.join(still)} (the model "
                f"{embedder.name} refused them, or they were added by a server running another "
                "model): search notes it until they are embedded again"
            )
    finally:
        await store.close()


async def _keep_word_recall(store: Store) -> None:
    # Queued in short batches first (a line per batch on a large table), then drained here
    # (a serving worker may take some of them too: the bar counts what this one settles).
    after: tuple[int, str] | None = None
    queued = 0
    while True:
        count, after = await store.queue_word_recall(after, _REINDEX_BATCH)
        queued += count
        if after is None:
            break
        log.info("queued %d sessions for recall by words", queued)
    bar = _progress(queued, "keeping recall by words", "session")
    worker = EmbeddingWorker(store, None)
    while done := await worker.run_once():
        bar.update(done)
    bar.close()
    print(f"kept recall by words for {queued} sessions (no pgvector)")


async def _ready(store: Store, config: Config) -> Embedder:
    if not store.vectors:
        raise FailedPrecondition(
            "this PostgreSQL server has no pgvector extension: there is nothing to embed into"
        )
    embedder = make_embedder(config)
    if embedder is None:
        raise FailedPrecondition(f"{source(config, 'embedder')} none: no model to embed with")
    return embedder


def _progress(total: int, description: str, unit: str = "msg") -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the cli extra is not installed: count quietly instead
        return _Quiet()
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr)


class _Quiet:
    def update(self, n: int) -> None:
        del n

    def close(self) -> None:
        pass

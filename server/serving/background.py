"""What a serving process runs beside its calls: the embedder and its worker, the embedding
queue's gauges (the periodic purge is in purge.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.config import Config
from server.search.embedding import Embedder, EmbeddingError, embedder_from_setting
from server.search.service import other_models_note
from server.search.worker import EmbeddingWorker
from server.settings import source
from server.store import Store

log = logging.getLogger(__name__)

#: Seconds a metrics scrape waits for the embedding queue's count before leaving it out.
_QUEUE_READ_SECONDS = 5.0


def make_embedder(config: Config) -> Embedder | None:
    """The embedder `--embedder` names (None for "none"), shared by search and the worker."""
    try:
        return embedder_from_setting(
            config.embedder, model=config.embedder_model or None, api_key=config.embedder_api_key
        )
    except ValueError as exc:
        raise RuntimeError(f"{source(config, 'embedder')}: {exc}") from exc


def load_model(embedder: Embedder | None) -> None:
    """Loads a local model now rather than on its first use; a failure is logged, not raised.

    A model that cannot load fails each search and embedding batch with the same error,
    which says what to install; the rest of memstore serves on.
    """
    load = getattr(embedder, "load", None)
    if load is None:
        return  # none, or a remote model: nothing to load
    try:
        load()
    except EmbeddingError as exc:
        log.error("%s", exc)


async def warn_of_other_models(store: Store, embedder: Embedder | None) -> None:
    """Says at start that vectors of another model are stored (after a change of
    --embedder): search by meaning does not find what they embedded until `memstore
    reindex` (each search's note says so too)."""
    if embedder is None or not store.vectors:
        return
    if others := await store.other_models(embedder.name):
        log.warning("%s", other_models_note(embedder.name, others))


def embedding_worker(
    config: Config, store: Store, embedder: Embedder | None
) -> EmbeddingWorker | None:
    """The in-process embedding worker, or None when it is off or has nothing to feed.

    Without pgvector it keeps recall by words (migration 0012) and runs no model.
    """
    if not config.embedding_worker:
        _queue_undrained(store, "--no-embedding-worker")
        return None
    if store.word_recall:
        log.info("recall worker on (no pgvector: recall by words, kept ahead of time)")
        return EmbeddingWorker(store, None)
    if embedder is None or not store.vectors:
        _queue_undrained(store, "--embedder none")
        return None
    log.info("embedding worker on (model %s)", embedder.name)
    return EmbeddingWorker(store, embedder)


def _queue_undrained(store: Store, why: str) -> None:
    # AddMemory still queues (the queue is the database's, any process may drain it): say
    # once at start who must, rather than drop the work or let the queue grow unseen.
    if not (store.vectors or store.word_recall):
        return
    work = "messages to embed" if store.vectors else "sessions whose recall to keep by words"
    log.warning(
        "%s: AddMemory queues %s and this process runs no worker to drain them; run "
        "`memstore embed` on this database (one is enough), or the queue only grows "
        "(the memstore_embedding_queue_rows metric)",
        why,
        work,
    )


def queue_stats(store: Store) -> Callable[[], tuple[int, float] | None] | None:
    """The embedding queue's (rows, oldest seconds) for the metrics thread, read on this
    loop's pool at each scrape; None where nothing is ever queued (no pgvector, no 0012)."""
    if not (store.vectors or store.word_recall):
        return None
    loop = asyncio.get_running_loop()

    def read() -> tuple[int, float] | None:
        future = asyncio.run_coroutine_threadsafe(store.embedding_lag(), loop)
        try:
            return future.result(timeout=_QUEUE_READ_SECONDS)
        except Exception:  # down or slow: the scrape goes on without the queue's gauges
            future.cancel()
            return None

    return read

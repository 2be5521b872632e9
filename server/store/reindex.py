"""Reindex's methods of the Store (see sql/reindex.sql): the embedding queue filled with what
lacks a vector of the model (or, without pgvector, recall kept by words), the models other
than it whose vectors are left, and the queue's length for /metrics."""

from __future__ import annotations

from server.store.base import StoreBase
from server.store.db import fetch_all, fetch_one
from server.store.queries import query

#: Rows of the embedding queue that embedding_lag counts at most: /metrics reads it at every
#: scrape and each server every minute, and a count of the whole queue scans it all (millions
#: of rows after a reindex). Exact below it; the cap means that many or more.
QUEUE_COUNT_CAP = 10_000


class ReindexMethods(StoreBase):
    """What fills the embedding queue and says what is left; the worker's are EmbeddingMethods'."""

    async def queue_reindex(
        self, model: str, after: tuple[int, str, int] | None, limit: int
    ) -> tuple[int, tuple[int, str, int] | None]:
        """Queues one batch of live messages lacking a `model` vector, after key `after`.

        Returns (rows queued, key to continue after; None when the scan is done).

        Raises:
            Unavailable: the database cannot be reached.
        """
        last_project, last_session, last_sequence = after or (0, "", 0)
        params = {
            "model": model,
            "limit": limit,
            "after_project": last_project,
            "after_session": last_session,
            "after_sequence": last_sequence,
        }
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "queue_reindex", params)
        assert row is not None
        if row["project_id"] is None:
            return int(row["queued"]), None
        return int(row["queued"]), (row["project_id"], row["session_id"], row["sequence"])

    async def queue_word_recall(
        self, after: tuple[int, str] | None, limit: int
    ) -> tuple[int, tuple[int, str] | None]:
        """Queues, for the recall worker, up to `limit` live sessions after key `after` whose
        recall by words is not kept (they had messages before migration 0012): one row each.

        Returns (sessions queued, key to continue after; None when the scan is done).

        Raises:
            Unavailable: the database cannot be reached.
        """
        last_project, last_session = after or (0, "")
        params = {"limit": limit, "after_project": last_project, "after_session": last_session}
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "queue_word_recall", params)
        assert row is not None
        if row["project_id"] is None:
            return int(row["queued"]), None
        return int(row["queued"]), (row["project_id"], row["session_id"])

    async def other_models(self, model: str) -> list[str]:
        """The models other than `model` whose vectors may be stored: the messages they
        embedded are not found by meaning with `model` until `memstore reindex`. None where
        vectors are not kept.

        Raises:
            Unavailable: the database cannot be reached.
        """
        if not self.vectors:
            return []
        async with self._connect(single=True) as conn:
            found = await fetch_all(conn, "other_embedding_models", {"model": model})
        return [str(row["model"]) for row in found]

    async def forget_unused_models(self, model: str) -> list[str]:
        """Forgets each model other than `model` no vector of which is left (reindex, once
        every live message has a `model` vector); returns those still used.

        Raises:
            Unavailable: the database cannot be reached.
        """
        used = []
        for other in await self.other_models(model):
            async with self._connect() as conn:
                row = await fetch_one(conn, "embedding_model_used", {"model": other})
                if row is not None and row["used"]:
                    used.append(other)
                else:
                    await conn.execute(query("forget_embedding_model"), {"model": other})
        return used

    async def reindex_total(self, model: str) -> int:
        """How many live messages lack a vector of `model`.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "reindex_total", {"model": model})
        return int(row["n"]) if row else 0

    async def embedding_lag(self, cap: int = QUEUE_COUNT_CAP) -> tuple[int, float]:
        """(rows waiting in the embedding queue, counted up to `cap`: `cap` means that many or
        more; seconds the oldest has waited, exact).

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "embedding_lag", {"cap": cap})
        assert row is not None
        return int(row["queued"]), float(row["oldest"])

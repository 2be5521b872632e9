"""The embedding worker's methods of the Store (see sql/embeddings.sql): it claims due
messages, saves their vectors and keeps each touched session's recall (by words alone where
vectors are not kept); what fills the queue is in reindex.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection

from server.errors import FailedPrecondition
from server.store.db import Row, fetch_all, fetch_one
from server.store.queries import query
from server.store.recall import RECALL_KEEP, RecallMethods
from server.store.search import vector_text

log = logging.getLogger(__name__)

#: Seconds a worker holds the messages it claimed, renewed while its model works on them
#: (_hold_leases): a worker that dies leaves them to others within this time.
LEASE_SECONDS = 30.0

#: Claims a worker tries on Citus before it takes a lost race for an empty queue.
_CLAIM_ATTEMPTS = 5
#: Runs of a batch's save under Citus when a delete committed during it (see embed_due).
_SAVE_ATTEMPTS = 3

#: Seconds between a word-recall worker's looks at whether pgvector came into use.
VECTORS_LOOK_SECONDS = 60.0

#: Seconds a message the model failed on alone is put off: as long again as it has waited,
#: at least the first and at most the second (defer_embeddings).
DEFER_SECONDS = (30.0, 3600.0)


@dataclass(frozen=True)
class Deferred:
    """What the model gave for a text it failed on alone, not by a refusal (an HTTP 500, a
    timeout, a NaN vector): its message stays queued and is tried again later."""

    reason: str


#: Embeds a batch of texts off the event loop; per text a vector, None for a text the model
#: refuses (it leaves the queue without one) or Deferred (it stays queued, put off).
EmbedBatch = Callable[[list[str]], Awaitable[Sequence[list[float] | Deferred | None]]]


def _keys_params(keys: list[tuple[int, str, int]]) -> dict[str, Any]:
    return {
        "project_ids": [k[0] for k in keys],
        "session_ids": [k[1] for k in keys],
        "sequences": [k[2] for k in keys],
    }


class EmbeddingMethods(RecallMethods):
    """The embedding worker's methods; ranking recall is RecallMethods', filling the queue
    ReindexMethods'."""

    async def keep_recall(self, sessions: list[tuple[int, str]], model: str, window: int) -> None:
        """Ranks and keeps the recall of these (project_id, session_id) sessions now, as the
        worker does after embedding their messages (for a bench that seeds vectors itself).

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect() as conn:
            await self._keep_recall(conn, sessions, model, window)

    async def _keep_recall(
        self,
        conn: AsyncConnection[Any],
        sessions: list[tuple[int, str]],
        model: str | None,
        window: int,
    ) -> None:
        # Ranks and keeps the recall of each session that just got messages: by its window's
        # vectors and words under `model` (save_recall), by words alone without one
        # (save_word_recall, where vectors are not kept).
        save = query("save_word_recall" if model is None else "save_recall")
        for project_id, session_id in sessions:
            params = self._recall_params(project_id, session_id, window, model, RECALL_KEEP)
            found = await self._rank_recall(conn, params, model)
            await conn.execute(
                save,
                {
                    "project_id": project_id,
                    "session_id": session_id,
                    "model": model,
                    "recall_sessions": [r.message.session_id for r in found],
                    "recall_sequences": [r.message.sequence for r in found],
                    "recall_scores": [r.score for r in found],
                },
            )

    async def embed_due(self, model: str, limit: int, window: int, embed: EmbedBatch) -> int:
        """Leases up to `limit` due messages, embeds them, saves the vectors and recall.

        The lease (LEASE_SECONDS) is committed before `embed` runs, so concurrent workers
        take other rows and no lock is held while the model works; a worker that dies
        leaves its rows to be claimed again when the lease ends, and a model that fails
        gives them back at once: nothing is lost. The save locks the batch's sessions
        first, in key order, as DeleteUser does, so the two wait for each other instead of
        deadlocking. Soft-deleted messages leave the queue without a vector. A message the
        model failed on alone (`embed` gave Deferred) stays queued, put off (DEFER_SECONDS)
        and logged by its key, while the rest of its batch is saved.
        Returns how many queue rows were settled (0 when nothing was due, and always where
        vectors are not kept: the queue then feeds keep_word_recall_due); deferred rows are
        not settled.

        Raises:
            Unavailable: the database cannot be reached.
        """
        if not self.vectors:
            return 0  # queued for recall by words (keep_word_recall_due): nothing to embed
        async with self._connect(single=True) as conn:
            claimed = await self._claim(conn, limit)
        if not claimed:
            return 0
        keys = [(r["project_id"], r["session_id"], r["sequence"]) for r in claimed]
        live = [r for r in claimed if r["live"]]
        # An empty message (an assistant's turn that only called a tool) means nothing to
        # rank by, and a remote model refuses it (OpenAI: 400): it is not sent.
        said = [r for r in live if r["content"].strip()]
        try:
            texts = [_embedding_text(r["role"], r["content"]) for r in said]
            vectors = await self._embed_holding(keys, embed, texts) if texts else []
        except BaseException:
            async with self._connect(single=True) as conn:
                await conn.execute(query("release_embeddings"), _keys_params(keys))
            raise
        # A message the model refused (None), or not sent, leaves the queue without a
        # vector, as a soft-deleted one does (save_embeddings). One it failed on alone is
        # put off first, in its own statement: should the save fail, it still heads no claim.
        by_key: dict[tuple[int, str, int], str] = {}
        deferred: dict[tuple[int, str, int], str] = {}
        for r, v in zip(said, vectors, strict=True):
            key = (r["project_id"], r["session_id"], r["sequence"])
            if isinstance(v, Deferred):
                deferred[key] = v.reason
            elif v is not None:
                by_key[key] = vector_text(v)
        if deferred:
            await self._defer(deferred)
            keys = [k for k in keys if k not in deferred]
            live = [
                r for r in live if (r["project_id"], r["session_id"], r["sequence"]) not in deferred
            ]
            if not keys:
                return 0
        # Citus locks no rows across shards, so the save does not lock the batch's sessions
        # first: a DeleteUser or purge that deleted one of its messages and commits while the
        # save runs makes the vectors' foreign key check fail (the key is co-located, checked
        # on the shard). The save then runs again with the same vectors in a new snapshot,
        # where the deleted rows are gone (save_embeddings joins the live messages), rather
        # than leaving the whole batch leased until LEASE_SECONDS pass.
        if by_key and model not in self._recorded_models:
            await self.record_model(model)
        for attempt in range(_SAVE_ATTEMPTS):
            try:
                await self._save_batch(keys, live, by_key, model, window)
                break
            except FailedPrecondition:
                if not self.citus or attempt + 1 == _SAVE_ATTEMPTS:
                    raise
        return len(keys)

    async def _embed_holding(
        self, keys: list[tuple[int, str, int]], embed: EmbedBatch, texts: list[str]
    ) -> Sequence[list[float] | Deferred | None]:
        # The lease is renewed every third of LEASE_SECONDS while the model works: a batch
        # that outlasted it (a slow remote model; the halving of a failing batch, up to 2n
        # POSTs) was claimed by another worker and embedded twice, the model's work doubled.
        holding = asyncio.create_task(self._hold_leases(keys))
        try:
            return await embed(texts)
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding

    async def _hold_leases(self, keys: list[tuple[int, str, int]]) -> None:
        params = {**_keys_params(keys), "lease": LEASE_SECONDS}
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                async with self._connect(single=True) as conn:
                    await conn.execute(query("renew_embeddings"), params)
            except Exception as exc:  # a lost renewal costs a repeat of the batch, no more
                log.warning(
                    "could not renew the lease of an embedding batch (%s): should the model "
                    "outlast it, another worker may embed the batch again",
                    exc,
                )

    async def _defer(self, deferred: dict[tuple[int, str, int], str]) -> None:
        # Given back at once as a failed batch is, such a message was the oldest due and
        # headed every claim: the same batch failed forever and nothing after it was
        # embedded. Logged by key only: the content is the user's.
        least, most = DEFER_SECONDS
        params = {**_keys_params(list(deferred)), "least": least, "most": most}
        async with self._connect(single=True) as conn:
            rows = await fetch_all(conn, "defer_embeddings", params)
        for row in rows:
            log.warning(
                "the embedding model fails on message %s of session %r (project %s) alone "
                "(%s); it stays queued, waiting %.0fs so far, tried again in %.0fs",
                row["sequence"],
                row["session_id"],
                row["project_id"],
                deferred[(row["project_id"], row["session_id"], row["sequence"])],
                row["waited"],
                row["delay"],
            )

    async def keep_word_recall_due(self, limit: int, window: int) -> int:
        """Leases up to `limit` due messages and keeps their sessions' recall by words.

        Where vectors are not kept, the queue says which sessions have new messages: each
        is ranked as GetMemory would rank it on the request path (its last `window`
        messages' words) and kept in session_word_recall, and the batch leaves the queue,
        in one transaction. Leased as embed_due's batches are: a worker that dies leaves
        them to the next claim. Returns how many queue rows were settled (0: nothing due).

        Raises:
            Unavailable: the database cannot be reached.
        """
        if await self._vectors_made_since():
            return 0
        async with self._connect(single=True) as conn:
            claimed = await self._claim(conn, limit)
        if not claimed:
            return 0
        keys = [(r["project_id"], r["session_id"], r["sequence"]) for r in claimed]
        sessions = sorted({(k[0], k[1]) for k in keys})
        for attempt in range(_SAVE_ATTEMPTS):  # as embed_due's save, on Citus
            try:
                await self._save_word_recall(keys, sessions, window)
                break
            except FailedPrecondition:
                if not self.citus or attempt + 1 == _SAVE_ATTEMPTS:
                    raise
        return len(claimed)

    async def _vectors_made_since(self) -> bool:
        # A server that saw pgvector migrated the database since this process started
        # without: the queue now holds messages to embed (migration 0007 queues every stored
        # one), which settled here by words were never embedded (an audit). Looked at every
        # VECTORS_LOOK_SECONDS; once made, this process leaves the queue alone.
        now = time.monotonic()
        if self._vectors_arrived or now - self._vectors_looked < VECTORS_LOOK_SECONDS:
            return self._vectors_arrived
        self._vectors_looked = now
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "vector_tables_made", {})
        if row is not None and row["made"]:
            self._vectors_arrived = True
            log.warning(
                "pgvector is in use by this database now (another server migrated it): this "
                "process, started without it, leaves the embedding queue to a worker that "
                "embeds; restart it to embed and search by meaning"
            )
        return self._vectors_arrived

    async def _lock_embedded_sessions(
        self, conn: AsyncConnection[Any], sessions: list[tuple[int, str]]
    ) -> None:
        """Locks a batch's sessions against deletion while the worker writes for them, in key
        order (`sessions` sorted) as DeleteUser locks them: the two wait in turn, never in a
        cycle. Not on Citus, which runs no multi-shard `FOR KEY SHARE`: its co-located
        foreign keys guard the same rows (docs/scaling.md)."""
        if self.citus:
            return
        await conn.execute(
            query("lock_embedded_sessions"),
            {"project_ids": [s[0] for s in sessions], "session_ids": [s[1] for s in sessions]},
        )

    async def _save_word_recall(
        self, keys: list[tuple[int, str, int]], sessions: list[tuple[int, str]], window: int
    ) -> None:
        async with self._connect() as conn:
            await self._lock_embedded_sessions(conn, sessions)
            await conn.execute(query("settle_word_recall"), _keys_params(keys))
            await self._keep_recall(conn, sessions, None, window)

    async def _save_batch(
        self,
        keys: list[tuple[int, str, int]],
        live: list[Row],
        by_key: dict[tuple[int, str, int], str],
        model: str,
        window: int,
    ) -> None:
        sessions = sorted({(k[0], k[1]) for k in keys})
        async with self._connect() as conn:
            await self._lock_embedded_sessions(conn, sessions)
            await fetch_one(
                conn,
                "save_embeddings",
                {**_keys_params(keys), "vectors": [by_key.get(k) for k in keys], "model": model},
            )
            touched = sorted({(r["project_id"], r["session_id"]) for r in live})
            if touched:
                refresh = (
                    "refresh_session_embeddings_citus"
                    if self.citus
                    else "refresh_session_embeddings"
                )
                await conn.execute(
                    query(refresh),
                    {
                        "project_ids": [s[0] for s in touched],
                        "session_ids": [s[1] for s in touched],
                        "model": model,
                    },
                )
                await self._keep_recall(conn, touched, model, window)

    async def _claim(self, conn: AsyncConnection[Any], limit: int) -> list[Row]:
        params = {"limit": limit, "lease": LEASE_SECONDS}
        if not self.citus:
            return await fetch_all(conn, "claim_embeddings", params)
        # Citus: workers that picked the same oldest rows race for their leases; one that
        # lost them all picks again while rows are still due (else it would sleep on a
        # queue that is not empty).
        for _ in range(_CLAIM_ATTEMPTS):
            claimed = await fetch_all(conn, "claim_embeddings_citus", params)
            if claimed:
                return claimed
            due = await fetch_one(conn, "any_due_citus", {})
            if not (due and due["due"]):
                break
        return []

    async def record_model(self, model: str) -> None:
        """Notes that vectors of `model` are stored (embedding_models, migration 0021), in a
        statement of its own: under Citus the table is a reference table, which a
        transaction writing shards in parallel may not also write.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            await conn.execute(query("record_embedding_model"), {"model": model})
        self._recorded_models.add(model)


def _embedding_text(role: str, content: str) -> str:
    # The speaker is part of what a message is about ("what did Priya suggest?").
    return f"{role}: {content}" if role else content

"""The search, recall and embedding-queue methods of the Store (see sql/search.sql)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from functools import cached_property
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from server.domain import Message, SearchQuery, SearchResult, Session
from server.errors import FailedPrecondition
from server.store import rows
from server.store.base import StoreBase, key
from server.store.coalesce import Coalescer
from server.store.db import Row, fetch_all, fetch_one
from server.store.messages import memory_window
from server.store.queries import query
from server.store.translate import translated

#: (query attribute, fragment) of every optional search filter with a value.
_FILTERS = (
    ("user_id", "search_filter_user"),
    ("session_ids", "search_filter_sessions"),
    ("role_types", "search_filter_role_types"),
    ("metadata_contains", "search_filter_metadata"),
    ("created_after", "search_filter_created_after"),
    ("created_before", "search_filter_created_before"),
)

#: The weight of the full-text score in a hybrid ranking (the vector score has the rest).
#: Chosen on the odd-numbered questions of the retrieval evaluation (docs/search.md).
HYBRID_TEXT_WEIGHT = 0.3

#: Seconds a worker holds the messages it claimed: far longer than a batch takes to embed;
#: a worker that dies leaves them to others when it ends.
LEASE_SECONDS = 30.0

#: Memories the worker ranks and keeps per session for GetMemory's recall (a larger
#: relevant_limit is ranked on the request path).
RECALL_KEEP = 20

#: Words of a session's last messages that recall matches (recall_query_text): the cost of
#: ranking each of the user's messages grows with them (docs/search.md, "Without pgvector").
#: 64 from make eval's recall: 32 lost 0.074 of recall@10 by words where the question follows
#: five messages of other talk, 64 lost nothing against every word (docs/search.md).
RECALL_WORDS = 64

#: The weight of the full-text score in recall's hybrid ranking (the nearest of the window's
#: vectors has the rest, recall_distance_window). Chosen with that ranking on the odd-numbered
#: questions of make eval's recall, for the sum and the least of recall@10 over its three
#: windows (docs/search.md, Recall quality): 0.3 (search's) lost 0.03-0.04 in each.
RECALL_TEXT_WEIGHT = 0.5

#: One coalesced GetMemory call: (project_id, session_id, lastn, relevant_limit, model), the
#: model "" for recall kept by words.
MemoryKey = tuple[int, str, int, int, str]

#: Claims a worker tries on Citus before it takes a lost race for an empty queue.
_CLAIM_ATTEMPTS = 5
#: Runs of a batch's save under Citus when a delete committed during it (see embed_due).
_SAVE_ATTEMPTS = 3

#: A found message and, when asked for, its vector (for diversity re-ranking).
Found = tuple[SearchResult, list[float] | None]

#: Embeds a batch of texts off the event loop; one vector per text.
EmbedBatch = Callable[[list[str]], Awaitable[list[list[float]]]]


def _keys_params(keys: list[tuple[int, str, int]]) -> dict[str, Any]:
    return {
        "project_ids": [k[0] for k in keys],
        "session_ids": [k[1] for k in keys],
        "sequences": [k[2] for k in keys],
    }


def vector_text(vector: Sequence[float]) -> str:
    """A vector in pgvector's text form, '[0.1,0.2,...]'."""
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def _filters(q: SearchQuery) -> tuple[sql.Composable, dict[str, Any]]:
    parts: list[sql.SQL | sql.Composed] = []
    params: dict[str, Any] = {}
    for attribute, fragment in _FILTERS:
        value: Any = getattr(q, attribute)
        if value is None:
            continue
        parts.append(query(fragment))
        if attribute == "metadata_contains":
            value = Jsonb(value)
        elif isinstance(value, tuple):
            value = list(value)
        params[attribute] = value
    return sql.SQL(" ").join(parts), params


def _statement(vector: bool, semantic_only: bool) -> str:
    if not vector:
        return "search_full_text"
    return "search_semantic" if semantic_only else "search_hybrid"


def recall_statement(vector: bool) -> sql.Composed:
    """The statement that ranks recall on the request path (or in the worker, to keep it).

    The user's other live sessions against the session's last messages: by words alone, or
    (`vector`) fused with each message's distance to the nearest of the vectors of those
    messages. Its parameters are _recall_params's.
    """
    fragment: sql.Composable = query("recall_query_text")
    if vector:
        fragment = query("recall_query_vector").format(words=fragment)
    scope = sql.SQL(" ").join([query("recall_filter_user"), query("search_filter_other_sessions")])
    return query(_statement(vector, semantic_only=False)).format(
        query=fragment,
        filters=scope,
        match=query("recall_match_scan"),
        distance=query("recall_distance_window"),
    )


def kept_recall_statement(name: str, *, vectors: bool) -> sql.Composed:
    """A read of kept recall (get_memories_recall, recall_stored_citus) over the table the
    worker keeps it in: session_embeddings with vectors, session_word_recall without."""
    if vectors:
        kept, kept_filter = "session_embeddings", query("recall_filter_kept_vectors")
    else:
        kept, kept_filter = "session_word_recall", sql.SQL("")
    return query(name).format(kept=sql.Identifier(kept), kept_filter=kept_filter)


def _kept(row: Row) -> SearchResult:
    # A part-1 row of get_memories_recall: the memory's message in the m_ columns.
    return SearchResult(
        message=rows.message(row, "m_"), user_id=row["user_id"], score=row["r_score"]
    )


def _found(row: Row) -> Found:
    result = SearchResult(message=rows.message(row), user_id=row["user_id"], score=row["score"])
    return result, json.loads(row["vector"]) if row["vector"] is not None else None


class SearchMethods(StoreBase):
    """Full-text and vector search over live messages, recall, and the embedding queue."""

    async def search_messages(
        self,
        project_id: int,
        q: SearchQuery,
        *,
        vector: Sequence[float] | None,
        model: str,
        limit: int,
        depth: int,
        with_vectors: bool = False,
    ) -> tuple[list[Found], int]:
        """Up to `limit` live messages in scope, best first, and the unembedded count.

        Without `vector` the ranking is full-text only; with it, q.search_type picks
        semantic or hybrid (which fuses the best `depth` of each ranker). The count (live
        messages in scope waiting for an embedding) is 0 when vectors are not kept. Both
        come from one round trip.

        Raises:
            InvalidArgument: a value the database rejects (e.g. metadata_contains).
            Unavailable: the database cannot be reached.
        """
        filters, params = _filters(q)
        use_vector = vector is not None and self.vectors
        fragment = query("search_query_vector" if use_vector else "search_query_text")
        statement = query(_statement(use_vector, q.search_type == "semantic")).format(
            query=fragment,
            filters=filters,
            match=query("search_match_index"),
            distance=query("search_distance_query"),
        )
        params.update(
            project_id=project_id,
            text=q.text,
            vector=vector_text(vector) if use_vector and vector is not None else None,
            model=model,
            limit=limit,
            candidates=depth,
            with_vectors=with_vectors,
            text_weight=HYBRID_TEXT_WEIGHT,
        )
        statements: list[sql.SQL | sql.Composed] = [statement]
        if self.vectors:
            statements.append(query("count_unembedded").format(filters=filters))
        async with self._connect(field="metadata_contains", single=True) as conn:
            found, *waiting = await _pipelined(conn, statements, params)
        count = int(waiting[0][0]["n"]) if waiting else 0
        return [_found(r) for r in found], count

    async def get_memory_with_recall(
        self,
        project_id: int,
        session_id: str,
        lastn: int,
        *,
        limit: int,
        window: int,
        model: str | None,
    ) -> tuple[Session | None, list[Message], list[SearchResult]]:
        """GetMemory's window plus up to `limit` memories from the user's other sessions.

        The memories are the live messages of the same user's other live sessions most
        relevant to this session's last `window` messages. Where the worker has ranked them
        (for `model` with vectors, whenever it embeds the session's messages; by words
        without, whenever they arrive), they are read as it kept them, with deleted ones
        dropped: one round trip of index reads. Otherwise (not yet kept, more than it keeps,
        or vectors without a model) they are ranked here, by words fused with the recall
        vector when there is one: a second round trip. No model runs.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = self._recall_params(project_id, session_id, window, model, limit)
        params["lastn"] = lastn
        kept_by = model if self.vectors else "" if self.word_recall else None
        stored = kept_by is not None and limit <= RECALL_KEEP
        if stored and self.citus:
            # Citus: the window on the session's shard, then the kept recall, whose memories
            # are on other shards (recall_stored_citus), each its own statement.
            async with self._connect(single=True) as conn:
                memory = await fetch_all(conn, memory_window(), params)
                kept = (
                    await fetch_all(conn, self._kept_statement("recall_stored_citus"), params)
                    if memory
                    else []
                )
        elif stored and kept_by is not None:
            # Concurrent calls share one statement (and its round trip), as GetUser's do.
            with translated():
                found = await self._memory_loader.load(
                    (project_id, session_id, lastn, limit, kept_by)
                )
            memory, kept = found or ([], [])
        else:
            async with self._connect(single=True) as conn:
                memory = await fetch_all(conn, memory_window(), params)
            kept = []
        if not memory:
            return None, [], []
        session = rows.session(memory[0])
        if session.user_id is None:
            results: list[SearchResult] = []  # no user, no user-level memory
        elif kept:
            results = [_kept(r) for r in kept if r["m_uuid"] is not None]
        else:
            async with self._connect(single=True) as conn:
                results = await self._rank_recall(conn, params, model)
        return session, rows.joined_messages(memory), results

    @cached_property
    def _memory_loader(self) -> Coalescer[MemoryKey, tuple[list[Row], list[Row]]]:
        return Coalescer(self._get_memories, max_waiting_batches=self._pool.max_waiting)

    async def _get_memories(
        self, keys: list[MemoryKey]
    ) -> dict[MemoryKey, tuple[list[Row], list[Row]]]:
        # One get_memories_recall per project and model (one of each, in practice).
        groups: dict[tuple[int, str], list[MemoryKey]] = {}
        for k in keys:
            groups.setdefault((k[0], k[4]), []).append(k)
        found: dict[MemoryKey, tuple[list[Row], list[Row]]] = {}
        async with self._connect(single=True) as conn:
            for (project_id, model), group in groups.items():
                params = {
                    "project_id": project_id,
                    "model": model,
                    "session_ids": [k[1] for k in group],
                    "lastns": [k[2] for k in group],
                    "limits": [k[3] for k in group],
                }
                statement = self._kept_statement("get_memories_recall")
                for row in await fetch_all(conn, statement, params):
                    parts = found.setdefault(group[row["i"] - 1], ([], []))
                    parts[row["part"]].append(row)
        return found

    def _kept_statement(self, name: str) -> sql.Composed:
        return kept_recall_statement(name, vectors=self.vectors)

    def _recall_params(
        self, project_id: int, session_id: str, window: int, model: str | None, limit: int
    ) -> dict[str, Any]:
        return {
            **key(project_id, session_id=session_id),
            "exclude_session": session_id,
            "window": window,
            "words": RECALL_WORDS,
            "model": model,
            "limit": limit,
            "candidates": max(limit * 4, 20),
            "with_vectors": False,
            "text_weight": RECALL_TEXT_WEIGHT,
        }

    async def _rank_recall(
        self, conn: AsyncConnection[Any], params: dict[str, Any], model: str | None
    ) -> list[SearchResult]:
        # The user's other sessions ranked against this one's last messages, here and now.
        use_vector = model is not None and self.vectors
        (found,) = await _pipelined(conn, [recall_statement(use_vector)], params)
        return [_found(r)[0] for r in found]

    async def rank_recall(
        self,
        project_id: int,
        session_id: str,
        *,
        limit: int,
        window: int,
        model: str | None,
        words: int = RECALL_WORDS,
    ) -> list[SearchResult]:
        """Ranks a session's recall here and now, as GetMemory does when none is kept.

        By the words of the session's last `window` messages (at most `words` of them),
        fused with its recall vector when `model` is given and vectors are kept. For the
        retrieval evaluation, which compares caps (docs/search.md); empty for a session
        without a user.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = self._recall_params(project_id, session_id, window, model, limit)
        params["words"] = words
        async with self._connect(single=True) as conn:
            return await self._rank_recall(conn, params, model)

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
        deadlocking. Soft-deleted messages leave the queue without a vector.
        Returns how many queue rows were settled (0 when nothing was due, and always where
        vectors are not kept: the queue then feeds keep_word_recall_due).

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
        try:
            vectors = await embed([_embedding_text(r["role"], r["content"]) for r in live])
        except BaseException:
            async with self._connect(single=True) as conn:
                await conn.execute(query("release_embeddings"), _keys_params(keys))
            raise
        by_key = {
            (r["project_id"], r["session_id"], r["sequence"]): vector_text(v)
            for r, v in zip(live, vectors, strict=True)
        }
        # Citus locks no rows across shards, so the save does not lock the batch's sessions
        # first: a DeleteUser or purge that deleted one of its messages and commits while the
        # save runs makes the vectors' foreign key check fail (the key is co-located, checked
        # on the shard). The save then runs again with the same vectors in a new snapshot,
        # where the deleted rows are gone (save_embeddings joins the live messages), rather
        # than leaving the whole batch leased until LEASE_SECONDS pass.
        for attempt in range(_SAVE_ATTEMPTS):
            try:
                await self._save_batch(keys, live, by_key, model, window)
                break
            except FailedPrecondition:
                if not self.citus or attempt + 1 == _SAVE_ATTEMPTS:
                    raise
        return len(claimed)

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

    async def reindex_total(self, model: str) -> int:
        """How many live messages lack a vector of `model`.

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "reindex_total", {"model": model})
        return int(row["n"]) if row else 0

    async def embedding_lag(self) -> tuple[int, float]:
        """(messages waiting for an embedding, seconds the oldest has waited).

        Raises:
            Unavailable: the database cannot be reached.
        """
        async with self._connect(single=True) as conn:
            row = await fetch_one(conn, "embedding_lag", {})
        assert row is not None
        return int(row["queued"]), float(row["oldest"])


async def _pipelined(
    conn: AsyncConnection[Any], statements: list[sql.SQL | sql.Composed], params: dict[str, Any]
) -> list[list[Row]]:
    # Every statement is sent, then one Sync: one round trip for all of them. The results
    # are read after the pipeline's end (they are all in by then): fetching inside it would
    # flush and wait once more before the Sync's own wait.
    # Never prepared: a prepared search soon runs on PostgreSQL's generic plan, which does
    # not know the query's words and was measured 10-20 times slower than a custom plan.
    async with conn.pipeline():
        cursors = [conn.cursor(row_factory=dict_row) for _ in statements]
        for cursor, statement in zip(cursors, statements, strict=True):
            await cursor.execute(statement, params, prepare=False)
    return [await cursor.fetchall() for cursor in cursors]


def _embedding_text(role: str, content: str) -> str:
    # The speaker is part of what a message is about ("what did Priya suggest?").
    return f"{role}: {content}" if role else content

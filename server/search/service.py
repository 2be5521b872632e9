"""SearchMemory and recall: the query's embedding (off the event loop), the store, re-ranking."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from server.domain import Message, SearchOutcome, SearchQuery, SearchResult, Session
from server.errors import FailedPrecondition, InvalidArgument, Unavailable
from server.search.embedding import PROBE_WORD, Embedder, EmbeddingError
from server.search.ranking import context_block, mmr_order
from server.search.threads import DEFAULT_SIZE, DaemonThreads
from server.store import Store

log = logging.getLogger(__name__)

#: How many of a session's most recent messages stand for it in recall.
RECALL_WINDOW = 6

#: Candidates each ranker contributes to a fusion, per result asked for (and at least).
_DEPTH_FACTOR, _MIN_DEPTH = 4, 40

#: Candidates maximal marginal relevance chooses from, at most.
_MAX_MMR_CANDIDATES = 400

#: Seconds a server goes by its last look at the models whose vectors are stored.
MODELS_LOOK_SECONDS = 30.0


def other_models_note(model: str, others: list[str]) -> str:
    """What a search with `model` cannot see while vectors of `others` are stored."""
    return (
        f"vectors of another embedding model ({', '.join(others)}) are stored: the messages "
        f"it embedded are not found by meaning with {model} (full-text and hybrid search "
        "still find them by words) until `memstore reindex` embeds them again"
    )


@dataclass(frozen=True, slots=True)
class Memory:
    """GetMemory's answer: the session, its last messages, and the user-level memory."""

    session: Session | None
    messages: list[Message]
    relevant: list[SearchResult]
    context: str
    #: The messages stop short of lastn: with the rest they would pass the answer's budget.
    cut: bool = False
    #: The memories stop short of relevant_limit: likewise, past their own budget.
    relevant_cut: bool = False
    #: The memories could not be read (a Citus worker out of reach): `relevant` is empty.
    relevant_unavailable: bool = False


class Searcher:
    """Runs searches and recall over the store with the configured embedder (or none)."""

    def __init__(self, store: Store, embedder: Embedder | None) -> None:
        self._store = store
        self._embedder = embedder
        # The query's model runs here, not in asyncio's executor, which a stopping process
        # waits for: a silent remote model held its exit (server/search/threads.py).
        self._threads = DaemonThreads(DEFAULT_SIZE, "query-embedder")
        # The other models whose vectors are stored (embedding_models), and when looked at.
        self._others: list[str] = []
        self._others_seen = -math.inf

    def why_not_semantic(self) -> str:
        """Why vectors cannot take part in ranking here; empty when they can."""
        if not self._store.vectors:
            return (
                "semantic search needs the pgvector extension, which this database does not "
                "have (the PostgreSQL server lacks it, or only a superuser may create it: the "
                "server's log says which); full-text search only"
            )
        if self._embedder is None:
            return "semantic search is off: the server runs with --embedder none"
        return ""

    async def search(
        self, project_id: int, q: SearchQuery, *, budget: int | None = None
    ) -> SearchOutcome:
        """The best messages for `q`, with how they were ranked; with a `budget`, read only
        while those before one hold less than `budget` bytes of content (`cut` when that
        stopped them). Diversified searches (mmr_lambda) read their candidates without
        content or metadata, pick among them by MMR, then read the picked up to the budget.

        Raises:
            FailedPrecondition: semantic ranking (or diversity) was asked for and cannot be
                served here (reason SEMANTIC_UNAVAILABLE).
            InvalidArgument: the embedding model refuses the text.
            Unavailable: the database (or a remote embedder) cannot be reached.
        """
        reason = "" if q.search_type == "full_text" else self.why_not_semantic()
        if reason and (q.search_type == "semantic" or q.mmr_lambda is not None):
            raise FailedPrecondition(reason, reason="SEMANTIC_UNAVAILABLE")
        vector = None
        if q.search_type != "full_text" and self._embedder is not None and not reason:
            vector = (await self.embed([q.text]))[0]
        depth = max(q.limit * _DEPTH_FACTOR, _MIN_DEPTH)
        if q.mmr_lambda is not None:
            # The candidates without their values, then only the chosen read, up to the budget.
            candidates, waiting = await self._store.search_candidates(
                project_id,
                q,
                vector=vector,
                model=self.model or "",
                limit=min(depth, _MAX_MMR_CANDIDATES),
                depth=depth,
            )
            order = mmr_order(
                [c.score for c in candidates], [c.vector for c in candidates], q.limit, q.mmr_lambda
            )
            results, cut = await self._store.read_chosen(
                project_id, [candidates[i] for i in order], budget=budget
            )
        else:
            found, waiting, cut = await self._store.search_messages(
                project_id,
                q,
                vector=vector,
                model=self.model or "",
                limit=q.limit,
                depth=depth,
                budget=budget,
            )
            results = [result for result, _ in found]
        model = self._embedder.name if vector is not None and self._embedder else None
        if model is not None and (others := await self._other_models(model)):
            reason = other_models_note(model, others)
        return SearchOutcome(
            results, semantic=vector is not None, unembedded=waiting, note=reason, cut=cut
        )

    async def _other_models(self, model: str) -> list[str]:
        # After a change of --embedder, semantic search answered nothing of what the old
        # model had embedded, and nothing said why (an audit): looked at every
        # MODELS_LOOK_SECONDS, one small read.
        now = time.monotonic()
        if now - self._others_seen >= MODELS_LOOK_SECONDS:
            self._others = await self._store.other_models(model)
            self._others_seen = now
        return self._others

    async def get_memory(
        self,
        project_id: int,
        session_id: str,
        lastn: int,
        relevant_limit: int,
        *,
        budget: int | None,
        relevant_budget: int | None = None,
    ) -> Memory:
        """The session's last `lastn` messages and up to `relevant_limit` memories of its user;
        with a `budget`, the messages are read only while they hold less than `budget` bytes
        of content (`cut` when that stopped them); the memories likewise with a
        `relevant_budget` (`relevant_cut`). On Citus, memories the store could not reach
        leave `relevant` empty and `relevant_unavailable` set (the window is whole).

        Raises:
            Unavailable: the database cannot be reached.
        """
        recalled = await self._store.get_memory_with_recall(
            project_id,
            session_id,
            lastn,
            limit=relevant_limit,
            window=RECALL_WINDOW,
            model=self.model if not self.why_not_semantic() else None,
            budget=budget,
            relevant_budget=relevant_budget,
        )
        return Memory(
            recalled.session,
            recalled.messages,
            recalled.relevant,
            context_block(recalled.relevant),
            recalled.cut,
            recalled.relevant_cut,
            recalled.relevant_unavailable,
        )

    async def _embeds_a_word(self) -> bool:
        # As the worker tells a text the model refuses from a model refusing everything (its
        # name or key wrong: the server's fault, UNAVAILABLE as any failing model).
        assert self._embedder is not None
        try:
            await self._threads.run(self._embedder.embed, [PROBE_WORD])
        except EmbeddingError:
            return False
        return True

    @property
    def model(self) -> str | None:
        """The name of the model whose vectors this server reads, if any."""
        return self._embedder.name if self._embedder is not None else None

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors of `texts`, computed in a thread so the event loop keeps serving.

        Raises:
            InvalidArgument: the model refuses the text (too long for it, say) while it
                embeds a word: the text's fault, so a retry would fail alike.
            Unavailable: the model failed (a remote embedder unreachable or erring).
        """
        assert self._embedder is not None
        try:
            return await self._threads.run(self._embedder.embed, texts)
        except EmbeddingError as exc:
            if exc.refused and await self._embeds_a_word():
                raise InvalidArgument.field(
                    "text",
                    f"the embedding model refuses it ({exc}); shorten it, or search with "
                    "SEARCH_TYPE_FULL_TEXT",
                ) from exc
            log.warning("embedding the query failed: %s", exc)
            raise Unavailable(
                f"the embedding model failed ({exc}); retry, or search with SEARCH_TYPE_FULL_TEXT",
                reason="EMBEDDER_UNAVAILABLE",
            ) from exc

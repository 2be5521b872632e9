"""The search and recall methods of the Store (see sql/search.sql); the embedding queue's
are in embeddings.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import cache, cached_property
from typing import Any, NamedTuple

from psycopg import AsyncConnection, AsyncRawCursor, sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from server.domain import Message, SearchQuery, SearchResult, Session
from server.store import rows
from server.store.base import StoreBase, key
from server.store.budget import budget_rows
from server.store.coalesce import Coalescer
from server.store.db import Row, fetch_all, fetch_one, fetch_pipelined, fetch_rows
from server.store.messages import memory_window, window_fragment
from server.store.queries import compact, positional, query
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

#: Memories the worker ranks and keeps per session for GetMemory's recall (a larger
#: relevant_limit is ranked on the request path).
RECALL_KEEP = 20

#: Words of a session's last messages that recall matches (recall_query_text): the cost of
#: ranking each of the user's messages grows with them (docs/search.md, "Without pgvector").
#: 64 from make eval's recall: 32 lost 0.074 of recall@10 by words where the question follows
#: five messages of other talk, 64 lost nothing against every word (docs/search.md).
RECALL_WORDS = 64
#: The most words of a search's text that it matches by (match_words): each word of the
#: query costs a posting list, and each matched message a rank against all of them. A text
#: of 10,000 characters (1,400 distinct words) took 10.2 s over 30,000 messages, 0.46 s cut
#: to 64 (docs/search.md, "Long texts").
SEARCH_WORDS = 64
#: A word as PostgreSQL's default text-search parser roughly sees it: letters and digits.
#: Not `\w+`, which holds the underscore that the parser splits on: 1,400 words joined by
#: underscores counted as one, and all of them reached PostgreSQL (2.2 s against 0.10 s for
#: the same words joined by spaces, over 10,000 messages: an audit, 2026-12-03).
_WORD = re.compile(r"[^\W_]+")

#: The weight of the full-text score in recall's hybrid ranking (the nearest of the window's
#: vectors has the rest, recall_distance_window). Chosen with that ranking on the odd-numbered
#: questions of make eval's recall, for the sum and the least of recall@10 over its three
#: windows then (docs/search.md, Recall quality): 0.3 (search's) lost 0.03-0.04 in each. With
#: RECALL_NEAREST_FLOOR, 0.4, 0.3 and 0.6 each lost on the five windows' sum.
RECALL_TEXT_WEIGHT = 0.5

#: The cosine distance no window message's nearest memory counts as nearer than in recall's
#: ranking (recall_distance_window): each window message's distances are raised by what its
#: nearest falls short of it. Without it, five lines the user's history holds (distance 0)
#: and their topic pushed a question after or before them out of the top 10 (make eval's
#: history-talk windows: recall@10 0.263). 0.4 was best of 0.1-0.6 on the odd-numbered
#: questions for the sum of recall@10 over the five windows (docs/search.md, Recall quality).
RECALL_NEAREST_FLOOR = 0.4

#: One coalesced GetMemory call: (project_id, session_id, lastn, relevant_limit, model,
#: budget, relevant budget), the model "" for recall kept by words; a call with
#: relevant_limit 0 reads no recall, so its model is None and it joins any statement of its
#: project.
MemoryKey = tuple[int, str, int, int, str | None, int | None, int | None]

#: A call's budget in a batch read by budget when the call itself has none: int8's largest.
NO_BUDGET = (1 << 63) - 1


class Recalled(NamedTuple):
    """GetMemory's reads: the live session (None if absent or deleted), its last messages
    (oldest first), the user's memories from other sessions (best first), whether the
    window was `cut` (the messages stop short of `lastn` where they passed the byte budget)
    and whether the memories were (`relevant_cut`: short of the limit, past theirs)."""

    session: Session | None
    messages: list[Message]
    relevant: list[SearchResult]
    cut: bool = False
    relevant_cut: bool = False


#: A found message and, when asked for, its vector (for diversity re-ranking).
Found = tuple[SearchResult, list[float] | None]


def vector_text(vector: Sequence[float]) -> str:
    """A vector in pgvector's text form, '[0.1,0.2,...]'."""
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def search_filters(q: SearchQuery) -> tuple[sql.Composable, dict[str, Any]]:
    """The scope fragments of a search and their parameters (one session named directly)."""
    parts: list[sql.SQL | sql.Composed] = []
    params: dict[str, Any] = {}
    for attribute, named in _FILTERS:
        value: Any = getattr(q, attribute)
        if value is None:
            continue
        param, fragment = attribute, named
        if attribute == "session_ids" and len(value) == 1:
            # One session named directly: Citus routes it to the session's shard.
            param, fragment, value = "session_id", "search_filter_session", value[0]
        parts.append(query(fragment))
        if attribute == "metadata_contains":
            value = Jsonb(value)
        elif isinstance(value, tuple):
            value = list(value)
        params[param] = value
    return sql.SQL(" ").join(parts), params


def ranking_statement(
    name: str,
    given: sql.Composable,
    filters: sql.Composable,
    match: sql.Composable,
    distance: sql.Composable,
) -> sql.Composed:
    """The ranking statement `name` (search_full_text, search_words, search_semantic or
    search_hybrid) over a query fragment (`given`), a scope (`filters`), a match and a
    distance fragment. Its full-text candidates (search_text_candidates) are filled first:
    format does not fill the placeholders of a fragment it puts in."""
    candidates = query("search_text_candidates").format(match=match, filters=filters)
    return query(name).format(
        query=given, filters=filters, match=match, distance=distance, text_candidates=candidates
    )


def _statement(vector: bool, semantic_only: bool) -> str:
    if not vector:
        return "search_full_text"
    return "search_semantic" if semantic_only else "search_hybrid"


def budgeted_ranking(statement: sql.Composed, budgeted: bool) -> sql.Composed:
    """A ranking statement, or (`budgeted`) the same read only up to %(budget)s bytes of its
    rows' content and metadata (search_budgeted over search_sized: the rows past it are not
    read; `followed` says so)."""
    if not budgeted:
        return statement
    sized = query("search_sized").format(ranked=statement)
    return query("search_budgeted").format(rows=budget_rows(sized, query("search_order")))


def candidates_statement(ranked: sql.Composed) -> sql.Composed:
    """A ranking statement's rows without their content and metadata (search_candidates)."""
    return query("search_candidates").format(ranked=ranked)


@cache
def chosen_statement(budgeted: bool) -> sql.Composed:
    """search_chosen, or (`budgeted`) the same read only up to %(budget)s bytes of its rows
    in the chosen order (search_chosen_budgeted)."""
    statement = query("search_chosen")
    if not budgeted:
        return sql.Composed([statement])
    sized = query("search_sized").format(ranked=statement)
    return query("search_chosen_budgeted").format(
        rows=budget_rows(sized, sql.SQL("k.chosen_order"))
    )


@cache
def recall_statement(vector: bool, budgeted: bool = False, *, citus: bool = False) -> sql.SQL:
    """The statement that ranks recall on the request path (or in the worker, to keep it).

    The user's other live sessions against the session's last messages: by words alone, or
    (`vector`) fused with each message's distance to the nearest of the vectors of those
    messages; read up to %(budget)s bytes of content if `budgeted` (budgeted_ranking). Its
    parameters are _recall_params's. On Citus (`citus`) its query is given, as
    recall_given_citus computed it, and the owner named (%(user_id)s): Citus ran the
    session's own reads inside the ranking as subplans. Composed once, without its lines'
    indentation (`compact`); sent by recall_positional.
    """
    fragment: sql.Composable = query("recall_query_text")
    scope = sql.SQL(" ").join([query("recall_filter_user"), query("search_filter_other_sessions")])
    if citus:
        fragment = query("recall_given_vector" if vector else "recall_given_text")
        scope = _OWNER_SCOPE
    elif vector:
        fragment = query("recall_query_vector").format(
            words=fragment, window_vectors=query("recall_window_vectors"), filters=scope
        )
    statement = ranking_statement(
        _statement(vector, semantic_only=False),
        fragment,
        scope,
        query("recall_match_scan"),
        query("recall_distance_window"),
    )
    return sql.SQL(compact(budgeted_ranking(statement, budgeted).as_string(None)))


@cache
def recall_positional(
    vector: bool, budgeted: bool = False, *, citus: bool = False
) -> tuple[bytes, tuple[str, ...]]:
    """recall_statement with `$n` placeholders and their names (`queries.positional`): at
    4,597 bytes (with vectors) psycopg would parse its placeholders on every call."""
    return positional(recall_statement(vector, budgeted, citus=citus).as_string(None))


#: Recall's scope on Citus, the owner named: the user's sessions but the one being read.
_OWNER_SCOPE = sql.SQL(" ").join(
    [query("search_filter_user"), query("search_filter_other_sessions")]
)


@cache
def recall_query_citus(vector: bool) -> sql.SQL:
    """recall_query_citus, with the window's vectors if `vector`: on the session's shard."""
    vectors: sql.Composable = sql.SQL("NULL::text")
    if vector:
        vectors = sql.SQL("({})::text").format(query("recall_window_vectors"))
    statement = query("recall_query_citus").format(
        words=query("recall_query_text"), vectors=vectors
    )
    return sql.SQL(compact(statement.as_string(None)))


@cache
def recall_nearest_citus() -> sql.SQL:
    """recall_nearest_citus over the owner's other sessions: one fan-out."""
    return sql.SQL(
        compact(query("recall_nearest_citus").format(filters=_OWNER_SCOPE).as_string(None))
    )


async def recall_given_citus(
    conn: AsyncConnection[Any], values: dict[str, Any], vector: bool
) -> dict[str, Any] | None:
    """The parameters of recall's ranking on Citus (recall_statement with `citus`): `values`
    and the query computed apart, on the session's shard (recall_query_citus), then with
    vectors their nearest memories (recall_nearest_citus, one fan-out). None where there is
    nothing to rank: the session is not live, has no user or no message.
    """
    found = await fetch_one(conn, recall_query_citus(vector), values)
    if found is None:
        return None
    given = {
        **values,
        "user_id": found["owner"],
        "query": found["query"],
        "vectors": found["vectors"],
        "nearest": None,
    }
    if vector and found["vectors"] not in (None, "{}"):
        nearest = await fetch_all(conn, recall_nearest_citus(), given)
        given["nearest"] = [row["nearest"] for row in nearest] or None
    return given


@cache
def kept_recall_statement(
    name: str, *, vectors: bool, budgeted: bool = False, relevant_budgeted: bool = False
) -> sql.SQL:
    """A read of kept recall (get_memories_recall, recall_kept_keys_citus) over the table the
    worker keeps it in: session_embeddings with vectors, session_word_recall without;
    get_memories_recall's windows read up to their calls' budgets if `budgeted`, and their
    kept memories up to their relevant budgets if `relevant_budgeted`. Composed once, as
    memory_window: psycopg would compose it again at every execute."""
    if vectors:
        kept, kept_filter = "session_embeddings", query("recall_filter_kept_vectors")
    else:
        kept, kept_filter = "session_word_recall", sql.SQL("")
    window = window_fragment(budgeted=budgeted, coalesced=True)
    scan = query("kept_recall_scan")
    recall: sql.Composable = query("kept_recall").format(scan=scan)
    if relevant_budgeted:
        sized = query("kept_recall_sized").format(scan=scan)
        recall = budget_rows(sized, sql.SQL("k.rank"), sql.SQL("q.relevant_budget"))
    statement = query(name).format(
        kept=sql.Identifier(kept), kept_filter=kept_filter, window=window, recall=recall
    )
    return sql.SQL(compact(statement.as_string(None)))


def _kept(row: Row) -> SearchResult:
    # A part-1 row of get_memories_recall: the memory's message in the m_ columns.
    return SearchResult(
        message=rows.message(row, "m_"), user_id=row["user_id"], score=row["r_score"]
    )


def _followed(found: list[Row]) -> bool:
    # A budgeted read's last row says whether the budget left rows out after it.
    return bool(found) and bool(found[-1].get("followed"))


def _found(row: Row) -> Found:
    result = SearchResult(message=rows.message(row), user_id=row["user_id"], score=row["score"])
    return result, json.loads(row["vector"]) if row["vector"] is not None else None


class Candidate(NamedTuple):
    """A message diversified search may choose (search_candidates): its keys, its score and
    its vector (None when not embedded), without its content or metadata."""

    uuid: str
    session_id: str
    sequence: int
    score: float
    vector: list[float] | None


def _candidate(row: Row) -> Candidate:
    vector = json.loads(row["vector"]) if row["vector"] is not None else None
    return Candidate(
        str(row["uuid"]), row["session_id"], int(row["sequence"]), float(row["score"]), vector
    )


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
        budget: int | None = None,
    ) -> tuple[list[Found], int, bool]:
        """Up to `limit` live messages in scope, best first, the unembedded count, and
        whether the messages were cut.

        Without `vector` the ranking is by words only (for a hybrid search as hybrid
        scores a message not embedded yet: search_words); with it, q.search_type picks
        semantic or hybrid (which fuses the best `depth` of each ranker). The count (live
        messages in scope waiting for an embedding) is 0 when vectors are not kept. Both
        come from one round trip. With a `budget`, the messages are read best first only
        while those before one hold less than `budget` bytes of content and metadata
        (search_sized; the best always is): cut, they are fewer than `limit` although more
        were found.

        Raises:
            InvalidArgument: a value the database rejects (e.g. metadata_contains).
            Unavailable: the database cannot be reached.
        """
        found, count = await self._ranked(
            project_id,
            q,
            lambda ranked: budgeted_ranking(ranked, budget is not None),
            vector=vector,
            model=model,
            limit=limit,
            depth=depth,
            with_vectors=with_vectors,
            budget=budget,
        )
        return [_found(r) for r in found], count, _followed(found)

    async def search_candidates(
        self,
        project_id: int,
        q: SearchQuery,
        *,
        vector: Sequence[float] | None,
        model: str,
        limit: int,
        depth: int,
    ) -> tuple[list[Candidate], int]:
        """Up to `limit` live messages in scope, best first, as search_messages ranks them
        with vectors, but without their content and metadata (search_candidates): what
        diversified search chooses among before read_chosen reads the chosen. And the
        unembedded count, as search_messages's.

        Raises:
            InvalidArgument: a value the database rejects (e.g. metadata_contains).
            Unavailable: the database cannot be reached.
        """
        found, count = await self._ranked(
            project_id,
            q,
            candidates_statement,
            vector=vector,
            model=model,
            limit=limit,
            depth=depth,
            with_vectors=True,
            budget=None,
        )
        return [_candidate(r) for r in found], count

    async def _ranked(
        self,
        project_id: int,
        q: SearchQuery,
        wrap: Callable[[sql.Composed], sql.Composed],
        *,
        vector: Sequence[float] | None,
        model: str,
        limit: int,
        depth: int,
        with_vectors: bool,
        budget: int | None,
    ) -> tuple[list[Row], int]:
        """The rows of the ranking q asks for (full-text without `vector`, else q's
        search_type), read through `wrap` (the answer's statement over the ranking), and the
        unembedded count, in one round trip: search_messages's and search_candidates's."""
        filters, params = search_filters(q)
        use_vector = vector is not None and self.vectors
        fragment = query("search_query_vector" if use_vector else "search_query_text")
        name = _statement(use_vector, q.search_type == "semantic")
        if not use_vector and q.search_type == "hybrid":
            name = "search_words"  # hybrid with no vector to take part: its scores, by words
        ranked = ranking_statement(
            name, fragment, filters, query("search_match_index"), query("search_distance_query")
        )
        params.update(
            project_id=project_id,
            text=match_words(q.text),
            vector=vector_text(vector) if use_vector and vector is not None else None,
            model=model,
            limit=limit,
            candidates=depth,
            with_vectors=with_vectors,
            text_weight=HYBRID_TEXT_WEIGHT,
            budget=budget,
        )
        statements: list[sql.SQL | sql.Composed] = [wrap(ranked)]
        if self.vectors:
            statements.append(query("count_unembedded").format(filters=filters))
        async with self._connect(field="metadata_contains", single=True) as conn:
            found, *waiting = await fetch_pipelined(conn, statements, params)
        count = int(waiting[0][0]["n"]) if waiting else 0
        return found, count

    async def read_chosen(
        self, project_id: int, chosen: Sequence[Candidate], *, budget: int | None = None
    ) -> tuple[list[SearchResult], bool]:
        """The `chosen` candidates' messages in the order given, each with its candidate's
        score (search_chosen); one deleted since it was ranked is left out. With a `budget`,
        read only while those before one hold less than `budget` bytes of content and
        metadata, as search_messages's (the first always is), and whether that left one out.

        Raises:
            Unavailable: the database cannot be reached.
        """
        if not chosen:
            return [], False
        statement = chosen_statement(budget is not None)
        params = {
            "project_id": project_id,
            "chosen": [c.uuid for c in chosen],
            "chosen_scores": [c.score for c in chosen],
            "chosen_sessions": sorted({c.session_id for c in chosen}),
            "chosen_sequences": sorted({c.sequence for c in chosen}),
            "budget": budget,
        }
        async with self._connect(single=True) as conn:
            (found,) = await fetch_pipelined(conn, [statement], params)
        found.sort(key=lambda r: r["chosen_order"])
        return [_found(r)[0] for r in found], _followed(found)

    async def get_memory_with_recall(
        self,
        project_id: int,
        session_id: str,
        lastn: int,
        *,
        limit: int,
        window: int,
        model: str | None,
        budget: int | None,
        relevant_budget: int | None = None,
    ) -> Recalled:
        """GetMemory's window plus up to `limit` memories from the user's other sessions.

        With a `budget`, the window is read newest first and stops where the messages after
        one hold `budget` bytes of content (the newest is always read): then it is `cut`, and
        holds fewer than `lastn` messages although more are stored. Without one it is read
        whole (GetMemory gives none where `lastn` messages cannot pass the answer). The
        memories likewise with a `relevant_budget`, best first (`relevant_cut`); on Citus
        the kept ones (at most RECALL_KEEP) are read, then cut.

        The memories are the live messages of the same user's other live sessions most
        relevant to this session's last `window` messages. Where the worker has ranked them
        (for `model` with vectors, whenever it embeds the session's messages; by words
        without, whenever they arrive), they are read as it kept them, with deleted ones
        dropped: one round trip of index reads. Otherwise (not yet kept, more than it keeps,
        or vectors without a model) they are ranked here, by words fused with the recall
        vector when there is one: a second round trip. No model runs. With `limit` 0 only
        the window is read, in the statement concurrent calls share where recall is kept.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = self._recall_params(project_id, session_id, window, model, limit)
        params["lastn"] = lastn
        params["budget"] = budget
        relevant_cut = False
        kept_by = model if self.vectors else "" if self.word_recall else None
        stored = kept_by is not None and limit <= RECALL_KEEP
        if stored and self.citus and limit > 0:
            # Citus: the window and the kept keys on the session's shard (one round trip),
            # then the memories on the shards of the sessions they name only.
            async with self._connect(single=True) as conn:
                memory, kept_keys = await fetch_pipelined(
                    conn,
                    [
                        memory_window(budgeted=budget is not None),
                        self._kept_statement("recall_kept_keys_citus"),
                    ],
                    params,
                    prepare=True,
                )
                if memory and kept_keys:
                    kept = await _kept_live_citus(conn, params, kept_keys[0], limit)
                    kept, relevant_cut = _cut_by_content(kept, relevant_budget)
                else:
                    kept = []
        elif stored and kept_by is not None and not self.citus:
            # Concurrent calls share one statement (and its round trip), as GetUser's do;
            # those without recall too (their model is None: any statement serves them).
            with translated():
                found = await self._memory_loader.load(
                    (
                        project_id,
                        session_id,
                        lastn,
                        limit,
                        kept_by if limit > 0 else None,
                        budget,
                        relevant_budget,
                    )
                )
            memory, kept = found or ([], [])
            relevant_cut = bool(kept) and bool(kept[-1]["m_followed"])
            if not relevant_cut and _kept_short(kept, limit, kept[0]["kept_count"] if kept else 0):
                kept = []  # ranked on the request path below
        else:
            async with self._connect(single=True) as conn:
                memory = await fetch_all(conn, memory_window(budgeted=budget is not None), params)
            kept = []
        if not memory:
            return Recalled(None, [], [])
        session = rows.session(memory[0])
        if session.user_id is None:
            results: list[SearchResult] = []  # no user, no user-level memory
        elif kept:
            results = [_kept(r) for r in kept if r["m_uuid"] is not None]
        elif limit <= 0:
            results = []
        else:
            async with self._connect(single=True) as conn:
                ranked = await self._ranked_rows(conn, params, model, relevant_budget)
            results, relevant_cut = [_found(r)[0] for r in ranked], _followed(ranked)
        # Rows in order: the first is the oldest message read, followed if the budget cut it.
        cut = bool(memory[0]["m_followed"])
        return Recalled(
            session, rows.joined_messages(memory), results, cut, relevant_cut and bool(results)
        )

    @cached_property
    def _memory_loader(self) -> Coalescer[MemoryKey, tuple[list[Row], list[Row]]]:
        return Coalescer(self._get_memories, max_waiting_batches=self._pool.max_waiting)

    async def _get_memories(
        self, keys: list[MemoryKey]
    ) -> dict[MemoryKey, tuple[list[Row], list[Row]]]:
        # One get_memories_recall per project and model (one of each, in practice); calls
        # without recall (model None) join their project's first.
        groups: dict[tuple[int, str], list[MemoryKey]] = {}
        for k in sorted(keys, key=lambda k: k[4] is None):
            model = k[4]
            if model is None:
                model = next((m for p, m in groups if p == k[0]), "")
            groups.setdefault((k[0], model), []).append(k)
        found: dict[MemoryKey, tuple[list[Row], list[Row]]] = {}
        async with self._connect(single=True) as conn:
            for (project_id, model), group in groups.items():
                params = {
                    "project_id": project_id,
                    "model": model,
                    "session_ids": [k[1] for k in group],
                    "lastns": [k[2] for k in group],
                    "limits": [k[3] for k in group],
                    "budgets": [NO_BUDGET if k[5] is None else k[5] for k in group],
                    "relevant_budgets": [NO_BUDGET if k[6] is None else k[6] for k in group],
                }
                statement = self._kept_statement(
                    "get_memories_recall",
                    budgeted=any(k[5] is not None for k in group),
                    relevant_budgeted=any(k[6] is not None for k in group),
                )
                for row in await fetch_all(conn, statement, params):
                    parts = found.setdefault(group[row["i"] - 1], ([], []))
                    parts[row["part"]].append(row)
        return found

    def _kept_statement(
        self, name: str, *, budgeted: bool = False, relevant_budgeted: bool = False
    ) -> sql.SQL:
        return kept_recall_statement(
            name, vectors=self.vectors, budgeted=budgeted, relevant_budgeted=relevant_budgeted
        )

    @staticmethod
    def _recall_params(
        project_id: int, session_id: str, window: int, model: str | None, limit: int
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
            "nearest_floor": RECALL_NEAREST_FLOOR,
        }

    async def _rank_recall(
        self, conn: AsyncConnection[Any], params: dict[str, Any], model: str | None
    ) -> list[SearchResult]:
        return [_found(r)[0] for r in await self._ranked_rows(conn, params, model, None)]

    async def _ranked_rows(
        self,
        conn: AsyncConnection[Any],
        params: dict[str, Any],
        model: str | None,
        budget: int | None,
    ) -> list[Row]:
        # The user's other sessions ranked against this one's last messages, here and now;
        # read up to `budget` bytes of their content if given (its `followed` rows say so).
        use_vector = model is not None and self.vectors
        values = {**params, "budget": budget}
        if self.citus:
            given = await recall_given_citus(conn, values, use_vector)
            if given is None:
                return []
            values = given
        statement, names = recall_positional(use_vector, budget is not None, citus=self.citus)
        cursor = AsyncRawCursor(conn, row_factory=dict_row)
        # Never prepared, as _pipelined's searches.
        await cursor.execute(statement, [values[n] for n in names], prepare=False)
        return await fetch_rows(cursor)

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


async def _kept_live_citus(
    conn: AsyncConnection[Any], params: dict[str, Any], keys: Row, limit: int
) -> list[Row]:
    """Kept recall's rows as get_memories_recall's part 1 has them, read on Citus.

    `keys` is recall_kept_keys_citus's row: the owner and the kept keys, best first. Their
    live memories are read `limit` keys at a time (the next keys only when some of these are
    gone), so a call reaches the shards of at most `limit` sessions in the usual case. As in
    get_memories_recall: one row with a NULL m_uuid when the worker kept none, no row when
    fewer than `limit` of the kept are live any more, and fewer than it kept (the caller
    then ranks on the request path).
    """
    # As unnest of the three arrays, which the worker writes with equal lengths.
    columns = (keys["recall_sessions"], keys["recall_sequences"], keys["recall_scores"])
    ranked = list(zip(*columns, strict=False))
    found: list[Row] = []
    for start in range(0, len(ranked), max(limit, 1)):
        if len(found) >= limit:
            break
        part = ranked[start : start + max(limit, 1)]
        live = await fetch_all(
            conn,
            "recall_live_citus",
            {
                "project_id": params["project_id"],
                "owner": keys["owner"],
                "recall_sessions": sorted({session for session, _, _ in part}),
                "recall_sequences": sorted({sequence for _, sequence, _ in part}),
            },
        )
        # A key names the message it was kept for, not one made since under a session id
        # the purge freed (get_memories_recall's kept_recall_scan, migrations 0019, 0020).
        kept_at = keys["recall_kept_at"]
        by_key = {
            (row["session_id"], row["m_sequence"]): row
            for row in live
            if kept_at is None or row["m_created_at"] <= kept_at
        }
        for session, sequence, score in part:
            row = by_key.get((session, sequence))
            if row is not None and len(found) < limit:
                found.append({**row, "r_score": score})
    if not ranked:
        return [{"m_uuid": None}]
    return [] if _kept_short(found, limit, len(ranked)) else found


def _kept_short(found: list[Row], limit: int, kept: int) -> bool:
    """Whether kept recall's live memories (`found`, read up to `limit` of the `kept` keys)
    are fewer than the worker's ranking would give now: some were deleted since and too few
    are left. The store then ranks on the request path, as if nothing were kept, rather than
    answer a short list while other live memories of the user would fill it."""
    live = sum(1 for row in found if row["m_uuid"] is not None)
    return live < min(limit, kept)


def _cut_by_content(found: list[Row], budget: int | None) -> tuple[list[Row], bool]:
    """Kept recall's rows read on Citus (best first) cut as kept_recall_sized's running sum
    cuts them: each only while those before it hold less than `budget` bytes of content and
    metadata (as PostgreSQL prints it: json.dumps' separators); and whether that left one
    out."""
    if budget is None:
        return found, False
    before = 0
    for i, row in enumerate(found):
        if before >= budget:
            return found[:i], True
        content, metadata = row.get("m_content"), row.get("m_metadata")
        before += len(content.encode()) if content is not None else 0
        before += len(json.dumps(metadata, ensure_ascii=False).encode()) if metadata else 0
    return found, False


def match_words(text: str) -> str:
    """The text a search matches by words: `text` itself when it holds at most SEARCH_WORDS
    words, else its SEARCH_WORDS longest distinct words (a stand-in for the rarest, and past
    the stopwords; the first seen first among equals). The semantic ranker embeds the whole
    text."""
    words = _WORD.findall(text)
    if len(words) <= SEARCH_WORDS:
        return text
    distinct = sorted(dict.fromkeys(w.casefold() for w in words), key=len, reverse=True)
    return " ".join(distinct[:SEARCH_WORDS])

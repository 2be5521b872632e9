"""The search methods of the Store: SearchMemory's rankings over live messages (see
sql/search.sql); GetMemory's recall is in recall.py, the embedding worker's in embeddings.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, NamedTuple

from psycopg import sql
from psycopg.types.json import Jsonb

from server.domain import SearchQuery, SearchResult
from server.store import rows
from server.store.base import StoreBase
from server.store.budget import budget_rows, followed
from server.store.db import Row, fetch_pipelined
from server.store.queries import query

#: (query attribute, fragment) of every optional search filter with a value.
_FILTERS = (
    ("user_id", "search_filter_user"),
    ("session_ids", "search_filter_sessions"),
    ("role_types", "search_filter_role_types"),
    ("metadata_contains", "search_filter_metadata"),
    ("created_after", "search_filter_created_after"),
    ("created_before", "search_filter_created_before"),
)

#: The scope of one user's live sessions (search_filter_user, its id %(user_id)s): search's,
#: and recall's on Citus, where the owner is named.
USER_SCOPE = query("search_filter_user")

#: The weight of the full-text score in a hybrid ranking (the vector score has the rest).
#: Chosen on the odd-numbered questions of the retrieval evaluation (docs/search.md).
HYBRID_TEXT_WEIGHT = 0.3

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


def ranking_name(vector: bool, semantic_only: bool) -> str:
    """The ranking statement by words alone, or (`vector`) by meaning or both."""
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


def _found(row: Row) -> Found:
    return rows.search_result(row), json.loads(row["vector"]) if row["vector"] is not None else None


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
        return [_found(r) for r in found], count, followed(found)

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
        name = ranking_name(use_vector, q.search_type == "semantic")
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
        # Scoped to one session, the ranking reaches that session's shard only; otherwise
        # every worker's (a fan-out).
        one = q.session_ids[0] if q.session_ids and len(q.session_ids) == 1 else None
        async with self._connect(
            field="metadata_contains", single=True, session=one, fans_out=one is None
        ) as conn:
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
        sessions = sorted({c.session_id for c in chosen})
        params = {
            "project_id": project_id,
            "chosen": [c.uuid for c in chosen],
            "chosen_scores": [c.score for c in chosen],
            "chosen_sessions": sessions,
            "chosen_sequences": sorted({c.sequence for c in chosen}),
            "budget": budget,
        }
        # The picks of one session are read on its worker's shard; of several, on every
        # worker's (a fan-out).
        one = sessions[0] if len(sessions) == 1 else None
        async with self._connect(single=True, session=one, fans_out=one is None) as conn:
            (found,) = await fetch_pipelined(conn, [statement], params)
        found.sort(key=lambda r: r["chosen_order"])
        return [rows.search_result(r) for r in found], followed(found)


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

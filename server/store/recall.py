"""GetMemory's recall, the Store's methods: the live messages of the user's other sessions
most relevant to a session's last ones, read as the worker kept them (kept_recall.py) or
ranked here (see sql/recall.sql, whose fragments fill search.sql's rankings)."""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

from psycopg import AsyncConnection, AsyncRawCursor, sql
from psycopg.rows import dict_row

from server.domain import Message, SearchResult, Session
from server.errors import DeadlineExceeded, Unavailable
from server.store import rows
from server.store.base import key
from server.store.budget import followed
from server.store.db import Row, fetch_all, fetch_one, fetch_rows
from server.store.kept_recall import KeptRecallMethods, kept_result
from server.store.messages import memory_window
from server.store.queries import compact, positional, query
from server.store.search import USER_SCOPE, budgeted_ranking, ranking_name, ranking_statement

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


class Recalled(NamedTuple):
    """GetMemory's reads: the live session (None if absent or deleted), its last messages
    (oldest first), the user's memories from other sessions (best first), whether the
    window was `cut` (the messages stop short of `lastn` where they passed the byte budget),
    whether the memories were (`relevant_cut`: short of the limit, past theirs) and whether
    they could not be read at all (`relevant_unavailable`)."""

    session: Session | None
    messages: list[Message]
    relevant: list[SearchResult]
    cut: bool = False
    relevant_cut: bool = False
    #: On Citus: the window was read and the memories could not be (a worker holding some of
    #: the user's sessions is out of reach); `relevant` is empty.
    relevant_unavailable: bool = False


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
            words=fragment,
            window_vectors=_WINDOW_VECTORS,
            window_scan=_WINDOW_SCAN,
            memories=_memories(scope),
        )
    statement = ranking_statement(
        ranking_name(vector, semantic_only=False),
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
_OWNER_SCOPE = sql.SQL(" ").join([USER_SCOPE, query("search_filter_other_sessions")])


def _memories(scope: sql.Composable) -> sql.Composed:
    """The memories in `scope` whose distance to the window's vectors recall ranks by
    (recall_memories)."""
    return query("recall_memories").format(filters=scope)


#: The session's last embedded messages (recall_window_scan), and their vectors.
_WINDOW_SCAN = query("recall_window_scan")
_WINDOW_VECTORS = query("recall_window_vectors").format(window_scan=_WINDOW_SCAN)


@cache
def recall_query_citus(vector: bool) -> sql.SQL:
    """recall_query_citus, with the window's vectors if `vector`: on the session's shard."""
    vectors: sql.Composable = sql.SQL("NULL::text")
    if vector:
        vectors = sql.SQL("({})::text").format(_WINDOW_VECTORS)
    statement = query("recall_query_citus").format(
        words=query("recall_query_text"), vectors=vectors
    )
    return sql.SQL(compact(statement.as_string(None)))


@cache
def recall_nearest_citus() -> sql.SQL:
    """recall_nearest_citus over the owner's other sessions: one fan-out."""
    return sql.SQL(
        compact(
            query("recall_nearest_citus").format(memories=_memories(_OWNER_SCOPE)).as_string(None)
        )
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


class RecallMethods(KeptRecallMethods):
    """GetMemory's recall: read as the embedding worker kept it, or ranked on the request
    path (and by the worker, to keep it)."""

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

        On Citus a worker out of reach fails the calls of its own shards, but not the window
        of a session elsewhere: where the window was read and the memories' shards (the
        user's other sessions) could not all be reached, or did not all answer within the
        recall timeout (KeptRecallMethods._recall_within: a worker that stopped answering),
        the window is answered with no memories and `relevant_unavailable` says so.

        Raises:
            Unavailable: the database cannot be reached.
        """
        params = self._recall_params(project_id, session_id, window, model, limit)
        params["lastn"] = lastn
        params["budget"] = budget
        kept_by = model if self.vectors else "" if self.word_recall else None
        if kept_by is not None and limit <= RECALL_KEEP and (limit > 0 or not self.citus):
            memory, kept, relevant_cut, unreachable = await self._read_kept(
                params, kept_by, relevant_budget
            )
        else:
            async with self._connect(single=True, session=session_id) as conn:
                memory = await fetch_all(conn, memory_window(budgeted=budget is not None), params)
            kept, relevant_cut, unreachable = [], False, False
        if not memory:
            return Recalled(None, [], [])
        session = rows.session(memory[0])
        if session.user_id is None:
            results: list[SearchResult] = []  # no user, no user-level memory
        elif kept:
            results = [kept_result(r) for r in kept if r["m_uuid"] is not None]
        elif limit <= 0 or unreachable:
            results = []
        elif self.citus and self._refusing():
            # Ranked here, the memories are read on every worker: none while one of them is
            # found silent (its fuse blown: server/store/fuse.py).
            results, unreachable = [], True
        elif (trial := self._recall_trial()) is None:
            results, unreachable = [], True
        else:
            try:
                async with self._connect(single=True, within=self._recall_within()) as conn:
                    ranked = await self._ranked_rows(conn, params, model, relevant_budget)
            except (Unavailable, DeadlineExceeded) as exc:
                if not self._recall_lost(exc):
                    raise
                ranked, unreachable = [], True
            else:
                self._recall_answered(trial)
            results, relevant_cut = [rows.search_result(r) for r in ranked], followed(ranked)
        # Rows in order: the first is the oldest message read, followed if the budget cut it.
        cut = bool(memory[0]["m_followed"])
        unavailable = unreachable and session.user_id is not None
        self.recall_unavailable += int(unavailable)
        return Recalled(
            session,
            rows.joined_messages(memory),
            results,
            cut,
            relevant_cut and bool(results),
            unavailable,
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
        return [rows.search_result(r) for r in await self._ranked_rows(conn, params, model, None)]

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

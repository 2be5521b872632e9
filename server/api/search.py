"""SearchMemory: validates a search, runs it through the Searcher, converts the results."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from memstore.v1 import session_service_pb2 as pb
from server import off_loop
from server.api import answer_size, convert
from server.api import metadata_checks as meta
from server.api import validation as val
from server.api.base import Context, ServicerBase
from server.api.status import unary_errors
from server.domain import SearchOutcome, SearchQuery, SearchResult, SearchType
from server.search.service import Searcher

#: The most results (and recalled memories) one call returns.
MAX_SEARCH_LIMIT = 100
DEFAULT_SEARCH_LIMIT = 10
#: Memories GetMemory recalls when the request does not say.
DEFAULT_RELEVANT_LIMIT = 5
#: Characters of query text at most.
MAX_QUERY_CHARS = 10_000
#: Session ids one search may name at most.
MAX_SEARCH_SESSIONS = 100

_SEARCH_TYPES: dict[int, SearchType] = {
    pb.SEARCH_TYPE_UNSPECIFIED: "hybrid",
    pb.SEARCH_TYPE_HYBRID: "hybrid",
    pb.SEARCH_TYPE_FULL_TEXT: "full_text",
    pb.SEARCH_TYPE_SEMANTIC: "semantic",
}


class SearchServicer(ServicerBase):
    """The search RPC of memstore.v1.SessionService (mixed into SessionServicer)."""

    _searcher: Searcher

    @unary_errors
    async def SearchMemory(self, request: pb.SearchMemoryRequest, context: Context) -> bytes:
        query = search_query(request)
        outcome = await self._searcher.search(
            self._project(context), query, budget=answer_size.memory_budget(query.limit)
        )
        if outcome.cut:
            raise answer_size.refuse_cut_answer("limit", f"{query.limit} results")
        # Up to 100 results of 64 KiB of metadata each: tenths of a second of protobuf to
        # build and serialize, in a thread then (off_loop), the results' text telling when.
        size = answer_size.text_at_least(
            (r.message for r in outcome.results), off_loop.OFF_LOOP_BYTES
        )
        return await off_loop.run(size, _search_answer, outcome, size)


def _search_answer(outcome: SearchOutcome, size: int) -> bytes:
    response = pb.SearchMemoryResponse(
        semantic=outcome.semantic, unembedded_messages=outcome.unembedded, note=outcome.note
    )
    add_results(response.results, outcome.results)
    return answer_size.checked_answer(
        response, size, f"{len(outcome.results)} results", limit="results"
    )


def search_query(request: pb.SearchMemoryRequest) -> SearchQuery:
    """The validated SearchQuery of a request.

    Raises:
        InvalidArgument: naming each bad field.
    """
    v = val.Violations()
    if not val.has_visible(request.text):
        v.add("text", "is required: the words or question to search for")
    else:
        val.check_text(v, "text", request.text, MAX_QUERY_CHARS)
    if request.user_id and request.session_ids:
        v.add("session_ids", "cannot be combined with user_id; send one scope or neither")
    val.check_id(v, "user_id", request.user_id, required=False)
    if len(request.session_ids) > MAX_SEARCH_SESSIONS:
        v.add("session_ids", f"at most {MAX_SEARCH_SESSIONS} ids (got {len(request.session_ids)})")
    for i, session_id in enumerate(request.session_ids):
        val.check_id(v, f"session_ids[{i}]", session_id)
    limit = request.limit or DEFAULT_SEARCH_LIMIT
    if not 0 <= request.limit <= MAX_SEARCH_LIMIT:
        v.add("limit", f"must be between 0 and {MAX_SEARCH_LIMIT} (got {request.limit})")
    search_type = _SEARCH_TYPES.get(request.search_type)
    if search_type is None:
        v.add("search_type", f"{request.search_type} is not a SearchType value")
    mmr = request.mmr_lambda if request.HasField("mmr_lambda") else None
    if mmr is not None and not 0.0 <= mmr <= 1.0:
        v.add("mmr_lambda", f"must be between 0 and 1 (got {mmr:g})")
    elif mmr is not None and search_type == "full_text":
        v.add("mmr_lambda", "diversifies by meaning: use it with hybrid or semantic search")
    roles = tuple(
        val.role_type(v, f"role_types[{i}]", value) for i, value in enumerate(request.role_types)
    )
    contains = meta.containment(v, "metadata_contains", request.metadata_contains)
    after = _bound(v, request, "created_after")
    before = _bound(v, request, "created_before")
    val.time_range(v, "created_after", after, "created_before", before)
    v.raise_if_any()
    return SearchQuery(
        text=request.text,
        search_type=search_type or "hybrid",
        limit=limit,
        user_id=request.user_id or None,
        session_ids=tuple(request.session_ids) or None,
        role_types=roles or None,
        metadata_contains=contains if request.HasField("metadata_contains") else None,
        created_after=after,
        created_before=before,
        mmr_lambda=mmr,
    )


def _bound(v: val.Violations, request: pb.SearchMemoryRequest, field: str) -> datetime | None:
    if not request.HasField(field):  # type: ignore[arg-type]
        return None
    return val.timestamp(v, field, getattr(request, field))


def relevant_limit(v: val.Violations, request: pb.GetMemoryRequest) -> int:
    """GetMemory's relevant_limit: unset is the default (5), 0 none, at most 100."""
    if not request.HasField("relevant_limit"):
        return DEFAULT_RELEVANT_LIMIT
    value = request.relevant_limit
    if not 0 <= value <= MAX_SEARCH_LIMIT:
        v.add("relevant_limit", f"must be between 0 and {MAX_SEARCH_LIMIT} (got {value})")
        return 0
    return value


def add_results(
    target: RepeatedCompositeFieldContainer[pb.SearchResult], results: Iterable[SearchResult]
) -> None:
    """Appends each result to a repeated SearchResult field."""
    for found in results:
        entry = target.add(
            session_id=found.message.session_id, user_id=found.user_id or "", score=found.score
        )
        convert.message_to_proto(found.message, entry.message)

"""Zep's search routes onto SearchMemory: the same validation (a SearchMemoryRequest is built
and checked by server/api/search.py) and the same Searcher."""

from __future__ import annotations

import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from memstore.v1 import session_service_pb2 as pb
from server import off_loop
from server.api import answer_size
from server.api import metadata_checks as meta
from server.api import validation as val
from server.api.search import search_query
from server.domain import MAX_EXACT_INT, JsonObject, SearchOutcome
from server.errors import InvalidArgument
from server.rest import body as b
from server.rest import convert as c
from server.rest import params
from server.rest.answers import json_answer
from server.rest.routing import endpoint, project, services

#: Zep's search types, and memstore's own names, to SearchType values. Zep's "similarity"
#: is memstore's hybrid ranking (words and meaning); "mmr" is hybrid diversified by MMR.
_TYPES = {
    "similarity": pb.SEARCH_TYPE_HYBRID,
    "mmr": pb.SEARCH_TYPE_HYBRID,
    "hybrid": pb.SEARCH_TYPE_HYBRID,
    "full_text": pb.SEARCH_TYPE_FULL_TEXT,
    "semantic": pb.SEARCH_TYPE_SEMANTIC,
}
#: Zep's default MMR lambda when "mmr" is asked without one.
_MMR_LAMBDA = 0.5


def _request(data: JsonObject, limit: int | None) -> tuple[pb.SearchMemoryRequest, float | None]:
    """The SearchMemoryRequest of a Zep search body, and its min_score."""
    v = val.Violations()
    request = pb.SearchMemoryRequest(limit=limit or 0)
    request.text = b.optional_str(v, data, "text") or ""
    request.user_id = b.optional_str(v, data, "user_id") or ""
    ids = data.get("session_ids")
    if ids is not None:
        if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
            request.session_ids.extend(ids)
        else:
            v.add("session_ids", "must be an array of strings")
    scope = data.get("search_scope")
    if scope not in (None, "", "messages"):
        v.add("search_scope", f"{str(scope)[:64]!r} is not served: memstore searches messages")
    kind = data.get("search_type") or "similarity"
    if isinstance(kind, str) and kind in _TYPES:
        request.search_type = _TYPES[kind]
    else:
        v.add("search_type", f"{str(kind)[:64]!r} is not one of {', '.join(_TYPES)}")
    mmr = _number(v, data, "mmr_lambda")
    if mmr is not None:
        request.mmr_lambda = mmr
    elif kind == "mmr":
        request.mmr_lambda = _MMR_LAMBDA
    metadata = b.metadata(v, data.get("metadata"), "metadata")
    if metadata and _zep_filter(metadata):
        # Zep reads `metadata` as its filter language ({"where": {"jsonpath": ...}}); here it
        # is a containment match, under which that filter matched nothing, silently.
        v.add(
            "metadata.where",
            "Zep's JSONPath filter is not served: `metadata` matches the messages whose "
            "metadata contains these keys and values",
        )
    elif metadata:
        meta.check_filter_elements(v, "metadata", metadata)
        request.metadata_contains.update(metadata)
    if data.get("record_filter"):
        v.add("record_filter", "is not served; filter by metadata containment with `metadata`")
    min_score = _number(v, data, "min_score")
    v.raise_if_any()
    return request, min_score


#: The operators of Zep's metadata filter (`where`: a JSONPath, or `and`/`or` of them).
_ZEP_FILTER = frozenset({"jsonpath", "and", "or"})


def _zep_filter(metadata: JsonObject) -> bool:
    """Whether a search's `metadata` is Zep's filter rather than metadata to contain."""
    where = metadata.get("where")
    return isinstance(where, dict) and bool(_ZEP_FILTER & where.keys())


def _number(v: val.Violations, data: JsonObject, name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        v.add(name, f"must be a number, not {b.kind(value)}")
        return None
    if isinstance(value, int) and not -MAX_EXACT_INT <= value <= MAX_EXACT_INT:
        # A double rounds it (past 1e308 float() fails): JSON has no bound on digits.
        v.add(name, "is an integer beyond +-2^53, which this number (a double) would round")
        return None
    return float(value)


async def _search(request: Request, data: JsonObject) -> tuple[SearchOutcome, float | None]:
    limit = params.query_int(request, "limit", minimum=0)
    search, min_score = _request(data, limit)
    query = search_query(search)
    outcome = await services(request).searcher.search(
        project(request), query, budget=answer_size.memory_budget(query.limit)
    )
    if outcome.cut:
        raise answer_size.refuse_cut_answer("limit", f"{query.limit} results")
    return outcome, min_score


def _results(outcome: SearchOutcome, min_score: float | None) -> list[dict[str, Any]]:
    # Called in the answer's build (answers.json_answer: in a thread when large).
    results = [r.message for r in outcome.results]
    answer_size.check_text_answer(f"{len(results)} results", limit=results)
    return [
        c.search_result(r) for r in outcome.results if min_score is None or r.score >= min_score
    ]


def _size(outcome: SearchOutcome) -> int:
    results = (r.message for r in outcome.results)
    return answer_size.text_at_least(results, off_loop.OFF_LOOP_BYTES)


@endpoint
async def search_sessions(request: Request) -> Response:
    """2.x `POST /sessions/search`: across a user's sessions, named sessions, or all."""
    data = await b.json_object(request)
    outcome, min_score = await _search(request, data)
    return await json_answer(
        _size(outcome),
        lambda: {
            "results": _results(outcome, min_score),
            "semantic": outcome.semantic,
            "note": outcome.note,
        },
    )


@endpoint
async def search_one_session(request: Request) -> Response:
    """`POST /sessions/{id}/search` (1.x and zep-cloud): within one session, a flat list."""
    session_id = params.path_id(request, "session_id")
    data = await b.json_object(request)
    for name in ("user_id", "session_ids"):
        if data.get(name):
            raise InvalidArgument.field(name, "cannot be given here: the path names the session")
    outcome, min_score = await _search(request, {**data, "session_ids": [session_id]})
    return await json_answer(_size(outcome), functools.partial(_results, outcome, min_score))

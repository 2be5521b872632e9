"""Reciprocal rank fusion: the alternative to SearchMemory's hybrid ranking, in the report."""

from __future__ import annotations

from collections.abc import Sequence

from bench.eval.corpus import MessageKey, Question
from bench.eval.metrics import DEPTH, Ranker

#: The constant from Cormack et al. (2009); it damps the weight of the very top ranks.
RRF_K = 60


def rrf(
    rankings: Sequence[Sequence[MessageKey]], k: int = RRF_K, depth: int = DEPTH
) -> list[MessageKey]:
    """Fuse rankings by the sum of 1 / (k + rank); the top `depth` keys, best first.

    Ties keep the order in which keys were first seen, list by list, so the result is
    deterministic and favours the first ranking given.
    """
    scores: dict[MessageKey, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    # dicts keep insertion order and sorted() is stable, so first-seen order breaks ties.
    return sorted(scores, key=lambda key: -scores[key])[:depth]


def fuse(rankers: Sequence[Ranker], k: int = RRF_K, depth: int = DEPTH) -> Ranker:
    """A ranker that asks each ranker and fuses their answers with `rrf`."""

    def fused(question: Question) -> list[MessageKey]:
        return rrf([ranker(question) for ranker in rankers], k=k, depth=depth)

    return fused

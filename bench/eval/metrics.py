"""Recall@k and MRR of a ranker over the corpus' questions, overall and per question kind."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bench.eval.corpus import KINDS, Kind, MessageKey, Question

#: A ranker answers one question with message keys, best first, from the question's user only.
#: It is a plain function: a ranker over an async client runs its own event loop (or calls the
#: blocking client), so the evaluation stays a simple loop and needs no event loop of its own.
Ranker = Callable[[Question], Sequence[MessageKey]]

#: How deep a ranking is read. SearchMemory will be called with limit=10, so MRR is MRR@10:
#: evidence below rank 10 scores 0, the same for a ranker that returns 10 keys or 1,000.
DEPTH = 10


def recall_at(ranked: Sequence[MessageKey], evidence: frozenset[MessageKey], k: int) -> float:
    """1.0 if any evidence message is in the top k, else 0.0.

    Hit-based, because a question's evidence lists every message that answers it on its own
    (the message that says the dog is called Biscuit, and the one about Biscuit's puppy class):
    finding one of them is finding the answer. A fraction would punish a ranker for not also
    returning the second way of saying the same thing.
    """
    if not evidence:
        raise ValueError("a question needs at least one evidence message")
    return 1.0 if evidence.intersection(ranked[:k]) else 0.0


def reciprocal_rank(
    ranked: Sequence[MessageKey], evidence: frozenset[MessageKey], depth: int = DEPTH
) -> float:
    """1 / the rank of the first evidence message in the top `depth`, or 0 if none is there."""
    for rank, key in enumerate(ranked[:depth], start=1):
        if key in evidence:
            return 1.0 / rank
    return 0.0


@dataclass(frozen=True)
class QuestionScore:
    """One question's figures under one ranker."""

    qid: str
    kind: Kind
    recall_at_5: float
    recall_at_10: float
    reciprocal_rank: float


@dataclass(frozen=True)
class Scores:
    """Means over a set of questions; `questions` is how many they are."""

    questions: int
    recall_at_5: float
    recall_at_10: float
    mrr: float


@dataclass(frozen=True)
class Evaluation:
    """A ranker's figures: overall, per kind, and per question (for head-to-head counts)."""

    overall: Scores
    by_kind: dict[Kind, Scores]
    per_question: tuple[QuestionScore, ...]


def score_question(question: Question, ranked: Sequence[MessageKey]) -> QuestionScore:
    """Score one ranking against the question's evidence."""
    evidence = question.evidence
    return QuestionScore(
        qid=question.qid,
        kind=question.kind,
        recall_at_5=recall_at(ranked, evidence, 5),
        recall_at_10=recall_at(ranked, evidence, 10),
        reciprocal_rank=reciprocal_rank(ranked, evidence),
    )


def aggregate(scores: Iterable[QuestionScore]) -> Scores:
    """Mean recall@5, recall@10 and MRR; all zeros for no questions."""
    items = list(scores)
    n = len(items)
    if n == 0:
        return Scores(0, 0.0, 0.0, 0.0)
    return Scores(
        questions=n,
        recall_at_5=sum(s.recall_at_5 for s in items) / n,
        recall_at_10=sum(s.recall_at_10 for s in items) / n,
        mrr=sum(s.reciprocal_rank for s in items) / n,
    )


def evaluate(ranker: Ranker, questions: Sequence[Question]) -> Evaluation:
    """Ask the ranker every question and score the answers."""
    per_question = tuple(score_question(q, ranker(q)) for q in questions)
    return Evaluation(
        overall=aggregate(per_question),
        by_kind={k: aggregate(s for s in per_question if s.kind == k) for k in KINDS},
        per_question=per_question,
    )

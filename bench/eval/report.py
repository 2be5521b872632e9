"""The retrieval report: every ranker's recall@5, recall@10 and MRR, overall and per kind."""

from __future__ import annotations

import sys
from collections.abc import Collection
from itertools import permutations
from typing import Any, TextIO

from bench.eval.corpus import KINDS, Corpus, load
from bench.eval.metrics import Evaluation, Ranker, evaluate


def report(
    rankers: dict[str, Ranker],
    corpus: Corpus | None = None,
    out: TextIO | None = None,
    printed_pairs: Collection[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every ranker on the corpus' questions, print a table, return the figures.

    The returned dict is JSON-ready: the corpus summary, each ranker's overall and per-kind
    figures, and for each ordered pair of rankers how many questions the first found (any
    evidence in its top 10) that the second missed, which is where each ranker wins. The
    table prints those counts for every pair, or only for pairs of `printed_pairs`.
    """
    corpus = corpus or load()
    out = out or sys.stdout
    evaluations = {name: evaluate(ranker, corpus.questions) for name, ranker in rankers.items()}
    figures: dict[str, Any] = {
        "corpus": corpus.summary(),
        "rankers": {name: _figures(e) for name, e in evaluations.items()},
        "only_found_by": _only_found_by(evaluations),
    }
    _print(figures, out, printed_pairs)
    return figures


def _figures(evaluation: Evaluation) -> dict[str, Any]:
    def row(s: Any) -> dict[str, float]:
        return {
            "recall_at_5": round(s.recall_at_5, 4),
            "recall_at_10": round(s.recall_at_10, 4),
            "mrr": round(s.mrr, 4),
        }

    return {
        "overall": row(evaluation.overall),
        "by_kind": {kind: row(evaluation.by_kind[kind]) for kind in KINDS},
    }


def _only_found_by(evaluations: dict[str, Evaluation]) -> dict[str, dict[str, list[str]]]:
    found = {
        name: {s.qid for s in e.per_question if s.recall_at_10 > 0}
        for name, e in evaluations.items()
    }
    pairs: dict[str, dict[str, list[str]]] = {name: {} for name in evaluations}
    for a, b in permutations(evaluations, 2):
        pairs[a][b] = sorted(found[a] - found[b])
    return pairs


def _print(figures: dict[str, Any], out: TextIO, printed: Collection[str] | None) -> None:
    c = figures["corpus"]
    by_kind = ", ".join(f"{n} {k}" for k, n in c["questions_by_kind"].items())
    print(
        f"corpus: {c['users']} users, {c['sessions']} sessions, {c['messages']} messages, "
        f"{c['questions']} questions ({by_kind})",
        file=out,
    )
    kinds = "".join(f"  {'R@10 ' + k:>17}" for k in KINDS)
    width = max(14, *(len(name) + 1 for name in figures["rankers"]))
    print(f"\n{'ranker':<{width}}{'R@5':>7}{'R@10':>7}{'MRR':>7}{kinds}", file=out)
    for name, f in figures["rankers"].items():
        o = f["overall"]
        per_kind = "".join(f"  {f['by_kind'][k]['recall_at_10']:>17.3f}" for k in KINDS)
        line = f"{name:<{width}}{o['recall_at_5']:>7.3f}{o['recall_at_10']:>7.3f}{o['mrr']:>7.3f}"
        print(line + per_kind, file=out)
    pairs = figures["only_found_by"]
    if len(pairs) > 1:
        print(
            "\nquestions with evidence in the top 10 of the first ranker but not the second:",
            file=out,
        )
        for a, others in pairs.items():
            for b, qids in others.items():
                if printed is not None and not {a, b} <= set(printed):
                    continue
                print(f"  {a} not {b}: {len(qids)}", file=out)

"""`make eval`: recall@5, recall@10 and MRR of SearchMemory's and GetMemory's recall rankers
against BM25."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.eval.bm25 import BM25Ranker
from bench.eval.corpus import Corpus, load
from bench.eval.fusion import fuse
from bench.eval.memstore import Answers, ask_memstore
from bench.eval.metrics import Ranker
from bench.eval.recall import WINDOWS, probes
from bench.eval.report import report
from server.store.recall import RECALL_WORDS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        help="only the first N questions and the sessions holding their evidence (a smoke test)",
    )
    args = parser.parse_args()
    corpus = load() if args.sample is None else load().sample(args.sample)
    answers = ask_memstore(corpus)
    rankers: dict[str, Ranker] = {"bm25": BM25Ranker(corpus)}
    rankers.update((name, answers.ranker(name)) for name in answers.ranked)
    if {"full_text", "semantic"} <= answers.ranked.keys():
        # What the hybrid ranking replaced: RRF of the two answers (docs/search.md).
        parts = [answers.ranker("full_text"), answers.ranker("semantic")]
        rankers["rrf(full_text,semantic)"] = fuse(parts)
    figures = report(rankers, corpus)
    figures["recall"] = _recall_report(corpus, answers)
    figures["embedding"] = {
        "messages": answers.messages,
        "seconds": round(answers.embed_seconds, 1),
        "messages_per_second": round(answers.messages / max(answers.embed_seconds, 1e-9), 1),
    }
    print(f"embedded {answers.messages} messages in {answers.embed_seconds:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def _recall_report(corpus: Corpus, answers: Answers) -> dict[str, object]:
    """GetMemory's recall rankers and BM25 over the same probes, one report per window."""
    made = probes(corpus)
    figures: dict[str, object] = {}
    for window in WINDOWS:
        asked = Corpus(corpus.messages, tuple(p.question for p in made if p.window == window))
        rankers: dict[str, Ranker] = {"bm25": BM25Ranker(asked)}
        rankers.update((n, answers.recall_ranker(window, n)) for n in answers.recall[window])
        print(f"\nrecall in GetMemory, window: {window.replace('_', ' ')}")
        main = ("bm25", "vector", "get_memory_words", f"words_{RECALL_WORDS}", "words_all")
        figures[window] = report(rankers, asked, printed_pairs=main)
    return figures


if __name__ == "__main__":
    main()

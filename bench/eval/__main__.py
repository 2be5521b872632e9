"""`make eval`: recall@5, recall@10 and MRR of SearchMemory's rankers against BM25."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.eval.bm25 import BM25Ranker
from bench.eval.corpus import load
from bench.eval.fusion import fuse
from bench.eval.memstore import ask_memstore
from bench.eval.metrics import Ranker
from bench.eval.report import report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    corpus = load()
    answers = ask_memstore(corpus)
    rankers: dict[str, Ranker] = {"bm25": BM25Ranker(corpus)}
    rankers.update((name, answers.ranker(name)) for name in answers.ranked)
    if {"full_text", "semantic"} <= answers.ranked.keys():
        # What the hybrid ranking replaced: RRF of the two answers (docs/search.md).
        parts = [answers.ranker("full_text"), answers.ranker("semantic")]
        rankers["rrf(full_text,semantic)"] = fuse(parts)
    figures = report(rankers, corpus)
    figures["embedding"] = {
        "messages": answers.messages,
        "seconds": round(answers.embed_seconds, 1),
        "messages_per_second": round(answers.messages / max(answers.embed_seconds, 1e-9), 1),
    }
    print(f"embedded {answers.messages} messages in {answers.embed_seconds:.1f}s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""`python -m bench.eval`: the retrieval report for the rankers that exist today (BM25)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.eval.bm25 import BM25Ranker
from bench.eval.corpus import load
from bench.eval.metrics import Ranker
from bench.eval.report import report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    corpus = load()
    # SearchMemory's FULL_TEXT, SEMANTIC and HYBRID rankers join this dict once it exists.
    rankers: dict[str, Ranker] = {"bm25": BM25Ranker(corpus)}
    figures = report(rankers, corpus)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

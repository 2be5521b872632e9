"""`python -m bench.eval.recall_replay`: recall's candidate fusions replayed on make eval's probes.

One load of the corpus as `make eval` makes it (the real worker, the real model); each probe
(bench/eval/recall.py) goes in, is embedded, and gives: GetMemory's recall, recall by words
with its ts_rank scores (Store.rank_recall, RECALL_WORDS), the window's message vectors and
the session's weighted recall vector as the worker kept it until migration 0014 (the mean of
the window's vectors, newest weighted 16, 8, 4, 2, 1, 1). Every fusion is then computed in
Python as the SQL does (min-max per part over its top CANDIDATES, or reciprocal rank fusion)
and scored like make eval's recall, per window, over all questions, the odd-numbered ones
(to choose on) and the even-numbered ones. Per-message candidates (each window message's
nearest lists interleaved, best ranks, caps, each message's similarities less its best or
less what its best exceeds a similarity: the floor GetMemory runs since) use every message
vector of the user. GetMemory's answers are scored beside them: the row of the fusion it
runs must equal them (docs/search.md, Recall quality, says which candidate won and why).
`--cache PATH` keeps the collected parts, so a second run only scores (a minute or two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import env
from bench.eval.corpus import Corpus, load
from bench.eval.memstore import ROOT, _load, _served
from bench.eval.metrics import DEPTH
from bench.eval.recall import _ROLE_TYPES, WINDOWS, probes
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc as ss_grpc
from memstore.v1 import user_service_pb2_grpc as us_grpc
from server.domain import DEFAULT_PROJECT_ID
from server.search.embedding import embedder_from_setting
from server.search.service import RECALL_WINDOW
from server.search.worker import EmbeddingWorker
from server.store.recall import RECALL_WORDS

#: Candidates per part, as the worker ranks its RECALL_KEEP (20): max(20 * 4, 20).
CANDIDATES = 80

Key = tuple[str, int]
Scored = list[tuple[Key, float]]


@dataclass(frozen=True)
class Seen:
    """What one probe's recall is made of."""

    user_id: str
    get_memory: list[Key]
    words: Scored
    window: list[np.ndarray]  # the window's message vectors, newest first
    mean: np.ndarray  # the weighted recall vector the worker kept before migration 0014


class Replay:
    """Every probe's parts, and every message vector of each user."""

    def __init__(self, seen: dict[tuple[str, str], Seen], vectors: dict[Key, Any]) -> None:
        self.seen = seen
        self.users: dict[str, tuple[list[Key], np.ndarray]] = {}
        grouped: dict[str, list[tuple[Key, list[float]]]] = {}
        for k, (user, v) in vectors.items():
            grouped.setdefault(user, []).append((k, v))
        for user, items in grouped.items():
            matrix = np.array([v for _, v in items], dtype=np.float64)
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
            self.users[user] = ([k for k, _ in items], matrix)

    def nearest(self, s: Seen, vectors: Sequence[np.ndarray], age_penalty: float = 0.0) -> Scored:
        """The user's messages by their best similarity to any of `vectors` (newest first)."""
        keys, matrix = self.users[s.user_id]
        best = np.full(len(keys), -np.inf)
        for age, v in enumerate(vectors):
            best = np.maximum(best, matrix @ (v / np.linalg.norm(v)) - age_penalty * age)
        order = np.argsort(-best, kind="stable")[:CANDIDATES]
        return [(keys[i], float(best[i])) for i in order]

    def similarities(self, s: Seen) -> tuple[list[Key], np.ndarray]:
        """The user's messages and their similarity to each of the window's vectors (a row
        per vector, newest first)."""
        keys, matrix = self.users[s.user_id]
        window = np.stack([v / np.linalg.norm(v) for v in s.window])
        return keys, window @ matrix.T

    def relative(self, s: Seen, share: float = 1.0, above: float = -1.0) -> Scored:
        """Nearest of the window, each window message's similarities less `share` of its
        best one above `above`: at 1 and -1, a message's nearest memories stand level with
        every other message's nearest."""
        keys, sims = self.similarities(s)
        offset = share * np.maximum(sims.max(axis=1, keepdims=True) - above, 0)
        best = (sims - offset).max(axis=0)
        return _top(keys, best)

    def interleaved(self, s: Seen, latest_first: bool = True) -> Scored:
        """Each window message's own nearest memories, round-robin (newest message first),
        deduplicated; the score is minus the position."""
        keys, sims = self.similarities(s)
        orders = [np.argsort(-row, kind="stable") for row in sims]
        if not latest_first:
            orders.reverse()
        taken: list[int] = []
        seen: set[int] = set()
        cursors = [0] * len(orders)
        while len(taken) < min(CANDIDATES, len(keys)):
            for j, order in enumerate(orders):
                while cursors[j] < len(order) and int(order[cursors[j]]) in seen:
                    cursors[j] += 1
                if cursors[j] < len(order):
                    i = int(order[cursors[j]])
                    seen.add(i)
                    taken.append(i)
        return [(keys[i], -float(n)) for n, i in enumerate(taken[:CANDIDATES])]

    def best_rank(self, s: Seen) -> Scored:
        """Each memory by its best rank in any window message's nearest list (ties: nearest)."""
        keys, sims = self.similarities(s)
        ranks = np.argsort(np.argsort(-sims, axis=1, kind="stable"), axis=1)
        best = -ranks.min(axis=0) + sims.max(axis=0) * 0.5
        return _top(keys, best)

    def capped(self, s: Seen, cap: int, relative: bool = False) -> Scored:
        """Nearest of the window, at most `cap` memories owned by (nearest to) each window
        message before any other's; the rest follow, scored 2 lower."""
        keys, sims = self.similarities(s)
        if relative:
            sims = sims - sims.max(axis=1, keepdims=True)
        best, owner = sims.max(axis=0), sims.argmax(axis=0)
        order = np.argsort(-best, kind="stable")
        counts: dict[int, int] = {}
        score = best.copy()
        for i in order[: CANDIDATES * 4]:
            counts[int(owner[i])] = counts.get(int(owner[i]), 0) + 1
            if counts[int(owner[i])] > cap:
                score[i] -= 2
        return _top(keys, score)


def _top(keys: list[Key], best: np.ndarray) -> Scored:
    order = np.argsort(-best, kind="stable")[:CANDIDATES]
    return [(keys[i], float(best[i])) for i in order]


def min_max(words: Scored, vector: Scored, text_weight: float) -> list[Key]:
    """search_hybrid's fusion: each part min-max normalised, then a convex combination."""
    text, vec = _normalised(words), _normalised(vector)
    keys = list(dict.fromkeys([k for k, _ in words] + [k for k, _ in vector]))
    score = {k: text_weight * text.get(k, 0) + (1 - text_weight) * vec.get(k, 0) for k in keys}
    return sorted(keys, key=lambda k: -score[k])


def rrf(parts: Sequence[Scored], k: int, weights: Sequence[float] | None = None) -> list[Key]:
    """Reciprocal rank fusion, each part's sum weighted."""
    score: dict[Key, float] = {}
    for i, part in enumerate(parts):
        for rank, (key, _) in enumerate(part, start=1):
            score[key] = score.get(key, 0.0) + (weights[i] if weights else 1.0) / (k + rank)
    return sorted(score, key=lambda key: -score[key])


def _normalised(part: Scored) -> dict[Key, float]:
    if not part:
        return {}
    low, high = min(s for _, s in part), max(s for _, s in part)
    return {k: 1.0 if high == low else (s - low) / (high - low) for k, s in part}


def candidates(r: Replay) -> dict[str, Callable[[Seen], list[Key]]]:
    """The fusions measured, by name (docs/search.md's table)."""
    decay = [16, 8, 4, 2, 1, 1]

    def words(s: Seen) -> Scored:
        return s.words[:CANDIDATES]

    def mean(s: Seen) -> Scored:
        return r.nearest(s, [s.mean])

    def each(s: Seen) -> list[Scored]:
        return [r.nearest(s, [v]) for v in s.window]

    found: dict[str, Callable[[Seen], list[Key]]] = {
        "GetMemory (as answered)": lambda s: s.get_memory,
        "mean, min-max 0.3 (replayed)": lambda s: min_max(words(s), mean(s), 0.3),
        "mean, min-max 0.5": lambda s: min_max(words(s), mean(s), 0.5),
        "mean, min-max 0.7": lambda s: min_max(words(s), mean(s), 0.7),
        "mean, RRF k60": lambda s: rrf([words(s), mean(s)], 60),
        "mean, RRF k10": lambda s: rrf([words(s), mean(s)], 10),
        "each, RRF k10 16..1, words 16": lambda s: rrf([words(s), *each(s)], 10, [16, *decay]),
        "each, RRF k10 16..1, no words": lambda s: rrf(each(s), 10, decay[: len(s.window)]),
        "each, RRF k60 16..1, words 16": lambda s: rrf([words(s), *each(s)], 60, [16, *decay]),
        "nearest, RRF k60": lambda s: rrf([words(s), r.nearest(s, s.window)], 60),
    }

    def fused(part: Callable[[Seen], Scored], weight: float) -> Callable[[Seen], list[Key]]:
        return lambda s: min_max(words(s), part(s), weight)

    def aged(penalty: float) -> Callable[[Seen], Scored]:
        return lambda s: r.nearest(s, s.window, penalty)

    for weight in (0.3, 0.4, 0.5):
        for penalty in (0.0, 0.01, 0.02, 0.05, 0.1):
            found[f"nearest -{penalty}/age, min-max {weight}"] = fused(aged(penalty), weight)
    # Against history talk (bench/eval/recall.py): each window message's memories on their own.
    found["interleaved, no words"] = lambda s: [k for k, _ in r.interleaved(s)]
    found["interleaved oldest first, no words"] = lambda s: [
        k for k, _ in r.interleaved(s, latest_first=False)
    ]
    found["best rank, no words"] = lambda s: [k for k, _ in r.best_rank(s)]
    found["relative, no words"] = lambda s: [k for k, _ in r.relative(s)]
    found["interleaved, RRF k10"] = lambda s: rrf([words(s), r.interleaved(s)], 10)
    for weight in (0.3, 0.5, 0.7):
        found[f"interleaved, min-max {weight}"] = fused(r.interleaved, weight)
        found[f"best rank, min-max {weight}"] = fused(r.best_rank, weight)
        found[f"relative, min-max {weight}"] = fused(r.relative, weight)
        for cap in (2, 3, 5):
            found[f"nearest cap {cap}, min-max {weight}"] = fused(
                partial(r.capped, cap=cap), weight
            )
            found[f"relative cap {cap}, min-max {weight}"] = fused(
                partial(r.capped, cap=cap, relative=True), weight
            )
    for weight in (0.3, 0.4, 0.5, 0.6):
        for share in (0.25, 0.5, 0.75):
            found[f"relative {share} of best, min-max {weight}"] = fused(
                partial(r.relative, share=share), weight
            )
        for above in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            found[f"relative above {above}, min-max {weight}"] = fused(
                partial(r.relative, above=above), weight
            )
    return found


def score(
    corpus: Corpus,
    r: Replay,
    rank: Callable[[Seen], list[Key]],
    keys: Any,
    numbered: Callable[[int], bool] = lambda n: True,
) -> str:
    """R@10 per window, as make eval scores recall, over the questions whose number (q01 is
    1) `numbered` keeps: odd-numbered ones to choose on, even-numbered ones to report."""
    evidence = {q.qid: q.evidence for q in corpus.questions}
    cells = []
    for window in WINDOWS:
        hits = [
            bool(evidence[qid].intersection(keys[k] for k in rank(s)[:DEPTH]))
            for (w, qid), s in r.seen.items()
            if w == window and numbered(int(qid.rsplit("q", 1)[1]))
        ]
        cells.append(f"{sum(hits) / max(len(hits), 1):.3f}")
    return " / ".join(cells)


#: The weight of the newest message in the recall vector the worker kept before migration 0014;
#: each older one half the one after it, at least 1 (70554b3).
_LATEST_WEIGHT = 16


def _weighted_mean(window: list[np.ndarray]) -> np.ndarray:
    """The recall vector of a window of vectors, newest first, as 70554b3's worker averaged it."""
    weights = [max(1, _LATEST_WEIGHT >> age) for age in range(len(window))]
    mean: np.ndarray = np.average(np.stack(window), axis=0, weights=weights)
    return mean


async def _collect(corpus: Corpus, url: str) -> tuple[Replay, dict[Key, Any]]:
    async with _served(url) as (store, channel):
        if not store.vectors:
            # Refused before the corpus is loaded: without vectors there is nothing to replay.
            raise SystemExit("the replay needs pgvector, which this PostgreSQL lacks")
        sessions = ss_grpc.SessionServiceStub(channel)
        keys = await _load(corpus, us_grpc.UserServiceStub(channel), sessions)
        embedder = embedder_from_setting("local")
        assert embedder is not None
        worker = EmbeddingWorker(store, embedder)
        await worker.drain(timeout=3600)
        async with store._connect(single=True) as conn:
            cur = await conn.execute(
                "SELECT e.session_id, e.sequence, s.user_id, e.embedding::text"
                " FROM message_embeddings e JOIN sessions s USING (project_id, session_id)"
            )
            vectors = {(r[0], r[1]): (r[2], json.loads(r[3])) for r in await cur.fetchall()}
        seen: dict[tuple[str, str], Seen] = {}
        for p in probes(corpus):
            lines = [rs.Message(role=a, role_type=_ROLE_TYPES[b], content=c) for a, b, c in p.lines]
            await sessions.AddMemory(
                ss.AddMemoryRequest(
                    session_id=p.session_id, user_id=p.question.user_id, messages=lines
                )
            )
            await worker.drain(timeout=600)
            got = await sessions.GetMemory(
                ss.GetMemoryRequest(session_id=p.session_id, lastn=1, relevant_limit=DEPTH)
            )
            words = await store.rank_recall(
                DEFAULT_PROJECT_ID, p.session_id, limit=CANDIDATES, window=RECALL_WINDOW,
                model=None, words=RECALL_WORDS,
            )  # fmt: skip
            async with store._connect(single=True) as conn:
                cur = await conn.execute(
                    "SELECT embedding::text FROM message_embeddings WHERE session_id = %s"
                    " ORDER BY sequence DESC",
                    [p.session_id],
                )
                window = [np.array(json.loads(r[0])) for r in await cur.fetchall()]
            seen[(p.window, p.question.qid)] = Seen(
                p.question.user_id,
                [(m.session_id, m.message.sequence) for m in got.relevant_messages],
                [((f.message.session_id, f.message.sequence), f.score) for f in words],
                window,
                _weighted_mean(window[:RECALL_WINDOW]),
            )
            await sessions.DeleteSession(ss.DeleteSessionRequest(session_id=p.session_id))
    return Replay(seen, vectors), keys


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval.recall_replay", description=__doc__)
    parser.add_argument("--sample", type=int, metavar="N", help="only the first N questions")
    parser.add_argument(
        "--cache",
        type=Path,
        metavar="PATH",
        help="load the probes' parts from PATH if it exists, else collect and save them there",
    )
    parser.add_argument("--only", metavar="TEXT", help="only the candidates whose name has TEXT")
    args = parser.parse_args()
    corpus = load() if args.sample is None else load().sample(args.sample)
    if args.cache and args.cache.exists():
        replay, keys = pickle.loads(args.cache.read_bytes())
    else:
        server = env.server_url(os.environ.get("DATABASE_URL"), ROOT / ".data")
        name = f"memstore_replay_{secrets.token_hex(3)}"
        url = env.fresh_database(server, name)
        try:
            replay, keys = asyncio.run(_collect(corpus, url))
        finally:
            env.drop_database(server, name)
        if args.cache:
            args.cache.write_bytes(pickle.dumps((replay, keys)))
    print("R@10 " + " / ".join(w.replace("_", " ") for w in WINDOWS))
    questions: dict[str, Callable[[int], bool]] = {
        "all questions": lambda n: True,
        "odd-numbered questions (to choose on)": lambda n: n % 2 == 1,
        "even-numbered questions": lambda n: n % 2 == 0,
    }
    ranks = {k: v for k, v in candidates(replay).items() if args.only is None or args.only in k}
    for title, numbered in questions.items():
        print(f"\n{title}")
        for label, rank in ranks.items():
            print(f"{label:40s} {score(corpus, replay, rank, keys, numbered)}")


if __name__ == "__main__":
    main()

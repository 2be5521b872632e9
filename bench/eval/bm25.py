"""The BM25 baseline (rank-bm25's BM25Okapi) over each user's messages, role included."""

from __future__ import annotations

import re

from rank_bm25 import BM25Okapi  # type: ignore[import-untyped]

from bench.eval.corpus import Corpus, MessageKey, Question, document_text

#: Candidates returned per question: deeper than the DEPTH the metrics read, so that a fusion
#: of this ranker with another has the tail of each list to work with.
CANDIDATES = 50

# Short on purpose: function words and the stray pieces contractions split into. Question
# words ("when", "where", "who") are in it too: the message that answers a when-question
# rarely says "when", and matching on it only rewards other questions.
_STOP_WORDS = """
    a about after all also am an and any are as at be been but by can could did do does for
    from get got had has have he her him his how i if in into is it its just me my of on or
    our she so than that the their them then there they this to too up us was we were what
    when where which who whom why will with would you your s t d ll m re ve
"""
STOP_WORDS = frozenset(_STOP_WORDS.split())

# Letters and digits of any script ("Neukölln" stays one word); everything else separates,
# so "INV-2291" is "inv" and "2291", and "Biscuit's" is "biscuit" and a dropped "s".
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens without stop words; no stemming, as plain BM25 baselines go."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


class BM25Ranker:
    """BM25Okapi, one index per user, so a question only ever sees its own user's messages."""

    def __init__(self, corpus: Corpus, candidates: int = CANDIDATES) -> None:
        self._candidates = candidates
        self._keys: dict[str, list[MessageKey]] = {}
        self._indexes: dict[str, BM25Okapi] = {}
        for user_id in sorted({m.key.user_id for m in corpus.messages}):
            messages = corpus.user_messages(user_id)
            self._keys[user_id] = [m.key for m in messages]
            self._indexes[user_id] = BM25Okapi([tokenize(document_text(m)) for m in messages])

    def __call__(self, question: Question) -> list[MessageKey]:
        """Messages sharing at least one query word, best first, ties in corpus order."""
        query = tokenize(question.text)
        keys = self._keys[question.user_id]
        if not query:
            return []
        scores = self._indexes[question.user_id].get_scores(query)
        # Only matches are returned, as a full-text search would: padding with score-0
        # messages would credit the baseline with whatever order the corpus happens to have.
        order = sorted(range(len(keys)), key=lambda i: -scores[i])
        return [keys[i] for i in order[: self._candidates] if scores[i] > 0]

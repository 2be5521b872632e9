"""GetMemory's recall as rankers: each question asked as the last message of a new session.

Recall answers a session's recent messages, not a question: GetMemory returns the messages of
the user's *other* sessions most relevant to this session's last six. So each question becomes
a probe, a new session of its user whose window is the question alone, the question after
five messages of other talk (generic exchanges the user's history does not hold), the
question before five such messages (the topic set earlier in the window), or the question
after or before five messages of *history talk*: talk on a topic the user's history holds,
copied word for word from it. The probe's relevant_messages are scored against the
question's evidence. Probes are asked one at a time and deleted after, so no probe is
another's memory.

History talk is the user's own chatter (corpus.chatter_groups), which by the corpus'
construction answers no question, so a recalled copy of it is never evidence: the exchanges
of one generated topic (orders, dog, work...; in a sample without any, one session's
handwritten chatter). Of the user's topics, the talk comes from one sharing the fewest words
(bm25.tokenize) with the question and its evidence, ties drawn by a seeded RNG: another topic
than the question's, chosen by words alone, never by a ranker under test. Its lines are exact
copies, the hardest case for a ranking by the window's nearest vectors: each has a memory at
distance 0 and the topic's near-duplicates close by (a user who talks about the dog again,
then asks where their sister lives).

Rankers, all over the same probes: GetMemory itself (with pgvector: the recall the worker kept,
words fused with the nearest of the window's vectors; without: the recall kept by words),
recall by words at several caps on the window's lexemes (RECALL_WORDS is the one GetMemory
uses) and uncapped, the vector recall with every word, and BM25 asked the window's text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from bench.eval.bm25 import tokenize
from bench.eval.corpus import (
    Corpus,
    Message,
    MessageKey,
    Question,
    chatter_groups,
    filler,
    user_name,
)
from bench.eval.metrics import DEPTH
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc as ss_grpc
from server.domain import DEFAULT_PROJECT_ID
from server.search.service import RECALL_WINDOW
from server.search.worker import EmbeddingWorker
from server.store import Store
from server.store.recall import RECALL_WORDS

#: A probe's window: the question alone, after five messages of other talk or before them,
#: after five messages of history talk (a topic the user's history holds) or before them.
WINDOWS = ("alone", "after_talk", "before_talk", "after_history_talk", "before_history_talk")

#: Caps on the window's lexemes measured for recall by words; 0 is every lexeme.
WORD_CAPS = (8, 16, 32, 64, 0)

#: A cap no window reaches: six messages of chat hold a few hundred lexemes at most.
_EVERY_WORD = 100_000

_ROLE_TYPES = {"user": rs.ROLE_TYPE_USER, "assistant": rs.ROLE_TYPE_ASSISTANT}

#: What a recall ranking holds: (session_id, sequence) of each memory, best first.
Keys = Callable[[tuple[str, int]], MessageKey]


@dataclass(frozen=True)
class Probe:
    """One question as a session's window; `question.text` is the window's text (for BM25)."""

    question: Question
    window: str
    lines: tuple[tuple[str, str, str], ...]  # (role, role type, content), oldest first

    @property
    def session_id(self) -> str:
        """The probe's session, unlike any of the corpus'."""
        return f"probe-{self.window}-{self.question.qid}"


def probes(corpus: Corpus) -> list[Probe]:
    """Every question as a probe of each window, in question order."""
    users = {q.user_id for q in corpus.questions}
    names = {u: user_name(u) for u in users}
    # Per user, the exchanges none of whose lines the user's history holds: talk that is
    # new, not a repeat of filler the history already has (which would match word for word).
    fresh = {u: _unheard(filler(), corpus.user_messages(u)) for u in users}
    # And the user's own chatter, by topic, as far as the history (maybe a sample) holds it.
    chatter = {u: _heard(chatter_groups(u), corpus.user_messages(u)) for u in users}
    by_key = {m.key: m for m in corpus.messages}
    made: list[Probe] = []
    for q in corpus.questions:
        name = names[q.user_id]
        asked = (name, "user", q.text)
        talk = _talk(fresh[q.user_id], random.Random(f"memstore-eval/recall/{q.qid}"), name)
        rng = random.Random(f"memstore-eval/recall/history/{q.qid}")
        own = _talk(_other_topic(chatter[q.user_id], q, by_key, rng), rng, name)
        windows = (
            ("alone", (asked,)),
            ("after_talk", (*talk, asked)),
            ("before_talk", (asked, *talk)),
            ("after_history_talk", (*own, asked)),
            ("before_history_talk", (asked, *own)),
        )
        for window, lines in windows:
            text = "\n".join(f"{role}: {content}" for role, _, content in lines)
            made.append(Probe(replace(q, text=text), window, lines))
    return made


def _heard(
    groups: dict[str, list[list[list[str]]]], history: tuple[Message, ...]
) -> dict[str, list[list[list[str]]]]:
    # Only exchanges the history holds line for line, and groups of five lines or more: the
    # generated topics, each one topic by construction, or where the history (a sample)
    # holds none, each session's handwritten chatter.
    said = {m.content for m in history}
    held = {g: [x for x in xs if all(line[1] in said for line in x)] for g, xs in groups.items()}
    long = {g: xs for g, xs in held.items() if sum(map(len, xs)) >= RECALL_WINDOW - 1}
    topics = {g: xs for g, xs in long.items() if g.startswith("topic:")}
    return topics or long


def _other_topic(
    groups: dict[str, list[list[list[str]]]],
    question: Question,
    by_key: dict[MessageKey, Message],
    rng: random.Random,
) -> list[list[list[str]]]:
    """The chatter group sharing the fewest words with the question and its evidence."""
    if not groups:
        raise ValueError(f"{question.user_id}: no chatter of five lines in the history")
    evidence = " ".join(by_key[k].content for k in question.evidence)
    asked = {*tokenize(question.text), *tokenize(evidence)}
    shared = {
        g: len(asked.intersection(w for x in xs for line in x for w in tokenize(line[1])))
        for g, xs in sorted(groups.items())
    }
    fewest = min(shared.values())
    return groups[rng.choice([g for g, n in shared.items() if n == fewest])]


def _unheard(
    exchanges: list[list[list[str]]], history: tuple[Message, ...]
) -> list[list[list[str]]]:
    heard = {m.content for m in history}
    unheard = [x for x in exchanges if not any(line[1] in heard for line in x)]
    if not unheard:
        raise ValueError("every filler exchange is in the user's history: no fresh talk")
    return unheard


def _talk(
    exchanges: list[list[list[str]]], rng: random.Random, name: str
) -> tuple[tuple[str, str, str], ...]:
    lines: list[tuple[str, str, str]] = []
    for exchange in _shuffled(exchanges, rng):
        for speaker, content, *_ in exchange:
            # As the corpus stores them: another person in a chat speaks under their name.
            if speaker == "A":
                lines.append(("assistant", "assistant", content))
            else:
                lines.append((name if speaker == "U" else speaker, "user", content))
        if len(lines) >= RECALL_WINDOW - 1:
            break
    return tuple(lines[: RECALL_WINDOW - 1])


def _shuffled(items: list[list[list[str]]], rng: random.Random) -> Iterator[list[list[str]]]:
    order = list(range(len(items)))
    rng.shuffle(order)
    return (items[i] for i in order)


def ranker_names(vectors: bool) -> list[str]:
    """The recall rankers a run measures, in report order (BM25 is added by the caller)."""
    names = ["vector", "vector_all_words"] if vectors else ["get_memory_words"]
    return names + [f"words_{cap}" if cap else "words_all" for cap in WORD_CAPS]


async def ask_recall(
    corpus: Corpus,
    store: Store,
    sessions: ss_grpc.SessionServiceAsyncStub,
    key_of: Keys,
    *,
    worker: EmbeddingWorker,
    model: str | None,
) -> dict[str, dict[str, dict[str, list[MessageKey]]]]:
    """Every probe's recall by every ranker: window -> ranker -> qid -> keys, best first.

    The worker keeps each probe's recall before GetMemory reads it, as the server's own
    does: embedding its messages with pgvector (`model` its embedder's name), by words
    without (`model` None).
    """
    ranked: dict[str, dict[str, dict[str, list[MessageKey]]]] = {w: {} for w in WINDOWS}
    for probe in probes(corpus):
        await sessions.AddMemory(
            ss.AddMemoryRequest(
                session_id=probe.session_id,
                user_id=probe.question.user_id,
                messages=[
                    rs.Message(role=role, role_type=_ROLE_TYPES[kind], content=content)
                    for role, kind, content in probe.lines
                ],
            )
        )
        await worker.drain(timeout=600)
        got = await sessions.GetMemory(
            ss.GetMemoryRequest(session_id=probe.session_id, lastn=1, relevant_limit=DEPTH)
        )
        answers = {
            "vector" if model else "get_memory_words": [
                key_of((r.session_id, r.message.sequence)) for r in got.relevant_messages
            ]
        }
        caps: list[tuple[str, str | None, int]] = [
            (f"words_{cap}" if cap else "words_all", None, cap or _EVERY_WORD) for cap in WORD_CAPS
        ]
        if model:
            caps.append(("vector_all_words", model, _EVERY_WORD))
        for name, with_model, words in caps:
            found = await store.rank_recall(
                DEFAULT_PROJECT_ID,
                probe.session_id,
                limit=DEPTH,
                window=RECALL_WINDOW,
                model=with_model,
                words=words,
            )
            answers[name] = [key_of((r.message.session_id, r.message.sequence)) for r in found]
        for name, keys in answers.items():
            ranked[probe.window].setdefault(name, {})[probe.question.qid] = keys
        await sessions.DeleteSession(ss.DeleteSessionRequest(session_id=probe.session_id))
    return ranked


assert RECALL_WORDS in WORD_CAPS, "the cap GetMemory uses is among those measured"

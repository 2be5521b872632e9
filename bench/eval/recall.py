"""GetMemory's recall as rankers: each question asked as the last message of a new session.

Recall answers a session's recent messages, not a question: GetMemory returns the messages of
the user's *other* sessions most relevant to this session's last six. So each question becomes
a probe, a new session of its user whose window is the question alone, the question after
five messages of other talk (generic exchanges the user's history does not hold), or the
question before five such messages (the topic set earlier in the window), and
the probe's relevant_messages are scored against the question's evidence. Probes are asked
one at a time and deleted after, so no probe is another's memory.

Rankers, all over the same probes: GetMemory itself (with pgvector: the recall the worker kept,
words fused with the session's recall vector; without: words ranked on the request path),
recall by words at several caps on the window's lexemes (RECALL_WORDS is the one GetMemory
uses) and uncapped, the vector recall with every word, and BM25 asked the window's text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from bench.eval.corpus import Corpus, Message, MessageKey, Question, filler, user_name
from bench.eval.metrics import DEPTH
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc as ss_grpc
from server.domain import DEFAULT_PROJECT_ID
from server.search.service import RECALL_WINDOW
from server.search.worker import EmbeddingWorker
from server.store import Store
from server.store.search import RECALL_WORDS

#: A probe's window: the question alone, after five messages of other talk, or before them.
WINDOWS = ("alone", "after_talk", "before_talk")

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
    made: list[Probe] = []
    for q in corpus.questions:
        name = names[q.user_id]
        asked = (name, "user", q.text)
        talk = _talk(fresh[q.user_id], random.Random(f"memstore-eval/recall/{q.qid}"), name)
        windows = (
            ("alone", (asked,)),
            ("after_talk", (*talk, asked)),
            ("before_talk", (asked, *talk)),
        )
        for window, lines in windows:
            text = "\n".join(f"{role}: {content}" for role, _, content in lines)
            made.append(Probe(replace(q, text=text), window, lines))
    return made


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
        for speaker, content in exchange:
            lines.append(
                (name, "user", content) if speaker == "U" else ("assistant", "assistant", content)
            )
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
    sessions: ss_grpc.SessionServiceStub,
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

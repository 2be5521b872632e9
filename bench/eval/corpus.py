"""The retrieval corpus: five users' chat sessions, and questions whose evidence is known."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from bench.eval.chatter import ChatterGenerator

DATA = Path(__file__).with_name("data")
USERS = ("maya", "tom", "lena", "raj", "sofia")

Kind = Literal["lexical", "paraphrase", "mixed"]
#: lexical: the question shares rare words or identifiers with its evidence; paraphrase: it
#: asks in other words; mixed: it names a person (often only the evidence's role) and
#: paraphrases the rest.
KINDS: tuple[Kind, ...] = ("lexical", "paraphrase", "mixed")

# A session is 15-40 messages: the handwritten scenes and chatter, chatter generated from the
# user's templates, plus generic filler drawn to a target length.
MIN_SESSION, TARGET_MAX, MAX_SESSION = 15, 36, 40
ASSISTANT = "assistant"


@dataclass(frozen=True, order=True)
class MessageKey:
    """Where a message sits: its user, its session, and its 0-based position in the session."""

    user_id: str
    session_id: str
    index: int


@dataclass(frozen=True)
class Message:
    """One chat message as memstore stores it: role (a speaker's name), role type, content."""

    key: MessageKey
    role: str
    role_type: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class Question:
    """A question asked within one user's memory, and the messages that answer it."""

    qid: str
    user_id: str
    text: str
    kind: Kind
    evidence: frozenset[MessageKey]


@dataclass(frozen=True)
class Corpus:
    """Every message (in user, session, index order) and every question."""

    messages: tuple[Message, ...]
    questions: tuple[Question, ...]

    def user_messages(self, user_id: str) -> tuple[Message, ...]:
        """The messages a search scoped to `user_id` may return."""
        return tuple(m for m in self.messages if m.key.user_id == user_id)

    def sessions(self) -> dict[str, tuple[Message, ...]]:
        """Messages grouped by session id, in order: the shape AddMessages takes."""
        grouped: dict[str, list[Message]] = {}
        for m in self.messages:
            grouped.setdefault(m.key.session_id, []).append(m)
        return {sid: tuple(ms) for sid, ms in grouped.items()}

    def sample(self, questions: int) -> Corpus:
        """The first `questions` questions and only the sessions holding their evidence: a
        corpus small enough for a smoke test of the evaluation's code path."""
        chosen = self.questions[:questions]
        sessions = {k.session_id for q in chosen for k in q.evidence}
        return Corpus(tuple(m for m in self.messages if m.key.session_id in sessions), chosen)

    def summary(self) -> dict[str, Any]:
        """Counts for the report: users, sessions, messages, questions by kind."""
        kinds = Counter(q.kind for q in self.questions)
        return {
            "users": len({m.key.user_id for m in self.messages}),
            "sessions": len({m.key.session_id for m in self.messages}),
            "messages": len(self.messages),
            "questions": len(self.questions),
            "questions_by_kind": {k: kinds[k] for k in KINDS},
        }


def document_text(message: Message) -> str:
    """The text a ranker indexes: speaker then content, as the full-text index will."""
    return f"{message.role}: {message.content}"


@cache
def load() -> Corpus:
    """Build the corpus from bench/eval/data; the same files give the same corpus every time."""
    filler = _read("filler")
    messages: list[Message] = []
    questions: list[Question] = []
    for user_id in USERS:
        user = _read(user_id)
        if user["user_id"] != user_id:
            raise ValueError(f"{user_id}.json is for user {user['user_id']!r}")
        built, labels = _build_user(user, filler)
        messages.extend(built)
        questions.extend(_questions(user, labels))
    return Corpus(tuple(messages), tuple(questions))


def user_name(user_id: str) -> str:
    """The name a user's own messages carry as their role."""
    return str(_read(user_id)["name"])


def filler() -> list[list[list[str]]]:
    """The generic exchanges (speaker "U" or "A", content) drawn into sessions as filler."""
    return list(_read("filler"))


def chatter_groups(user_id: str) -> dict[str, list[list[list[str]]]]:
    """A user's chatter, the talk that answers no question, by topic: each generated topic's
    exchanges (`topic:<name>`, as the corpus generated them) and each session's handwritten
    chatter (`session:<id>`), in the order the corpus holds them."""
    user = _read(user_id)
    generator = ChatterGenerator(
        user.get("generated", {}), _written_text(user), f"memstore-eval/{user_id}/generated"
    )
    groups: dict[str, list[list[list[str]]]] = {}
    for session in user["sessions"]:
        if session.get("chatter"):
            groups[f"session:{session['id']}"] = list(session["chatter"])
        # The same calls in the same order as _build_user: the same exchanges.
        topics = session.get("generated", [])
        for topic, exchange in zip(topics, generator.exchanges(topics), strict=True):
            groups.setdefault(f"topic:{topic}", []).append(exchange)
    return groups


def _read(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


def _build_user(
    user: dict[str, Any], filler: list[list[list[str]]]
) -> tuple[list[Message], dict[str, MessageKey]]:
    user_id, name = user["user_id"], user["name"]
    # A string seed is hashed with SHA-512, so the layout does not depend on PYTHONHASHSEED.
    rng = random.Random(f"memstore-eval/{user_id}")
    exchanges = _filler_stream(filler, rng)
    # Its own RNG, so adding templates changes no session's layout, only generated text.
    generator = ChatterGenerator(
        user.get("generated", {}), _written_text(user), f"memstore-eval/{user_id}/generated"
    )
    messages: list[Message] = []
    labels: dict[str, MessageKey] = {}
    for session in user["sessions"]:
        chatter = [*session.get("chatter", []), *generator.exchanges(session.get("generated", []))]
        lines = _layout(session["scenes"], chatter, exchanges, rng)
        for index, line in enumerate(lines):
            key = MessageKey(user_id, session["id"], index)
            messages.append(_message(key, name, line))
            if len(line) == 3:
                if line[2] in labels:
                    raise ValueError(f"{user_id}: label {line[2]!r} used twice")
                labels[line[2]] = key
    return messages, labels


def _written_text(user: dict[str, Any]) -> str:
    """Every handwritten message and question of a user: what a fresh identifier must avoid."""
    blocks = [b for s in user["sessions"] for b in (*s["scenes"], *s.get("chatter", []))]
    lines = [line[1] for block in blocks for line in block]
    return "\n".join([*lines, *(q[1] for q in user["questions"])])


def _filler_stream(filler: list[list[list[str]]], rng: random.Random) -> Iterator[list[list[str]]]:
    # Each user walks the pool in its own shuffled order and only wraps around after using
    # every exchange, so no user hears the same small talk twice before the pool runs out.
    while True:
        order = list(range(len(filler)))
        rng.shuffle(order)
        for i in order:
            yield filler[i]


def _layout(
    scenes: list[list[list[str]]],
    chatter: list[list[list[str]]],
    exchanges: Iterator[list[list[str]]],
    rng: random.Random,
) -> list[list[str]]:
    """Scenes then chatter, in their written order, with generic filler scattered among them."""
    # Chatter follows the scenes because it often refers back to them ("the sign for the new
    # place" after the lease is signed); filler refers to nothing, so it can go anywhere.
    written = [*scenes, *chatter]
    size = sum(len(block) for block in written)
    target = max(rng.randint(MIN_SESSION, TARGET_MAX), size + 2)
    filler: list[list[list[str]]] = []
    while size < target:
        exchange = next(exchanges)
        if size + len(exchange) > MAX_SESSION and size >= MIN_SESSION:
            break
        filler.append(exchange)
        size += len(exchange)
    slots = [True] * len(written) + [False] * len(filler)
    rng.shuffle(slots)
    written_iter, filler_iter = iter(written), iter(filler)
    lines: list[list[str]] = []
    for is_written in slots:
        lines.extend(next(written_iter) if is_written else next(filler_iter))
    return lines


def _message(key: MessageKey, name: str, line: Sequence[str]) -> Message:
    speaker, content = line[0], line[1]
    if speaker == "A":
        return Message(key, ASSISTANT, "assistant", content)
    # "U" is the user; any other speaker is another person who joined the chat, and is stored
    # under their own name with role type user, as a shared conversation would be.
    return Message(key, name if speaker == "U" else speaker, "user", content)


def _questions(user: dict[str, Any], labels: dict[str, MessageKey]) -> Iterator[Question]:
    user_id = user["user_id"]
    for n, (kind, text, evidence) in enumerate(user["questions"], start=1):
        if kind not in KINDS:
            raise ValueError(f"{user_id} question {n}: unknown kind {kind!r}")
        missing = [label for label in evidence if label not in labels]
        if missing or not evidence:
            raise ValueError(f"{user_id} question {n}: unknown or no evidence {missing}")
        keys = frozenset(labels[label] for label in evidence)
        yield Question(f"{user_id}-q{n:02d}", user_id, text, kind, keys)

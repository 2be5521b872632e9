"""Chat-like text and the search group's data: users with embedded messages, a queued backlog."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import psycopg
from psycopg import sql

from bench.env import EPOCH
from memstore.v1 import resources_pb2, session_service_pb2
from server.search.service import RECALL_WINDOW
from server.store import Store

#: The local model's name and width: search reads only vectors stored under the current name.
MODEL = "all-MiniLM-L6-v2-int8"
DIMENSIONS = 384

_FUNCTION_TEXT = (
    "the a to and of in my we it for with that is was on at about this you i our "
    "your they have had will can just so but not then when from"
)
_FUNCTION_WORDS = tuple(_FUNCTION_TEXT.split())

# Content words over the topics people tell an assistant about. Drawn with Zipf-like
# weights, so some words are common (a query matches many messages) and most are rare.
_CONTENT_TEXT = """
trip flight hotel beach mountain train ticket passport luggage airport museum city village
restaurant dinner lunch breakfast recipe vegetarian vegan pasta salad soup coffee tea wine
birthday party wedding anniversary gift present cake flowers daughter son sister brother
mother father grandmother friend neighbour colleague manager team project deadline meeting
report presentation budget invoice contract client customer order delivery refund account
password login email phone laptop printer software update backup server database network
doctor dentist appointment medicine allergy headache exercise running yoga swimming gym
diet sleep stress holiday weekend morning evening tonight tomorrow yesterday monday friday
january march june september december summer winter spring autumn rain snow weather
garden plants tomatoes roses dog cat puppy vet walk park bicycle car garage repair insurance
mortgage rent apartment house kitchen bathroom furniture sofa paint moving boxes landlord
school homework exam teacher course lesson guitar piano concert tickets movie series book
novel author library podcast music playlist camera photos album painting drawing museum
spanish french german japanese italian language grammar vocabulary practice translation
salary interview promotion resume career training workshop conference speaker slides
anxious happy tired excited worried grateful busy bored curious surprised proud relieved
allergic peanuts gluten lactose shellfish spicy sweet salty bitter sour fresh frozen
lisbon porto madrid paris berlin tokyo kyoto london dublin rome naples vienna prague oslo
"""
_CONTENT_WORDS = tuple(_CONTENT_TEXT.split())

_NAMES = ("Priya", "Marco", "Aiko", "Lena", "Tomas", "Sofia", "Jamal", "Chen", "Ines", "Olu")


class ChatText:
    """Seeded sentences and questions drawn from one vocabulary, so that searches match."""

    def __init__(self, seed: int = 11) -> None:
        self._rng = random.Random(seed)
        self._weights = [1 / (rank + 1) ** 0.7 for rank in range(len(_CONTENT_WORDS))]

    def _words(self, count: int) -> list[str]:
        content = self._rng.choices(_CONTENT_WORDS, self._weights, k=count)
        return [
            self._rng.choice(_FUNCTION_WORDS) if self._rng.random() < 0.4 else word
            for word in content
        ]

    def sentence(self) -> str:
        """One chat message: 8-28 words, sometimes two sentences, sometimes a name."""
        words = self._words(self._rng.randint(8, 28))
        if self._rng.random() < 0.3:
            words.insert(self._rng.randrange(len(words)), self._rng.choice(_NAMES))
        text = " ".join(words)
        return text[0].upper() + text[1:] + self._rng.choice((".", ".", "!", "?"))

    def question(self) -> str:
        """A search query: 4-9 words ending in a question mark."""
        text = " ".join(self._words(self._rng.randint(4, 9)))
        return text[0].upper() + text[1:] + "?"

    def role(self, sequence: int) -> tuple[str, str]:
        """(role, role_type) of the message at `sequence`: the user and the assistant alternate."""
        if sequence % 2:
            return self._rng.choice(_NAMES), "user"
        return "assistant", "assistant"


def add_memory_payloads(
    text: ChatText, batch: int, prefix: str, sessions: int = 2000
) -> tuple[bytes, ...]:
    """AddMemory requests of `batch` chat messages each, over `sessions` new sessions."""
    kinds = {"user": resources_pb2.ROLE_TYPE_USER, "assistant": resources_pb2.ROLE_TYPE_ASSISTANT}
    out = []
    for s in range(sessions):
        messages = []
        for k in range(batch):
            role, kind = text.role(k + 1)
            messages.append(
                resources_pb2.Message(role=role, role_type=kinds[kind], content=text.sentence())
            )
        request = session_service_pb2.AddMemoryRequest(
            session_id=f"{prefix}-{s}", messages=messages
        )
        out.append(request.SerializeToString())
    return tuple(out)


def has_vectors(url: str) -> bool:
    """Whether the migrated bench database has pgvector (migration 0007 applied)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
    return row is not None


def _message_lines(
    text: ChatText, sessions: list[str], per_session: int
) -> Iterator[tuple[str, str]]:
    """(messages COPY line, sessions COPY line) for sessions of `per_session` messages."""
    for j, session_id in enumerate(sessions):
        start = EPOCH + timedelta(hours=j)
        lines = []
        for seq in range(1, per_session + 1):
            role, role_type = text.role(seq)
            at = (start + timedelta(seconds=30 * seq)).isoformat()
            lines.append(f"1\t{session_id}\t{seq}\t{role}\t{role_type}\t{text.sentence()}\t{at}\n")
        last = (start + timedelta(seconds=30 * per_session)).isoformat()
        yield "".join(lines), f"{session_id}\t{per_session}\t{per_session + 1}\t{last}"


def seed_user(
    url: str, text: ChatText, user_id: str, *, prefix: str, messages: int, per_session: int
) -> list[str]:
    """COPYs a user with `messages` messages in sessions of `per_session`; returns the sessions."""
    sessions = [f"{prefix}-{j}" for j in range(max(1, messages // per_session))]
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users (project_id, user_id) VALUES (1, %s)", (user_id,))
        session_rows = []
        columns = "project_id, session_id, user_id, message_count, next_sequence, last_message_at"
        messages_copy = (
            "COPY messages (project_id, session_id, sequence, role, role_type, content, "
            "created_at) FROM STDIN"
        )
        lines = list(_message_lines(text, sessions, per_session))
        with cur.copy(f"COPY sessions ({columns}) FROM STDIN") as copy:
            for _, session_line in lines:
                sid, rest = session_line.split("\t", 1)
                session_rows.append(f"1\t{sid}\t{user_id}\t{rest}\n")
            copy.write("".join(session_rows))
        with cur.copy(messages_copy) as copy:
            for message_lines, _ in lines:
                copy.write(message_lines)
    return sessions


def _vector_lines(keys: list[tuple[str, int]], rng: np.random.Generator) -> Iterator[str]:
    for start in range(0, len(keys), 1000):
        block = keys[start : start + 1000]
        vectors = rng.standard_normal((len(block), DIMENSIONS)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        buf = io.StringIO()
        np.savetxt(buf, vectors, fmt="%.5f", delimiter=",")
        rows = buf.getvalue().splitlines()
        pairs = zip(block, rows, strict=True)
        yield "".join(f"1\t{sid}\t{seq}\t{MODEL}\t[{row}]\n" for (sid, seq), row in pairs)


def embed_randomly(url: str, prefix: str, seed: int = 11) -> int:
    """Random unit vectors for every message of the sessions named `prefix`-*, and their means.

    What the worker would store, except that the vectors mean nothing: the cost of a search
    (an exact scan of the user's vectors) does not depend on what they say.
    """
    like = f"{prefix}-%"
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT session_id, sequence FROM messages WHERE project_id = 1"
            " AND session_id LIKE %s ORDER BY session_id, sequence",
            (like,),
        )
        keys = [(str(r[0]), int(r[1])) for r in cur.fetchall()]
        columns = "project_id, session_id, sequence, model, embedding"
        with cur.copy(f"COPY message_embeddings ({columns}) FROM STDIN") as copy:
            for chunk in _vector_lines(keys, np.random.default_rng(seed)):
                copy.write(chunk)
        # The worker keeps the mean of the last six messages; the mean of all costs the same
        # to read, and recall reads one vector per session either way.
        cur.execute(
            "INSERT INTO session_embeddings"
            " (project_id, session_id, model, embedding, through_sequence)"
            " SELECT project_id, session_id, model, avg(embedding), max(sequence)"
            " FROM message_embeddings WHERE project_id = 1 AND session_id LIKE %s"
            " GROUP BY project_id, session_id, model",
            (like,),
        )
    return len(keys)


def keep_recall(url: str, prefix: str) -> int:
    """Ranks and keeps the recall of the sessions named `prefix`-*, as the worker would after
    embedding them; returns how many sessions."""

    async def run() -> int:
        store = await Store.open(url, min_size=1, max_size=2)
        try:
            await store.check_vectors()
            async with await psycopg.AsyncConnection.connect(url) as conn:
                cur = await conn.execute(
                    "SELECT session_id FROM sessions WHERE project_id = 1 AND session_id LIKE %s",
                    (f"{prefix}-%",),
                )
                sessions = [(1, str(r[0])) for r in await cur.fetchall()]
            await store.keep_recall(sessions, MODEL, RECALL_WINDOW)
            return len(sessions)
        finally:
            await store.close()

    return asyncio.run(run())


def keep_word_recall(url: str, prefix: str) -> int:
    """Keeps the recall by words of the sessions named `prefix`-*, as the worker does without
    pgvector when their messages arrive (migration 0012); returns how many queue rows it
    settled. COPY queued nothing, so their messages are queued first."""

    async def run() -> int:
        store = await Store.open(url, min_size=1, max_size=2)
        try:
            await store.check_vectors()
            if not store.word_recall:
                raise RuntimeError(
                    "kept recall by words needs a PostgreSQL without pgvector (and migration 0012)"
                )
            queue_backlog(url, prefix)
            settled = 0
            while done := await store.keep_word_recall_due(64, RECALL_WINDOW):
                settled += done
            return settled
        finally:
            await store.close()

    return asyncio.run(run())


def queue_backlog(url: str, prefix: str) -> int:
    """Queues every message of the sessions named `prefix`-* for embedding, oldest first."""
    with psycopg.connect(url) as conn:
        cur = conn.execute(
            "INSERT INTO embedding_queue (project_id, session_id, sequence)"
            " SELECT project_id, session_id, sequence FROM messages"
            " WHERE project_id = 1 AND session_id LIKE %s ORDER BY session_id, sequence",
            (f"{prefix}-%",),
        )
        return cur.rowcount


def remove(url: str, prefixes: tuple[str, ...]) -> int:
    """Deletes the search users and the sessions named with `prefixes`; returns queue rows left.

    Their messages, vectors and queue rows go with them (ON DELETE CASCADE).
    """
    patterns = [f"{p}%" for p in prefixes]
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM embedding_queue").fetchone()
        with conn.transaction():
            conn.execute("DELETE FROM users WHERE project_id = 1 AND user_id LIKE 'search-%'")
            conn.execute(
                "DELETE FROM sessions WHERE project_id = 1 AND session_id LIKE ANY(%s)",
                (patterns,),
            )
            left = conn.execute("SELECT count(*) FROM embedding_queue").fetchone()
        if left and left[0]:
            raise RuntimeError(f"{left[0]} queued messages belong to no search session")
        conn.execute(
            "VACUUM ANALYZE users, sessions, messages, message_embeddings, session_embeddings,"
            " embedding_queue"
        )
    return int(row[0]) if row else 0


def analyze(url: str) -> None:
    """Fresh statistics after the COPYs, as a real table of this size would have.

    The vector tables only where pgvector is: without it migrations 0007 and 0008, which make
    them, are skipped (the agent's turn seeds its user either way).
    """
    tables = ["messages", "sessions"]
    if has_vectors(url):
        tables += ["message_embeddings", "session_embeddings"]
    names = sql.SQL(", ").join(sql.Identifier(t) for t in tables)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(names))

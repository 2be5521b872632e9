"""SearchMemory and GetMemory's recall as rankers: the corpus loaded into a real memstore.

The corpus goes in through the gRPC API (CreateUser, AddMemory), the real embedding worker
embeds every message, and each question is asked with SearchMemory in the question's user
scope, once per search type, then as a new session's window for GetMemory's recall
(bench/eval/recall.py). The server runs in-process over a database of its own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench import env
from bench.eval.corpus import Corpus, MessageKey, Question
from bench.eval.metrics import DEPTH, Ranker
from bench.eval.recall import ask_recall
from memstore.v1 import resources_pb2 as rs
from memstore.v1 import session_service_pb2 as ss
from memstore.v1 import session_service_pb2_grpc as ss_grpc
from memstore.v1 import user_service_pb2 as us
from memstore.v1 import user_service_pb2_grpc as us_grpc
from server.config import Config
from server.search.embedding import embedder_from_setting
from server.search.worker import EmbeddingWorker
from server.serving.app import build_server
from server.store import Store

ROOT = Path(__file__).resolve().parents[2]

SEARCH_TYPES = {
    "full_text": ss.SEARCH_TYPE_FULL_TEXT,
    "semantic": ss.SEARCH_TYPE_SEMANTIC,
    "hybrid": ss.SEARCH_TYPE_HYBRID,
}

_ROLE_TYPES = {"user": rs.ROLE_TYPE_USER, "assistant": rs.ROLE_TYPE_ASSISTANT}


@dataclass(frozen=True)
class Answers:
    """Every question's ranked keys per search type, and what loading took."""

    ranked: dict[str, dict[str, list[MessageKey]]]
    embed_seconds: float
    messages: int
    #: GetMemory's recall of each probe (bench/eval/recall.py): window -> ranker -> qid.
    recall: dict[str, dict[str, dict[str, list[MessageKey]]]]

    def ranker(self, search_type: str) -> Ranker:
        """The answers of one search type as an evaluation Ranker."""
        return _answered(self.ranked[search_type])

    def recall_ranker(self, window: str, name: str) -> Ranker:
        """One recall ranker's answers to the probes of one window as an evaluation Ranker."""
        return _answered(self.recall[window][name])


def _answered(answers: dict[str, list[MessageKey]]) -> Ranker:
    def ranked(question: Question) -> list[MessageKey]:
        return answers[question.qid]

    return ranked


def ask_memstore(corpus: Corpus) -> Answers:
    """Loads the corpus into a fresh memstore and asks every question with every search type.

    The database is made on DATABASE_URL's server (else the bench's embedded PostgreSQL)
    and dropped afterwards.
    """
    server = env.server_url(os.environ.get("DATABASE_URL"), ROOT / ".data")
    name = f"memstore_eval_{secrets.token_hex(3)}"
    url = env.fresh_database(server, name)
    try:
        return asyncio.run(_ask(corpus, url))
    finally:
        env.drop_database(server, name)


async def _ask(corpus: Corpus, url: str) -> Answers:
    async with _served(url) as (store, channel):
        sessions = ss_grpc.SessionServiceStub(channel)
        keys = await _load(corpus, us_grpc.UserServiceStub(channel), sessions)
        embedder = embedder_from_setting("local")
        assert embedder is not None
        worker = EmbeddingWorker(store, embedder)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await worker.drain(timeout=3600)
        embed_seconds = loop.time() - start
        ranked: dict[str, dict[str, list[MessageKey]]] = {}
        for name, search_type in SEARCH_TYPES.items():
            if search_type != ss.SEARCH_TYPE_FULL_TEXT and not store.vectors:
                continue  # no pgvector on this server: words only
            ranked[name] = {
                q.qid: await _search(sessions, q, search_type, keys.__getitem__)
                for q in corpus.questions
            }
        model = embedder.name if store.vectors else None
        recall = await ask_recall(
            corpus, store, sessions, keys.__getitem__, worker=worker, model=model
        )
    return Answers(ranked, embed_seconds, len(corpus.messages), recall)


@asynccontextmanager
async def _served(url: str) -> AsyncIterator[tuple[Store, grpc.aio.Channel]]:
    store = await Store.open(url, min_size=1, max_size=4)
    try:
        await store.migrate()
        server, port = await build_server(Config(host="127.0.0.1", port=0), store)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield store, channel
        finally:
            await server.stop(None)
    finally:
        await store.close()


async def _load(
    corpus: Corpus, users: us_grpc.UserServiceAsyncStub, sessions: ss_grpc.SessionServiceAsyncStub
) -> dict[tuple[str, int], MessageKey]:
    """Adds every session; returns the corpus key of each (session_id, sequence)."""
    for user_id in sorted({m.key.user_id for m in corpus.messages}):
        await users.CreateUser(us.CreateUserRequest(user_id=user_id))
    keys: dict[tuple[str, int], MessageKey] = {}
    for session_id, messages in corpus.sessions().items():
        added = await sessions.AddMemory(
            ss.AddMemoryRequest(
                session_id=session_id,
                user_id=messages[0].key.user_id,
                messages=[
                    rs.Message(role=m.role, role_type=_ROLE_TYPES[m.role_type], content=m.content)
                    for m in messages
                ],
            )
        )
        for message, stored in zip(messages, added.messages, strict=True):
            keys[(session_id, stored.sequence)] = message.key
    return keys


async def _search(
    sessions: ss_grpc.SessionServiceAsyncStub,
    question: Question,
    search_type: ss.SearchType.ValueType,
    key_of: Callable[[tuple[str, int]], MessageKey],
) -> list[MessageKey]:
    found = await sessions.SearchMemory(
        ss.SearchMemoryRequest(
            text=question.text, user_id=question.user_id, search_type=search_type, limit=DEPTH
        )
    )
    return [key_of((r.session_id, r.message.sequence)) for r in found.results]

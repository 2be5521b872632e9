"""`memstore embed` killed mid-batch loses nothing, and stopped saves its batch in hand;
`memstore reindex` re-embeds for a model.

Without pgvector (CI's external PostgreSQL 15) embed runs the recall worker, which runs no model
and keeps each session's recall by words, and reindex keeps it for sessions from before
migration 0012 (whose messages were never queued).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from memstore.v1.session_service_pb2 import SearchMemoryRequest
from memstore.v1.session_service_pb2_grpc import SessionServiceStub
from server.search.worker import BATCH_SIZE
from tests.fake_embedder import FakeServer, serving
from tests.fix_db import scratch_database
from tests.processes import serve_memstore, stop_memstore

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 400


def _no_vectors(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return not _scalar(conn, "SELECT (to_regclass('message_embeddings') IS NOT NULL)::int")


def _refused(url: str, command: str) -> None:
    run = _memstore(url, command)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "pgvector" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture
def embed_db(server_url: str) -> Iterator[str]:
    """A migrated scratch database holding MESSAGES queued messages in 20 sessions."""
    with scratch_database(server_url, "memstore_embed") as url:
        _memstore(url, "migrate").check_returncode()
        with psycopg.connect(url, autocommit=True) as conn:
            for s in range(20):
                conn.execute(
                    "INSERT INTO sessions (project_id, session_id, next_sequence) "
                    "VALUES (1, %s, %s)",
                    (f"s{s}", MESSAGES // 20 + 1),
                )
            conn.execute(
                "INSERT INTO messages (project_id, session_id, sequence, role, content) "
                "SELECT 1, 's' || (i %% 20), i / 20 + 1, 'kai', 'message number ' || i "
                "FROM generate_series(0, %s - 1) AS i",
                (MESSAGES,),
            )
            conn.execute(
                "INSERT INTO embedding_queue (project_id, session_id, sequence) "
                "SELECT project_id, session_id, sequence FROM messages"
            )
        yield url


def _memstore(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args, "--database-url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _start_embed(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server", "embed", "--database-url", url, "--log-level", "WARNING"],
        cwd=ROOT,
        env={**os.environ, "MEMSTORE_PURGE_INTERVAL": "0"},
    )


def _scalar(conn: psycopg.Connection[tuple[object, ...]], statement: str) -> int:
    row = conn.execute(statement).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def _counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        # The queue first: each statement reads its own snapshot, and a batch saved between
        # the two reads would otherwise show as neither queued nor embedded (seen once on
        # the Citus cluster: (368, 0) of 400). A batch's queue rows and vectors commit together.
        queued = _scalar(conn, "SELECT count(*) FROM embedding_queue")
        return _scalar(conn, "SELECT count(*) FROM message_embeddings"), queued


def _wait(url: str, done: object, timeout: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = _counts(url)
        if done(counts):  # type: ignore[operator]
            return counts
        time.sleep(0.1)
    raise AssertionError(f"not reached in {timeout}s: embedded, queued = {_counts(url)}")


def _keeps_recall_by_words(url: str) -> None:
    worker = _start_embed(url)
    try:
        deadline = time.monotonic() + 240
        with psycopg.connect(url, autocommit=True) as conn:
            while _scalar(conn, "SELECT count(*) FROM embedding_queue") and (
                time.monotonic() < deadline
            ):
                time.sleep(0.1)
            # Each session's recall kept (empty: they belong to no user), nothing embedded.
            assert _scalar(conn, "SELECT count(*) FROM embedding_queue") == 0
            assert _scalar(conn, "SELECT count(*) FROM session_word_recall") == 20
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()


def test_a_worker_killed_mid_batch_loses_nothing(embed_db: str) -> None:
    if _no_vectors(embed_db):
        _keeps_recall_by_words(embed_db)
        return
    first = _start_embed(embed_db)
    try:
        # Some batches committed, the rest still queued: kill it while it works.
        _wait(embed_db, lambda c: c[0] >= 64, timeout=120)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
    embedded, queued = _counts(embed_db)
    assert embedded + queued == MESSAGES and queued > 0
    second = _start_embed(embed_db)
    try:
        assert _wait(embed_db, lambda c: c[1] == 0, timeout=240) == (MESSAGES, 0)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()
    with psycopg.connect(embed_db) as conn:
        # One vector per message, each from the local model, and a recall vector per session.
        assert (
            _scalar(conn, "SELECT count(DISTINCT (session_id, sequence)) FROM message_embeddings")
            == MESSAGES
        )
        assert _scalar(conn, "SELECT count(DISTINCT model) FROM message_embeddings") == 1
        assert _scalar(conn, "SELECT count(*) FROM session_embeddings") == 20


def test_a_stopped_worker_saves_the_batch_the_model_is_embedding(embed_db: str) -> None:
    # An audit: SIGTERM during a remote model's call cancelled the batch at once, the process
    # waited for the call anyway (its thread cannot be stopped), and the vectors it answered
    # were thrown away, the batch given back to be embedded (and paid for) again.
    if _no_vectors(embed_db):
        _keeps_recall_by_words(embed_db)  # no model: stopped between batches
        return
    with serving() as fake:
        fake.hold = threading.Event()
        worker = subprocess.Popen(
            [sys.executable, "-m", "server", "embed", "--database-url", embed_db,
             "--embedder", fake.url, "--embedder-model", "slow", "--log-level", "WARNING"],
            cwd=ROOT,
            env={**os.environ, "MEMSTORE_PURGE_INTERVAL": "0"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not fake.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fake.requests, "the worker never called the model"
            worker.send_signal(signal.SIGTERM)  # the model still answering
            _answer_later(fake)
            assert worker.wait(timeout=30) == 0
        finally:
            worker.kill()
        # The batch in hand saved, and no other claimed after the signal.
        assert [len(body["input"]) for _, body in fake.requests] == [BATCH_SIZE]
    assert _counts(embed_db) == (BATCH_SIZE, MESSAGES - BATCH_SIZE)


def _answer_later(fake: FakeServer) -> None:
    """Lets the held model answer a second from now: after the signal just sent (or about to
    be) has reached the process. A fixed 2 s from the model's request was not always past
    it: serve's start can take that long on a loaded machine."""
    assert fake.hold is not None
    threading.Timer(1.0, fake.hold.set).start()


def _serve_until_the_model_is_asked(
    embed_db: str, fake: FakeServer, *args: str
) -> subprocess.Popen[str]:
    """`memstore serve` running the embedding worker against `fake`, once it has sent the
    model its first batch."""
    proc, _ = serve_memstore(
        "--embedder", fake.url, "--embedder-model", "slow", "--purge-interval", "0", *args,
        env={**os.environ, "DATABASE_URL": embed_db},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not fake.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake.requests, "the worker never called the model"
    return proc


def test_a_stopped_serve_saves_the_batch_the_model_is_embedding(embed_db: str) -> None:
    # As `memstore embed`, for the worker `memstore serve` runs: a drain delay longer than
    # the model's answer still claims no other batch once the signal has come.
    if _no_vectors(embed_db):
        _keeps_recall_by_words(embed_db)  # no model: stopped between batches
        return
    with serving() as fake:
        fake.hold = threading.Event()
        proc = _serve_until_the_model_is_asked(embed_db, fake, "--drain-delay", "3")
        _answer_later(fake)
        code, out = stop_memstore(proc)  # the model still answering
        assert code == 0, out
        assert [len(body["input"]) for _, body in fake.requests] == [BATCH_SIZE]
    assert _counts(embed_db) == (BATCH_SIZE, MESSAGES - BATCH_SIZE)


def test_a_batch_not_saved_within_the_grace_period_is_given_back_whole(embed_db: str) -> None:
    if _no_vectors(embed_db):
        _keeps_recall_by_words(embed_db)  # no model: stopped between batches
        return
    with serving() as fake:
        fake.hold = threading.Event()  # the model answers only once the process is gone
        proc = _serve_until_the_model_is_asked(
            embed_db, fake, "--drain-delay", "0", "--grace-period", "1"
        )
        signalled = time.monotonic()
        code, out = stop_memstore(proc)
        stopped_in = time.monotonic() - signalled
        fake.hold.set()
        assert code == 0, out
        assert "embedding batch not saved within 1.0s: given back to the queue" in out, out
        # The process exits too, its model still silent: it waited for the model's HTTP
        # timeout (30 s) while the embedding thread was joined at exit.
        assert stopped_in < 15, stopped_in
        assert [len(body["input"]) for _, body in fake.requests] == [BATCH_SIZE]
    assert _counts(embed_db) == (0, MESSAGES)


def test_a_search_waiting_on_a_silent_model_does_not_hold_a_stopped_servers_exit(
    embed_db: str,
) -> None:
    # The query's vector came from asyncio's default executor, whose threads `asyncio.run`
    # and Python join at exit: a SearchMemory whose remote model never answered held the
    # stopped server until the model's HTTP timeout (30 s), long after the grace period had
    # failed the call.
    with serving() as fake:
        fake.hold = threading.Event()  # the model answers only once the process is gone
        proc, port = serve_memstore(
            "--embedder", fake.url, "--embedder-model", "silent", "--no-embedding-worker",
            "--purge-interval", "0", "--grace-period", "1",
            env={**os.environ, "DATABASE_URL": embed_db},
        )  # fmt: skip
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            search = SessionServiceStub(channel).SearchMemory.future(
                SearchMemoryRequest(text="message number 7", session_ids=["s7"]), timeout=60
            )
            if _no_vectors(embed_db):
                # Nothing kept by meaning: the search ranks by words, the model never asked.
                results = search.result().results
                assert [r.message.content for r in results][:1] == ["message number 7"]
                assert fake.requests == []
                code, out = stop_memstore(proc)
                assert code == 0, out
                return
            deadline = time.monotonic() + 30
            while not fake.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [body["input"] for _, body in fake.requests] == [["message number 7"]]
            signalled = time.monotonic()
            code, out = stop_memstore(proc)
            stopped_in = time.monotonic() - signalled
            fake.hold.set()
            assert code == 0, out
            assert stopped_in < 10, (stopped_in, out)
            with pytest.raises(grpc.RpcError) as failed:
                search.result()
            # Past the grace period the call is cancelled by the server, or its channel
            # closes with the process: either way it fails, nothing answered half.
            assert failed.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_reindex_re_embeds_what_another_model_made(embed_db: str) -> None:
    if _no_vectors(embed_db):
        # Nothing to embed; the sessions belong to no user, so none has recall to keep.
        run = _memstore(embed_db, "reindex")
        assert run.returncode == 0, run.stderr[-2000:]
        assert "kept recall by words for 0 sessions" in run.stdout
        return
    with psycopg.connect(embed_db, autocommit=True) as conn:
        conn.execute("DELETE FROM embedding_queue WHERE sequence > 2")
        conn.execute(
            "INSERT INTO message_embeddings (project_id, session_id, sequence, model, embedding) "
            "SELECT project_id, session_id, sequence, 'old-model', '[1,0,0]' FROM messages"
            " WHERE sequence > 2"
        )
    run = _memstore(embed_db, "reindex")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"reindexed {MESSAGES - 40} messages" in run.stdout
    with psycopg.connect(embed_db) as conn:
        assert (
            _scalar(conn, "SELECT count(*) FROM message_embeddings WHERE model = 'old-model'") == 0
        )
        assert _scalar(conn, "SELECT count(*) FROM message_embeddings") == MESSAGES
        assert _scalar(conn, "SELECT count(*) FROM embedding_queue") == 0


def _seed_before_0012(url: str) -> None:
    # What a database migrated to 0012 holds of sessions whose messages a server before 0012
    # added without pgvector: messages, and nothing queued or kept. Two live sessions of user
    # u with messages, one deleted, one whose only message is deleted, one of no user.
    _memstore(url, "migrate").check_returncode()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO users (project_id, user_id) VALUES (1, 'u')")
        for session, user, deleted in (
            ("trip", "u", False),
            ("birds", "u", False),
            ("gone", "u", True),
            ("emptied", "u", False),
            ("nobody", None, False),
        ):
            conn.execute(
                "INSERT INTO sessions (project_id, session_id, user_id, next_sequence, "
                "deleted_at) VALUES (1, %s, %s, 3, CASE WHEN %s THEN now() END)",
                (session, user, deleted),
            )
        for session, sequence, content in (
            ("trip", 1, "we fly to antarctica in march"),
            ("trip", 2, "pack warm boots for antarctica"),
            ("birds", 1, "emperor penguins live in antarctica"),
            ("birds", 2, "penguins cannot fly"),
            ("gone", 1, "penguins of antarctica, deleted"),
            ("emptied", 1, "antarctica again"),
            ("nobody", 1, "antarctica for nobody"),
        ):
            conn.execute(
                "INSERT INTO messages (project_id, session_id, sequence, role, content) "
                "VALUES (1, %s, %s, 'kai', %s)",
                (session, sequence, content),
            )
        conn.execute("UPDATE messages SET deleted_at = now() WHERE session_id = 'emptied'")
        conn.execute(
            "UPDATE sessions s SET last_message_at = now(), message_count = (SELECT count(*)"
            " FROM messages m WHERE m.session_id = s.session_id AND m.deleted_at IS NULL)"
        )


def test_reindex_with_a_model_it_cannot_reach_says_so_in_one_line(embed_db: str) -> None:
    # An embedder URL where nothing listens (or one refusing the key): a traceback before.
    argv = ("--embedder", "http://127.0.0.1:9/v1/embeddings", "--embedder-model", "m")
    run = _memstore(embed_db, "reindex", *argv)
    if _no_vectors(embed_db):
        # Without pgvector reindex keeps recall by words: it asks no model anything.
        assert run.returncode == 0, run.stderr[-2000:]
        return
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "reindex failed: the embedding model failed" in run.stderr, run.stderr[-2000:]
    with psycopg.connect(embed_db) as conn:  # nothing lost: the messages stay queued
        assert _scalar(conn, "SELECT count(*) FROM embedding_queue") == MESSAGES


def test_reindex_keeps_recall_of_sessions_from_before_0012(server_url: str) -> None:
    # Their recall was ranked on every GetMemory's request path until their next message;
    # reindex keeps it (without pgvector by words, with it by embedding what lacks a vector).
    with scratch_database(server_url, "memstore_backfill") as url:
        _seed_before_0012(url)
        run = _memstore(url, "reindex")
        assert run.returncode == 0, run.stderr[-2000:]
        with psycopg.connect(url) as conn:
            if _no_vectors(url):
                assert "kept recall by words for 2 sessions" in run.stdout
                kept = "SELECT session_id, recall_sessions FROM session_word_recall"
            else:
                # Live sessions of a user (the vector worker also keeps the recall of a
                # deleted session whose messages it embeds; GetMemory never reads it).
                kept = (
                    "SELECT e.session_id, e.recall_sessions FROM session_embeddings e"
                    " JOIN sessions s USING (project_id, session_id)"
                    " WHERE e.recall_sessions IS NOT NULL AND s.deleted_at IS NULL"
                    " AND s.user_id IS NOT NULL"
                )
            rows = dict(conn.execute(kept).fetchall())  # type: ignore[arg-type]
            assert _scalar(conn, "SELECT count(*) FROM embedding_queue") == 0
    # Each live session of the user with a live message, its recall the other one's memories.
    assert set(rows) == {"trip", "birds"}
    assert set(rows["trip"]) == {"birds"} and set(rows["birds"]) == {"trip"}

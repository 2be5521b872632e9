"""The embedding queue: claims that never overlap, crashes that lose nothing, and the
no-pgvector mode in which nothing is embedded and the queue feeds recall kept by words."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from server.domain import DEFAULT_PROJECT_ID as P
from server.domain import Message, NewMessage, SearchQuery, Session
from server.errors import FailedPrecondition
from server.search import worker as worker_module
from server.search.embedding import EmbeddingError
from server.search.worker import EmbeddingWorker, watch_queue
from server.store import Store
from server.store.migrate import apply_migrations
from server.store.queries import query
from tests.fix_db import scalar
from tests.polling import until

MODEL = "test-model"


def msg(content: str) -> NewMessage:
    return NewMessage(role="kai", role_type="user", content=content, metadata={})


def unit_vectors(texts: list[str]) -> list[list[float]]:
    # A vector per text that differs by text: enough to check what was saved for which row.
    return [[1.0, float(len(t)), 0.0] for t in texts]


async def _nothing_to_embed(store: Store, clean_db: str) -> None:
    """Without pgvector, what the worker's tests rely on instead: the store knows it keeps no
    vectors, a worker finds nothing to embed (its model is never called), and the messages
    AddMemory queued are settled by keeping their session's recall by words (migration 0012)."""
    assert await store.check_vectors() is False
    assert store.word_recall

    async def never(texts: list[str]) -> list[list[float]]:
        raise AssertionError(f"embedded {texts} without pgvector")

    await store.add_memory(P, "no-vectors", None, [msg("a"), msg("bb")])
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 1
    assert await store.embed_due(MODEL, 10, 6, never) == 0
    assert await store.keep_word_recall_due(10, 6) == 1
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0
    assert await scalar(clean_db, "SELECT count(*) FROM session_word_recall") == 1


async def test_add_memory_queues_messages_for_the_worker_in_both_modes(
    store: Store, clean_db: str
) -> None:
    # With pgvector each message, to be embedded; without, the turn (its last message): the
    # worker ranks the session's recall by words once, however many messages it brought.
    await store.add_memory(P, "s", None, [msg("one"), msg("two"), msg("three")])
    await store.add_memory(P, "s", None, [msg("four")])
    queued = await scalar(clean_db, "SELECT count(*) FROM embedding_queue")
    assert queued == (4 if store.vectors else 2)
    if not store.vectors:
        last = "SELECT array_agg(sequence ORDER BY sequence)::text FROM embedding_queue"
        async with await psycopg.AsyncConnection.connect(clean_db) as conn:
            row = await (await conn.execute(last)).fetchone()
        assert row == ("{3,4}",)
    assert await store.embedding_lag() == (queued, pytest.approx(0, abs=60))


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan] + [n for p in plan.get("Plans", []) for n in _plan_nodes(p)]


async def test_the_queue_gauge_counts_exactly_up_to_its_cap_and_reads_no_further(
    store: Store, clean_db: str
) -> None:
    # /metrics reads embedding_lag at each scrape: below the cap its count is exact; at the
    # cap it stops counting (the cap means that many or more), and the age stays exact.
    for i in range(6):  # one queued row a call in both modes
        await store.add_memory(P, f"s{i}", None, [msg(f"m{i}")])
    rows, oldest = await store.embedding_lag()
    assert rows == 6 and 0 < oldest < 60
    assert (await store.embedding_lag(cap=6))[0] == 6
    capped, capped_oldest = await store.embedding_lag(cap=3)
    assert capped == 3 and capped_oldest >= oldest
    if store.citus:
        return  # the shards' plans are their own (tests/citus/test_routing.py runs it there)
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        # Priced out, as in a table too large to read whole, the plan shows what it reads.
        await conn.execute("SET enable_seqscan = off")
        explain = b"EXPLAIN (ANALYZE, FORMAT JSON) " + query("embedding_lag").as_bytes(conn)
        row = await (await conn.execute(explain, {"cap": 3})).fetchone()
    assert row is not None
    doc = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    scans = [n for n in _plan_nodes(doc[0]["Plan"]) if n["Node Type"].endswith("Scan")]
    assert scans and all(n["Actual Rows"] <= 3 for n in scans), scans
    assert any(n.get("Index Name") == "embedding_queue_enqueued_idx" for n in scans), scans


async def test_a_failed_batch_loses_nothing_and_is_claimed_again(
    store: Store, clean_db: str
) -> None:
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "s", None, [msg("a"), msg("bb"), msg("ccc")])

    async def crash(texts: list[str]) -> list[list[float]]:
        raise RuntimeError("the model process died")

    with pytest.raises(RuntimeError, match="died"):
        await store.embed_due(MODEL, 10, 6, crash)
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 3
    assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 0

    async def embed(texts: list[str]) -> list[list[float]]:
        return unit_vectors(texts)

    assert await store.embed_due(MODEL, 10, 6, embed) == 3
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0
    assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 3
    # The speaker is embedded with the content: "kai: bb" is 7 characters.
    assert await scalar(
        clean_db, "SELECT (embedding::real[])[2] FROM message_embeddings WHERE sequence = 2"
    ) == len("kai: bb")
    # The session's recall vector is the mean of its messages' vectors.
    assert await scalar(clean_db, "SELECT through_sequence FROM session_embeddings") == 3


async def test_concurrent_workers_never_embed_a_message_twice(store: Store, clean_db: str) -> None:
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    for i in range(6):
        await store.add_memory(P, f"s{i}", None, [msg(f"m{i}-{j}") for j in range(10)])
    calls: list[list[str]] = []
    started = asyncio.Event()

    async def slow(texts: list[str]) -> list[list[float]]:
        calls.append(texts)
        started.set()
        await asyncio.sleep(0.2)  # hold the claim while the other worker claims
        return unit_vectors(texts)

    async def worker() -> int:
        total = 0
        while done := await store.embed_due(MODEL, 7, 6, slow):
            total += done
        return total

    totals = await asyncio.gather(worker(), worker(), worker())
    assert sum(totals) == 60 and all(totals)
    embedded = [text for batch in calls for text in batch]
    assert len(embedded) == len(set(embedded)) == 60
    assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 60


async def test_a_batch_that_outlasts_its_lease_is_held_not_embedded_again(
    store: Store, clean_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease (30 s, 1.5 here) is renewed while the model works: a slow batch was claimed
    # by a second worker once it passed and embedded twice (a remote model's timeouts and a
    # failing batch's halving outlast 30 s). Renewed every 0.5 s, it has a second to spare
    # on a loaded machine (0.6 s renewed every 0.2 s lapsed there).
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    lease = 1.5
    monkeypatch.setattr("server.store.embeddings.LEASE_SECONDS", lease)
    await store.add_memory(P, "s", None, [msg("a"), msg("bb"), msg("ccc")])
    working, answer = asyncio.Event(), asyncio.Event()
    calls: list[list[str]] = []

    async def slow(texts: list[str]) -> list[list[float]]:
        calls.append(texts)
        working.set()
        await answer.wait()  # until the probes below are done: more than two leases
        return unit_vectors(texts)

    first = asyncio.create_task(store.embed_due(MODEL, 10, 6, slow))
    await working.wait()
    started = time.monotonic()
    while time.monotonic() - started < 2.5 * lease:
        await asyncio.sleep(0.4)
        assert await store.embed_due(MODEL, 10, 6, slow) == 0
    answer.set()
    assert await first == 3
    assert [sorted(batch) for batch in calls] == [["kai: a", "kai: bb", "kai: ccc"]]
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0


async def test_deleted_messages_leave_the_queue_without_a_vector(
    store: Store, clean_db: str
) -> None:
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "kept", None, [msg("stay")])
    await store.add_memory(P, "gone", None, [msg("leave"), msg("leave too")])
    await store.delete_session(P, "gone")
    seen: list[str] = []

    async def embed(texts: list[str]) -> list[list[float]]:
        seen.extend(texts)
        return unit_vectors(texts)

    assert await store.embed_due(MODEL, 10, 6, embed) == 3
    assert seen == ["kai: stay"]
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0


async def test_reindex_queues_what_another_model_embedded(store: Store, clean_db: str) -> None:
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "s", None, [msg(str(i)) for i in range(5)])

    async def embed(texts: list[str]) -> list[list[float]]:
        return unit_vectors(texts)

    await store.embed_due("old-model", 10, 6, embed)
    assert await store.reindex_total(MODEL) == 5
    queued, after = await store.queue_reindex(MODEL, None, 3)
    assert queued == 3 and after is not None
    queued, after = await store.queue_reindex(MODEL, after, 3)
    assert queued == 2
    assert (await store.queue_reindex(MODEL, after, 3))[0] == 0
    assert await store.embed_due(MODEL, 10, 6, embed) == 5
    assert await store.reindex_total(MODEL) == 0


async def test_a_model_answering_another_length_under_its_name_says_how_to_mend_it(
    store: Store, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A remote model swapped behind the same --embedder-model name: its query vectors meet
    # stored ones of another length, which pgvector cannot compare. That is no caller's
    # fault, and it was INVALID_ARGUMENT naming metadata_contains.
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "s", None, [msg("the red door"), msg("the blue door")])

    async def three(texts: list[str]) -> list[list[float]]:
        return unit_vectors(texts)

    async def four(texts: list[str]) -> list[list[float]]:
        return [[*v, 0.5] for v in unit_vectors(texts)]

    assert await store.embed_due(MODEL, 10, 6, three) == 2
    query = SearchQuery(text="door", search_type="semantic", session_ids=("s",))

    async def search(model: str) -> list[int]:
        found, _, _ = await store.search_messages(
            P, query, vector=[1.0, 0.0, 0.0, 0.5], model=model, limit=10, depth=40
        )
        return sorted(r.message.sequence for r, _ in found)

    with (
        caplog.at_level(logging.ERROR, "server.store.translate"),
        pytest.raises(FailedPrecondition) as raised,
    ):
        await search(MODEL)
    assert raised.value.reason == "EMBEDDING_DIMENSIONS_DIFFER"
    assert "--embedder-model" in raised.value.message
    assert "memstore reindex" in raised.value.message
    assert "different vector dimensions" in caplog.text
    # What the message says to do mends it: a new name, its vectors made anew.
    queued, _ = await store.queue_reindex("renamed", None, 10)
    assert queued == 2
    assert await store.embed_due("renamed", 10, 6, four) == 2
    assert await search("renamed") == [1, 2]


async def _queued_keys(url: str) -> list[tuple[str, int]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT session_id, sequence FROM embedding_queue ORDER BY session_id, sequence"
        )
        return [(r[0], r[1]) for r in await cur.fetchall()]


async def test_reindex_passes_over_deleted_sessions_and_messages(
    store: Store, clean_db: str
) -> None:
    # DeleteSession hides the session's messages with it and ClearMemory hides a session's
    # messages; UndeleteSession brings back the session, not them. So reindex queues none of
    # them, before or after the undelete (nobody could read a vector of theirs), and the
    # revived session's next messages are queued by the AddMemory that brings them.
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "live", None, [msg("stay")])
    await store.add_memory(P, "gone", None, [msg("leave"), msg("leave too")])
    await store.add_memory(P, "cleared", None, [msg("forget")])
    await store.delete_session(P, "gone")
    await store.clear_memory(P, "cleared")
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        await conn.execute("DELETE FROM embedding_queue")  # as if the worker had drained it
    assert await store.reindex_total(MODEL) == 1
    assert await store.queue_reindex(MODEL, None, 10) == (1, (P, "live", 1))
    assert await _queued_keys(clean_db) == [("live", 1)]

    await store.undelete_session(P, "gone")
    assert await store.reindex_total(MODEL) == 1
    assert (await store.queue_reindex(MODEL, None, 10))[0] == 0
    await store.add_memory(P, "gone", None, [msg("back")])
    assert await _queued_keys(clean_db) == [("gone", 3), ("live", 1)]


async def test_a_migration_needing_a_missing_extension_waits_unrecorded(
    database_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.store import migrate

    real = migrate.migrations()
    extra = (
        "9999_needs_missing",
        "-- requires extension: memstore_no_such_extension\nSELECT 1/0;\n",
    )
    monkeypatch.setattr(migrate, "migrations", lambda: [*real, extra])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        assert await apply_migrations(conn) == []
        cur = await conn.execute("SELECT count(*) FROM schema_migrations WHERE name LIKE '9999%'")
        row = await cur.fetchone()
    assert row is not None and row[0] == 0


async def _delete_while_saving(store: Store, user: str) -> None:
    started = asyncio.Event()

    async def slow(texts: list[str]) -> list[list[float]]:
        started.set()
        await asyncio.sleep(0.1)  # the delete arrives while the model runs
        return unit_vectors(texts)

    async def worker() -> None:
        while await store.embed_due(MODEL, 16, 6, slow):
            pass

    async def delete() -> None:
        await started.wait()
        await store.delete_user(P, user)

    await asyncio.gather(worker(), delete())


async def test_delete_user_while_the_worker_saves_never_deadlocks(
    store: Store, clean_db: str
) -> None:
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    for round_ in range(3):
        user = f"u{round_}"
        await store.create_user(P, user, "", "", "", {})
        for s in range(4):
            await store.add_memory(P, f"{user}-s{s}", user, [msg(f"m{s}-{i}") for i in range(8)])
        # Before leases, DeleteUser died here with "deadlock detected" (UNAVAILABLE).
        await _delete_while_saving(store, user)
        assert await scalar(clean_db, "SELECT count(*) FROM sessions") == 0
        assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 0
        assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0


async def test_a_server_warns_while_queued_rows_wait(
    store: Store, clean_db: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a server without a worker says when nothing drains the queue (docs/search.md):
    # nothing while the queue is empty, a warning naming `memstore embed` once rows wait
    # (here at once: `stale` 0).
    caplog.set_level(logging.WARNING, logger="server.search.worker")
    looks = 0
    lag = store.embedding_lag

    async def counted() -> tuple[int, float]:
        nonlocal looks
        looks += 1
        return await lag()

    monkeypatch.setattr(store, "embedding_lag", counted)

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "server.search.worker"]

    async def looked_thrice() -> bool:
        return looks >= 3

    async def warned_once() -> bool:
        return bool(warned())

    watcher = asyncio.create_task(watch_queue(store, every=0.01, stale=0.0))
    try:
        assert await until(looked_thrice)
        assert warned() == []
        await store.add_memory(P, "s", None, [msg("one")])
        assert await until(warned_once)
    finally:
        watcher.cancel()
    assert "embedding queue: 1 rows" in warned()[0] and "memstore embed" in warned()[0]


async def _warnings_on_a_test_clock(
    store: Store,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    looks: int,
    oldest: Callable[[float], float],
    **watch: float,
) -> list[str]:
    """What watch_queue(store, **watch) warns in `looks` looks at a queue of 3 rows whose
    oldest waited oldest(clock) seconds: the watcher's clock is the test's, a second a look."""
    caplog.set_level(logging.WARNING, logger="server.search.worker")
    clock = 0.0
    looked = asyncio.Event()

    async def waiting() -> tuple[int, float]:
        nonlocal clock
        if clock == looks:
            looked.set()
            await asyncio.Event().wait()  # no more looks
        clock += 1.0
        return 3, oldest(clock)

    monkeypatch.setattr(store, "embedding_lag", waiting)
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(monotonic=lambda: clock))
    watcher = asyncio.create_task(watch_queue(store, **watch))
    try:
        await asyncio.wait_for(looked.wait(), 30)
    finally:
        watcher.cancel()
    return [r.getMessage() for r in caplog.records if r.name == "server.search.worker"]


async def test_a_server_warns_about_a_waiting_queue_at_most_once_per_stale(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README and docs/search.md promise a warning at most every 10 minutes while rows wait:
    # one per look (every 30 s) would fill the log. Rows wait all along.
    warned = await _warnings_on_a_test_clock(
        store, caplog, monkeypatch, 25, lambda _: 1_000.0, every=0.001, stale=10.0
    )
    # 25 looks, a second apart: warned at the 1st, 11th and 21st.
    assert len(warned) == 3, warned
    assert all("embedding queue: 3 rows" in line for line in warned)


async def test_a_server_warns_once_a_queued_row_has_waited_10_minutes(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # README: a warning "while a queued row has waited 10 minutes (at most every 10 minutes)",
    # with the watcher's own default (what serve runs): none for a younger row. The oldest
    # row is 595 s old at the first look.
    warned = await _warnings_on_a_test_clock(
        store, caplog, monkeypatch, 1_300, lambda clock: 594.0 + clock, every=0.0
    )
    # Nothing at 595-599 s; at 600 s, then every 600 s (1,200, 1,800), none between.
    assert [line.split("waiting ")[1].split("s")[0] for line in warned] == ["600", "1200", "1800"]


async def test_restore_queues_like_add_memory_in_both_modes(store: Store, clean_db: str) -> None:
    # With pgvector each live message of a live session; without, each such session's last
    # live one: the worker ranks the session once, not once per batch of its messages.
    now = datetime.now(UTC)
    sessions = [
        Session(sid, None, {}, now, now, now if sid == "gone" else None, 0, None)
        for sid in ("a", "b", "gone")
    ]

    def message(sid: str, sequence: int, *, deleted: bool = False) -> Message:
        return Message(
            str(uuid.uuid4()), sid, sequence, "kai", "user", f"{sid} {sequence}", {}, now, now,
            now if deleted else None,
        )  # fmt: skip

    messages = [
        *(message("a", n) for n in (1, 2, 3)),
        message("a", 4, deleted=True),
        message("b", 1),
        message("gone", 1, deleted=True),
    ]
    await store.restore(P, [], sessions, messages)
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        cur = await conn.execute(
            "SELECT session_id, sequence FROM embedding_queue ORDER BY session_id, sequence"
        )
        queued = await cur.fetchall()
    if store.vectors:
        assert queued == [("a", 1), ("a", 2), ("a", 3), ("b", 1)]
    else:
        assert queued == [("a", 3), ("b", 1)]


class _Refusing:
    """A remote model that refuses (HTTP 400) any request holding a text past `longest` or an
    empty one (as OpenAI's does), or, with `broken`, every request (a wrong model name or
    key); `seen` keeps every text sent."""

    name, dimensions = MODEL, 3

    def __init__(self, longest: int, *, broken: bool = False) -> None:
        self.longest, self.broken = longest, broken
        self.seen: list[str] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.seen.extend(texts)
        if self.broken or any(len(t) > self.longest or not t for t in texts):
            raise EmbeddingError("400 Bad Request: input invalid", url="http://m", status=400)
        return unit_vectors(list(texts))


async def test_a_message_the_model_refuses_never_stalls_the_queue(
    store: Store, clean_db: str
) -> None:
    # A remote model refused a batch holding one text too long for it; given back, the batch
    # was claimed and refused again forever, and nothing queued after it was embedded.
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "s", None, [msg("a"), msg("x" * 500), msg("bb")])
    worker = EmbeddingWorker(store, _Refusing(100))
    assert await worker.run_once() == 3
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0
    kept = "SELECT count(*) FROM message_embeddings WHERE sequence IN (1, 3)"
    assert await scalar(clean_db, kept) == 2
    assert await scalar(clean_db, "SELECT count(*) FROM message_embeddings") == 2
    # A model that refuses everything, even a word, is wrong itself (its name, its key):
    # the batch goes back to the queue, nothing is dropped.
    await store.add_memory(P, "t", None, [msg("c")])
    broken = EmbeddingWorker(store, _Refusing(100, broken=True))
    with pytest.raises(EmbeddingError):
        await broken.run_once()
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 1


async def test_an_empty_message_is_kept_without_a_vector_and_never_sent_to_the_model(
    store: Store, clean_db: str
) -> None:
    # An assistant's turn that only calls a tool has no text (LangChain sends content "").
    if not store.vectors:
        await _nothing_to_embed(store, clean_db)
        return
    await store.add_memory(P, "s", None, [msg("weather in Paris?"), msg(""), msg("18C")])
    model = _Refusing(100)
    assert await EmbeddingWorker(store, model).run_once() == 3
    assert sorted(model.seen) == ["kai: 18C", "kai: weather in Paris?"], model.seen
    assert await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0
    kept = "SELECT string_agg(sequence::text, ',' ORDER BY sequence) FROM message_embeddings"
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        row = await (await conn.execute(kept)).fetchone()
    assert row == ("1,3",)
    # A batch of nothing but empty messages asks the model nothing.
    model.seen.clear()
    await store.add_memory(P, "t", None, [msg(""), msg("  ")])
    assert await EmbeddingWorker(store, model).run_once() == 2
    assert model.seen == [] and await scalar(clean_db, "SELECT count(*) FROM embedding_queue") == 0

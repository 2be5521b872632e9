"""The embedding worker: claims due messages, embeds them off the event loop, saves vectors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Sequence

from server.errors import MemstoreError
from server.search.embedding import PROBE_WORD, Embedder, EmbeddingError
from server.search.service import RECALL_WINDOW
from server.search.threads import DaemonThreads
from server.store import QUEUE_COUNT_CAP, Deferred, Store

log = logging.getLogger(__name__)

#: Messages embedded per claim: large enough to batch the model, small enough that a claim
#: holds its rows (and a pooled connection) for well under a second.
BATCH_SIZE = 32

#: Seconds between looks at an empty queue (the lag of a message on a quiet server).
IDLE_SECONDS = 0.2

#: Seconds between a serving process's looks at the queue's age (watch_queue).
QUEUE_LOOK_SECONDS = 60.0

#: The age of the queue's oldest row past which a serving process warns (at most this often):
#: nothing drains the queue, or nothing keeps up.
QUEUE_STALE_SECONDS = 600.0

#: Seconds to wait after a failed batch (database down, remote embedder failing).
_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)

#: HTTP statuses by which a remote model says it is overloaded or unreachable behind a proxy:
#: they say nothing of the texts sent, so a batch failing so is given back whole, not split.
_OVERLOADED = frozenset({429, 502, 503, 504})

#: The request path is busy when the rest of the process used at least this many cores
#: since the last look (a saturated server here uses 0.6-0.9, one at 17 AddMemory calls/s 0.03).
BUSY_CORES = 0.25

#: The share of a core the model may use while the request path is busy: after a batch it
#: pauses for (1 / share - 1) times the batch's CPU time, so ~8 messages/s still go through.
BUSY_SHARE = 0.10

#: Seconds between looks at the request path during a pause: a pause ends at the first look
#: that finds the request path no longer busy.
PACE_STEP = 0.2


class Pacer:
    """Decides how long the worker pauses after a batch: requests first, embedding after.

    Niceness alone was not enough: the model takes every idle moment of the cores, and on a
    machine whose cores the server, PostgreSQL and the clients share, that slowed writes by
    16-29% (docs/search.md). While the rest of the process is busy the model keeps to
    BUSY_SHARE of a core; idle, it runs flat out.
    """

    def __init__(self, busy_cores: float = BUSY_CORES, share: float = BUSY_SHARE) -> None:
        self._busy_cores = busy_cores
        self._share = share
        self._last_wall = time.monotonic()
        self._last_cpu = time.process_time()
        self._model_cpu = 0.0

    def model_ran(self, cpu_seconds: float) -> None:
        """Records CPU time the model used (measured in its own thread)."""
        self._model_cpu += cpu_seconds

    def busy(self) -> bool:
        """Whether the rest of the process used BUSY_CORES or more since the last look."""
        wall, cpu = time.monotonic(), time.process_time()
        elapsed = wall - self._last_wall
        others = cpu - self._last_cpu - self._model_cpu
        self._last_wall, self._last_cpu, self._model_cpu = wall, cpu, 0.0
        return elapsed > 0 and others / elapsed >= self._busy_cores

    def pause_after(self, batch_cpu: float) -> float:
        """Seconds to pause after a batch whose model run took `batch_cpu` CPU-seconds."""
        return batch_cpu * (1 / self._share - 1)


class EmbeddingWorker:
    """Embeds queued messages until stopped; safe to run in any number of processes.

    Each batch is claimed with FOR UPDATE SKIP LOCKED and settled in the transaction that
    claimed it, so workers never embed the same message twice at once, and a worker that
    dies mid-batch leaves its rows to the next claim. Where the store keeps no vectors, it
    runs no model: it keeps the recall by words of the sessions whose messages arrived
    (store.keep_word_recall_due), and the embedder may be None.
    """

    def __init__(
        self,
        store: Store,
        embedder: Embedder | None,
        *,
        batch_size: int = BATCH_SIZE,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._store = store
        self._embedder = embedder
        self._batch_size = batch_size
        self._idle = idle_seconds
        self.embedded = 0
        self._pacer = Pacer()
        self._batch_cpu = 0.0
        # The model runs in a thread of its own at a lower CPU priority: on a machine it
        # shares with the server's requests, embedding takes what the requests leave.
        self._thread = DaemonThreads(1, "embedder", on_start=_lower_priority)
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Embeds until cancelled or stopped (`stop`); a failed batch is retried after a
        backoff."""
        failures = 0
        while not self._stopping.is_set():
            try:
                done = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = _BACKOFF_SECONDS[min(failures, len(_BACKOFF_SECONDS) - 1)]
                failures += 1
                # The database or the model out of reach (a remote embedder's error names
                # its endpoint and why): one line per failure. A traceback only for a bug.
                if isinstance(exc, MemstoreError | EmbeddingError):
                    log.warning("embedding batch failed (%s); retrying in %.1fs", exc, delay)
                else:
                    log.exception("embedding batch failed; retrying in %.1fs", delay)
                await self._sleep(delay)
                continue
            failures = 0
            if done == 0:
                await self._sleep(self._idle)
            else:
                await self._pace()

    async def stop(self, running: asyncio.Task[None], grace: float) -> None:
        """Ends `running` (this worker's `run`) within `grace` seconds: the batch in hand is
        embedded and saved, and no other is claimed. Cancelled, a batch was given back
        unsaved: a SIGTERM during a remote model's call (up to its 30 s timeout) threw its
        vectors away. A batch not saved within the grace is cancelled still: its claim
        rolls back, and the next claim takes its rows."""
        self._stopping.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(running), grace)
        if not running.done():
            log.warning("embedding batch not saved within %.1fs: given back to the queue", grace)
            running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    async def _sleep(self, seconds: float) -> None:
        # A pause that a stop ends at once.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _pace(self) -> None:
        # Pauses while the request path is busy, up to the batch's share; a quiet moment
        # ends the pause. Under sustained load the queue then grows by what arrives beyond
        # ~BUSY_SHARE of a core's worth of embedding, and drains at full speed after.
        remaining = self._pacer.pause_after(self._batch_cpu)
        self._batch_cpu = 0.0
        while remaining > 0 and self._pacer.busy() and not self._stopping.is_set():
            step = min(PACE_STEP, remaining)
            await self._sleep(step)
            remaining -= step

    async def run_once(self) -> int:
        """Claims, embeds and saves one batch; returns how many queue rows it settled.

        Raises:
            Unavailable: the database cannot be reached.
        """
        if not self._store.vectors:
            # No model: the ranking's time, spent in PostgreSQL, is paced as the model's is.
            start = time.monotonic()
            done = await self._store.keep_word_recall_due(self._batch_size, RECALL_WINDOW)
            self._batch_cpu += time.monotonic() - start
        elif self._embedder is None:
            raise ValueError("vectors are kept: the worker needs a model to embed with")
        else:
            done = await self._store.embed_due(
                self._embedder.name, self._batch_size, RECALL_WINDOW, self._embed
            )
        self.embedded += done
        return done

    async def drain(self, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Embeds until the queue is empty (or `timeout` passes); returns rows settled.

        Raises:
            TimeoutError: the queue was not empty after `timeout` seconds.
            Unavailable: the database cannot be reached.
        """
        deadline = time.monotonic() + timeout
        total = 0
        while (done := await self.run_once()) > 0:
            total += done
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedding queue not drained after {timeout:.0f}s")
        return total

    async def _embed(self, texts: list[str]) -> Sequence[list[float] | Deferred | None]:
        # One vector per text; None for a text the model refuses whatever is sent with it,
        # Deferred for one it fails on alone otherwise.
        try:
            return list(await self._embed_now(texts))
        except EmbeddingError as exc:
            first = exc
        # Given back whole, a failed batch was claimed and failed again, forever, and nothing
        # queued after it was embedded: a text too long for the model (HTTP 400, 413, 422;
        # the remote path sends texts whole and a message may hold 1 MiB), one past a
        # server's batch (llama.cpp answers 500), one that times out or comes back NaN. So
        # the batch is halved until each failing text is alone (at most 2n - 2 more POSTs
        # for n texts, 2 log2 n for one bad text), unless the failure is the service's: it
        # says it is overloaded, or it fails a word too (down, or its name or key wrong).
        # Then the batch goes back whole and the worker backs off: an outage costs two
        # POSTs a try, not n.
        if first.status in _OVERLOADED or not await self._embeds_a_word():
            raise first
        results = await self._bisect(texts, first)
        # Nothing passed: the service may have gone down since its word passed.
        passed = any(isinstance(r, list) for r in results)
        if len(texts) > 1 and not passed and not await self._embeds_a_word():
            raise first
        for text, result in zip(texts, results, strict=True):
            if result is None:
                log.warning(
                    "the embedding model refuses a message of %d characters (%s): it is kept "
                    "without a vector, found by words but not by meaning",
                    len(text),
                    first,
                )
        return results

    async def _bisect(
        self, texts: list[str], failure: EmbeddingError
    ) -> list[list[float] | Deferred | None]:
        # `texts` failed together with `failure`: each half is sent alone, and a half that
        # fails is halved again. A text refused alone leaves the queue without a vector (its
        # message stays, found by words); one that fails alone otherwise is put off.
        if len(texts) == 1:
            return [None if failure.refused else Deferred(str(failure))]
        middle = len(texts) // 2
        results: list[list[float] | Deferred | None] = []
        for part in (texts[:middle], texts[middle:]):
            try:
                results.extend(await self._embed_now(part))
            except EmbeddingError as exc:
                results.extend(await self._bisect(part, exc))
        return results

    async def _embeds_a_word(self) -> bool:
        try:
            await self._embed_now([PROBE_WORD])
        except EmbeddingError:
            return False
        return True

    async def _embed_now(self, texts: list[str]) -> list[list[float]]:
        assert self._embedder is not None
        vectors, cpu = await self._thread.run(_timed, self._embedder, texts)
        self._pacer.model_ran(cpu)
        self._batch_cpu += cpu
        return vectors


def _timed(embedder: Embedder, texts: list[str]) -> tuple[list[list[float]], float]:
    # The model's CPU time, measured in its thread (ORT runs there with one intra-op thread).
    start = time.thread_time()
    vectors = embedder.embed(texts)
    return vectors, time.thread_time() - start


#: How much nicer than the serving threads the embedding thread runs (Linux nice levels).
EMBEDDING_NICENESS = 10


def _lower_priority() -> None:
    # Linux schedules threads separately: setpriority on the thread's own id lowers this
    # thread only (elsewhere it would lower the process, so it is skipped there).
    if hasattr(os, "setpriority") and os.uname().sysname == "Linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), EMBEDDING_NICENESS)
        except OSError as exc:  # e.g. a container that forbids it: run at normal priority
            log.warning("cannot lower the embedding thread's priority: %s", exc)


async def watch_queue(
    store: Store, *, every: float = QUEUE_LOOK_SECONDS, stale: float = QUEUE_STALE_SECONDS
) -> None:
    """Warns while queued rows wait longer than `stale` seconds, at most once per `stale`.

    AddMemory queues whether or not a worker runs anywhere, and a server cannot know about
    workers in other processes: the age of the oldest row is what tells that none drains the
    queue (or that they fall behind), in the log of every server, Prometheus or not.
    """
    warned_at = -math.inf
    while True:
        await asyncio.sleep(every)
        try:
            rows, oldest = await store.embedding_lag()
        except MemstoreError:
            continue  # the database is away: the request path says so already
        now = time.monotonic()
        if rows and oldest >= stale and now - warned_at >= stale:
            warned_at = now
            log.warning(
                "embedding queue: %s rows, the oldest waiting %.0fs: no worker drains it or "
                "none keeps up; run `memstore embed` on this database (or serve without "
                "--no-embedding-worker)",
                rows if rows < QUEUE_COUNT_CAP else f"{QUEUE_COUNT_CAP} or more",
                oldest,
            )

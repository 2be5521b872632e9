"""The embedding worker's failed batches: one WARNING line each when the model is out of
reach, a traceback only for what nobody expected."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from server.search import OpenAIEmbedder
from server.search import worker as worker_module
from server.search.worker import EmbeddingWorker

ENDPOINT = "http://127.0.0.1:9/v1/embeddings"  # the discard port: nothing listens


class _Queue:
    """A store with one queued text, handed to the worker's model as embed_due does."""

    vectors = True
    word_recall = False

    def __init__(self, failure: Exception | None = None) -> None:
        self._failure = failure
        self.calls = 0
        #: Set at the fourth batch: three have failed, and were logged, before it.
        self.retried_thrice = asyncio.Event()

    async def embed_due(self, model: str, size: int, window: int, embed: Any) -> int:
        del model, size, window
        self.calls += 1
        if self.calls == 4:
            self.retried_thrice.set()
        if self._failure is not None:
            raise self._failure
        return len(await embed(["a queued message"]))


async def _failures(store: _Queue, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The worker's log records of its first three failed batches."""
    embedder = OpenAIEmbedder(ENDPOINT, "m", timeout=5, dimensions=3)
    run = asyncio.create_task(EmbeddingWorker(store, embedder).run())  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger=worker_module.__name__):
        async with asyncio.timeout(30):
            await store.retried_thrice.wait()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    records = [r for r in caplog.records if r.name == worker_module.__name__]
    assert len(records) >= 3
    return records


async def test_an_unreachable_remote_embedder_is_one_warning_line_per_failure(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by the red team: `memstore embed --embedder http://127.0.0.1:9/v1/embeddings`
    # logged each retry at ERROR with the whole traceback (urllib's, then the re-raise).
    monkeypatch.setattr(worker_module, "_BACKOFF_SECONDS", (0.01, 0.02))
    records = await _failures(_Queue(), caplog)
    for record in records:
        line = record.getMessage()
        assert record.levelno == logging.WARNING and record.exc_info is None, line
        assert ENDPOINT in line and "refused" in line.lower(), line
        assert "retrying in" in line and "\n" not in line, line


async def test_an_unexpected_failure_keeps_its_traceback(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "_BACKOFF_SECONDS", (0.01,))
    records = await _failures(_Queue(RuntimeError("a bug")), caplog)
    assert all(r.levelno == logging.ERROR and r.exc_info for r in records)

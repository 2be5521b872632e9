"""Log lines written by a thread of their own, so a stalled stderr never stalls the server.

Every gRPC call writes an access line, and the gRPC and REST ports share one event loop. A
log consumer that stops reading (a full pipe, a blocked journald or container log driver)
made the loop's next write block, and with it every call in flight. Records now go through a
bounded queue to a writer thread; while stderr is stalled the queue fills, and past
`CAPACITY` records are dropped and counted, never waited for. When the writer gets through
again it first writes one WARNING saying how many were dropped; the count is also the
`memstore_log_records_dropped` counter (docs/reliability.md, the promise of a log consumer
that stops reading).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

#: Records waiting for the writer at most (an access line is about 300 bytes as a record,
#: so at most a few MB while stderr is stalled); more are dropped and counted.
CAPACITY = 10_000
#: How long the process's exit waits for the writer to write what is queued.
_EXIT_WAIT_SECONDS = 5.0


class OffLoopHandler(logging.Handler):
    """Hands each record, made self-contained, to a writer thread that passes it to `target`.

    The message, any exception's traceback and the request id are resolved in the caller's
    thread (the writer cannot see the caller's context variables or its objects later). The
    thread starts with the first record in each process, so a forked worker gets its own.
    """

    def __init__(
        self, target: logging.Handler, resolve: dict[str, Callable[[], object]] | None = None
    ) -> None:
        super().__init__()
        self._target = target
        # The target's formatter is this handler's: logging.basicConfig gives a handler
        # without one its default format.
        self.formatter = target.formatter
        #: Attributes to set on a record that lacks them: name -> zero-argument callable.
        self._resolve = resolve or {}
        self._dropped_total = 0
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._queue: queue.Queue[logging.LogRecord | None] = queue.Queue(CAPACITY)
        self._start = threading.Lock()
        self._writer: threading.Thread | None = None
        self._dropped = 0  # since the writer last said so

    @property
    def dropped_total(self) -> int:
        """Records dropped in this process because stderr was not taking them."""
        return self._dropped_total

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._target.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record = self._prepare(record)
        except Exception:
            self.handleError(record)
            return
        if self._writer is None:
            self._start_writer()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._start:
                self._dropped += 1
                self._dropped_total += 1

    def _prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        ready = logging.makeLogRecord(record.__dict__)
        ready.msg, ready.args = record.getMessage(), None
        if record.exc_info:
            formatter = self._target.formatter or logging.Formatter()
            ready.exc_text = record.exc_text or formatter.formatException(record.exc_info)
            ready.exc_info = None
        for name, value in self._resolve.items():
            if not getattr(ready, name, None):
                setattr(ready, name, value())
        return ready

    def _start_writer(self) -> None:
        with self._start:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            with self._start:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._target.handle(_dropped_record(dropped))
            self._target.handle(record)

    def flush(self) -> None:
        self._target.flush()

    def close(self) -> None:
        """Lets the writer write what is queued (up to a few seconds), then closes the target."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            try:
                self._queue.put(None, timeout=_EXIT_WAIT_SECONDS)
                writer.join(_EXIT_WAIT_SECONDS)
            except queue.Full:
                pass  # stderr is stalled: what is queued is lost with the process
        self._target.close()
        super().close()


def _dropped_record(count: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "memstore.log",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": f"{count} log records dropped: stderr was not taking them",
        }
    )

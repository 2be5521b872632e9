"""Log records go to stderr through a writer thread: a stalled stderr never blocks a caller."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import TextIO

import pytest

from server.serving import log_output
from server.serving.log_format import JsonFormatter, request_id
from server.serving.log_output import OffLoopHandler


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def _handler_on_pipe() -> tuple[OffLoopHandler, int, TextIO]:
    """A handler writing to a pipe nobody reads yet; the caller closes the stream it gets."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", buffering=1)
    handler = OffLoopHandler(logging.StreamHandler(stream), resolve={"request_id": request_id.get})
    handler.setFormatter(JsonFormatter())
    return handler, read_end, stream


def test_a_stalled_stderr_drops_records_and_says_how_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(log_output, "CAPACITY", 50)
    handler, read_end, stream = _handler_on_pipe()
    logger = logging.getLogger("test.stalled")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    sent = 5_000  # ~150 bytes each as JSON: far past a 64 KiB pipe nobody reads

    def log_them() -> None:
        for n in range(sent):
            logger.info("line %d", n)

    caller = threading.Thread(target=log_them)
    caller.start()
    caller.join(30)
    # The pipe was full after a few hundred lines: a handler writing in the caller's thread
    # would still be blocked here.
    assert not caller.is_alive(), "logging blocked the caller while stderr was stalled"
    reader = threading.Thread(target=lambda: out.append(_read_all(read_end)))
    out: list[str] = []
    reader.start()
    logger.removeHandler(handler)
    handler.close()  # the writer writes what is queued
    stream.close()
    reader.join(30)
    lines = [json.loads(line) for line in out[0].splitlines()]
    written = [e for e in lines if e["logger"] == "test.stalled"]
    notices = [e for e in lines if e["logger"] == "memstore.log"]
    dropped = sum(int(e["message"].split()[0]) for e in notices)
    assert notices and all(e["level"] == "WARNING" for e in notices), lines[-3:]
    assert dropped == handler.dropped_total > 0
    assert len(written) + dropped == sent
    # What was written is in order, each line whole.
    numbers = [int(e["message"].split()[1]) for e in written]
    assert numbers == sorted(numbers)


def test_the_writer_thread_keeps_the_callers_request_id_message_and_traceback() -> None:
    handler, read_end, stream = _handler_on_pipe()
    logger = logging.getLogger("test.context")
    logger.propagate = False
    logger.addHandler(handler)
    token = request_id.set("rid-42")
    try:
        words = ["mutable"]
        logger.warning("args %s", words)
        words.append("changed after the call")  # the line says what was true at the call
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        request_id.reset(token)
    logger.removeHandler(handler)
    handler.close()
    stream.close()
    entries = [json.loads(line) for line in _read_all(read_end).splitlines()]
    assert [e["message"] for e in entries] == ["args ['mutable']", "failed"]
    assert {e["request_id"] for e in entries} == {"rid-42"}
    assert "ValueError: boom" in entries[1]["exception"]
    assert "exception" not in entries[0]


def test_a_forked_child_logs_through_a_writer_of_its_own() -> None:
    handler, read_end, stream = _handler_on_pipe()
    logger = logging.getLogger("test.fork")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("parent")  # the parent's writer thread is running at the fork
    pid = os.fork()
    if pid == 0:
        logger.warning("child")
        handler.close()
        stream.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    logger.removeHandler(handler)
    handler.close()
    stream.close()
    messages = sorted(json.loads(line)["message"] for line in _read_all(read_end).splitlines())
    assert messages == ["child", "parent"]

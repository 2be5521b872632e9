"""Log lines as JSON or text, each with the request id of its call, and root logging set up."""

from __future__ import annotations

import contextvars
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from server.domain import CONTROL_CHARACTERS
from server.serving.log_output import OffLoopHandler

#: The request id of the call being served, for every log line written while serving it.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and call fields."""

    _FIELDS = ("method", "code", "latency_ms", "peer", "reason", "error", "fields")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            entry["request_id"] = rid
        for name in self._FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # resolved before the record left the caller (log_output)
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One line per record: time, level, logger, request id (when there is one), message and
    any traceback, with line breaks and other control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or request_id.get()
        head = f"{self.formatTime(record)} {record.levelname} {record.name}"
        text = f"{head} request_id={rid}: " if rid else f"{head}: "
        text += record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # resolved before the record left the caller (log_output)
            text += " | " + record.exc_text
        if record.stack_info:
            text += " | " + self.formatStack(record.stack_info)
        # A line per record, as the JSON form keeps: a traceback, a driver's two-line error or
        # a caller's text must not write lines of their own (a reader takes each for a record,
        # and a forged one for memstore's). Backslashes are kept as they are: the escapes make
        # the line unambiguous to read, not reversible.
        return CONTROL_CHARACTERS.sub(_escape, text)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


class _EndedCallWrites(logging.Filter):
    """grpc.aio logs a write that failed because its call had already ended as an ERROR with
    a traceback ("ExecuteBatchError raised in core by servicer method [...]"): a stream
    whose client stopped reading and then cancelled (or whose deadline passed, or whose
    connection closed) while the server waited to send. That is the client's doing, which
    the access line already records as CANCELLED; kept at INFO, without the traceback
    (tests/grpc/test_observability.py)."""

    _GRPC_TEXT = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not str(record.msg).startswith(self._GRPC_TEXT):
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        # "... [%s]", the method, stays.
        record.msg = "a call ended while the server was sending its answer" + str(
            record.msg
        ).removeprefix(self._GRPC_TEXT)
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def quiet_ended_call_writes() -> None:
    """Installs _EndedCallWrites on grpc.aio's logger (once per process)."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _EndedCallWrites) for f in grpc_log.filters):
        grpc_log.addFilter(_EndedCallWrites())


def configure_logging(level: str, log_format: str) -> None:
    """Root logging to stderr, as JSON lines or as plain text, written off the event loop."""
    stderr = logging.StreamHandler()
    if log_format == "json":
        stderr.setFormatter(JsonFormatter())
    else:
        stderr.setFormatter(TextFormatter())
    handler = OffLoopHandler(stderr, resolve={"request_id": request_id.get})
    logging.basicConfig(level=level.upper(), handlers=[handler])


def dropped_log_records() -> int:
    """Log records this process dropped because stderr was not taking them (log_output)."""
    return sum(
        h.dropped_total for h in logging.getLogger().handlers if isinstance(h, OffLoopHandler)
    )

"""Prometheus metrics, JSON access logs and request ids for every RPC (wrapped per method)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from server.api.chunking import WireChunk
from server.domain import CONTROL_CHARACTERS
from server.serving.log_output import OffLoopHandler
from server.store import QUEUE_COUNT_CAP
from server.store.base import call_deadline

log = logging.getLogger("memstore.access")

#: The metadata key a caller may set to trace a call; echoed in trailing metadata.
REQUEST_ID_KEY = "x-request-id"
#: The request id of the call being served, for every log line written while serving it.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# A caller's id is echoed back and logged: keep it short and printable.
_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
#: Seconds of the request-duration histograms' buckets, gRPC's and HTTP's. Past 10 s for the
#: calls that run that long on purpose: exports and Restore over large projects, a call with
#: a long deadline held up to --statement-timeout (30 s), a REST body allowed 20 s plus 1 s
#: per 8 KiB; ending at 10 s put all of them in +Inf, where no quantile can be read.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
#: Where grpcio-status puts the google.rpc.Status of an error (server/api/status.py).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
#: The one path the metrics endpoint answers; any other is 404.
METRICS_PATH = "/metrics"


class Metrics:
    """The metric families of one server, in a registry of their own."""

    def __init__(
        self,
        pool_stats: Callable[[], dict[str, int]] | None = None,
        queue_stats: Callable[[], tuple[int, float] | None] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "memstore_grpc_requests",
            "Finished RPCs by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "memstore_grpc_request_duration_seconds",
            "Time from the start of an RPC to its status, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "memstore_grpc_in_flight", "RPCs being served, by method.", ["method"],
            registry=self.registry,
        )  # fmt: skip
        self.stream_messages = Counter(
            "memstore_grpc_stream_messages",
            "Messages sent on server streams, by method.",
            ["method"],
            registry=self.registry,
        )
        self.stream_rows = Counter(
            "memstore_grpc_stream_rows",
            "Rows (users, sessions, messages) sent on server streams, by method.",
            ["method"],
            registry=self.registry,
        )
        if pool_stats is not None:
            self.registry.register(_PoolCollector(pool_stats))
        if queue_stats is not None:
            self.registry.register(_QueueCollector(queue_stats))
        self.registry.register(_DroppedLogCollector())
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=self.registry)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Starts the /metrics HTTP endpoint in a thread; returns it and its port.

        Only /metrics answers; every other path is 404 (prometheus_client's own server
        answers metrics on any path, which hides a mistyped scrape target).
        """
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        # prometheus_client's start_wsgi_server serves its app on every path; its server class
        # is reused, with a handler of our own that writes no line per request.
        httpd: WSGIServer = make_server(
            host,
            port,
            _only_metrics(make_wsgi_app(self.registry)),
            server_class,
            handler_class=_SilentHandler,
        )
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
        return httpd, int(httpd.server_port)


class _SilentHandler(WSGIRequestHandler):
    """A request handler that writes no line per request.

    wsgiref's writes each scrape to sys.stderr itself, past logging: a plain-text line in the
    JSON log whatever --log-level says, and, with stderr stalled, a scrape thread (and its
    socket) blocked on the write for good (tests/test_metrics_process.py). Every scrape is in
    the scraper's own records; prometheus_client's handler (private there) is silent too.
    """

    def log_message(self, format: str, *args: Any) -> None:
        """Writes nothing."""


def _only_metrics(app: Any) -> Any:
    """The WSGI app that serves `app` on METRICS_PATH and 404 elsewhere."""

    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: metrics are served at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return serve


#: psycopg_pool's statistics that only grow from the pool's start (its get_stats, which the
#: store reads, never resets them): counters, so that rate() and increase() apply. The
#: others (pool_min, pool_max, pool_size, pool_available, requests_waiting) are levels, and
#: a statistic a later psycopg_pool adds stays a gauge until it is named here.
_POOL_COUNTERS = frozenset(
    {
        "requests_num", "requests_queued", "requests_wait_ms", "requests_errors", "usage_ms",
        "returns_bad", "connections_num", "connections_ms", "connections_errors",
        "connections_lost",
    }
)  # fmt: skip


class _PoolCollector(Collector):
    """psycopg_pool's statistics, read at scrape time: counters for totals, gauges for levels."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        for name, value in sorted(self._stats().items()):
            family = CounterMetricFamily if name in _POOL_COUNTERS else GaugeMetricFamily
            yield family(f"memstore_db_pool_{name}", f"psycopg_pool statistic {name}.", value=value)


class _DroppedLogCollector(Collector):
    """Log records dropped while stderr was stalled (server/serving/log_output.py)."""

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "memstore_log_records_dropped",
            "Log records dropped because stderr was not taking them (a stalled log consumer);"
            " the log says how many when it gets through again.",
            value=dropped_log_records(),
        )


class _QueueCollector(Collector):
    """The embedding queue's length and age, read from the database at scrape time.

    Without a worker draining it (--no-embedding-worker and no `memstore embed`), the queue
    only grows: these two gauges are how an operator sees that (docs/search.md).
    """

    def __init__(self, stats: Callable[[], tuple[int, float] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        if stats is None:
            return  # the database did not answer in time: no sample rather than a stale one
        rows, oldest = stats
        yield GaugeMetricFamily(
            "memstore_embedding_queue_rows",
            "Rows waiting in the embedding queue for a worker (memstore embed, or serve's own),"
            f" counted up to {QUEUE_COUNT_CAP}: exact below it, {QUEUE_COUNT_CAP} means that"
            " many or more (a scrape never scans a long queue whole).",
            value=rows,
        )
        yield GaugeMetricFamily(
            "memstore_embedding_queue_oldest_seconds",
            "Seconds the oldest row of the embedding queue has waited (0 when it is empty).",
            value=oldest,
        )


class _Context:
    """The servicer context as handlers see it: abort keeps the request id in the trailer.

    context.abort(code, details, trailing_metadata) replaces any trailing metadata set
    before, and server/api/status.py passes the google.rpc status there; the id is merged in.
    """

    def __init__(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        rid: str,
        on_abort: Callable[[str, tuple[tuple[str, Any], ...]], None] | None = None,
    ) -> None:
        self._context = context
        self._rid = rid
        self._on_abort = on_abort

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> Any:
        trailer = tuple(trailing_metadata or ())
        if self._on_abort is not None:
            self._on_abort(details, trailer)
        await self._context.abort(code, details, (*trailer, (REQUEST_ID_KEY, self._rid)))

    async def abort_with_status(self, status: grpc.Status) -> Any:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def invocation_metadata(self) -> Any:
        # Defined, not left to __getattr__: every authenticated call reads it.
        return self._context.invocation_metadata()

    def read(self) -> Any:
        # Defined, not left to __getattr__: every unary call reads its request so
        # (serving/services.py).
        return self._context.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    return _request_id_in(context.invocation_metadata())


def _request_id_in(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    # context.code() is what abort() or set_code() left; None means the handler returned.
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return _BY_NUMBER.get(int(code), grpc.StatusCode.UNKNOWN)


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def _error_fields(trailer: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The reason and the violated fields of the google.rpc.Status in an abort's trailer."""
    found: dict[str, Any] = {}
    for key, value in trailer:
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        for detail in status.details:
            if detail.Unpack(info):
                found["reason"] = info.reason
            elif detail.Unpack(bad):
                found["fields"] = [v.field for v in bad.field_violations]
    return found


def _rows(response: Any) -> int:
    # A chunk's rows are its repeated message fields (users, sessions, messages); a chunk
    # already serialized (chunking.WireChunk) says how many it holds.
    if isinstance(response, WireChunk):
        return response.rows
    return sum(
        len(value)
        for field, value in response.ListFields()
        if field.is_repeated and field.message_type is not None
    )


class _MethodMetrics:
    """One method's metric children, looked up once: `labels()` takes a lock and builds a key
    on every call, which every RPC paid four times."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.method = method
        self.in_flight = metrics.in_flight.labels(method)
        self.latency = metrics.latency.labels(method)
        self.stream_messages = metrics.stream_messages.labels(method)
        self.stream_rows = metrics.stream_rows.labels(method)
        self._requests = metrics.requests
        self._by_code: dict[grpc.StatusCode, Any] = {}

    def finished(self, code: grpc.StatusCode) -> Any:
        """The requests counter of this method and `code`."""
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(self.method, code.name)
        return counter


#: Runs inside an observed unary call, before its handler: (request, context, the call's
#: invocation metadata); what it returns is not used. Authentication goes here
#: (serving/services.py).
Enter = Callable[[Any, Any, Any], Awaitable[object]]


class Observer:
    """Counts, times and logs every RPC and gives it a request id.

    Each method's handler is wrapped once, at registration (serving/handlers.py), with its
    metric children looked up then: grpc.aio's interceptors would run a chain of coroutines
    on every call to do the same.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def unary(
        self, method: str, behavior: Callable[..., Any], enter: Enter | None = None
    ) -> Callable[..., Any]:
        """`behavior` (a single response) observed; `enter` runs first, inside the call."""
        per_method = _MethodMetrics(self._metrics, method)
        if enter is None:

            async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                call = _Call(per_method, context)
                try:
                    return await behavior(request, call.context)
                except BaseException as exc:
                    call.failed(exc)
                    raise
                finally:
                    call.finish()

            return serve

        async def serve_entered(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            call = _Call(per_method, context)
            try:
                await enter(request, call.context, call.metadata)
                return await behavior(request, call.context)
            except BaseException as exc:
                call.failed(exc)
                raise
            finally:
                call.finish()

        return serve_entered

    def stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """`behavior` (a response stream) observed, with its messages and rows counted."""
        per_method = _MethodMetrics(self._metrics, method)

        async def serve(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            call = _Call(per_method, context)
            messages, rows = per_method.stream_messages, per_method.stream_rows
            try:
                responses = behavior(request, call.context)
                if inspect.isawaitable(responses):
                    # A handler that sends with context.write and returns nothing (grpc's
                    # health Watch): iterating it failed every Watch with UNKNOWN.
                    await responses
                    return
                async for response in responses:
                    messages.inc()
                    rows.inc(_rows(response))
                    yield response
            except BaseException as exc:
                call.failed(exc)
                raise
            finally:
                call.finish()

        return serve


class _Call:
    """One RPC being served: its id, start time and outcome."""

    def __init__(
        self, per_method: _MethodMetrics, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        self._per_method, self._raw = per_method, context
        #: The call's invocation metadata, read once (grpc.aio builds a new tuple per read).
        self.metadata = context.invocation_metadata()
        self.rid = _request_id_in(self.metadata)
        request_id.set(self.rid)
        # The caller's deadline, for the store: a call that may run longer than the
        # statement timeout runs its statements up to its deadline (StoreBase._bound_for_call).
        self._budget = context.time_remaining()
        if self._budget is not None:
            call_deadline.set(time.monotonic() + self._budget)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.rid),))
        self.context = _Context(context, self.rid, self.aborted)
        self._code: grpc.StatusCode | None = None
        self._error: dict[str, Any] = {}
        # Read now: grpc.aio's peer() of a call that the client has cancelled can crash the
        # process (seen in finish() after a cancelled stream).
        self._peer = str(context.peer())
        self._start = time.perf_counter()
        per_method.in_flight.inc()

    def aborted(self, details: str, trailer: tuple[tuple[str, Any], ...]) -> None:
        """Keeps what the access line says of an error: its message, reason and fields."""
        self._error = {"error": details, **_error_fields(trailer)}

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            return  # the code is the one abort() set
        # Cancelled by the client or by its deadline; anything else escaped the error map.
        if not _is_cancel(exc):
            self._code = grpc.StatusCode.UNKNOWN
            return
        remaining = self._raw.time_remaining()
        expired = remaining is not None and remaining < _deadline_slack(self._budget)
        self._code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    def finish(self) -> None:
        code = self._code or _code(self._raw)
        elapsed = time.perf_counter() - self._start
        per_method = self._per_method
        per_method.in_flight.dec()
        per_method.finished(code).inc()
        per_method.latency.observe(elapsed)
        if not log.isEnabledFor(logging.INFO):
            return  # no access line would be written: skip building it
        latency_ms = round(elapsed * 1000, 3)
        fields = {
            "method": per_method.method,
            "code": code.name,
            "latency_ms": latency_ms,
            "request_id": self.rid,
            "peer": self._peer,
            **self._error,
        }
        # The text form says as much: reason and message after the code.
        outcome = " ".join(str(self._error[k]) for k in ("reason", "error") if k in self._error)
        log.info(
            "%s %s %.1fms %s%s",
            per_method.method,
            code.name,
            latency_ms,
            fields["peer"],
            f" {outcome}" if outcome else "",
            extra=fields,
        )


#: How close to the call's deadline a cancel may come and still be the client's deadline.
#: A client ends its call when its own clock reaches the deadline, and the server's copy
#: trails it: the timeout is sent rounded up, and the server starts counting when the call
#: arrives. So the cancel usually arrives first: by 1-10 ms on one machine (most calls were
#: counted CANCELLED, the client's choice, and a slow method never showed DEADLINE_EXCEEDED),
#: by as much as the network's jitter across one. A true cancel this close to the deadline
#: is counted as the deadline it anticipated by a hair.
_DEADLINE_SLACK = 0.1


def _deadline_slack(budget: float | None) -> float:
    # At most a quarter of the call's whole time: a client that cancels a 100 ms call half
    # way through did cancel it.
    return _DEADLINE_SLACK if budget is None else min(_DEADLINE_SLACK, budget / 4)


def _is_cancel(exc: BaseException) -> bool:
    # grpc.aio ends a stream the client cancelled either by cancelling its task or by
    # closing its generator, which raises GeneratorExit at the yield (about half the time).
    return isinstance(exc, asyncio.CancelledError | GeneratorExit)


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

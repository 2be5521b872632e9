"""Every RPC observed: counted, timed, access-logged and given a request id (wrapped per method)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from server.api.chunking import WireChunk
from server.serving.log_format import request_id
from server.serving.metrics import Metrics
from server.store.base import call_deadline

log = logging.getLogger("memstore.access")

#: The metadata key a caller may set to trace a call; echoed in trailing metadata.
REQUEST_ID_KEY = "x-request-id"
# A caller's id is echoed back and logged: keep it short and printable.
_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
#: Where grpcio-status puts the google.rpc.Status of an error (server/api/status.py).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


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

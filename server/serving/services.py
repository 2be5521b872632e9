"""memstore's gRPC services on a server: each method's handler wrapped once, at registration.

Observed (metrics, access line, request id) and refused when protobuf could not parse the
request, then, but for health and reflection, counted against the cap on calls in flight and
behind the API key gate, whose check comes before the request is read (serving/handlers.py
does the wrapping; this module says what with).
A unary method takes and returns bytes: its request is parsed, and its answer serialized, in
a thread when large (server/off_loop.py) rather than by grpc.aio on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf import descriptor

from server import off_loop
from server.api.base import Context
from server.api.chunking import WireChunk
from server.api.status import abort
from server.errors import InvalidArgument, MemstoreError, Unimplemented
from server.serving import wire
from server.serving.auth import AuthGate
from server.serving.grpc_health import track_call
from server.serving.handlers import GenericHandler, Wrap, register, rewrap
from server.serving.limit import SEND_STALL_SECONDS, CallLimit, watch_send
from server.serving.malformed import Malformed, tolerant, tolerant_deserializer
from server.serving.observability import Observer


class Wrapping:
    """What every method's handler is wrapped in, once, at registration (serving/handlers.py):
    observed (metrics, access line, request id) and refused when protobuf could not parse
    the request, then, but for health and reflection (auth.OPEN_METHODS), counted against the
    cap on calls in flight and behind the API key gate; our services' requests are checked
    too."""

    def __init__(self, observer: Observer, gate: AuthGate, limit: CallLimit) -> None:
        self._observer = observer
        self._gate = gate
        self._limit = limit
        #: Reflection streams open: not calls against the cap, but a stop waits for them.
        self.streams_open = 0

    def busy(self) -> bool:
        """Whether a call is in flight (gRPC or HTTP) or a reflection stream open: what a
        stop gives its grace period to (shutdown.stop_grpc)."""
        return self._limit.in_flight > 0 or self.streams_open > 0

    def open(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        """Health and reflection: observed, no key needed, requests protobuf cannot parse
        refused as our services refuse them. Reflection's streams are counted for the stop."""
        parse = handler.request_deserializer
        deserializer = None if parse is None else tolerant(parse)
        if handler.request_streaming:
            return rewrap(
                handler,
                unary=lambda behavior: behavior,  # no open method takes a client stream
                stream=lambda behavior: self._observer.stream(
                    method, self._counted(_refusing_malformed_stream(behavior))
                ),
                deserializer=deserializer,
            )
        return rewrap(
            handler,
            unary=lambda behavior: self._observer.unary(method, _refusing_malformed(behavior)),
            stream=lambda behavior: self._observer.stream(method, _refusing_malformed(behavior)),
            deserializer=deserializer,
        )

    def service(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        """One of our services' methods: observed, behind the gate, malformed requests refused.

        Each is served as a client stream whose one request is read only once the key was
        checked: grpc.aio reads a unary request (of a unary or a response-stream method)
        before it invokes the handler, and gRPC's core opens the stream's window to fit the
        size the client announced (up to 16 MiB) to read it, so a caller without a valid
        key could make the server hold that much per stream, for as long as it kept the
        stream open (docs/reliability.md). A client-stream handler is invoked at the call's
        start; until it reads, the core takes in at most the stream's initial window, and
        a refusal resets the stream and drops what came."""
        kwargs: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            behavior = _read_after_gate(self._limit, handler.unary_unary)
            return grpc.stream_unary_rpc_method_handler(
                self._observer.unary(method, behavior, self._gate_first), **kwargs
            )
        if handler.unary_stream is None:
            raise ValueError(f"{method}: memstore's services take no client streams")
        return grpc.stream_stream_rpc_method_handler(
            self._observer.stream(method, self._stream_after_gate(handler.unary_stream)),
            **kwargs,
        )

    def unknown_methods(self) -> GenericHandler:
        """The handler of every method no other serves, to be added last: it refuses the
        call as gRPC's core would (UNIMPLEMENTED), but observed, counted under the one
        method label UNKNOWN_METHOD (the caller chooses the name: one label per name would
        grow the metrics without bound) and access-logged with the name in its error."""
        return _UnknownMethods(self._observer)

    def _counted(
        self, behavior: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def handler(requests: Any, context: Context) -> AsyncIterator[Any]:
            self.streams_open += 1
            try:
                async for response in behavior(requests, context):
                    yield response
            finally:
                self.streams_open -= 1

        return handler

    async def _gate_first(self, _requests: Any, context: Context, metadata: Any) -> int:
        """The call's project (AuthGate.enter), before its request is read.

        The call holds a slot under the cap while its key is checked, as before (a call
        refused for overload costs no key check, and key checks in flight stay bounded),
        but not while its request arrives: it takes one again once the request is in
        (_read_after_gate, _limited_stream), so that a client that sends half a request
        and stalls holds none."""
        limit = self._limit
        try:
            limit.enter()
        except MemstoreError as error:
            await abort(context, error)
        try:
            return await self._gate.enter(context, metadata)
        finally:
            limit.leave()

    def _stream_after_gate(
        self, behavior: Callable[..., Any]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        """A response stream whose one request is read after the gate, then counted against
        the cap; its key is checked again before each message (AuthGate.recheck)."""
        limited = _limited_stream(self._limit, _guard_stream(behavior))

        async def handler(_requests: Any, context: Context) -> AsyncIterator[Any]:
            metadata = context.invocation_metadata()
            project = await self._gate_first(_requests, context, metadata)
            request = await _read_one(context)
            responses = limited(request, context)
            async for response in self._gate.recheck(responses, context, metadata, project):
                yield response

        return handler


#: The method label of calls to a method the server does not serve.
UNKNOWN_METHOD = "unknown"


class _UnknownMethods(GenericHandler):
    """Answers every method with an observed refusal (Wrapping.unknown_methods)."""

    def __init__(self, observer: Observer) -> None:
        self._observer = observer

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        error = Unimplemented(f"no such method: {handler_call_details.method}")

        async def refuse(requests: Any, context: Context) -> AsyncIterator[Any]:
            # Any kind of call (unary or streaming, either side) takes a refusal from a
            # stream-stream handler: no request is read, no answer sent but the status.
            await abort(context, error)
            yield  # pragma: no cover - abort raises; the yield makes this a stream

        return grpc.stream_stream_rpc_method_handler(self._observer.stream(UNKNOWN_METHOD, refuse))


async def _admit(limit: CallLimit, context: Context) -> None:
    try:
        limit.enter_task()
    except MemstoreError as error:
        await abort(context, error)


#: What context.read() gives once the client ended its side (grpc.aio's stubs lack it).
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]
#: The refusal of a unary call that ended its side without sending its request.
NO_REQUEST = InvalidArgument.field(
    "request", "the call ended without its request message", reason="MALFORMED_REQUEST"
)


def _read_after_gate(
    limit: CallLimit, behavior: Callable[..., Any]
) -> Callable[[Any, Context], Awaitable[Any]]:
    """A unary `behavior` served as a client stream: its one request read after the gate
    (Wrapping._gate_first), then the call counted against the cap."""

    async def handler(_requests: Any, context: Context) -> Any:
        request = await context.read()
        if request is _EOF:  # not _read_one: a coroutine less on every call
            await _no_request(context)
        await _admit(limit, context)
        track_call()
        return await behavior(request, context)

    return handler


async def _read_one(context: Context) -> Any:
    """The call's request; the call refused when the client ended its side without one
    (_no_request)."""
    request = await context.read()
    if request is _EOF:
        await _no_request(context)
    return request


async def _no_request(context: Context) -> None:
    """Refuses a call that ended its side without a request.

    Raises:
        asyncio.CancelledError: gRPC's core ended the call itself (its message was past
            the receive limit: the core answered RESOURCE_EXHAUSTED), or the client did.
    """
    try:
        await abort(context, NO_REQUEST)
    except grpc.aio.AbortError:
        raise
    except Exception as error:  # ExecuteBatchError: the call is over, no status can go
        raise asyncio.CancelledError from error


def _limited_stream(
    limit: CallLimit, method: Callable[[Any, Context], AsyncIterator[Any]]
) -> Callable[[Any, Context], AsyncGenerator[Any, None]]:
    async def handler(request: Any, context: Context) -> AsyncGenerator[Any, None]:
        await _admit(limit, context)
        disarm = None
        try:
            async for response in method(request, context):
                # Until the client has taken this answer (the generator resumes): a stream
                # it never reads is cancelled after --send-stall-timeout (limit.watch_send).
                disarm = watch_send(limit.send_stall, till_done=False)
                yield response
                disarm()
        finally:
            if disarm is not None:
                disarm()

    return handler


def _guard_stream(
    method: Callable[[Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        track_call()
        if isinstance(request, Malformed):
            await abort(context, request.error)
        async for response in method(request, context):
            yield response

    return handler


def _refusing_malformed(behavior: Callable[[Any, Context], Any]) -> Callable[[Any, Context], Any]:
    # A plain function, not a coroutine: what `behavior` gives (a coroutine, an async
    # iterator, or a coroutine that writes with context.write: grpc's health Watch) goes on
    # to the observer as it is, and a refusal is a coroutine that raises when awaited.
    def handler(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            return abort(context, request.error)
        return behavior(request, context)

    return handler


def _refusing_malformed_stream(
    behavior: Callable[[Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    # Each request of a client stream is parsed as it comes: the first that protobuf could
    # not parse ends the call.
    async def checked(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                await abort(context, request.error)
            yield request

    def handler(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        return behavior(checked(requests, context), context)

    return handler


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    # A stream may yield a chunk already serialized (WireChunk, encoded by PostgreSQL);
    # protobuf messages concatenate, so its bytes go out as they are.
    def serializer(response: Any) -> bytes:
        if type(response) is WireChunk:
            return response.data
        return serialize(response)

    return serializer


def _bytes_unary(
    request_class: Any,
    implementation: Callable[[Any, Context], Awaitable[Any]],
    send_stall: float,
) -> Callable[[bytes, Context], Awaitable[bytes]]:
    """`implementation` over bytes: the request parsed, and the answer serialized, here rather
    than by grpc.aio, which did both on the event loop both ports share: at AddMemory's cap, a
    few tenths of a second each (tests/reliability/test_loop_stalls.py). A request of
    OFF_LOOP_BYTES or more is parsed in a thread, in pieces (serving/wire.py); an answer the
    handler serialized itself (bytes: in a thread and in pieces when large) is sent as it is,
    any other is serialized here. Once the answer is ready, a client that does not take it
    within `send_stall` seconds has its call cancelled (limit.watch_send)."""
    parse = tolerant_deserializer(request_class)
    parse_in_pieces = tolerant_deserializer(request_class, wire.parse)

    async def handler(data: bytes, context: Context) -> bytes:
        size = len(data)
        off_loop.request_bytes.set(size)
        if size < off_loop.OFF_LOOP_BYTES:
            request = parse(data)
        else:
            request = await off_loop.run(size, parse_in_pieces, data)
        if isinstance(request, Malformed):
            await abort(context, request.error)
        response = await implementation(request, context)
        serialized: bytes = response if type(response) is bytes else response.SerializeToString()
        watch_send(send_stall)
        return serialized

    return handler


def register_service(
    server: grpc.aio.Server,
    module: ModuleType,
    name: str,
    servicer: object,
    wrap: Wrap,
    *,
    send_stall: float = SEND_STALL_SECONDS,
) -> str:
    """Registers `servicer` for service `name` of `module`; returns the full service name.
    A unary answer the client has not taken `send_stall` seconds after it was ready ends
    its call (limit.watch_send)."""
    service: descriptor.ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name)
        response_class = getattr(module, method.output_type.name)
        implementation = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                implementation,
                request_deserializer=tolerant_deserializer(request_class),
                response_serializer=_passing_bytes(response_class.SerializeToString),
            )
        else:
            # Bytes both ways (grpc.aio hands over and sends bytes when a handler has no
            # deserializer or serializer): _bytes_unary decides where each is done.
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _bytes_unary(request_class, implementation, send_stall)
            )
    register(server, service.full_name, handlers, wrap)
    return str(service.full_name)

"""Every RPC's handler wrapped once, when it is registered: metrics, access line, request id, auth.

grpc.aio runs its server interceptors as a chain of coroutines on every call just to find
the handler; the same behaviour applied to each method's handler at registration costs a
call nothing but the wrapper itself (docs/performance.md, "Serving without interceptors").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
    #: Wraps the handler of one method (its full name, "/package.Service/Method").
    Wrap = Callable[[str, grpc.RpcMethodHandler[Any, Any]], grpc.RpcMethodHandler[Any, Any]]
else:  # the runtime classes are not generic; only their stubs are
    GenericHandler = grpc.GenericRpcHandler
    Wrap = Callable[[str, Any], Any]
#: Wraps a handler's behaviour (request or request iterator, context).
Behavior = Callable[..., Any]


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary: Behavior,
    stream: Behavior,
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behaviour wrapped: `unary` for a single response, `stream`
    for a response stream, whatever the request side is; `deserializer`, when given, parses
    its requests instead of the handler's own."""
    kwargs: dict[str, Any] = {
        "request_deserializer": deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    assert handler.stream_stream is not None  # the only kind left
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)


def register(
    server: grpc.aio.Server,
    service: str,
    handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
    wrap: Wrap,
) -> None:
    """Registers `handlers` of `service` (by method name), each wrapped once by `wrap`."""
    wrapped = {name: wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
    # The generated stubs call "registered" methods; this is their faster lookup path.
    server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]


class WrappingServer:
    """A server as generated `add_*Servicer_to_server` functions see it: what they register
    is wrapped by `wrap` first (grpc's health service, whose registration we do not write)."""

    def __init__(self, server: grpc.aio.Server, wrap: Wrap) -> None:
        self._server = server
        self._wrap = wrap

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[GenericHandler]) -> None:
        """Adds each generic handler, answering with wrapped handlers."""
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(h, self._wrap) for h in generic_handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Adds the registered (fast lookup) handlers of `service`, each wrapped once."""
        wrapped = {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]


class _WrappedGeneric(GenericHandler):
    """A generic handler whose answers are wrapped, each method's once (checked by identity)."""

    def __init__(self, inner: GenericHandler, wrap: Wrap) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method)
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(method, handler))
        return cached[1]

"""What the server's interceptors share: re-wrapping a handler's behaviour by RPC kind."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    #: What intercept_service is given to reach the next interceptor (or the handler).
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:  # the runtime classes are not generic; only their stubs are
    ServerInterceptor = grpc.aio.ServerInterceptor
    Continuation = Callable[..., Any]

#: Turns a handler's behaviour (request or request iterator, context) into a wrapped one.
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any], *, unary: Wrap, stream: Wrap
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with its behaviour wrapped: `unary` for a single response, `stream`
    for a response stream, whatever the request side is."""
    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
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

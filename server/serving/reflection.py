"""gRPC server reflection, so `grpcurl list` and `describe` work with no proto files at hand."""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

# What reflection.enable_server_reflection serves on a grpc.aio server (public there as
# `reflection.aio`, a name its stubs do not export).
from grpc_reflection.v1alpha._async import ReflectionServicer

from server.serving.handlers import Wrap, WrappingServer


class _MethodAwarePool:
    """The descriptor pool as reflection sees it, plus the files of RPC methods.

    grpcurl's `describe memstore.v1.SessionService.AddMemory` asks reflection for the file
    containing a method symbol; Python's pool knows services and messages but not methods,
    so it would answer NOT_FOUND. Everything else goes to the real pool unchanged.
    """

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, name: str) -> descriptor.FileDescriptor:
        """The file of a symbol, methods included (KeyError when unknown)."""
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service_name, _, method = name.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                raise KeyError(name) from None
            if method not in service.methods_by_name:
                raise KeyError(name) from None
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(server: grpc.aio.Server, services: list[str], wrap: Wrap) -> None:
    """Serves reflection for `services`, health and reflection itself on `server`, its
    handler wrapped by `wrap` (as reflection.enable_server_reflection registers it, which
    takes no wrapper)."""
    names = [
        *services,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    # Duck-typed: reflection only calls the pool's Find* methods.
    pool = cast(descriptor_pool.DescriptorPool, _MethodAwarePool(descriptor_pool.Default()))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        ReflectionServicer(names, pool=pool), WrappingServer(server, wrap)
    )

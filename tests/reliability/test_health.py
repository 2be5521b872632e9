"""Health through the whole server (interceptors included): Check and Watch both answer."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_watch_streams_the_status_through_every_interceptor(
    channel: grpc.aio.Channel,
) -> None:
    # Regression: the metrics interceptor iterated every server-streaming handler, but
    # grpc's health Watch sends with context.write, so every Watch failed with UNKNOWN.
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "memstore.v1.SessionService"):
        stream = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
        first = await stream.read()
        assert first.status == SERVING, service
        stream.cancel()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == SERVING

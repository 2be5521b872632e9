"""Health through the whole server (interceptors included): Check and Watch both answer."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.serving.grpc_health import DrainingHealth, Readiness

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


class _RecordingContext:
    """What Watch needs of a servicer context: write()."""

    def __init__(self) -> None:
        self.written: list[health_pb2.HealthCheckResponse] = []

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self.written.append(message)


async def test_a_watch_that_arrives_after_the_drain_ends_at_once() -> None:
    # Watches open at the drain are cancelled; one that starts later must not wait for a
    # status change that never comes and hold the shutdown for the whole grace period.
    health = DrainingHealth()
    await health.set("", SERVING)
    await health.enter_graceful_shutdown()
    health.end_watches()
    context = _RecordingContext()
    watch = asyncio.ensure_future(health.Watch(health_pb2.HealthCheckRequest(), context))
    # Not wait_for: cancelling a Watch after the drain also ends it without an error.
    done, _ = await asyncio.wait({watch}, timeout=2)
    assert done == {watch}, "the late Watch is still waiting"
    assert [m.status for m in context.written] == [health_pb2.HealthCheckResponse.NOT_SERVING]


class _Store:
    """What Readiness needs of a store: a listener slot for the database's state."""

    def on_database_change(self, listener: object) -> None:
        self.listener = listener


async def test_the_drain_turns_every_status_not_serving_for_good() -> None:
    # test_sigterm.py watches the overall status through a real SIGTERM; the README says every
    # status, the services' too, turns NOT_SERVING, and that the database's return does not
    # bring them back during the drain.
    health = DrainingHealth()
    services = ["memstore.v1.UserService", "memstore.v1.SessionService"]
    readiness = Readiness(health, services)
    await readiness.start(_Store())  # type: ignore[arg-type]
    await readiness.drain(0)
    await readiness.database_changed(True)
    for name in ["", *services]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), None)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, name

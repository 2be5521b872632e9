"""The gRPC tier is stateless: two `memstore serve` behind client-side round-robin, one killed.

docs/scaling.md's claim, proven with real processes on one database: a client that balances
calls over two replicas (`grpc.lb_policy_name` round_robin) and retries UNAVAILABLE keeps
writing when one replica dies mid-load, and every AddMemory it saw acknowledged is stored,
exactly once and in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

import grpc

from memstore.v1 import resources_pb2, session_service_pb2, session_service_pb2_grpc
from tests.processes import serve_memstore, stop_memstore
from tests.test_workers import _ESTABLISHED, _sockets

WRITERS = 4
TURNS = 40
#: Retries of UNAVAILABLE inside the channel (AddMemory is idempotent by message uuid).
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "memstore.v1.SessionService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


async def _add(
    stub: session_service_pb2_grpc.SessionServiceStub, session_id: str, message_id: str, n: int
) -> int:
    """One acknowledged AddMemory, retried by the caller on UNAVAILABLE; returns the retries."""
    request = session_service_pb2.AddMemoryRequest(
        session_id=session_id,
        messages=[
            resources_pb2.Message(
                uuid=message_id,
                role="agent",
                role_type=resources_pb2.ROLE_TYPE_ASSISTANT,
                content=f"turn {n}",
            )
        ],
    )
    for attempt in range(20):
        try:
            await stub.AddMemory(request, timeout=10)
            return attempt
        except grpc.aio.AioRpcError as error:
            # Only "the replica went away" is retried; anything else fails the test.
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            await asyncio.sleep(0.05)
    raise AssertionError("AddMemory never acknowledged")


async def test_round_robin_client_survives_a_killed_replica(clean_db: str) -> None:
    env = {**os.environ, "DATABASE_URL": clean_db}
    first, first_port = serve_memstore(env=env)
    second, second_port = serve_memstore(env=env)
    try:
        target = f"ipv4:127.0.0.1:{first_port},127.0.0.1:{second_port}"
        options = [
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
        ]
        acknowledged: dict[str, list[str]] = {f"tier-{w}": [] for w in range(WRITERS)}
        killed = asyncio.Event()
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = session_service_pb2_grpc.SessionServiceStub(channel)

            async def writer(session_id: str) -> None:
                for n in range(TURNS):
                    message_id = str(uuid.uuid4())
                    await _add(stub, session_id, message_id, n)
                    acknowledged[session_id].append(message_id)
                    if session_id == "tier-0" and n == TURNS // 3:
                        # Round-robin holds a connection to each replica: both serve calls.
                        assert _sockets(first.pid, first_port, _ESTABLISHED) > 0
                        assert _sockets(second.pid, second_port, _ESTABLISHED) > 0
                        first.send_signal(signal.SIGKILL)
                        killed.set()

            await asyncio.gather(*(writer(s) for s in acknowledged))
            assert killed.is_set()
            first.communicate(timeout=10)  # reaps it and closes its output pipe
            assert first.returncode == -signal.SIGKILL

            # Read back through the same channel: only the survivor answers now.
            for session_id, ids in acknowledged.items():
                page = await stub.ListMessages(
                    session_service_pb2.ListMessagesRequest(session_id=session_id, page_size=1000)
                )
                stored = [m.uuid for m in page.messages]
                assert stored == ids, f"{session_id}: stored {len(stored)} of {len(ids)} acked"
                assert [m.content for m in page.messages] == [f"turn {n}" for n in range(TURNS)]
    finally:
        if first.poll() is None:
            stop_memstore(first)
        code, out = stop_memstore(second)
        assert code == 0, out

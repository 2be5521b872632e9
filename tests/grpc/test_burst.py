"""A burst of calls larger than gRPC's backlog of calls not yet picked up: no CANCELLED.

gRPC's core server refuses a call when more than `grpc.server.max_pending_requests` (default
1,000) wait for the application to pick them up, and the caller gets CANCELLED, which says
the caller gave up (clients do not retry it) and which no RPC of memstore documents. 1,500
concurrent CreateUser on one channel got 41-61 CANCELLED (and no access-log line: the server
never saw them). Overload is memstore's to answer, with RESOURCE_EXHAUSTED and its reason
SERVER_OVERLOADED (--pool-max-waiting), so the backlog is set past any burst.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from memstore.v1 import user_service_pb2 as upb
from tests.grpc import Code, Users

BURST = 1500


async def test_a_burst_of_calls_is_refused_as_overload_never_cancelled(users: Users) -> None:
    async def create(i: int) -> grpc.StatusCode:
        try:
            await users.CreateUser(upb.CreateUserRequest(user_id=f"u{i}"), timeout=60)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return Code.OK

    codes = Counter(await asyncio.gather(*(create(i) for i in range(BURST))))
    assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}, codes
    listed = await users.ListUsers(upb.ListUsersRequest(page_size=1), timeout=60)
    assert listed.total_size == codes[Code.OK], codes  # what was refused was not written

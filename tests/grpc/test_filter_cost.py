"""metadata_contains filters are bounded: each array element of one is a scan of every stored
array it is looked up in, so their number is limited (docs/reliability.md, Hostile input)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from memstore.v1 import session_service_pb2 as ss
from server.api.metadata_checks import MAX_FILTER_ELEMENTS
from tests.grpc import Code, Sessions, msg, rpc_error, struct

#: Stored arrays as long as 64 KiB of metadata holds (10,000 integers: 58,890 bytes).
_LONG = list(range(10_000))


@pytest.mark.parametrize(
    "contains",
    [
        {"tags": list(range(MAX_FILTER_ELEMENTS + 1))},
        # Nested arrays count too: 2 + 2 + 4 + 1 elements (an object is one).
        {"a": [[1, 2], [3, 4, 5, {"b": [6]}]]},
        # Arrays under different keys add up.
        {"a": list(range(5)), "b": {"c": list(range(MAX_FILTER_ELEMENTS - 4))}},
    ],
)
async def test_a_filter_of_too_many_array_elements_is_refused_naming_it(
    sessions: Sessions, contains: dict[str, Any]
) -> None:
    # Before, such a filter was served: 100 elements against 200 sessions holding an array
    # of 10,000 took 18.5 s, and 1,000 ran into the 30 s statement timeout.
    listing = sessions.ListSessions(ss.ListSessionsRequest(metadata_contains=struct(contains)))
    error = await rpc_error(listing, Code.INVALID_ARGUMENT, field="metadata_contains")
    assert f"at most {MAX_FILTER_ELEMENTS}" in (error.details() or "")
    search = sessions.SearchMemory(
        ss.SearchMemoryRequest(text="pasta", metadata_contains=struct(contains))
    )
    error = await rpc_error(search, Code.INVALID_ARGUMENT, field="metadata_contains")
    assert f"at most {MAX_FILTER_ELEMENTS}" in (error.details() or "")


async def test_the_largest_filter_allowed_is_served_against_the_longest_arrays(
    sessions: Sessions,
) -> None:
    # The costliest filter allowed: every element is present, at the far end of each stored
    # array, so each is a scan of all 10,000. 20 sessions and 20 messages hold them.
    metadata = struct({"tags": _LONG, "plan": "pro"})
    await asyncio.gather(
        *(
            sessions.CreateSession(ss.CreateSessionRequest(session_id=f"s{i}", metadata=metadata))
            for i in range(20)
        )
    )
    messages = [msg(f"pasta {i}", metadata=metadata) for i in range(20)]
    await sessions.AddMemory(ss.AddMemoryRequest(session_id="m", messages=messages))
    worst = struct({"tags": _LONG[::-1][:MAX_FILTER_ELEMENTS], "plan": "pro"})
    listed = await sessions.ListSessions(
        ss.ListSessionsRequest(page_size=1, metadata_contains=worst), timeout=20
    )
    assert listed.total_size == 20
    found = await sessions.SearchMemory(
        ss.SearchMemoryRequest(text="pasta", limit=3, metadata_contains=worst), timeout=20
    )
    assert len(found.results) == 3
    # An element absent from the stored arrays matches nothing.
    absent = struct({"tags": [10_000]})
    none = await sessions.ListSessions(ss.ListSessionsRequest(metadata_contains=absent))
    assert none.total_size == 0

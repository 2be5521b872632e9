"""Regression: metadata of many small keys merges in linear time (found by the fuzz tests).

memstore_merge_patch used to copy the whole object once per key, so a 64 KiB object of
small keys cost seconds of database CPU under a row lock (migration 0005 fixed it).
"""

from __future__ import annotations

import json
import time

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb
from server.validation import MAX_METADATA_BYTES
from tests.grpc import Sessions, Users, as_dict, msg, struct
from tests.reliability import record


def _widest() -> dict[str, int]:
    """As many keys as fit in the metadata limit (about 7,900)."""
    wide: dict[str, int] = {}
    i = 0
    while len(json.dumps(wide, separators=(",", ":"))) < MAX_METADATA_BYTES - 16:
        wide[str(i)] = 0
        i += 1
    return wide


async def test_the_widest_metadata_merges_in_well_under_a_second(
    users: Users, sessions: Sessions
) -> None:
    wide = _widest()
    timings = {}
    start = time.monotonic()
    await users.CreateUser(upb.CreateUserRequest(user_id="wide", metadata=struct(wide)), timeout=30)
    timings["create"] = time.monotonic() - start
    start = time.monotonic()
    patch = {key: 1 for key in wide}
    got = await users.UpdateUser(
        upb.UpdateUserRequest(user_id="wide", metadata=struct(patch)), timeout=30
    )
    timings["merge"] = time.monotonic() - start
    assert as_dict(got.user.metadata) == patch
    start = time.monotonic()
    await sessions.AddMemory(
        spb.AddMemoryRequest(session_id="wide", messages=[msg("m", metadata=struct(wide))] * 4),
        timeout=30,
    )
    timings["add_4_messages"] = time.monotonic() - start
    # Quadratic merging took 1.8 s, 2.9 s and 6 s here; linear merging about 0.1 s a
    # merge, the rest being the Python side of 30,000 keys.
    assert timings["create"] < 1.0, timings
    assert timings["merge"] < 1.0, timings
    assert timings["add_4_messages"] < 2.5, timings
    record("wide_metadata", keys=len(wide), **{k: round(v, 3) for k, v in timings.items()})

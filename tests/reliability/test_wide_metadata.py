"""Regression: metadata of many small keys merges in linear time (found by the fuzz tests).

A memstore_merge_patch that copies the whole object once per key (migration 0001's) makes a
64 KiB object of small keys cost seconds of database CPU under a row lock; 0005 replaces it.
"""

from __future__ import annotations

import json
import time

import psycopg

from memstore.v1 import session_service_pb2 as spb
from memstore.v1 import user_service_pb2 as upb
from server.api.validation import MAX_METADATA_BYTES, json_size
from tests.grpc import Sessions, Users, as_dict, msg, struct
from tests.reliability import record


def _widest() -> dict[str, int]:
    """As many keys as fit in the metadata limit (about 6,000)."""
    wide: dict[str, int] = {}
    size = 2  # {}
    while size < MAX_METADATA_BYTES - 32:
        key = str(len(wide))
        wide[key] = 0
        size += len(key) + 7  # "key": 0, (jsonb's text form: see validation.json_size)
    return wide


async def test_merge_patch_is_linear_in_the_number_of_keys(clean_db: str) -> None:
    # Straight in SQL, with more keys than the API allows, to leave no doubt: quadratic
    # merging took about 1.3 s for 7,400 keys, so tens of seconds for these 30,000.
    wide = json.dumps({str(i): i for i in range(30_000)})
    async with await psycopg.AsyncConnection.connect(clean_db) as conn:
        start = time.monotonic()
        cur = await conn.execute(
            "SELECT memstore_merge_patch(%s::jsonb, %s::jsonb) = %s::jsonb", [wide, wide, wide]
        )
        took = time.monotonic() - start
        assert await cur.fetchone() == (True,)
    assert took < 3.0, took
    record("merge_patch_30000_keys", seconds=round(took, 3))


async def test_the_widest_metadata_is_merged_quickly_and_right(
    users: Users, sessions: Sessions
) -> None:
    wide = _widest()
    assert MAX_METADATA_BYTES - 32 <= json_size(wide) <= MAX_METADATA_BYTES
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
    # Quadratic merging took 1.8 s, 2.9 s and 6 s here, linear about 0.1-0.5 s, mostly the
    # Python side of 30,000 keys (generous bounds: the machine may be busy).
    assert max(timings.values()) < 5.0, timings
    record("wide_metadata", keys=len(wide), **{k: round(v, 3) for k, v in timings.items()})
